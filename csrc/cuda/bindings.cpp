// geffect_fast._C_cuda: the CUDA kernels, called with raw device pointers and a stream handle from
// geffect_fast/ops/cuda.py. Linked against the static CUDA runtime: it imports on machines without a GPU
// and reports the reason through device_count().
#include <pybind11/pybind11.h>

#include <string>

#include "../common/bind_args.h"
#include "ops.h"

namespace py = pybind11;
using namespace gf;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "geffect_fast CUDA kernels (raw-pointer interface; see geffect_fast/ops/cuda.py)";
  m.def(
      "linear_dot",
      [](const MatT& a, const MatT& g, const Mat3T& v, const MatT& vb, const IndexT& seg, int64_t N, int64_t I,
         int64_t O, int64_t K, int64_t B, uintptr_t out_w, uintptr_t out_b, bool acc64, int device, uintptr_t stream) {
        auto args = linear_args(a, g, v, vb, seg, N, I, O, K, B, out_w, out_b, acc64);
        py::gil_scoped_release nogil;
        cuda_linear_dot(args, device, stream);
      });
  m.def(
      "embedding_dot",
      [](const IndexT& ids, const MatT& g, const Mat3T& v, const IndexT& seg, int64_t N, int64_t D, int64_t K,
         int64_t B, int64_t vocab, int64_t padding_idx, uintptr_t out, bool acc64, int device, uintptr_t stream) {
        auto args = embedding_args(ids, g, v, seg, N, D, K, B, vocab, padding_idx, out, acc64);
        py::gil_scoped_release nogil;
        cuda_embedding_dot(args, device, stream);
      });
  m.def(
      "norm_dot",
      [](const MatT& xhat, const MatT& g, const MatT& vw, const MatT& vb, const IndexT& seg, int64_t N, int64_t D,
         int64_t K, int64_t B, uintptr_t out_w, uintptr_t out_b, bool acc64, int device, uintptr_t stream) {
        auto args = norm_args(xhat, g, vw, vb, seg, N, D, K, B, out_w, out_b, acc64);
        py::gil_scoped_release nogil;
        cuda_norm_dot(args, device, stream);
      });
  m.def(
      "segment_outer",
      [](const MatT& u, const MatT& w, const IndexT& seg, int64_t N, int64_t KU, int64_t KW, int64_t B, uintptr_t out,
         bool acc64, int device, uintptr_t stream) {
        auto args = seg_outer_args(u, w, seg, N, KU, KW, B, out, acc64);
        py::gil_scoped_release nogil;
        cuda_segment_outer(args, device, stream);
      });
  m.def("device_count", []() {
    std::string why;
    int n = cuda_device_count(&why);
    return py::make_tuple(n, why);
  }, "(number of CUDA devices, the runtime's reason when 0)");
  m.def("runtime_version", &cuda_runtime_version, "CUDA runtime version this module was linked with");
}
