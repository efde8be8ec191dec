// norm_dot per token: out_w[k, t] = (g_t ⊙ x̂_t) · vw_k and out_b[k, t] = g_t · vb_k (LayerNorm/RMSNorm
// affine gradients against K directions). The per-sample sums are the caller's.
//
// One warp per token row. Each step a lane reads E consecutive elements of g and x̂ (16 bytes of the narrower
// of the activation and direction types) once, and the matching elements of vw_k and vb_k of every direction
// of the launch ([K, D]: small, and read by every row, so they stay in L1/L2).
#include "common.cuh"

namespace gf {
namespace {

template <typename TA, typename TV, bool VEC>
__global__ void __launch_bounds__(kRowWarps * 32, kRowMinBlocks) norm_dot_kernel(NormTokArgs a, int64_t k0, int kn) {
  using A = acc_t<TA, TV>;
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (t >= a.N) return;  // the whole warp
  const TA* g = static_cast<const TA*>(a.g.p) + t * a.g.s0;
  const TA* xh = static_cast<const TA*>(a.xhat.p) + t * a.xhat.s0;
  const bool has_w = a.vw.p != nullptr, has_b = a.vb.p != nullptr;
  const TV* vw = has_w ? static_cast<const TV*>(a.vw.p) + k0 * a.vw.s0 : nullptr;
  const TV* vb = has_b ? static_cast<const TV*>(a.vb.p) + k0 * a.vb.s0 : nullptr;
  A aw[kMaxKPerLaunch], ab[kMaxKPerLaunch];
#pragma unroll
  for (int k = 0; k < kMaxKPerLaunch; ++k) aw[k] = ab[k] = A(0);
  int64_t c0 = 0;
  if constexpr (VEC) {  // unit stride, 16-byte aligned rows (checked on the host)
    constexpr int E = vec_elems<TA, TV>();
    const int64_t cv = a.D - a.D % E;
    for (int64_t c = static_cast<int64_t>(lane) * E; c < cv; c += 32 * E) {
      A gv[E];
      load_vec<E>(g + c, gv);
      if (has_w) {
        A gx[E];
        load_vec<E>(xh + c, gx);
#pragma unroll
        for (int e = 0; e < E; ++e) gx[e] *= gv[e];
#pragma unroll
        for (int k = 0; k < kMaxKPerLaunch; ++k) {
          if (k < kn) {
            A w[E];
            load_vec<E>(vw + k * a.vw.s0 + c, w);
#pragma unroll
            for (int e = 0; e < E; ++e) aw[k] += gx[e] * w[e];
          }
        }
      }
      if (has_b) {
#pragma unroll
        for (int k = 0; k < kMaxKPerLaunch; ++k) {
          if (k < kn) {
            A b[E];
            load_vec<E>(vb + k * a.vb.s0 + c, b);
#pragma unroll
            for (int e = 0; e < E; ++e) ab[k] += gv[e] * b[e];
          }
        }
      }
    }
    c0 = cv;
  }
  for (int64_t c = c0 + lane; c < a.D; c += 32) {  // the scalar path, or the vector path's tail
    const A gv = load<A>(g, c * a.g.s1);
    if (has_w) {
      const A gx = gv * load<A>(xh, c * a.xhat.s1);
#pragma unroll
      for (int k = 0; k < kMaxKPerLaunch; ++k)
        if (k < kn) aw[k] += gx * load<A>(vw, k * a.vw.s0 + c * a.vw.s1);
    }
    if (has_b) {
#pragma unroll
      for (int k = 0; k < kMaxKPerLaunch; ++k)
        if (k < kn) ab[k] += gv * load<A>(vb, k * a.vb.s0 + c * a.vb.s1);
    }
  }
#pragma unroll
  for (int k = 0; k < kMaxKPerLaunch; ++k) {
    aw[k] = warp_sum(aw[k]);
    ab[k] = warp_sum(ab[k]);
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < kMaxKPerLaunch; ++k) {
      if (k < kn) {
        if (has_w) store_out(a.out_w, k0 + k, t, aw[k]);
        if (has_b) store_out(a.out_b, k0 + k, t, ab[k]);
      }
    }
  }
}

template <typename TA, typename TV>
bool launch(const NormTokArgs& a, bool vec, cudaStream_t s) {
  if (a.acc64 != std::is_same_v<acc_t<TA, TV>, double>)
    throw std::invalid_argument("norm_dot: acc64 must be true exactly when an input is float64");
  if (vec)
    launch_rows(norm_dot_kernel<TA, TV, true>, a, a.N, a.K, s, "norm_dot launch");
  else
    launch_rows(norm_dot_kernel<TA, TV, false>, a, a.N, a.K, s, "norm_dot launch");
  return vec;
}

}  // namespace

bool cuda_norm_dot(const NormTokArgs& a, bool allow_vec, int device, uintptr_t stream) {
  if (a.vw.p == nullptr && a.vb.p == nullptr) throw std::invalid_argument("norm_dot needs vw or vb");
  if ((a.vw.p != nullptr && a.out_w.p == nullptr) || (a.vb.p != nullptr && a.out_b.p == nullptr))
    throw std::invalid_argument("norm_dot: an output for every given direction");
  if (a.N == 0 || a.K == 0) return false;
  DeviceGuard guard(device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const bool vec = allow_vec && vec16(a.g.p, a.g.dtype, a.g.s1, {a.g.s0}) &&
                   vec16(a.vw.p ? a.xhat.p : nullptr, a.xhat.dtype, a.xhat.s1, {a.xhat.s0}) &&
                   vec16(a.vw.p, a.vw.dtype, a.vw.s1, {a.vw.s0}) && vec16(a.vb.p, a.vb.dtype, a.vb.s1, {a.vb.s0});
  const int tv = a.vw.p ? a.vw.dtype : a.vb.dtype;
  if (a.vw.p && a.vb.p && a.vw.dtype != a.vb.dtype) throw std::invalid_argument("norm_dot: vw and vb in one dtype");
  if (a.xhat.dtype != a.g.dtype) throw std::invalid_argument("norm_dot: xhat and g in one dtype");
  bool ran = false;
  GF_DISPATCH_TYPE(a.g.dtype, TA, GF_DISPATCH_TYPE(tv, TV, ran = launch<TA, TV>(a, vec, s)));
  return ran;
}

}  // namespace gf
