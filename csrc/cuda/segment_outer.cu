// segment_outer over ragged sample ids: out[b] = Σ_{t: seg_t = b} u_t w_tᵀ, [B, KU, KW] (the Kronecker
// sketch's accumulation). Uniform segments never come here: they are one batched GEMM on the Python side
// (geffect_fast.ops.gemm.segment_outer_bmm). The ids are checked to lie in [0, B) by the caller.
//
// One thread per (r, c) element of the [KU, KW] product and chunk of TOK tokens; a thread sums u[t, r]·w[t, c]
// over runs of tokens of one sample and adds each run's sum to out[seg, r, c] atomically (one atomic per run:
// tokens of a sample are usually contiguous). The token chunks are strided over grid.y (at most 65535).
#include "common.cuh"

namespace gf {
namespace {

constexpr int TOK = 64;
constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

template <typename TU, typename TW>
__global__ void __launch_bounds__(kThreads) segment_outer_kernel(SegOuterArgs x) {
  using A = acc_t<TU, TW>;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= x.KU * x.KW) return;
  const int64_t r = e / x.KW, c = e % x.KW;
  const TU* u = static_cast<const TU*>(x.u.p);
  const TW* w = static_cast<const TW*>(x.w.p);
  A* out = static_cast<A*>(x.out);
  for (int64_t t0 = static_cast<int64_t>(blockIdx.y) * TOK; t0 < x.N; t0 += static_cast<int64_t>(gridDim.y) * TOK) {
    const int64_t t1 = min(x.N, t0 + TOK);
    int64_t cur = -1;
    A acc = 0;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = load_index(x.seg.p, x.seg.is64, t * x.seg.s0);
      if (b != cur) {
        if (cur >= 0) atomicAdd(out + (cur * x.KU + r) * x.KW + c, acc);
        cur = b;
        acc = 0;
      }
      acc += load<A>(u, t * x.u.s0 + r * x.u.s1) * load<A>(w, t * x.w.s0 + c * x.w.s1);
    }
    if (cur >= 0) atomicAdd(out + (cur * x.KU + r) * x.KW + c, acc);
  }
}

}  // namespace

void cuda_segment_outer(const SegOuterArgs& x, int device, uintptr_t stream) {
  const int64_t n_out = x.B * x.KU * x.KW;
  if (n_out == 0) return;
  DeviceGuard guard(device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  check(cudaMemsetAsync(x.out, 0, n_out * (x.acc64 ? sizeof(double) : sizeof(float)), s), "cudaMemsetAsync");
  if (x.N == 0) return;
  const int64_t gx = (x.KU * x.KW + kThreads - 1) / kThreads;
  if (gx > INT_MAX) throw std::invalid_argument("segment_outer: KU·KW too large for one grid");
  dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(std::min<int64_t>((x.N + TOK - 1) / TOK, kMaxGridY)));
  GF_DISPATCH_TYPE(x.u.dtype, TU, GF_DISPATCH_TYPE(x.w.dtype, TW, {
    if (x.acc64 != std::is_same_v<acc_t<TU, TW>, double>)
      throw std::invalid_argument("segment_outer: acc64 must be true exactly when an input is float64");
    segment_outer_kernel<TU, TW><<<grid, kThreads, 0, s>>>(x);
  }));
  check(cudaGetLastError(), "segment_outer launch");
}

}  // namespace gf
