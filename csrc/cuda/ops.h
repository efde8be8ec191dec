// CUDA kernels of the op contract: plain C++ launchers and descriptors (no CUDA types), so the pybind11
// bindings compile with the host compiler. ``stream`` is a cudaStream_t passed as an integer (torch's current
// stream of ``device``).
//
// The row kernels (row_dot, embedding_dot, norm_dot) write one value per token and direction into a [K, N]
// output in the accumulation dtype; the per-sample sums are taken on the Python side
// (geffect_fast.ops.contract.segment_sum). linear_dot is cuBLAS (through torch) + the row_dot epilogue.
#pragma once
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "../common/args.h"
#include "../common/dtype.h"

namespace gf {

// directions one launch of a row kernel handles, all for one read of the activation row; more are launched in
// groups of this many
constexpr int kMaxKPerLaunch = 4;

struct Out {  // a [K, N] per-token output in the accumulation dtype (float, or double when acc64)
  void* p = nullptr;
  int64_t s0 = 0, s1 = 0;
};

// row_dot: out[k, t] = p[k, t] · x[t]
struct RowDotArgs {
  Mat3 p;   // [K, N, C] in the accumulation dtype (any strides; s1 = 0: one row broadcast to every token)
  Mat x;    // [N, C] float32/float64/bfloat16/float16
  Out out;  // [K, N]
  int64_t N, C, K;
  bool acc64;
};

// embedding_dot per token: out[k, t] = g_t · V_k[ids_t] (0 where ids_t is padding_idx or outside [0, vocab))
struct EmbeddingTokArgs {
  Index ids;  // [N]
  Mat g;      // [N, D]
  Mat3 v;     // [K, vocab, D]
  Out out;    // [K, N]
  int64_t N, D, K, vocab;
  int64_t padding_idx;  // < 0: none
  bool acc64;
};

// norm_dot per token: out_w[k, t] = (g_t ⊙ x̂_t) · vw_k, out_b[k, t] = g_t · vb_k
struct NormTokArgs {
  Mat xhat, g;        // [N, D], one dtype
  Mat vw, vb;         // [K, D], one dtype; either may be null (then its output is not written)
  Out out_w, out_b;   // [K, N]
  int64_t N, D, K;
  bool acc64;
};

// Whether a view can be read with 16-byte vector loads: unit stride along its rows, and every row start
// (base + Σ index·outer stride) 16-byte aligned. An absent operand (null) does not prevent it.
inline bool vec16(const void* p, int dtype, int64_t inner_stride, const int64_t* outer_strides, size_t n_outer) {
  if (p == nullptr) return true;
  const int64_t size = elem_size(dtype);
  if (inner_stride != 1 || reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  for (size_t i = 0; i < n_outer; ++i)
    if ((outer_strides[i] * size) % 16 != 0) return false;
  return true;
}
inline bool vec16(const void* p, int dtype, int64_t inner_stride, std::initializer_list<int64_t> outer_strides) {
  return vec16(p, dtype, inner_stride, outer_strides.begin(), outer_strides.size());
}

// Launchers. ``device`` is made current for the launch and the previous device restored afterwards: this
// module's static CUDA runtime and torch's share the thread's current context. ``allow_vec`` = false forces the
// scalar path; each returns whether the 16-byte vector path ran.
bool cuda_row_dot(const RowDotArgs& args, bool allow_vec, int device, uintptr_t stream);
bool cuda_embedding_dot(const EmbeddingTokArgs& args, bool allow_vec, int device, uintptr_t stream);
bool cuda_norm_dot(const NormTokArgs& args, bool allow_vec, int device, uintptr_t stream);
// segment_outer over ragged sample ids (checked in [0, B) by the caller): out [B, KU, KW] zeroed then
// accumulated with atomics
void cuda_segment_outer(const SegOuterArgs& args, int device, uintptr_t stream);
// number of CUDA devices; 0 with the runtime's reason in *why when there is no usable driver or device
int cuda_device_count(std::string* why);
int cuda_runtime_version();
// this module's runtime's current device (tests: it must agree with torch's after a launch)
int cuda_current_device();
}  // namespace gf
