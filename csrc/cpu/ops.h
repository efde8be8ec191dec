// CPU kernels of the op contract (C++/OpenMP). See ops.cpp.
#pragma once
#include "../common/args.h"

namespace gf {
void cpu_linear_dot(const LinearArgs& args, int nthreads);
void cpu_embedding_dot(const EmbeddingArgs& args, int nthreads);
void cpu_norm_dot(const NormArgs& args, int nthreads);
void cpu_segment_outer(const SegOuterArgs& args, int nthreads);
int cpu_max_threads();
}  // namespace gf
