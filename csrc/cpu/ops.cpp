// C++/OpenMP CPU kernels of the op contract (geffect_fast/ops/reference.py is the spec).
//
// Each kernel writes its [K, B] outputs in full (zero first, then accumulate): callers may pass
// uninitialised memory. Work is split over threads; each thread keeps private [K, B] partial sums that are
// added at the end, so results do not depend on a shared accumulation order within a thread's share.
#include "ops.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "../common/dtype.h"

namespace gf {
namespace {

template <typename A>
void zero(void* out, int64_t n) {
  if (out) std::fill(static_cast<A*>(out), static_cast<A*>(out) + n, A(0));
}

template <typename A>
void add_into(void* out, const std::vector<A>& part) {
  A* o = static_cast<A*>(out);
  for (size_t j = 0; j < part.size(); ++j) o[j] += part[j];
}

// Copy a strided row of n elements into a contiguous buffer of the accumulation type.
template <typename A, typename T>
inline void load_row(A* dst, const T* src, int64_t stride, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = load<A>(src, j * stride);
}

// ---------------------------------------------------------------------------------------------------
// linear_dot. Threads split the output features O into blocks of OB rows. For each direction k a thread
// converts its block of V_k to a contiguous buffer once, then streams the tokens in tiles of TN: each V row
// is dotted with TN token rows at a time (TN independent accumulators, vectorised over I), the dot products
// are weighted by g[t, o] and summed per token, and the per-token sums go to out[k, seg[t]].
// ---------------------------------------------------------------------------------------------------
constexpr int64_t OB = 16;
constexpr int64_t TN = 4;

template <typename A, typename TA, typename TV>
void linear_dot_impl(const LinearArgs& x, int nthreads) {
  const int64_t N = x.N, I = x.I, O = x.O, K = x.K, B = x.B;
  zero<A>(x.out_w, K * B);
  zero<A>(x.out_b, K * B);
  const TA* a = static_cast<const TA*>(x.a.p);
  const TA* g = static_cast<const TA*>(x.g.p);
  const TV* v = static_cast<const TV*>(x.v.p);
  const TV* vb = static_cast<const TV*>(x.vb.p);
  const bool has_w = v != nullptr && x.out_w != nullptr;
  const bool has_b = vb != nullptr && x.out_b != nullptr;
  std::vector<int64_t> seg(N);
  for (int64_t t = 0; t < N; ++t) seg[t] = load_index(x.seg.p, x.seg.is64, t * x.seg.s0);
  const int64_t nblocks = (O + OB - 1) / OB;

#pragma omp parallel num_threads(nthreads)
  {
    std::vector<A> part_w(has_w ? K * B : 0, A(0)), part_b(has_b ? K * B : 0, A(0));
    std::vector<A> vbuf(has_w ? OB * I : 0), abuf(has_w ? TN * I : 0), gbuf(TN * OB);
    std::vector<A> tok(TN);
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t o0 = blk * OB, o1 = std::min(O, o0 + OB), nob = o1 - o0;
      for (int64_t k = 0; k < K; ++k) {
        if (has_w)
          for (int64_t r = 0; r < nob; ++r)
            load_row<A>(&vbuf[r * I], v + k * x.v.s0 + (o0 + r) * x.v.s1, x.v.s2, I);
        for (int64_t t0 = 0; t0 < N; t0 += TN) {
          const int64_t nt = std::min(TN, N - t0);
          for (int64_t u = 0; u < nt; ++u)
            for (int64_t r = 0; r < nob; ++r) gbuf[u * OB + r] = load<A>(g, (t0 + u) * x.g.s0 + (o0 + r) * x.g.s1);
          if (has_w) {
            for (int64_t u = 0; u < nt; ++u) load_row<A>(&abuf[u * I], a + (t0 + u) * x.a.s0, x.a.s1, I);
            for (int64_t u = nt; u < TN; ++u) std::fill(&abuf[u * I], &abuf[u * I] + I, A(0));
            A acc[TN] = {};
            const A* a0 = &abuf[0];
            const A* a1 = &abuf[I];
            const A* a2 = &abuf[2 * I];
            const A* a3 = &abuf[3 * I];
            for (int64_t r = 0; r < nob; ++r) {
              const A* vr = &vbuf[r * I];
              A s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
              for (int64_t i = 0; i < I; ++i) {
                const A vi = vr[i];
                s0 += vi * a0[i];
                s1 += vi * a1[i];
                s2 += vi * a2[i];
                s3 += vi * a3[i];
              }
              acc[0] += s0 * gbuf[0 * OB + r];
              if (nt > 1) acc[1] += s1 * gbuf[1 * OB + r];
              if (nt > 2) acc[2] += s2 * gbuf[2 * OB + r];
              if (nt > 3) acc[3] += s3 * gbuf[3 * OB + r];
            }
            for (int64_t u = 0; u < nt; ++u) part_w[k * B + seg[t0 + u]] += acc[u];
          }
          if (has_b) {
            for (int64_t u = 0; u < nt; ++u) {
              A s = 0;
              for (int64_t r = 0; r < nob; ++r) s += gbuf[u * OB + r] * load<A>(vb, k * x.vb.s0 + (o0 + r) * x.vb.s1);
              part_b[k * B + seg[t0 + u]] += s;
            }
          }
        }
      }
    }
#pragma omp critical
    {
      if (has_w) add_into<A>(x.out_w, part_w);
      if (has_b) add_into<A>(x.out_b, part_b);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// embedding_dot: a gather-dot per token; V_k[ids_t] is read in place, never gathered into a buffer.
// ---------------------------------------------------------------------------------------------------
template <typename A, typename TA, typename TV>
void embedding_dot_impl(const EmbeddingArgs& x, int nthreads) {
  const int64_t N = x.N, D = x.D, K = x.K, B = x.B;
  zero<A>(x.out, K * B);
  const TA* g = static_cast<const TA*>(x.g.p);
  const TV* v = static_cast<const TV*>(x.v.p);
  std::atomic<bool> bad{false};
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<A> part(K * B, A(0)), grow(D);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < N; ++t) {
      const int64_t id = load_index(x.ids.p, x.ids.is64, t * x.ids.s0);
      if (id == x.padding_idx) continue;
      if (id < 0 || id >= x.vocab) {
        bad.store(true, std::memory_order_relaxed);
        continue;
      }
      const int64_t b = load_index(x.seg.p, x.seg.is64, t * x.seg.s0);
      load_row<A>(grow.data(), g + t * x.g.s0, x.g.s1, D);
      for (int64_t k = 0; k < K; ++k) {
        const TV* vr = v + k * x.v.s0 + id * x.v.s1;
        A s = 0;
        if constexpr (std::is_same_v<TV, A>) {
          if (x.v.s2 == 1) {
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < D; ++d) s += grow[d] * vr[d];
          } else {
            for (int64_t d = 0; d < D; ++d) s += grow[d] * vr[d * x.v.s2];
          }
        } else {
          for (int64_t d = 0; d < D; ++d) s += grow[d] * load<A>(vr, d * x.v.s2);
        }
        part[k * B + b] += s;
      }
    }
#pragma omp critical
    add_into<A>(x.out, part);
  }
  // exceptions must not leave an OpenMP region: raise after it
  if (bad.load()) throw std::out_of_range("embedding_dot: an id is outside the table");
}

// ---------------------------------------------------------------------------------------------------
// norm_dot: per token, (g ⊙ x̂)·vw_k and g·vb_k.
// ---------------------------------------------------------------------------------------------------
template <typename A, typename TA, typename TV>
void norm_dot_impl(const NormArgs& x, int nthreads) {
  const int64_t N = x.N, D = x.D, K = x.K, B = x.B;
  zero<A>(x.out_w, K * B);
  zero<A>(x.out_b, K * B);
  const TA* xh = static_cast<const TA*>(x.xhat.p);
  const TA* g = static_cast<const TA*>(x.g.p);
  const TV* vw = static_cast<const TV*>(x.vw.p);
  const TV* vb = static_cast<const TV*>(x.vb.p);
  const bool has_w = vw != nullptr && x.out_w != nullptr;
  const bool has_b = vb != nullptr && x.out_b != nullptr;
  // directions converted once: [K, D] each
  std::vector<A> cw(has_w ? K * D : 0), cb(has_b ? K * D : 0);
  for (int64_t k = 0; k < K; ++k) {
    if (has_w) load_row<A>(&cw[k * D], vw + k * x.vw.s0, x.vw.s1, D);
    if (has_b) load_row<A>(&cb[k * D], vb + k * x.vb.s0, x.vb.s1, D);
  }
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<A> pw(has_w ? K * B : 0, A(0)), pb(has_b ? K * B : 0, A(0)), grow(D), gx(D);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < N; ++t) {
      const int64_t b = load_index(x.seg.p, x.seg.is64, t * x.seg.s0);
      load_row<A>(grow.data(), g + t * x.g.s0, x.g.s1, D);
      if (has_w) {
        load_row<A>(gx.data(), xh + t * x.xhat.s0, x.xhat.s1, D);
        for (int64_t d = 0; d < D; ++d) gx[d] *= grow[d];
      }
      for (int64_t k = 0; k < K; ++k) {
        if (has_w) {
          const A* w = &cw[k * D];
          A s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += gx[d] * w[d];
          pw[k * B + b] += s;
        }
        if (has_b) {
          const A* w = &cb[k * D];
          A s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += grow[d] * w[d];
          pb[k * B + b] += s;
        }
      }
    }
#pragma omp critical
    {
      if (has_w) add_into<A>(x.out_w, pw);
      if (has_b) add_into<A>(x.out_b, pb);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// segment_outer: threads split the rows r of the [KU, KW] outer products, so every thread owns
// out[:, r, :] for its rows and adds u[t, r]·w[t, :] there for every token (vectorised over KW).
// ---------------------------------------------------------------------------------------------------
template <typename A, typename TU, typename TW>
void segment_outer_impl(const SegOuterArgs& x, int nthreads) {
  const int64_t N = x.N, KU = x.KU, KW = x.KW, B = x.B;
  A* out = static_cast<A*>(x.out);
  zero<A>(out, B * KU * KW);
  const TU* u = static_cast<const TU*>(x.u.p);
  const TW* w = static_cast<const TW*>(x.w.p);
  std::vector<int64_t> seg(N);
  for (int64_t t = 0; t < N; ++t) seg[t] = load_index(x.seg.p, x.seg.is64, t * x.seg.s0);
  // w converted once, contiguous [N, KW]
  std::vector<A> wc(N * KW);
  for (int64_t t = 0; t < N; ++t) load_row<A>(&wc[t * KW], w + t * x.w.s0, x.w.s1, KW);
  if (KW >= 8) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < KU; ++r) {
      for (int64_t t = 0; t < N; ++t) {
        const A ur = load<A>(u, t * x.u.s0 + r * x.u.s1);
        A* o = out + (seg[t] * KU + r) * KW;
        const A* wr = &wc[t * KW];
#pragma omp simd
        for (int64_t c = 0; c < KW; ++c) o[c] += ur * wr[c];
      }
    }
    return;
  }
  // narrow products (vector parameters: KW = 1): vectorise over r instead, threads taking blocks of rows
  std::vector<A> uc(N * KU);
  for (int64_t t = 0; t < N; ++t) load_row<A>(&uc[t * KU], u + t * x.u.s0, x.u.s1, KU);
#pragma omp parallel num_threads(nthreads)
  {
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t r0 = KU * id / nt, r1 = KU * (id + 1) / nt;
    for (int64_t t = 0; t < N; ++t) {
      const A* ur = &uc[t * KU];
      for (int64_t c = 0; c < KW; ++c) {
        const A wv = wc[t * KW + c];
        A* o = out + seg[t] * KU * KW + c;
#pragma omp simd
        for (int64_t r = r0; r < r1; ++r) o[r * KW] += ur[r] * wv;
      }
    }
  }
}

}  // namespace

// dtype dispatch: activation type TA x direction type TV, accumulating in double iff acc64
#define GF_CPU_DISPATCH(impl, args, ta, tv, nthreads)                                         \
  GF_DISPATCH_TYPE(ta, TA_, GF_DISPATCH_TYPE(tv, TV_, {                                       \
    if (args.acc64) impl<double, TA_, TV_>(args, nthreads);                                   \
    else impl<float, TA_, TV_>(args, nthreads);                                               \
  }))

void cpu_linear_dot(const LinearArgs& args, int nthreads) {
  const int ta = args.g.dtype;
  const int tv = args.v.p ? args.v.dtype : args.vb.dtype;
  GF_CPU_DISPATCH(linear_dot_impl, args, ta, tv, nthreads);
}

void cpu_embedding_dot(const EmbeddingArgs& args, int nthreads) {
  GF_CPU_DISPATCH(embedding_dot_impl, args, args.g.dtype, args.v.dtype, nthreads);
}

void cpu_norm_dot(const NormArgs& args, int nthreads) {
  const int tv = args.vw.p ? args.vw.dtype : args.vb.dtype;
  GF_CPU_DISPATCH(norm_dot_impl, args, args.g.dtype, tv, nthreads);
}

void cpu_segment_outer(const SegOuterArgs& args, int nthreads) {
  GF_CPU_DISPATCH(segment_outer_impl, args, args.u.dtype, args.w.dtype, nthreads);
}

int cpu_max_threads() { return omp_get_max_threads(); }

}  // namespace gf
