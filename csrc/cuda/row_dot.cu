// row_dot, the epilogue of linear_dot's GEMM route (geffect_fast/ops/gemm.py): out[k, t] = p[k, t] · x[t].
//
// One warp per token row. Each step a lane reads E consecutive elements of x (16 bytes of the narrower type)
// and the matching E elements of every direction of the launch, so x is read once for all of them. p is in
// the accumulation dtype A (float, or double); x in any of float/double/bfloat16/float16.
#include "common.cuh"

namespace gf {
namespace {

template <typename A, typename TX, bool VEC>
__global__ void __launch_bounds__(kRowWarps * 32, kRowMinBlocks) row_dot_kernel(RowDotArgs a, int64_t k0, int kn) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (t >= a.N) return;  // the whole warp: shuffles below see all 32 lanes
  const TX* x = static_cast<const TX*>(a.x.p) + t * a.x.s0;
  const A* p = static_cast<const A*>(a.p.p) + k0 * a.p.s0 + t * a.p.s1;
  A acc[kMaxKPerLaunch];
#pragma unroll
  for (int k = 0; k < kMaxKPerLaunch; ++k) acc[k] = A(0);
  int64_t c0 = 0;
  if constexpr (VEC) {  // unit stride, 16-byte aligned rows (checked on the host)
    constexpr int E = vec_elems<A, TX>();
    const int64_t cv = a.C - a.C % E;
    for (int64_t c = static_cast<int64_t>(lane) * E; c < cv; c += 32 * E) {
      A xv[E];
      load_vec<E>(x + c, xv);
#pragma unroll
      for (int k = 0; k < kMaxKPerLaunch; ++k) {
        if (k < kn) {
          A pv[E];
          load_vec<E>(p + k * a.p.s0 + c, pv);
#pragma unroll
          for (int e = 0; e < E; ++e) acc[k] += pv[e] * xv[e];
        }
      }
    }
    c0 = cv;
  }
  // the scalar path: the whole row through its strides, or the vector path's tail (< E elements)
  for (int64_t c = c0 + lane; c < a.C; c += 32) {
    const A xv = load<A>(x, c * a.x.s1);
#pragma unroll
    for (int k = 0; k < kMaxKPerLaunch; ++k)
      if (k < kn) acc[k] += load<A>(p, k * a.p.s0 + c * a.p.s2) * xv;
  }
#pragma unroll
  for (int k = 0; k < kMaxKPerLaunch; ++k) acc[k] = warp_sum(acc[k]);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < kMaxKPerLaunch; ++k)
      if (k < kn) store_out(a.out, k0 + k, t, acc[k]);
  }
}

template <typename A, typename TX>
bool launch(const RowDotArgs& a, bool vec, cudaStream_t s) {
  if (vec)
    launch_rows(row_dot_kernel<A, TX, true>, a, a.N, a.K, s, "row_dot launch");
  else
    launch_rows(row_dot_kernel<A, TX, false>, a, a.N, a.K, s, "row_dot launch");
  return vec;
}

template <typename TX>
bool launch_x(const RowDotArgs& a, bool vec, cudaStream_t s) {
  if (a.acc64) return launch<double, TX>(a, vec, s);
  if constexpr (std::is_same_v<TX, double>) {
    throw std::invalid_argument("row_dot: float64 x needs acc64");
  } else {
    return launch<float, TX>(a, vec, s);
  }
}

}  // namespace

bool cuda_row_dot(const RowDotArgs& a, bool allow_vec, int device, uintptr_t stream) {
  if (a.p.dtype != (a.acc64 ? kF64 : kF32))
    throw std::invalid_argument("row_dot: p must be in the accumulation dtype (float32, or float64 when acc64)");
  if (!a.acc64 && a.x.dtype == kF64) throw std::invalid_argument("row_dot: float64 x needs acc64");
  if (a.N == 0 || a.K == 0) return false;
  DeviceGuard guard(device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const bool vec = allow_vec && vec16(a.p.p, a.p.dtype, a.p.s2, {a.p.s0, a.p.s1}) &&
                   vec16(a.x.p, a.x.dtype, a.x.s1, {a.x.s0});
  bool ran = false;
  GF_DISPATCH_TYPE(a.x.dtype, TX, ran = launch_x<TX>(a, vec, s));
  return ran;
}

}  // namespace gf
