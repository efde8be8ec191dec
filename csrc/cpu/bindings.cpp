// geffect_fast._C_cpu: the CPU kernels, called with raw pointers from geffect_fast/ops/native.py.
#include <pybind11/pybind11.h>

#include "../common/bind_args.h"
#include "ops.h"

namespace py = pybind11;
using namespace gf;

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "geffect_fast C++/OpenMP CPU kernels (raw-pointer interface; see geffect_fast/ops/native.py)";
  m.def(
      "linear_dot",
      [](const MatT& a, const MatT& g, const Mat3T& v, const MatT& vb, const IndexT& seg, int64_t N, int64_t I,
         int64_t O, int64_t K, int64_t B, uintptr_t out_w, uintptr_t out_b, bool acc64, int nthreads) {
        auto args = linear_args(a, g, v, vb, seg, N, I, O, K, B, out_w, out_b, acc64);
        py::gil_scoped_release nogil;
        cpu_linear_dot(args, nthreads);
      });
  m.def(
      "embedding_dot",
      [](const IndexT& ids, const MatT& g, const Mat3T& v, const IndexT& seg, int64_t N, int64_t D, int64_t K,
         int64_t B, int64_t vocab, int64_t padding_idx, uintptr_t out, bool acc64, int nthreads) {
        auto args = embedding_args(ids, g, v, seg, N, D, K, B, vocab, padding_idx, out, acc64);
        py::gil_scoped_release nogil;
        cpu_embedding_dot(args, nthreads);
      });
  m.def(
      "norm_dot",
      [](const MatT& xhat, const MatT& g, const MatT& vw, const MatT& vb, const IndexT& seg, int64_t N, int64_t D,
         int64_t K, int64_t B, uintptr_t out_w, uintptr_t out_b, bool acc64, int nthreads) {
        auto args = norm_args(xhat, g, vw, vb, seg, N, D, K, B, out_w, out_b, acc64);
        py::gil_scoped_release nogil;
        cpu_norm_dot(args, nthreads);
      });
  m.def(
      "segment_outer",
      [](const MatT& u, const MatT& w, const IndexT& seg, int64_t N, int64_t KU, int64_t KW, int64_t B, uintptr_t out,
         bool acc64, int nthreads) {
        auto args = seg_outer_args(u, w, seg, N, KU, KW, B, out, acc64);
        py::gil_scoped_release nogil;
        cpu_segment_outer(args, nthreads);
      });
  m.def("max_threads", &cpu_max_threads, "OpenMP's default thread count");
}
