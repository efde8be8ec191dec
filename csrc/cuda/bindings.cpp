// geffect_fast._C_cuda: the CUDA kernels, called with raw device pointers and a stream handle from
// geffect_fast/ops/cuda.py. Linked against the static CUDA runtime: it imports on machines without a GPU
// and reports the reason through device_count().
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "../common/bind_args.h"
#include "ops.h"

namespace py = pybind11;
using namespace gf;

namespace {
// a [K, N] per-token output: (ptr, stride0, stride1)
using OutT = std::tuple<uintptr_t, int64_t, int64_t>;

Out out(const OutT& t) { return Out{ptr(std::get<0>(t)), std::get<1>(t), std::get<2>(t)}; }
}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "geffect_fast CUDA kernels (raw-pointer interface; see geffect_fast/ops/cuda.py)";
  m.def(
      "row_dot",
      [](const Mat3T& p, const MatT& x, const OutT& o, int64_t N, int64_t C, int64_t K, bool acc64, bool allow_vec,
         int device, uintptr_t stream) {
        RowDotArgs args{mat3(p), mat(x), out(o), N, C, K, acc64};
        py::gil_scoped_release nogil;
        return cuda_row_dot(args, allow_vec, device, stream);
      },
      "out[k, t] = p[k, t] · x[t]; returns whether the 16-byte vector path ran");
  m.def(
      "embedding_dot",
      [](const IndexT& ids, const MatT& g, const Mat3T& v, const OutT& o, int64_t N, int64_t D, int64_t K,
         int64_t vocab, int64_t padding_idx, bool acc64, bool allow_vec, int device, uintptr_t stream) {
        EmbeddingTokArgs args{index(ids), mat(g), mat3(v), out(o), N, D, K, vocab, padding_idx, acc64};
        py::gil_scoped_release nogil;
        return cuda_embedding_dot(args, allow_vec, device, stream);
      },
      "out[k, t] = g_t · V_k[ids_t] (0 at padding); returns whether the 16-byte vector path ran");
  m.def(
      "norm_dot",
      [](const MatT& xhat, const MatT& g, const MatT& vw, const MatT& vb, const OutT& ow, const OutT& ob, int64_t N,
         int64_t D, int64_t K, bool acc64, bool allow_vec, int device, uintptr_t stream) {
        NormTokArgs args{mat(xhat), mat(g), mat(vw), mat(vb), out(ow), out(ob), N, D, K, acc64};
        py::gil_scoped_release nogil;
        return cuda_norm_dot(args, allow_vec, device, stream);
      },
      "out_w[k, t] = (g_t ⊙ x̂_t) · vw_k, out_b[k, t] = g_t · vb_k; returns whether the 16-byte vector path ran");
  m.def(
      "segment_outer",
      [](const MatT& u, const MatT& w, const IndexT& seg, int64_t N, int64_t KU, int64_t KW, int64_t B, uintptr_t o,
         bool acc64, int device, uintptr_t stream) {
        auto args = seg_outer_args(u, w, seg, N, KU, KW, B, o, acc64);
        py::gil_scoped_release nogil;
        cuda_segment_outer(args, device, stream);
      },
      "out[b] = Σ_{t: seg_t = b} u_t w_tᵀ over ragged sample ids (atomics)");
  m.def(
      "vec16",
      [](uintptr_t p, int dtype, int64_t inner_stride, const std::vector<int64_t>& outer) {
        return vec16(reinterpret_cast<const void*>(p), dtype, inner_stride, outer.data(), outer.size());
      },
      "whether a view (pointer, dtype code, row stride, outer strides) takes the 16-byte vector path");
  m.def("max_k_per_launch", []() { return kMaxKPerLaunch; }, "directions per launch of a row kernel");
  m.def(
      "device_count",
      []() {
        std::string why;
        int n = cuda_device_count(&why);
        return py::make_tuple(n, why);
      },
      "(number of CUDA devices, the runtime's reason when 0)");
  m.def("runtime_version", &cuda_runtime_version, "CUDA runtime version this module was linked with");
  m.def("current_device", &cuda_current_device, "this module's runtime's current device");
}
