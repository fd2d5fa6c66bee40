// The decode tables and rounding rules of the 4-bit formats, shared by the CUDA kernels and by
// host code. The other copy of these tables is rust/codebook.rs; tests/codebook_header.rs compiles
// this header for the CPU and proves the two agree bit for bit.
//
// Rules (identical in the Rust core, rust/quant4.rs and rust/blockwise8.rs):
//   element value  = round_to_out_dtype(code4[nibble] * absmax)   one float32 product, then one
//                                                                 round-to-nearest-even conversion
//   absmax (double quant) = nested_code[q] * nested_absmax[block / 256] + offset
//                                                                 two float32 roundings, never an FMA
//   packing: element 2j is the HIGH nibble of byte j, element 2j+1 the low nibble.
//
// On the device the products and sums use __fmul_rn/__fadd_rn, which the compiler never contracts
// into an FMA, so the kernels stay bit-exact even with --fmad=true (the default) elsewhere. Host code
// that includes this header must be compiled without FP contraction (-ffp-contract=off).
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define QLORA_HD __host__ __device__ __forceinline__
#else
#define QLORA_HD static inline
#endif

namespace qlora {

// Index of a 4-bit code table; the Rust side maps QuantType::{Nf4, Fp4, Int4} to these numbers.
enum QuantType : int { kNf4 = 0, kFp4 = 1, kInt4 = 2 };

// The 16 values of each table, index = nibble, written once as text so that the host and the
// device arrays are initialised from the same tokens.
#define QLORA_NF4_CODE                                                                              \
  {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,                      \
   -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,                     \
   0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,        \
   0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f}
// FP4 (e2m1, no infinities): bit 3 is the sign; magnitudes 0, 0.0625, 8, 12, 4, 6, 2, 3, over 12;
// both zeros +0.0.
#define QLORA_FP4_CODE                                                                              \
  {0.0f, 0.0625f / 12.0f, 8.0f / 12.0f, 1.0f,                                                      \
   4.0f / 12.0f, 6.0f / 12.0f, 2.0f / 12.0f, 3.0f / 12.0f,                                        \
   0.0f, -0.0625f / 12.0f, -8.0f / 12.0f, -1.0f,                                                  \
   -4.0f / 12.0f, -6.0f / 12.0f, -2.0f / 12.0f, -3.0f / 12.0f}
// INT4: -7..7 over 7, sign-magnitude like bitsandbytes' "int4" map: nibbles 0..7 hold 7/7 down to
// 0, nibbles 8..15 hold 0 (+0.0, as bitsandbytes stores it) down to -7/7.
#define QLORA_INT4_CODE                                                                             \
  {1.0f, 6.0f / 7.0f, 5.0f / 7.0f, 4.0f / 7.0f, 3.0f / 7.0f, 2.0f / 7.0f, 1.0f / 7.0f, 0.0f,       \
   0.0f, -1.0f / 7.0f, -2.0f / 7.0f, -3.0f / 7.0f, -4.0f / 7.0f, -5.0f / 7.0f, -6.0f / 7.0f,      \
   -1.0f}

#if defined(__CUDACC__)
// Read once per thread block into shared memory by the kernels (a divergent index into constant
// memory would serialise the warp).
__constant__ float kCode4Device[3][16] = {QLORA_NF4_CODE, QLORA_FP4_CODE, QLORA_INT4_CODE};
#endif
static const float kCode4Host[3][16] = {QLORA_NF4_CODE, QLORA_FP4_CODE, QLORA_INT4_CODE};

// The decode value of `nibble` (0..15) in table `quant_type`.
QLORA_HD float code4_value(int quant_type, unsigned nibble) {
#if defined(__CUDA_ARCH__)
  return kCode4Device[quant_type][nibble & 15u];
#else
  return kCode4Host[quant_type][nibble & 15u];
#endif
}

// Nibble of element `index` within its byte: even elements sit in the high nibble.
QLORA_HD unsigned nibble_of(uint8_t byte, uint64_t index) {
  return (index & 1u) ? (byte & 15u) : (unsigned)(byte >> 4);
}

// float32 multiply and add, each rounded to nearest even, never fused.
QLORA_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

QLORA_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// The float32 block scale of a double-quantized tensor: nested_code[q] * nested_absmax + offset.
QLORA_HD float decode_nested_absmax(float nested_code_q, float nested_absmax, float offset) {
  return add_rn(mul_rn(nested_code_q, nested_absmax), offset);
}

// The float32 value of one element before the output conversion.
QLORA_HD float decode_value(int quant_type, unsigned nibble, float absmax) {
  return mul_rn(code4_value(quant_type, nibble), absmax);
}

// float32 -> bfloat16 bits, round to nearest even. NaN stays NaN (quiet); the device's payload
// (canonical 0x7fff) may differ from the host's (sign and top payload bits kept, as the Rust
// `half` crate does) -- NaN never arises from finite scales.
QLORA_HD uint16_t f32_to_bf16_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  uint32_t x;
  memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x0040u);
  // Adding 0x7fff plus the lowest kept bit rounds half-way cases to the even neighbour; the carry
  // into the exponent handles mantissa overflow and rounding up to infinity.
  return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
#endif
}

// float32 -> float16 bits, round to nearest even, with subnormals; overflow gives infinity.
QLORA_HD uint16_t f32_to_f16_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) {  // infinity or NaN
    if (ax == 0x7f800000u) return (uint16_t)(sign | 0x7c00u);
    return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
  }
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // >= 65520 rounds to infinity
  if (ax >= 0x38800000u) {                                   // a normal float16 (>= 2^-14)
    const uint32_t rounded = ax + 0xfffu + ((ax >> 13) & 1u);
    return (uint16_t)(sign | ((rounded - 0x38000000u) >> 13));
  }
  if (ax < 0x33000000u) return (uint16_t)sign;  // below 2^-25: rounds to zero
  // A float16 subnormal: value / 2^-24 = mantissa >> (126 - exponent), rounded to nearest even.
  const uint32_t e = ax >> 23;
  const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;  // 14..24
  uint32_t h = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1u);
  if (rem > halfway || (rem == halfway && (h & 1u))) h += 1u;
  return (uint16_t)(sign | h);
#endif
}

}  // namespace qlora
