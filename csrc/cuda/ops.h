// CUDA kernels of the op contract: plain C++ launchers (no CUDA types), so the pybind11 bindings compile
// with the host compiler. ``stream`` is a cudaStream_t passed as an integer (torch's current stream).
#pragma once
#include <cstdint>
#include <string>

#include "../common/args.h"

namespace gf {
// ``device`` is made current first: this module's (static) CUDA runtime keeps its own current device,
// separate from torch's.
void cuda_linear_dot(const LinearArgs& args, int device, uintptr_t stream);
void cuda_embedding_dot(const EmbeddingArgs& args, int device, uintptr_t stream);
void cuda_norm_dot(const NormArgs& args, int device, uintptr_t stream);
void cuda_segment_outer(const SegOuterArgs& args, int device, uintptr_t stream);
// number of CUDA devices; 0 with the runtime's reason in *why when there is no usable driver or device
int cuda_device_count(std::string* why);
int cuda_runtime_version();
}  // namespace gf
