/* Prefill products of the CPU backend: a block of weight rows times a block
 * of prepared activation rows (vecdot.h's formats), for the dense matrices
 * and for each expert over the tokens routed to it.
 *
 * Contract: every output is the float moe_vecdot gives for that (row,
 * token) on the same path (the same operations in the same order), so a
 * sequence computed inside a batch equals the sequence alone and prefill
 * equals decode. Types with a tile kernel on the running path (gemm.c's
 * table: several weight rows x several tokens per call, accumulators in
 * registers) use it; every other type falls back to moe_vecdot_rows. No
 * allocation; thread-safe; the same alignment rules as vecdot.h.
 */
#ifndef MOE_KERNELS_CPU_GEMM_H
#define MOE_KERNELS_CPU_GEMM_H

#include <stddef.h>
#include <stdint.h>

/* y[k * ldy + r] = dot(row r, token k) (+ bias[r] when bias is not NULL)
 * for r < n_rows, k < n_tok: rows w + r * row_bytes of type t, n elements
 * each; tokens act + k * act_stride, prepared by moe_vecdot_quantize_act. */
void moe_gemm(uint32_t t, const void *w, size_t row_bytes, int64_t n_rows, const void *act, size_t act_stride,
              int64_t n_tok, int64_t n, float *y, int64_t ldy, const float *bias);

/* Whether moe_gemm has a tile kernel for type t on the running path (else
 * it is moe_vecdot_rows in a loop). */
int moe_gemm_tiled(uint32_t t);

/* Whether a call of moe_gemm for type t unpacks each weight row once
 * whatever n_tok (the AVX-512 K-quant tiles, rows of up to 4096): the
 * caller then gives it all its tokens at once rather than in blocks. */
int moe_gemm_whole_tokens(uint32_t t);

#endif
