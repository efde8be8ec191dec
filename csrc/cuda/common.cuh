// What the CUDA kernels share: error checks, the device guard, 16-byte vector loads, warp sums and the launch
// of the row kernels (one warp per token row, all of a launch's directions per read of the row).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../common/dtype.h"
#include "check.h"
#include "ops.h"

namespace gf {

template <typename TA, typename TV>
using acc_t = std::conditional_t<std::is_same_v<TA, double> || std::is_same_v<TV, double>, double, float>;

// Makes ``device`` current for a launch and restores the previous device on exit (also when the launch
// throws). The static runtime of this module and torch's runtime share the thread's current context, so a
// cudaSetDevice here without the restore would move torch's current device too.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device_) check(cudaSetDevice(device_), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (prev_ != device_) cudaSetDevice(prev_);  // nothing to report to from a destructor
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int prev_ = -1;
};

template <typename A>
__device__ __forceinline__ A warp_sum(A s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  return s;
}

// elements per lane and step of the vector path: 16 bytes of the narrower of two element types
template <typename T1, typename T2>
constexpr int vec_elems() {
  return static_cast<int>(16 / (sizeof(T1) < sizeof(T2) ? sizeof(T1) : sizeof(T2)));
}

template <typename T>
union Pack16 {
  uint4 raw;
  T e[16 / sizeof(T)];
};

// E consecutive elements from a 16-byte aligned address, as A (E · sizeof(T) is a multiple of 16)
template <int E, typename A, typename T>
__device__ __forceinline__ void load_vec(const T* p, A (&out)[E]) {
  constexpr int W = static_cast<int>(16 / sizeof(T));
  static_assert(E % W == 0, "a vector step must be whole 16-byte loads");
#pragma unroll
  for (int j = 0; j < E / W; ++j) {
    Pack16<T> pk;
    pk.raw = __ldg(reinterpret_cast<const uint4*>(p) + j);
#pragma unroll
    for (int e = 0; e < W; ++e) out[j * W + e] = load<A>(pk.e, e);
  }
}

// token rows (one warp each) per block of the row kernels: N = 4096 tokens give 1024 blocks for 132 SMs
constexpr int kRowWarps = 4;
// blocks per SM the row kernels are compiled for (__launch_bounds__: at most 128 registers a thread). Without
// it ptxas 13 picks 72 registers for norm_dot on sm_80 and spills 8 bytes.
constexpr int kRowMinBlocks = 4;

// Launches ``kernel(args, k0, kn)`` over N rows for each group of at most kMaxKPerLaunch directions.
template <typename Args>
void launch_rows(void (*kernel)(Args, int64_t, int), const Args& args, int64_t N, int64_t K, cudaStream_t s,
                 const char* what) {
  const int64_t blocks = (N + kRowWarps - 1) / kRowWarps;
  if (blocks > INT_MAX) throw std::invalid_argument(std::string(what) + ": too many rows for one grid");
  for (int64_t k0 = 0; k0 < K; k0 += kMaxKPerLaunch) {
    const int kn = static_cast<int>(std::min<int64_t>(kMaxKPerLaunch, K - k0));
    kernel<<<static_cast<unsigned>(blocks), kRowWarps * 32, 0, s>>>(args, k0, kn);
    check(cudaGetLastError(), what);
  }
}

template <typename A>
__device__ __forceinline__ void store_out(const Out& o, int64_t k, int64_t t, A v) {
  static_cast<A*>(o.p)[k * o.s0 + t * o.s1] = v;
}

}  // namespace gf
