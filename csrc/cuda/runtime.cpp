// Queries of this module's (static) CUDA runtime: devices, version, current device (host code only).
#include <string>

#include "check.h"
#include "ops.h"

namespace gf {

int cuda_device_count(std::string* why) {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    if (why) *why = cudaGetErrorString(err);
    cudaGetLastError();  // clear the (non-sticky) error state
    return 0;
  }
  return n;
}

int cuda_runtime_version() {
  int v = 0;
  check(cudaRuntimeGetVersion(&v), "cudaRuntimeGetVersion");
  return v;
}

int cuda_current_device() {
  int d = -1;
  check(cudaGetDevice(&d), "cudaGetDevice");
  return d;
}

}  // namespace gf
