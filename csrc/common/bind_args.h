// pybind11 glue shared by the CPU and CUDA modules: Python tuples -> the descriptors of args.h.
// A view travels as (ptr, dtype, stride0, stride1[, stride2]); an index vector as (ptr, is_int64, stride).
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <tuple>

#include "args.h"

namespace gf {
namespace py = pybind11;

using MatT = std::tuple<uintptr_t, int, int64_t, int64_t>;
using Mat3T = std::tuple<uintptr_t, int, int64_t, int64_t, int64_t>;
using IndexT = std::tuple<uintptr_t, bool, int64_t>;

inline Mat mat(const MatT& t) {
  return Mat{reinterpret_cast<const void*>(std::get<0>(t)), std::get<1>(t), std::get<2>(t), std::get<3>(t)};
}
inline Mat3 mat3(const Mat3T& t) {
  return Mat3{reinterpret_cast<const void*>(std::get<0>(t)), std::get<1>(t), std::get<2>(t), std::get<3>(t),
              std::get<4>(t)};
}
inline Index index(const IndexT& t) {
  return Index{reinterpret_cast<const void*>(std::get<0>(t)), std::get<1>(t), std::get<2>(t)};
}
inline void* ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

inline LinearArgs linear_args(const MatT& a, const MatT& g, const Mat3T& v, const MatT& vb, const IndexT& seg,
                              int64_t N, int64_t I, int64_t O, int64_t K, int64_t B, uintptr_t out_w,
                              uintptr_t out_b, bool acc64) {
  return LinearArgs{mat(a), mat(g), mat3(v), mat(vb), index(seg), N, I, O, K, B, ptr(out_w), ptr(out_b), acc64};
}
inline EmbeddingArgs embedding_args(const IndexT& ids, const MatT& g, const Mat3T& v, const IndexT& seg, int64_t N,
                                    int64_t D, int64_t K, int64_t B, int64_t vocab, int64_t padding_idx,
                                    uintptr_t out, bool acc64) {
  return EmbeddingArgs{index(ids), mat(g), mat3(v), index(seg), N, D, K, B, vocab, padding_idx, ptr(out), acc64};
}
inline NormArgs norm_args(const MatT& xhat, const MatT& g, const MatT& vw, const MatT& vb, const IndexT& seg,
                          int64_t N, int64_t D, int64_t K, int64_t B, uintptr_t out_w, uintptr_t out_b, bool acc64) {
  return NormArgs{mat(xhat), mat(g), mat(vw), mat(vb), index(seg), N, D, K, B, ptr(out_w), ptr(out_b), acc64};
}

inline SegOuterArgs seg_outer_args(const MatT& u, const MatT& w, const IndexT& seg, int64_t N, int64_t KU, int64_t KW,
                                   int64_t B, uintptr_t out, bool acc64) {
  return SegOuterArgs{mat(u), mat(w), index(seg), N, KU, KW, B, ptr(out), acc64};
}

}  // namespace gf
