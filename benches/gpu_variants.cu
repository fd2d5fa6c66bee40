// Kernel variants timed side by side on a lent GPU by benches/gpu_variants.py: not part of the
// library's fatbin (build.rs compiles cuda/*.cu only). The shipped kernels are included too, so
// every variant and the kernel it would replace run from one module in one harness.
//
//   nvcc -arch=sm_90 -O3 -cubin -o .gpuexp/variants.cubin benches/gpu_variants.cu
//
// qexp_simt_s{S}_u{U}_m{MAXM}: the SIMT GEMV of cuda/gemm_4bit.cu with S warps per row and U chunks
// in flight per lane (the shipped kernels use QLORA_SIMT_SPLIT and QLORA_SIMT_DEPTH).
// qexp_gemv_w{W}_u{U}: the tensor-core GEMV with W warps per block and U super-steps in flight
// (shipped: kGemvWarps, kGemvDepth).
//
// Measured and left out (H200, 2026-12-04): the tensor-core GEMV with x as the A operand (rows 8..15
// zero, 8 rows of W per warp, 1 to 4 tiles): up to 9% faster at M <= 2 on N = 4096, up to 8% slower
// on 14336x4096 and at M = 8; either form without the PRMT table offsets: 3-8% slower.
#include "../cuda/dequant.cu"
#include "../cuda/gemm_4bit.cu"

#define QEXP_SIMT(S, U, MAXM) QLORA_GEMM_4BIT_SIMT(qexp_simt_s##S##_u##U##_m##MAXM, __nv_bfloat16, S, U, MAXM)

QEXP_SIMT(1, 2, 1)
QEXP_SIMT(2, 2, 1)
QEXP_SIMT(4, 1, 1)
QEXP_SIMT(4, 2, 1)
QEXP_SIMT(4, 4, 1)
QEXP_SIMT(8, 1, 1)
QEXP_SIMT(8, 2, 1)
QEXP_SIMT(2, 2, 4)
QEXP_SIMT(4, 1, 4)
QEXP_SIMT(4, 2, 4)
QEXP_SIMT(8, 1, 4)


#define QEXP_GEMV(W, U) QLORA_GEMM_4BIT_GEMV(qexp_gemv_w##W##_u##U, __nv_bfloat16, W, U)

QEXP_GEMV(4, 1)
QEXP_GEMV(4, 2)
QEXP_GEMV(8, 1)
QEXP_GEMV(8, 2)
QEXP_GEMV(16, 1)
