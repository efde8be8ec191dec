// Element types shared by the CPU and CUDA kernels, and the codes the Python side passes for them.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define GF_HD __host__ __device__ __forceinline__
#else
#define GF_HD inline
#endif

namespace gf {

// dtype codes, as geffect_fast/ops/_native_common.py sends them
enum DType : int { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };

// 16-bit storage types, converted to float on load
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

GF_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// bytes per element of a dtype code
inline int64_t elem_size(int code) {
  switch (code) {
    case kF32: return 4;
    case kF64: return 8;
    case kBF16:
    case kF16: return 2;
    default: throw std::invalid_argument("unsupported dtype code");
  }
}

// bfloat16 -> float: exact (the upper half of a float)
GF_HD float to_float(bf16_t x) {
#if defined(__CUDA_ARCH__)
  return __bfloat162float(__ushort_as_bfloat16(x.bits));
#else
  return bits_to_float(static_cast<uint32_t>(x.bits) << 16);
#endif
}

// IEEE half -> float, exact for normals, subnormals, inf and NaN (device code: the cvt instruction)
GF_HD float to_float(f16_t x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(x.bits));
#else
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  if (exp == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    // subnormal: normalise
    int e = -1;
    do { mant <<= 1; ++e; } while ((mant & 0x400u) == 0);
    mant &= 0x3FFu;
    return bits_to_float(sign | ((127 - 15 - e) << 23) | (mant << 13));
  }
  return bits_to_float(sign | ((exp + 127 - 15) << 23) | (mant << 13));
#endif
}

// load any supported element as the accumulation type A
template <typename A> GF_HD A load(const float* p, int64_t i) { return static_cast<A>(p[i]); }
template <typename A> GF_HD A load(const double* p, int64_t i) { return static_cast<A>(p[i]); }
template <typename A> GF_HD A load(const bf16_t* p, int64_t i) { return static_cast<A>(to_float(p[i])); }
template <typename A> GF_HD A load(const f16_t* p, int64_t i) { return static_cast<A>(to_float(p[i])); }

// index loads (ids, segment ids): int32 or int64
GF_HD int64_t load_index(const void* p, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(p)[i] : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

}  // namespace gf

// GF_DISPATCH_TYPE(code, T, body...): runs body with T bound to the storage type of dtype ``code``.
#define GF_DISPATCH_TYPE(code, T, ...)            \
  switch (code) {                                 \
    case gf::kF32: { using T = float; __VA_ARGS__; break; }     \
    case gf::kF64: { using T = double; __VA_ARGS__; break; }    \
    case gf::kBF16: { using T = gf::bf16_t; __VA_ARGS__; break; } \
    case gf::kF16: { using T = gf::f16_t; __VA_ARGS__; break; }   \
    default: throw std::invalid_argument("unsupported dtype code"); \
  }
