// embedding_dot per token: out[k, t] = g_t · V_k[ids_t] (0 where ids_t is padding_idx, or outside [0, vocab):
// torch's forward rejects those before a backward could reach here). The per-sample sums are the caller's.
//
// One warp per token row. Each step a lane reads E consecutive elements of g (16 bytes of the narrower of the
// two types) and the matching E elements of the gathered row V_k[ids_t] of every direction of the launch, so
// g is read once for all of them; nothing of V[ids] is materialised.
#include "common.cuh"

namespace gf {
namespace {

template <typename TA, typename TV, bool VEC>
__global__ void __launch_bounds__(kRowWarps * 32, kRowMinBlocks) embedding_dot_kernel(EmbeddingTokArgs a, int64_t k0, int kn) {
  using A = acc_t<TA, TV>;
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (t >= a.N) return;  // the whole warp
  A acc[kMaxKPerLaunch];
#pragma unroll
  for (int k = 0; k < kMaxKPerLaunch; ++k) acc[k] = A(0);
  const int64_t id = load_index(a.ids.p, a.ids.is64, t * a.ids.s0);
  if (id != a.padding_idx && id >= 0 && id < a.vocab) {  // the same for every lane of the warp
    const TA* g = static_cast<const TA*>(a.g.p) + t * a.g.s0;
    const TV* v = static_cast<const TV*>(a.v.p) + k0 * a.v.s0 + id * a.v.s1;
    int64_t c0 = 0;
    if constexpr (VEC) {  // unit stride, 16-byte aligned rows (checked on the host)
      constexpr int E = vec_elems<TA, TV>();
      const int64_t cv = a.D - a.D % E;
      for (int64_t c = static_cast<int64_t>(lane) * E; c < cv; c += 32 * E) {
        A gv[E];
        load_vec<E>(g + c, gv);
#pragma unroll
        for (int k = 0; k < kMaxKPerLaunch; ++k) {
          if (k < kn) {
            A vv[E];
            load_vec<E>(v + k * a.v.s0 + c, vv);
#pragma unroll
            for (int e = 0; e < E; ++e) acc[k] += gv[e] * vv[e];
          }
        }
      }
      c0 = cv;
    }
    for (int64_t c = c0 + lane; c < a.D; c += 32) {  // the scalar path, or the vector path's tail
      const A gv = load<A>(g, c * a.g.s1);
#pragma unroll
      for (int k = 0; k < kMaxKPerLaunch; ++k)
        if (k < kn) acc[k] += gv * load<A>(v, k * a.v.s0 + c * a.v.s2);
    }
#pragma unroll
    for (int k = 0; k < kMaxKPerLaunch; ++k) acc[k] = warp_sum(acc[k]);
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < kMaxKPerLaunch; ++k)
      if (k < kn) store_out(a.out, k0 + k, t, acc[k]);
  }
}

template <typename TA, typename TV>
bool launch(const EmbeddingTokArgs& a, bool vec, cudaStream_t s) {
  if (a.acc64 != std::is_same_v<acc_t<TA, TV>, double>)
    throw std::invalid_argument("embedding_dot: acc64 must be true exactly when an input is float64");
  if (vec)
    launch_rows(embedding_dot_kernel<TA, TV, true>, a, a.N, a.K, s, "embedding_dot launch");
  else
    launch_rows(embedding_dot_kernel<TA, TV, false>, a, a.N, a.K, s, "embedding_dot launch");
  return vec;
}

}  // namespace

bool cuda_embedding_dot(const EmbeddingTokArgs& a, bool allow_vec, int device, uintptr_t stream) {
  if (a.N == 0 || a.K == 0) return false;
  DeviceGuard guard(device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const bool vec = allow_vec && vec16(a.g.p, a.g.dtype, a.g.s1, {a.g.s0}) &&
                   vec16(a.v.p, a.v.dtype, a.v.s2, {a.v.s0, a.v.s1});
  bool ran = false;
  GF_DISPATCH_TYPE(a.g.dtype, TA, GF_DISPATCH_TYPE(a.v.dtype, TV, ran = launch<TA, TV>(a, vec, s)));
  return ran;
}

}  // namespace gf
