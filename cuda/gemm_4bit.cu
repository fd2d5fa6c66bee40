// Fused 4-bit GEMM for small batches: out[M, N] = x[M, K] @ dequant(W[N, K])^T with M = 1..16,
// bf16/fp16 activations and output, float32 accumulation. The packed weight is read directly
// (never materialised in 16 bits); each weight is decoded exactly as dequant.cu decodes it.
//
// All kernels need K % 32 == 0 and 16-byte aligned x and packed pointers (the launcher checks;
// other shapes go through dequantize + torch.matmul). Then every 16-byte chunk of a weight row
// holds 32 elements of one quantization block, also when blocks run across row boundaries.
//
//  * qlora_gemm_4bit_gemv_*: tensor cores, M <= 8, W as the mma's A operand (see below): the
//    kernel for one to eight rows of activations.
//  * qlora_gemm_4bit_mma_*: tensor cores (mma.sync m16n8k16, sm_80+). A block of `warps` warps owns
//    32 output columns (4 tiles of 8 rows of W); its warps split K and reduce through shared memory.
//  * qlora_gemm_4bit_simt_*: plain FMA, M <= 4: a GEMV, a warp per row of W (see below). Slower than
//    the gemv kernel at every M on an H200; kept as an independent cross-check (kernel="simt").
#include "device_common.cuh"

namespace qlora {

// Two 16-bit values of a 32-bit word (low half first) as float32.
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t w);

template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t w) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}

template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t w) {
  __half2 h = *reinterpret_cast<__half2*>(&w);
  return __half22float2(h);
}

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel.
//
// mma.m16n8k16 fragment ownership (PTX ISA): lane = 4 * g + q. A (16 x 16, row-major) registers
// a0..a3 hold rows g, g+8, g, g+8 at k-pairs q, q, q+4, q+4; B (16 x 8) registers b0, b1 hold column
// g at k-pairs q and q+4; C holds rows g, g, g+8, g+8 at columns 2q, 2q+1, 2q, 2q+1.
//
// Within one k16 step the order of k does not matter as long as A and B agree, so each lane feeds
// the mma from its own 16-byte weight chunk: in "super-step" s the lane with k-pair index q owns
// chunk c = 4 s + q (32 elements), and mma step j (0..7) takes its elements 4j, 4j+1 (pair q) and
// 4j+2, 4j+3 (pair q+4) -- byte 2j and byte 2j+1 of the chunk. Its A values are x[g][32c + 4j ..]
// and x[g+8][32c + 4j ..], i.e. words 2j and 2j+1 of the same 32-element slice of x.
// ---------------------------------------------------------------------------------------------

constexpr int kMmaTiles = 4;  // n8 tiles per warp: 32 output columns per block

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                  uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Elements 2b and 2b + 1 of the byte `byte` (high nibble first) through the 16-entry table `lut`,
// scaled by `absmax` and rounded to T exactly as dequantize writes them, as a pair (the high
// nibble's value in the low half).
template <typename T>
__device__ __forceinline__ uint32_t scaled_pair(const float* lut, uint32_t byte, float absmax) {
  return Out<T>::pair(mul_rn(lut[byte >> 4], absmax), mul_rn(lut[byte & 15u], absmax));
}

// Chunk c (32 weights) of R rows 8 apart, with their block scales.
template <int R>
struct WeightFrag {
  uint4 w[R];
  float absmax[R];
};

// Loads chunk c of rows n0 + 8 t + g (t < R); outside the matrix: zero weights, zero scale.
template <int R>
__device__ __forceinline__ void load_weight_frag(WeightFrag<R>& f, const uint8_t* __restrict__ packed,
                                                 const Scales& scales, int n0, int g, int c, int kchunks, int N,
                                                 int K, int blocksize_log2) {
#pragma unroll
  for (int t = 0; t < R; ++t) {
    const int n = n0 + 8 * t + g;
    if (c < kchunks && n < N) {
      const uint64_t flat = (uint64_t)n * (uint64_t)K + 32u * (uint64_t)c;
      f.w[t] = load16(packed + (flat >> 1));
      f.absmax[t] = block_absmax(scales, flat >> blocksize_log2);
    } else {
      f.w[t] = make_uint4(0, 0, 0, 0);
      f.absmax[t] = 0.0f;
    }
  }
}

// The 32-element slice [32c, 32c + 32) of row `row` of x as 16 words, or zeros outside x.
template <typename T>
__device__ __forceinline__ void load_x_slice(uint32_t (&xs)[16], const T* __restrict__ x, int row, int M, int c,
                                             int kchunks, int K) {
  if (row < M && c < kchunks) {
    const uint4* p = reinterpret_cast<const uint4*>(x + (size_t)row * K + 32 * (size_t)c);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint4 v = __ldg(p + i);
      xs[4 * i] = v.x;
      xs[4 * i + 1] = v.y;
      xs[4 * i + 2] = v.z;
      xs[4 * i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i) xs[i] = 0u;
  }
}

template <typename T>
__device__ __forceinline__ void gemm_4bit_mma(const T* __restrict__ x, const uint8_t* __restrict__ packed,
                                              Scales scales, int M, int N, int K, int quant_type,
                                              int blocksize_log2, T* __restrict__ out) {
  extern __shared__ float partial[];  // [warps][kMmaTiles * 4][32]
  __shared__ float lut[16];
  load_code4(lut, quant_type);
  __syncthreads();

  const int warps = blockDim.x >> 5;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int q = lane & 3;
  const int n0 = blockIdx.x * (8 * kMmaTiles);
  const int kchunks = K >> 5;
  const int steps = (kchunks + 3) >> 2;

  float acc[kMmaTiles][4];
#pragma unroll
  for (int t = 0; t < kMmaTiles; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;

  WeightFrag<kMmaTiles> cur;
  if (warp < steps) load_weight_frag(cur, packed, scales, n0, g, 4 * warp + q, kchunks, N, K, blocksize_log2);
  for (int s = warp; s < steps; s += warps) {
    // Prefetch the next super-step's weights while this one is decoded.
    WeightFrag<kMmaTiles> next;
    const int sn = s + warps;
    if (sn < steps) load_weight_frag(next, packed, scales, n0, g, 4 * sn + q, kchunks, N, K, blocksize_log2);

    const int c = 4 * s + q;
    uint32_t xa[16], xb[16];
    load_x_slice(xa, x, g, M, c, kchunks, K);
    load_x_slice(xb, x, g + 8, M, c, kchunks, K);

#pragma unroll
    for (int t = 0; t < kMmaTiles; ++t) {
      const float am = cur.absmax[t];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        // Byte 2j holds elements 4j (high nibble) and 4j+1; byte 2j+1 holds 4j+2 and 4j+3.
        const uint32_t p0 = byte_of(cur.w[t], 2 * j);
        const uint32_t p1 = byte_of(cur.w[t], 2 * j + 1);
        const uint32_t b0 = scaled_pair<T>(lut, p0, am);
        const uint32_t b1 = scaled_pair<T>(lut, p1, am);
        mma_16816<T>(acc[t], xa[2 * j], xb[2 * j], xa[2 * j + 1], xb[2 * j + 1], b0, b1);
      }
    }
    if (sn < steps) cur = next;
  }

  float* mine = partial + warp * (kMmaTiles * 4 * 32);
#pragma unroll
  for (int t = 0; t < kMmaTiles; ++t) {
#pragma unroll
    for (int r = 0; r < 4; ++r) mine[(t * 4 + r) * 32 + lane] = acc[t][r];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kMmaTiles * 4 * 32; i += blockDim.x) {
    float sum = 0.0f;
    for (int w = 0; w < warps; ++w) sum += partial[w * (kMmaTiles * 4 * 32) + i];
    const int ln = i & 31;
    const int r = (i >> 5) & 3;
    const int t = i >> 7;
    const int row = (ln >> 2) + 8 * (r >> 1);
    const int col = n0 + 8 * t + 2 * (ln & 3) + (r & 1);
    if (row < M && col < N) out[(size_t)row * N + col] = Out<T>::one(sum);
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core GEMV (M <= 8): the mma with its operands swapped.
//
// A = 16 rows of W, B = x^T (rows of x are the 8 columns of the mma's n8), D = W x^T: no register
// holds the zero rows that M <= 8 would leave in an A made of x, and each mma covers 256 weights.
// A warp owns 16 rows of W (n0 + g and n0 + g + 8) and every W-th super-step of K; in a
// super-step the lane with k-pair index q decodes its own 16-byte chunk c = 4 s + q of both rows
// (the k order of the mma kernel above) and feeds B from the same 32-element slice of x row g. The
// W warps of a block work on the same rows; partial sums meet in shared memory in warp
// order. Table reads take one PRMT each: the 16-entry table sits 256-byte aligned in shared memory,
// and the byte lanes of (word >> 2) & 0x3c3c3c3c and (word << 2) & 0x3c3c3c3c hold 4 * nibble for
// the high and low nibbles of the word's bytes, so PRMT(offsets, table address) is the entry's
// address. About 4 instructions per weight against 8 for the SIMT kernel below (H200, 2026-12-04:
// 1.1-1.4x the SIMT and tensor-core kernels it replaced at M = 1..8; benches/gpu_variants.py).
// ---------------------------------------------------------------------------------------------

// M <= 8 is the mma's n (GEMV_MAX_M in rust/cuda/launch.rs). The warps of a block (W, which split K)
// and the super-steps each warp keeps in flight (U) are template parameters: one instance per warp
// count the launcher chooses from (GEMV_WARPS there), by the number of 16-row groups against the
// multiprocessors (cuda_ops.py). H200, 2026-12-04, M = 1 (benches/gpu_variants.py): 32 warps, U = 1
// fastest at N = 1024 (5.6 us against 8.2 for 8 warps), 16 warps, U = 1 at N = 4096 (8.8 against
// 10.0; 22.7 against 26.7 at K = 14336), 8 warps, U = 2 at N = 8192 and 14336; K split over blocks as
// well (a last-block reduction) lost everywhere. NT n8 tiles of x (1: M <= 8, the shipped instances;
// 2: M <= 16, each decoded A fragment feeding two mma) -- NT = 2 is instantiated by
// benches/gpu_variants.cu only, until a GPU run has timed it against the tensor-core GEMM.

// The table entry whose byte offset is byte k of `offsets`, in the table at shared address `base`
// (256-byte aligned).
__device__ __forceinline__ float table_at(uint32_t base, uint32_t offsets, int k) {
  const uint32_t addr = __byte_perm(offsets, base, 0x7650u + (uint32_t)k);
  float v;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(addr));
  return v;
}

// Elements 2b and 2b + 1 of a 16-byte chunk (byte b: high nibble first) decoded, scaled by `absmax`
// and rounded to T exactly as dequantize writes them, as a pair (element 2b in the low half).
template <typename T>
__device__ __forceinline__ uint32_t decode_pair(uint32_t base, const uint4& w, int b, float absmax) {
  const uint32_t word = word_of(w, b);
  const int k = b & 3;
  return Out<T>::pair(mul_rn(table_at(base, (word >> 2) & 0x3c3c3c3cu, k), absmax),
                      mul_rn(table_at(base, (word << 2) & 0x3c3c3c3cu, k), absmax));
}

template <typename T, int W, int U, int NT>
__device__ __forceinline__ void gemm_4bit_gemv(const T* __restrict__ x, const uint8_t* __restrict__ packed,
                                               Scales scales, int M, int N, int K, int quant_type,
                                               int blocksize_log2, T* __restrict__ out) {
  __shared__ __align__(256) float lut[16];
  __shared__ float partial[W][NT * 128];
  load_code4(lut, quant_type);
  __syncthreads();
  const uint32_t base = (uint32_t)__cvta_generic_to_shared(lut);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int q = lane & 3;
  const int n0 = blockIdx.x * 16;
  const int kchunks = K >> 5;
  const int steps = (kchunks + 3) >> 2;
  float acc[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
  for (int s0 = warp; s0 < steps; s0 += W * U) {
    WeightFrag<2> w[U];  // rows g and g + 8
#pragma unroll
    for (int u = 0; u < U; ++u) {
      load_weight_frag(w[u], packed, scales, n0, g, 4 * (s0 + W * u) + q, kchunks, N, K, blocksize_log2);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = 4 * (s0 + W * u) + q;
      uint32_t xs[NT][16];
#pragma unroll
      for (int t = 0; t < NT; ++t) load_x_slice(xs[t], x, g + 8 * t, M, c, kchunks, K);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        // A: rows g (a0, a2) and g + 8 (a1, a3) at elements 4j, 4j + 1 and 4j + 2, 4j + 3 of the chunk.
        const uint32_t a0 = decode_pair<T>(base, w[u].w[0], 2 * j, w[u].absmax[0]);
        const uint32_t a1 = decode_pair<T>(base, w[u].w[1], 2 * j, w[u].absmax[1]);
        const uint32_t a2 = decode_pair<T>(base, w[u].w[0], 2 * j + 1, w[u].absmax[0]);
        const uint32_t a3 = decode_pair<T>(base, w[u].w[1], 2 * j + 1, w[u].absmax[1]);
#pragma unroll
        for (int t = 0; t < NT; ++t) mma_16816<T>(acc[t], a0, a1, a2, a3, xs[t][2 * j], xs[t][2 * j + 1]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < NT; ++t) {
#pragma unroll
    for (int r = 0; r < 4; ++r) partial[warp][128 * t + 4 * lane + r] = acc[t][r];
  }
  __syncthreads();
  static_assert(32 * W >= NT * 128, "a thread per output of the block");
  if (threadIdx.x < NT * 128) {
    const int i = threadIdx.x;
    float sum = 0.0f;
#pragma unroll
    for (int v = 0; v < W; ++v) sum += partial[v][i];
    const int t = NT == 1 ? 0 : i >> 7;  // written so that NT = 1 compiles to the code run on a GPU
    const int ln = NT == 1 ? i >> 2 : (i >> 2) & 31;
    const int r = i & 3;
    const int row = (ln >> 2) + 8 * (r >> 1);    // D's c0, c1: row g; c2, c3: row g + 8
    const int m = 8 * t + 2 * (ln & 3) + (r & 1);  // D's columns 2q, 2q + 1 of tile t are rows of x
    if (m < M && n0 + row < N) out[(size_t)m * N + n0 + row] = Out<T>::one(sum);
  }
}

// ---------------------------------------------------------------------------------------------
// SIMT kernel (M <= 4): a GEMV, a warp per row of W.
//
// A block of kSimtWarps warps owns kSimtWarps rows of W. The lanes of a warp read chunks lane,
// lane + 32, ... of its row, kSimtDepth of them per iteration, all loads issued before any is
// decoded, so every load instruction of a warp reads 512 contiguous bytes. Each weight is rounded to
// T exactly as dequantize writes it (the product is x @ dequant(W)^T), multiplied in float32, summed
// per lane and then across the warp (xor shuffle). On an H200 (2026-12-04, benches/gpu_variants.py)
// this form (depth 2) measured fastest of rows split over 1..8 warps and depths 1..4 on 4096x4096,
// 4096x14336 and 14336x4096; about 8 instructions per weight (index, table read, scale, round,
// unpack, FMA) bound it, not the loads.
// ---------------------------------------------------------------------------------------------

constexpr int kSimtWarps = 8;  // warps (rows of W) per block
constexpr int kSimtDepth = 2;  // chunks per lane in flight
constexpr int kSimtMaxM = 4;

template <typename T, int MAXM>
__device__ __forceinline__ void gemm_4bit_simt(const T* __restrict__ x, const uint8_t* __restrict__ packed,
                                               Scales scales, int M, int N, int K, int quant_type,
                                               int blocksize_log2, T* __restrict__ out) {
  __shared__ float lut[16];
  load_code4(lut, quant_type);
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * kSimtWarps + (threadIdx.x >> 5);
  if (n >= N) return;
  const int kchunks = K >> 5;
  float acc[MAXM];
#pragma unroll
  for (int m = 0; m < MAXM; ++m) acc[m] = 0.0f;

  const uint64_t row = (uint64_t)n * (uint64_t)K;
  for (int base = lane; base < kchunks; base += 32 * kSimtDepth) {
    uint4 w[kSimtDepth];
    float am[kSimtDepth];
#pragma unroll
    for (int u = 0; u < kSimtDepth; ++u) {
      const int c = base + 32 * u;
      if (c < kchunks) {
        const uint64_t flat = row + 32u * (uint64_t)c;
        w[u] = load16(packed + (flat >> 1));
        am[u] = block_absmax(scales, flat >> blocksize_log2);
      }
    }
#pragma unroll
    for (int u = 0; u < kSimtDepth; ++u) {
      const int c = base + 32 * u;
      if (c < kchunks) {
        uint32_t xs[MAXM][16];
#pragma unroll
        for (int m = 0; m < MAXM; ++m) load_x_slice(xs[m], x, m, M, c, kchunks, K);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          const uint32_t b = byte_of(w[u], j);
          const float2 f = unpack2<T>(scaled_pair<T>(lut, b, am[u]));
#pragma unroll
          for (int m = 0; m < MAXM; ++m) {
            const float2 xv = unpack2<T>(xs[m][j]);
            acc[m] = fmaf(f.x, xv.x, acc[m]);
            acc[m] = fmaf(f.y, xv.y, acc[m]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int m = 0; m < MAXM; ++m) {
    float v = acc[m];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0 && m < M) out[(size_t)m * N + n] = Out<T>::one(v);
  }
}

}  // namespace qlora

// Entry points. gemv_w{W}: blockDim 32 * W, gridDim ceil(N / 16). mma: blockDim 32 * warps
// (warps <= 16), gridDim ceil(N / 32), dynamic shared memory warps * 2 KiB. simt: blockDim
// 32 * kSimtWarps, gridDim ceil(N / kSimtWarps), no dynamic shared memory; _m1 for one row of
// activations, _m4 for 2 to 4.
#define QLORA_GEMM_4BIT_ARGS(T)                                                                        \
  const T *__restrict__ x, const uint8_t *__restrict__ packed, const void *__restrict__ absmax,       \
      const float *__restrict__ nested_absmax, const float *__restrict__ nested_code, float offset,   \
      int nested, int M, int N, int K, int quant_type, int blocksize_log2, T *__restrict__ out

#define QLORA_GEMM_4BIT_MMA(NAME, T)                                                                  \
  extern "C" __global__ void __launch_bounds__(512) NAME(QLORA_GEMM_4BIT_ARGS(T)) {                  \
    qlora::Scales s{absmax, nested_absmax, nested_code, offset, nested};                            \
    qlora::gemm_4bit_mma<T>(x, packed, s, M, N, K, quant_type, blocksize_log2, out);                \
  }

#define QLORA_GEMM_4BIT_GEMV(NAME, T, W, U, NT)                                                       \
  extern "C" __global__ void __launch_bounds__(32 * W) NAME(QLORA_GEMM_4BIT_ARGS(T)) {               \
    qlora::Scales s{absmax, nested_absmax, nested_code, offset, nested};                            \
    qlora::gemm_4bit_gemv<T, W, U, NT>(x, packed, s, M, N, K, quant_type, blocksize_log2, out);     \
  }

#define QLORA_GEMM_4BIT_SIMT(NAME, T, MAXM)                                                           \
  extern "C" __global__ void __launch_bounds__(32 * qlora::kSimtWarps) NAME(QLORA_GEMM_4BIT_ARGS(T)) { \
    qlora::Scales s{absmax, nested_absmax, nested_code, offset, nested};                            \
    qlora::gemm_4bit_simt<T, MAXM>(x, packed, s, M, N, K, quant_type, blocksize_log2, out);         \
  }

QLORA_GEMM_4BIT_GEMV(qlora_gemm_4bit_gemv_w8_bf16, __nv_bfloat16, 8, 2, 1)
QLORA_GEMM_4BIT_GEMV(qlora_gemm_4bit_gemv_w8_f16, __half, 8, 2, 1)
QLORA_GEMM_4BIT_GEMV(qlora_gemm_4bit_gemv_w16_bf16, __nv_bfloat16, 16, 1, 1)
QLORA_GEMM_4BIT_GEMV(qlora_gemm_4bit_gemv_w16_f16, __half, 16, 1, 1)
QLORA_GEMM_4BIT_GEMV(qlora_gemm_4bit_gemv_w32_bf16, __nv_bfloat16, 32, 1, 1)
QLORA_GEMM_4BIT_GEMV(qlora_gemm_4bit_gemv_w32_f16, __half, 32, 1, 1)
QLORA_GEMM_4BIT_MMA(qlora_gemm_4bit_mma_bf16, __nv_bfloat16)
QLORA_GEMM_4BIT_MMA(qlora_gemm_4bit_mma_f16, __half)
QLORA_GEMM_4BIT_SIMT(qlora_gemm_4bit_simt_m1_bf16, __nv_bfloat16, 1)
QLORA_GEMM_4BIT_SIMT(qlora_gemm_4bit_simt_m1_f16, __half, 1)
QLORA_GEMM_4BIT_SIMT(qlora_gemm_4bit_simt_m4_bf16, __nv_bfloat16, qlora::kSimtMaxM)
QLORA_GEMM_4BIT_SIMT(qlora_gemm_4bit_simt_m4_f16, __half, qlora::kSimtMaxM)
