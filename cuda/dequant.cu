// 4-bit dequantize (NF4/FP4/INT4, plain or double-quantized scales) to float32/float16/bfloat16,
// bit-exact with rust/quant4.rs::dequantize_4bit.
//
// One thread decodes one 16-byte chunk of packed data: 32 elements, which always lie in a single
// quantization block because every block size is a multiple of 32 and chunks start at multiples of
// 32 elements. Full chunks use one 16-byte load and 16-byte stores (when `vec_ok`: both pointers
// 16-byte aligned); the last partial chunk and unaligned buffers take the element-wise path.
#include "device_common.cuh"

namespace qlora {

template <typename T>
__device__ __forceinline__ void dequant_4bit(const uint8_t* __restrict__ packed, Scales scales, uint64_t n,
                                             int quant_type, int blocksize_log2, T* __restrict__ out,
                                             int vec_ok) {
  __shared__ float lut[16];
  load_code4(lut, quant_type);
  __syncthreads();

  const uint64_t chunk = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const uint64_t e0 = chunk * 32;
  if (e0 >= n) return;
  const float absmax = block_absmax(scales, e0 >> blocksize_log2);

  if (vec_ok && e0 + 32 <= n) {
    const uint4 w = load16(packed + chunk * 16);
    float v[32];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const uint32_t b = byte_of(w, j);
      v[2 * j] = mul_rn(lut[b >> 4], absmax);
      v[2 * j + 1] = mul_rn(lut[b & 15u], absmax);
    }
    store32(out + e0, v);
  } else {
    const uint64_t end = e0 + 32 < n ? e0 + 32 : n;
    for (uint64_t e = e0; e < end; ++e) {
      const uint8_t b = packed[e >> 1];
      out[e] = Out<T>::one(mul_rn(lut[nibble_of(b, e)], absmax));
    }
  }
}

}  // namespace qlora

// Entry points, one per output type. Launch: blockDim 256, gridDim ceil(ceil(n / 32) / 256).
#define QLORA_DEQUANT_4BIT(NAME, T)                                                                  \
  extern "C" __global__ void __launch_bounds__(256) NAME(                                          \
      const uint8_t* __restrict__ packed, const void* __restrict__ absmax,                         \
      const float* __restrict__ nested_absmax, const float* __restrict__ nested_code, float offset, \
      int nested, unsigned long long n, int quant_type, int blocksize_log2, T* __restrict__ out,   \
      int vec_ok) {                                                                                \
    qlora::Scales s{absmax, nested_absmax, nested_code, offset, nested};                           \
    qlora::dequant_4bit<T>(packed, s, n, quant_type, blocksize_log2, out, vec_ok);                 \
  }

QLORA_DEQUANT_4BIT(qlora_dequantize_4bit_f32, float)
QLORA_DEQUANT_4BIT(qlora_dequantize_4bit_f16, __half)
QLORA_DEQUANT_4BIT(qlora_dequantize_4bit_bf16, __nv_bfloat16)
