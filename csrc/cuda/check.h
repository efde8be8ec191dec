// CUDA runtime error checks, for the kernels' launchers and the host-only queries (runtime.cpp).
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace gf {

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

}  // namespace gf
