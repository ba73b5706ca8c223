/* Tile kernels of gemm.c's table that live beside their row kernels in
 * vecdot.c: each computes, per (row, token), exactly the operations of the
 * row kernel moe_vecdot runs for that type on the running path, which is
 * easiest to keep true where both are written side by side.
 *
 * Each has gemm.c's gemm_tile_fn signature: nr rows w + r * row_bytes of n
 * elements against n_tok prepared tokens act + k * act_stride, into
 * y[k * ldy + r] (+ bias[r] when bias is not NULL). */
#ifndef MOE_KERNELS_CPU_VECDOT_IMPL_H
#define MOE_KERNELS_CPU_VECDOT_IMPL_H

#include <stddef.h>
#include <stdint.h>

/* BF16: with AVX512_BF16 register tiles of 3 rows x 4 tokens, each pair
 * keeping dot_bf16_avx512's two accumulators; with AVX2 alone (or AVX-512
 * without BF16) tiles of 2 rows x 2 tokens of dot_bf16_avx2's. */
void moe_gemm_tile_bf16(const uint8_t *w, size_t row_bytes, int nr, const uint8_t *act, size_t act_stride,
                        int64_t n_tok, int64_t n, float *y, int64_t ldy, const float *bias);

/* Q8_0 and MXFP4 on the AVX-512 path only: register tiles of 2 rows x 4
 * tokens of the QUAD_ROWS kernels. */
void moe_gemm_tile_q8_0(const uint8_t *w, size_t row_bytes, int nr, const uint8_t *act, size_t act_stride,
                        int64_t n_tok, int64_t n, float *y, int64_t ldy, const float *bias);
void moe_gemm_tile_mxfp4(const uint8_t *w, size_t row_bytes, int nr, const uint8_t *act, size_t act_stride,
                         int64_t n_tok, int64_t n, float *y, int64_t ldy, const float *bias);

/* Q4_0 and IQ4_NL on the AVX-512 path only: one token against four rows at
 * a time (gemm.c's gemv), each row q4c_rows' float operations; y[r] (+
 * bias[r]) for r < n_rows. */
void moe_gemm_gemv_q4_0(const uint8_t *w, size_t row_bytes, int64_t n_rows, const uint8_t *act, int64_t n, float *y,
                        const float *bias);
void moe_gemm_gemv_iq4_nl(const uint8_t *w, size_t row_bytes, int64_t n_rows, const uint8_t *act, int64_t n, float *y,
                          const float *bias);

/* BF16, Q8_0 and MXFP4, one token against n_rows rows four at a time (the
 * next four prefetched): y[r] (+ bias[r]) as moe_vecdot gives it (+ the
 * bias) on the running path; on paths without a kernel for the type (BF16
 * without AVX512_BF16, Q8_0 and MXFP4 below AVX-512, rows of more than
 * 16384 elements), moe_vecdot row by row. */
void moe_gemm_gemv_bf16(const uint8_t *w, size_t row_bytes, int64_t n_rows, const uint8_t *act, int64_t n, float *y,
                        const float *bias);
void moe_gemm_gemv_q8_0(const uint8_t *w, size_t row_bytes, int64_t n_rows, const uint8_t *act, int64_t n, float *y,
                        const float *bias);
void moe_gemm_gemv_mxfp4(const uint8_t *w, size_t row_bytes, int64_t n_rows, const uint8_t *act, int64_t n, float *y,
                         const float *bias);

#endif
