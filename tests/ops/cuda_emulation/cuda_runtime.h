// Host emulation of the CUDA runtime and the device built-ins csrc/cuda uses, for tests/ops/test_cuda_emulated.py:
// the kernels compile as C++17 with this header in place of the real cuda_runtime.h and run on the host, the 32
// lanes of a warp as coroutines that meet at every shuffle, warp after warp.
// It checks what a GPU would not report: a 16-byte load from an unaligned address aborts, and so does a warp
// whose lanes stop meeting at a shuffle (a partial-warp return before a reduction).
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

using std::max;
using std::min;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidDevice = 101 };
using cudaStream_t = struct CUstream_st*;
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : e == cudaErrorInvalidDevice ? "invalid device ordinal" : "invalid argument";
}

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

namespace gfemu {
constexpr int kDevices = 2;  // emulated devices (the device guard's tests use cuda:1)
inline int current_device = 0;
inline dim3 thread_idx, block_idx, block_dim, grid_dim;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

// The 32 lanes of a warp are coroutines (ucontext) on one thread: each runs until it reaches a warp-level sync
// (half of a shuffle) or returns, then the next lane runs; a warp goes on once every lane has reached the sync.
struct Warp {
  static constexpr size_t kStack = 256 << 10;
  ucontext_t sched;
  ucontext_t ctx[32];
  std::vector<char> stacks = std::vector<char>(32 * kStack);
  bool done[32];
  double slots[32];
  std::function<void()> body;  // the kernel, for the lane that runs
};
inline Warp* warp = nullptr;
inline int lane = 0;

inline void lane_main() {
  warp->body();
  warp->done[lane] = true;  // then back to the scheduler (uc_link)
}

inline void sync() { swapcontext(&warp->ctx[lane], &warp->sched); }

template <typename T>
T shfl_xor(T v, int off) {
  static_assert(sizeof(T) <= sizeof(double), "shuffle of at most 8 bytes");
  std::memcpy(&warp->slots[lane], &v, sizeof(T));
  sync();
  T r;
  std::memcpy(&r, &warp->slots[lane ^ off], sizeof(T));
  sync();
  return r;
}

template <typename... P>
void run(void (*kernel)(P...), dim3 grid, dim3 block, std::tuple<std::decay_t<P>...> params) {
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads % 32 != 0 || threads > 1024) fail("a block must be 1 to 32 whole warps");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) fail("invalid grid");
  static Warp w;
  warp = &w;
  w.body = [&] { std::apply(kernel, params); };
  block_dim = block;
  grid_dim = grid;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx)
        for (unsigned w0 = 0; w0 < threads; w0 += 32) {
          for (int l = 0; l < 32; ++l) {
            getcontext(&w.ctx[l]);
            w.ctx[l].uc_stack.ss_sp = w.stacks.data() + l * Warp::kStack;
            w.ctx[l].uc_stack.ss_size = Warp::kStack;
            w.ctx[l].uc_link = &w.sched;
            makecontext(&w.ctx[l], lane_main, 0);
            w.done[l] = false;
          }
          for (;;) {  // rounds: every lane that has not returned runs to its next sync
            int finished = 0, waiting = 0;
            for (int l = 0; l < 32; ++l) {
              if (w.done[l]) {
                ++finished;
                continue;
              }
              lane = l;
              thread_idx = dim3(w0 + l);
              block_idx = dim3(bx, by, bz);
              swapcontext(&w.sched, &w.ctx[l]);
              ++(w.done[l] ? finished : waiting);
            }
            if (waiting == 0) break;
            if (finished) fail("a warp's lanes did not all reach a shuffle");
          }
        }
}

// kernel<<<grid, block, smem, stream>>>(args) is rewritten as make_launch(kernel, grid, block, smem, stream)(args)
template <typename... P>
auto make_launch(void (*kernel)(P...), dim3 grid, dim3 block, int = 0, cudaStream_t = nullptr) {
  return [=](auto&&... args) { run(kernel, grid, block, std::tuple<std::decay_t<P>...>(args...)); };
}
}  // namespace gfemu

#define threadIdx (::gfemu::thread_idx)
#define blockIdx (::gfemu::block_idx)
#define blockDim (::gfemu::block_dim)
#define gridDim (::gfemu::grid_dim)

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int off, int = 32) {
  return ::gfemu::shfl_xor(v, off);
}
inline uint4 __ldg(const uint4* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) ::gfemu::fail("a 16-byte load from an unaligned address");
  return *p;
}
template <typename T>
inline T atomicAdd(T* p, T v) {  // the lanes run one at a time
  const T old = *p;
  *p = old + v;
  return old;
}

inline cudaError_t cudaGetDevice(int* d) {
  *d = ::gfemu::current_device;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
  if (d < 0 || d >= ::gfemu::kDevices) return cudaErrorInvalidDevice;
  ::gfemu::current_device = d;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = ::gfemu::kDevices;
  return cudaSuccess;
}
inline cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 13000;
  return cudaSuccess;
}
