// CUDA kernels of the op contract (geffect_fast/ops/reference.py is the spec).
//
// All kernels accumulate in float (double when an input is float64), write [K, B] outputs that the
// launcher zeroes first on the same stream, and reduce per token before one atomicAdd per token and
// output tile into out[k, seg[t]].
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "../common/dtype.h"
#include "ops.h"

namespace gf {
namespace {

template <typename TA, typename TV>
using acc_t = std::conditional_t<std::is_same_v<TA, double> || std::is_same_v<TV, double>, double, float>;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

__device__ __forceinline__ int64_t dev_index(const void* p, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(p)[i] : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

// ---------------------------------------------------------------------------------------------------
// linear_dot: a 64 tokens x 64 outputs tile per block, 256 threads each holding a 4 x 4 micro-tile of
// P = a Vᵀ, reduction dim I staged through shared memory 16 at a time. The epilogue multiplies P by g,
// sums over the thread's 4 outputs, then over the 16 threads of a token row by warp shuffles.
// ---------------------------------------------------------------------------------------------------
constexpr int BN = 64, BO = 64, BI = 16, TM = 4;

template <typename TA, typename TV>
__global__ void __launch_bounds__(256) linear_dot_kernel(LinearArgs x) {
  using A = acc_t<TA, TV>;
  __shared__ A As[BI][BN];
  __shared__ A Vs[BI][BO];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN, o0 = static_cast<int64_t>(blockIdx.y) * BO;
  const int64_t k = blockIdx.z;
  const TA* a = static_cast<const TA*>(x.a.p);
  const TA* g = static_cast<const TA*>(x.g.p);
  const TV* v = static_cast<const TV*>(x.v.p);
  const TV* vb = static_cast<const TV*>(x.vb.p);
  const bool has_w = v != nullptr && x.out_w != nullptr;
  const bool has_b = vb != nullptr && x.out_b != nullptr;

  A acc[TM][TM];
#pragma unroll
  for (int u = 0; u < TM; ++u)
#pragma unroll
    for (int j = 0; j < TM; ++j) acc[u][j] = A(0);

  if (has_w) {
    for (int64_t i0 = 0; i0 < x.I; i0 += BI) {
      // 1024 elements of each tile, 4 per thread
      for (int e = threadIdx.x; e < BI * BN; e += blockDim.x) {
        const int ii = e % BI, r = e / BI;
        const int64_t t = n0 + r, i = i0 + ii;
        As[ii][r] = (t < x.N && i < x.I) ? load<A>(a, t * x.a.s0 + i * x.a.s1) : A(0);
        const int64_t o = o0 + r;
        Vs[ii][r] = (o < x.O && i < x.I) ? load<A>(v, k * x.v.s0 + o * x.v.s1 + i * x.v.s2) : A(0);
      }
      __syncthreads();
#pragma unroll
      for (int ii = 0; ii < BI; ++ii) {
        A ar[TM], vr[TM];
#pragma unroll
        for (int u = 0; u < TM; ++u) ar[u] = As[ii][ty * TM + u];
#pragma unroll
        for (int j = 0; j < TM; ++j) vr[j] = Vs[ii][tx * TM + j];
#pragma unroll
        for (int u = 0; u < TM; ++u)
#pragma unroll
          for (int j = 0; j < TM; ++j) acc[u][j] += ar[u] * vr[j];
      }
      __syncthreads();
    }
  }

  // epilogue: per token, Σ over this thread's outputs of P·g (and g·vb)
#pragma unroll
  for (int u = 0; u < TM; ++u) {
    const int64_t t = n0 + ty * TM + u;
    A rw = 0, rb = 0;
    if (t < x.N) {
#pragma unroll
      for (int j = 0; j < TM; ++j) {
        const int64_t o = o0 + tx * TM + j;
        if (o < x.O) {
          const A gv = load<A>(g, t * x.g.s0 + o * x.g.s1);
          rw += acc[u][j] * gv;
          if (has_b) rb += gv * load<A>(vb, k * x.vb.s0 + o * x.vb.s1);
        }
      }
    }
    // the 16 threads sharing ty are 16 consecutive lanes of one warp
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) {
      rw += __shfl_xor_sync(0xffffffffu, rw, off, 16);
      rb += __shfl_xor_sync(0xffffffffu, rb, off, 16);
    }
    if (tx == 0 && t < x.N) {
      const int64_t b = dev_index(x.seg.p, x.seg.is64, t * x.seg.s0);
      if (has_w) atomicAdd(static_cast<A*>(x.out_w) + k * x.B + b, rw);
      if (has_b) atomicAdd(static_cast<A*>(x.out_b) + k * x.B + b, rb);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// embedding_dot and norm_dot: one warp per token, lanes striding over the feature dim.
// ---------------------------------------------------------------------------------------------------
constexpr int WARPS = 8;

template <typename A>
__device__ __forceinline__ A warp_sum(A s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  return s;
}

template <typename TA, typename TV>
__global__ void __launch_bounds__(WARPS * 32) embedding_dot_kernel(EmbeddingArgs x) {
  using A = acc_t<TA, TV>;
  const int lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * WARPS + threadIdx.x / 32;
  const int64_t k = blockIdx.y;
  if (t >= x.N) return;
  const int64_t id = dev_index(x.ids.p, x.ids.is64, t * x.ids.s0);
  if (id == x.padding_idx || id < 0 || id >= x.vocab) return;  // torch rejected bad ids in the forward already
  const TA* g = static_cast<const TA*>(x.g.p);
  const TV* v = static_cast<const TV*>(x.v.p);
  A s = 0;
  for (int64_t d = lane; d < x.D; d += 32)
    s += load<A>(g, t * x.g.s0 + d * x.g.s1) * load<A>(v, k * x.v.s0 + id * x.v.s1 + d * x.v.s2);
  s = warp_sum(s);
  if (lane == 0) atomicAdd(static_cast<A*>(x.out) + k * x.B + dev_index(x.seg.p, x.seg.is64, t * x.seg.s0), s);
}

template <typename TA, typename TV>
__global__ void __launch_bounds__(WARPS * 32) norm_dot_kernel(NormArgs x) {
  using A = acc_t<TA, TV>;
  const int lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * WARPS + threadIdx.x / 32;
  const int64_t k = blockIdx.y;
  if (t >= x.N) return;
  const TA* xh = static_cast<const TA*>(x.xhat.p);
  const TA* g = static_cast<const TA*>(x.g.p);
  const TV* vw = static_cast<const TV*>(x.vw.p);
  const TV* vb = static_cast<const TV*>(x.vb.p);
  A sw = 0, sb = 0;
  for (int64_t d = lane; d < x.D; d += 32) {
    const A gv = load<A>(g, t * x.g.s0 + d * x.g.s1);
    if (vw) sw += gv * load<A>(xh, t * x.xhat.s0 + d * x.xhat.s1) * load<A>(vw, k * x.vw.s0 + d * x.vw.s1);
    if (vb) sb += gv * load<A>(vb, k * x.vb.s0 + d * x.vb.s1);
  }
  sw = warp_sum(sw);
  sb = warp_sum(sb);
  if (lane == 0) {
    const int64_t b = dev_index(x.seg.p, x.seg.is64, t * x.seg.s0);
    if (vw && x.out_w) atomicAdd(static_cast<A*>(x.out_w) + k * x.B + b, sw);
    if (vb && x.out_b) atomicAdd(static_cast<A*>(x.out_b) + k * x.B + b, sb);
  }
}

// segment_outer: one thread per (r, c) element of the [KU, KW] product and chunk of TOK tokens; a thread sums
// u[t, r]·w[t, c] over runs of tokens of the same sample and adds each run's sum to out[seg, r, c] atomically
// (one atomic per run: tokens of a sample are usually contiguous).
constexpr int TOK = 64;

template <typename TU, typename TW>
__global__ void __launch_bounds__(256) segment_outer_kernel(SegOuterArgs x) {
  using A = acc_t<TU, TW>;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= x.KU * x.KW) return;
  const int64_t r = e / x.KW, c = e % x.KW;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * TOK, t1 = min(x.N, t0 + TOK);
  const TU* u = static_cast<const TU*>(x.u.p);
  const TW* w = static_cast<const TW*>(x.w.p);
  A* out = static_cast<A*>(x.out);
  int64_t cur = -1;
  A acc = 0;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = dev_index(x.seg.p, x.seg.is64, t * x.seg.s0);
    if (b != cur) {
      if (cur >= 0) atomicAdd(out + (cur * x.KU + r) * x.KW + c, acc);
      cur = b;
      acc = 0;
    }
    acc += load<A>(u, t * x.u.s0 + r * x.u.s1) * load<A>(w, t * x.w.s0 + c * x.w.s1);
  }
  if (cur >= 0) atomicAdd(out + (cur * x.KU + r) * x.KW + c, acc);
}

size_t acc_size(bool acc64) { return acc64 ? sizeof(double) : sizeof(float); }

void zero_out(void* p, int64_t n, bool acc64, cudaStream_t s) {
  if (p) check(cudaMemsetAsync(p, 0, n * acc_size(acc64), s), "cudaMemsetAsync");
}

template <typename TA, typename TV>
void check_acc(bool acc64) {
  if (acc64 != std::is_same_v<acc_t<TA, TV>, double>)
    throw std::invalid_argument("acc64 must be true exactly when an input is float64");
}

}  // namespace

#define GF_CUDA_DISPATCH(ta, tv, ...) GF_DISPATCH_TYPE(ta, TA_, GF_DISPATCH_TYPE(tv, TV_, __VA_ARGS__))

void cuda_linear_dot(const LinearArgs& x, int device, uintptr_t stream) {
  check(cudaSetDevice(device), "cudaSetDevice");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int tv = x.v.p ? x.v.dtype : x.vb.dtype;
  zero_out(x.out_w, x.K * x.B, x.acc64, s);
  zero_out(x.out_b, x.K * x.B, x.acc64, s);
  if (x.N == 0) return;
  dim3 grid((x.N + BN - 1) / BN, (x.O + BO - 1) / BO, x.K);
  GF_CUDA_DISPATCH(x.g.dtype, tv, {
    check_acc<TA_, TV_>(x.acc64);
    linear_dot_kernel<TA_, TV_><<<grid, 256, 0, s>>>(x);
  });
  check(cudaGetLastError(), "linear_dot launch");
}

void cuda_embedding_dot(const EmbeddingArgs& x, int device, uintptr_t stream) {
  check(cudaSetDevice(device), "cudaSetDevice");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  zero_out(x.out, x.K * x.B, x.acc64, s);
  if (x.N == 0) return;
  dim3 grid((x.N + WARPS - 1) / WARPS, x.K);
  GF_CUDA_DISPATCH(x.g.dtype, x.v.dtype, {
    check_acc<TA_, TV_>(x.acc64);
    embedding_dot_kernel<TA_, TV_><<<grid, WARPS * 32, 0, s>>>(x);
  });
  check(cudaGetLastError(), "embedding_dot launch");
}

void cuda_norm_dot(const NormArgs& x, int device, uintptr_t stream) {
  check(cudaSetDevice(device), "cudaSetDevice");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int tv = x.vw.p ? x.vw.dtype : x.vb.dtype;
  zero_out(x.out_w, x.K * x.B, x.acc64, s);
  zero_out(x.out_b, x.K * x.B, x.acc64, s);
  if (x.N == 0) return;
  dim3 grid((x.N + WARPS - 1) / WARPS, x.K);
  GF_CUDA_DISPATCH(x.g.dtype, tv, {
    check_acc<TA_, TV_>(x.acc64);
    norm_dot_kernel<TA_, TV_><<<grid, WARPS * 32, 0, s>>>(x);
  });
  check(cudaGetLastError(), "norm_dot launch");
}

void cuda_segment_outer(const SegOuterArgs& x, int device, uintptr_t stream) {
  check(cudaSetDevice(device), "cudaSetDevice");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  zero_out(x.out, x.B * x.KU * x.KW, x.acc64, s);
  if (x.N == 0) return;
  dim3 grid((x.KU * x.KW + 255) / 256, (x.N + TOK - 1) / TOK);
  GF_CUDA_DISPATCH(x.u.dtype, x.w.dtype, {
    check_acc<TA_, TV_>(x.acc64);
    segment_outer_kernel<TA_, TV_><<<grid, 256, 0, s>>>(x);
  });
  check(cudaGetLastError(), "segment_outer launch");
}

int cuda_device_count(std::string* why) {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    if (why) *why = cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky-free error state
    return 0;
  }
  return n;
}

int cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

}  // namespace gf
