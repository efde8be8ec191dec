// Plain descriptors of the tensors the Python side hands over: raw pointers, dtype codes, element strides.
// No torch headers: the extension builds against nothing but pybind11 (and the CUDA runtime).
#pragma once
#include <cstdint>

namespace gf {

struct Mat {  // a 2-D view [rows, cols]
  const void* p = nullptr;
  int dtype = 0;
  int64_t s0 = 0, s1 = 0;
};

struct Mat3 {  // a 3-D view [K, rows, cols]
  const void* p = nullptr;
  int dtype = 0;
  int64_t s0 = 0, s1 = 0, s2 = 0;
};

struct Index {  // a 1-D int32/int64 view
  const void* p = nullptr;
  bool is64 = true;
  int64_t s0 = 1;
};

// linear_dot: out_w[k,b] = Σ_{t: seg_t=b} g_tᵀ V_k a_t ; out_b[k,b] = Σ_{t: seg_t=b} g_t·vb_k
struct LinearArgs {
  Mat a, g;     // [N, I], [N, O]   (a.p may be null when only the bias is asked)
  Mat3 v;       // [K, O, I]        (v.p may be null: bias only)
  Mat vb;       // [K, O]           (vb.p may be null: weight only)
  Index seg;    // [N]
  int64_t N, I, O, K, B;
  void* out_w;  // [K, B] contiguous, accumulation dtype (written, not accumulated into)
  void* out_b;  // [K, B] or null
  bool acc64;   // accumulate in double (any input float64) instead of float
};

// embedding_dot: out[k,b] = Σ_{t: seg_t=b, ids_t≠pad} g_t·V_k[ids_t]
struct EmbeddingArgs {
  Index ids;    // [N]
  Mat g;        // [N, D]
  Mat3 v;       // [K, vocab, D]
  Index seg;
  int64_t N, D, K, B, vocab;
  int64_t padding_idx;  // < 0: none
  void* out;
  bool acc64;
};

// norm_dot: out_w[k,b] = Σ (g_t ⊙ x̂_t)·vw_k ; out_b[k,b] = Σ g_t·vb_k
struct NormArgs {
  Mat xhat, g;  // [N, D]
  Mat vw, vb;   // [K, D] (either may be null)
  Index seg;
  int64_t N, D, K, B;
  void* out_w;
  void* out_b;
  bool acc64;
};

// segment_outer: out[b] = Σ_{t: seg_t=b} u_t w_tᵀ, [B, KU, KW] (the Kronecker-sketch accumulation)
struct SegOuterArgs {
  Mat u, w;     // [N, KU], [N, KW]
  Index seg;
  int64_t N, KU, KW, B;
  void* out;    // [B, KU, KW] contiguous, accumulation dtype (written, not accumulated into)
  bool acc64;
};

}  // namespace gf
