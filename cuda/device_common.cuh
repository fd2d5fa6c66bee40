// Device helpers shared by the kernels: 16-byte loads, output conversions and block-scale reads.
// The numeric rules themselves live in codebook.cuh.
#pragma once

#include "codebook.cuh"

namespace qlora {

// Parameters every 4-bit kernel takes to find a block scale. `absmax` holds float32 scales, or,
// when `nested` is set, uint8 codes decoded with nested_code/nested_absmax/offset.
struct Scales {
  const void* absmax;
  const float* nested_absmax;
  const float* nested_code;
  float offset;
  int nested;
};

// The float32 scale of block `blk`.
__device__ __forceinline__ float block_absmax(const Scales& s, uint64_t blk) {
  if (s.nested) {
    const uint8_t q = __ldg(static_cast<const uint8_t*>(s.absmax) + blk);
    return decode_nested_absmax(__ldg(s.nested_code + q), __ldg(s.nested_absmax + (blk >> 8)), s.offset);
  }
  return __ldg(static_cast<const float*>(s.absmax) + blk);
}

// Copies the 16 values of table `quant_type` into shared memory; the caller synchronises.
__device__ __forceinline__ void load_code4(float* lut, int quant_type) {
  if (threadIdx.x < 16) lut[threadIdx.x] = code4_value(quant_type, threadIdx.x);
}

// Read-only 16-byte load through the non-coherent cache.
__device__ __forceinline__ uint4 load16(const void* p) { return __ldg(static_cast<const uint4*>(p)); }

// Output element types: conversion of one float32 value and of a pair packed into 32 bits (low
// half = first element), both round-to-nearest-even as codebook.cuh specifies.
template <typename T>
struct Out;

template <>
struct Out<float> {
  static constexpr int kBytes = 4;
  __device__ __forceinline__ static float one(float v) { return v; }
};

template <>
struct Out<__half> {
  static constexpr int kBytes = 2;
  __device__ __forceinline__ static __half one(float v) { return __ushort_as_half(f32_to_f16_bits(v)); }
  __device__ __forceinline__ static uint32_t pair(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static float to_float(__half v) { return __half2float(v); }
};

template <>
struct Out<__nv_bfloat16> {
  static constexpr int kBytes = 2;
  __device__ __forceinline__ static __nv_bfloat16 one(float v) {
    return __ushort_as_bfloat16(f32_to_bf16_bits(v));
  }
  __device__ __forceinline__ static uint32_t pair(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
};

// The 4-byte word of a 16-byte vector that holds its byte j (0..15).
__device__ __forceinline__ uint32_t word_of(const uint4& w, int j) {
  return j < 4 ? w.x : j < 8 ? w.y : j < 12 ? w.z : w.w;
}

// Byte j (0..15) of a 16-byte vector, little-endian as it sits in memory.
__device__ __forceinline__ uint32_t byte_of(const uint4& w, int j) {
  return (word_of(w, j) >> (8 * (j & 3))) & 0xffu;
}

}  // namespace qlora
