// Kernel variants timed side by side on a lent GPU by benches/gpu_variants.py: not part of the
// library's fatbin (build.rs compiles cuda/*.cu only). The shipped kernels are included too, so
// every variant and the kernel it would replace run from one module in one harness.
//
//   nvcc -arch=sm_90 -O3 -cubin -o .gpuexp/variants.cubin benches/gpu_variants.cu
//
// qexp_gemv_w{W}_u{U}: the tensor-core GEMV with W warps per block and U super-steps in flight, the
// neighbours of the shipped instances (qlora_gemm_4bit_gemv_w8 / _w16 / _w32: U = 2, 1, 1).
// qexp_gemv_w{W}_m16: the same GEMV for up to 16 rows of activations (NT = 2: each decoded A fragment
// feeds two mma, x rows 0..7 and 8..15), against the tensor-core GEMM (`mma`) that runs M = 9..16
// now (0.75-0.93x torch's bf16 product on an H200). Not yet run on a GPU; if it wins, the library
// instantiates it beside the M <= 8 instances and GEMV_MAX_M (launcher and cuda_ops) becomes 16.
//
// Measured and left out (H200, 2026-12-04):
// - the tensor-core GEMV with x as the A operand (rows 8..15 zero, 8 rows of W per warp, 1 to 4
//   tiles): up to 9% faster at M <= 2 on N = 4096, up to 8% slower on 14336x4096 and at M = 8;
//   either form without the PRMT table offsets: 3-8% slower;
// - the SIMT GEMV with a row split over S = 2..8 warps, U = 1..4 chunks in flight: no gain over S = 1;
// - the GEMV with K split over 2 to 8 blocks as well (partial sums to global memory, the last block
//   of a row group adding them in split order): slower than the best unsplit warp count on every
//   shape, N = 1024 to 14336 (N = 1024, M = 1: 6.0 us at best against 5.6 for 32 warps; N = 4096:
//   10.3 against 8.8; N = 14336: 21.8 against 21.8 with one split, 25.6 and more with two or more).
#include "../cuda/dequant.cu"
#include "../cuda/gemm_4bit.cu"

#define QEXP_GEMV(W, U) QLORA_GEMM_4BIT_GEMV(qexp_gemv_w##W##_u##U, __nv_bfloat16, W, U, 1)
#define QEXP_GEMV16(W, U) QLORA_GEMM_4BIT_GEMV(qexp_gemv_w##W##_m16, __nv_bfloat16, W, U, 2)

QEXP_GEMV(4, 2)
QEXP_GEMV(8, 1)
QEXP_GEMV(16, 2)
QEXP_GEMV(32, 2)
QEXP_GEMV16(8, 2)
QEXP_GEMV16(16, 1)
QEXP_GEMV16(32, 1)
