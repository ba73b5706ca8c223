/* Weight quantizers: float32 rows to GGUF block types, bit-exact with
 * llama-quantize (ggml's reference quantizers quantize_row_*_ref, no
 * importance matrix), and the matching dequantizers for the same types.
 *
 * Rules (facts of the formats, see ggml-common.h / ggml-quants.c):
 *   F16   IEEE binary16, round to nearest even, overflow to inf, subnormals
 *         kept, NaN stays a quiet NaN (kernels/fp16.h).
 *   BF16  the high half of the float32, rounded to nearest even; NaN forced
 *         quiet (ggml_compute_fp32_to_bf16).
 *   Q8_0  blocks of 32: d = amax / 127, q = roundf(x / d) (as x * (1/d)).
 *   Q4_0  blocks of 32: max = the element of largest magnitude (first one on
 *         ties), with its sign; d = max / -8; q = min(15, (int8)(x/d + 8.5));
 *         byte j holds element j in its low nibble and j + 16 in its high one.
 * d is stored as F16 (a block whose d underflows F16 dequantizes to zeros).
 * An all-zero block gets d = +0 and codes 0 (Q8_0) or d = -0 (0 / -8, as
 * ggml computes it) and codes 8 (Q4_0); both dequantize to 0.
 *
 * Every function here is pure: no allocation, no global state, thread-safe.
 * Row lengths n must be a multiple of the block size for the block types
 * (checked by moe_quantize_row; the typed functions assert it). Multi-byte
 * fields are little-endian, like the host (kernels/blocks.h insists).
 * Used by the test-model generator and the tests; never on a hot path.
 */
#ifndef MOE_KERNELS_CPU_QUANT_H
#define MOE_KERNELS_CPU_QUANT_H

#include <stdint.h>

#include "kernels/blocks.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Element-wise conversions of n values. */
void moe_quantize_row_f16(const float *x, uint16_t *y, int64_t n);
void moe_quantize_row_bf16(const float *x, uint16_t *y, int64_t n);
void moe_dequantize_row_f16(const uint16_t *x, float *y, int64_t n);
void moe_dequantize_row_bf16(const uint16_t *x, float *y, int64_t n);

/* n floats (a multiple of 32) to n / 32 blocks, and back. */
void moe_quantize_row_q8_0(const float *x, struct moe_block_q8_0 *y, int64_t n);
void moe_quantize_row_q4_0(const float *x, struct moe_block_q4_0 *y, int64_t n);
void moe_dequantize_row_q8_0(const struct moe_block_q8_0 *x, float *y, int64_t n);
void moe_dequantize_row_q4_0(const struct moe_block_q4_0 *x, float *y, int64_t n);

/* n floats (a multiple of 256) to n / 256 super-blocks: ggml's reference
 * K-quantizers (quantize_row_q{4,5,6}_K_ref, what llama-quantize uses
 * without an importance matrix): per group of 32 (Q4_K, Q5_K) a weighted
 * least-squares search for scale and minimum, or per group of 16 (Q6_K) for
 * a signed scale; the group scales quantized to 6 or 8 bits against a
 * super-block f16 scale. */
void moe_quantize_row_q4_k(const float *x, struct moe_block_q4_k *y, int64_t n);
void moe_quantize_row_q5_k(const float *x, struct moe_block_q5_k *y, int64_t n);
void moe_quantize_row_q6_k(const float *x, struct moe_block_q6_k *y, int64_t n);
/* n floats (a multiple of 32): E8M0 exponent floor(log2(amax)) - 2, each
 * element the nearest E2M1 value (the first on ties). */
void moe_quantize_row_mxfp4(const float *x, struct moe_block_mxfp4 *y, int64_t n);

/* Whether moe_quantize_row can write type t (an enum moe_dtype id):
 * F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K, MXFP4. */
int moe_quantize_supported(uint32_t t);

/* Writes n floats as type t into dst (moe_dtype_row_bytes(t, n) bytes, no
 * alignment needed). Returns 0, -EINVAL when n is negative or not a
 * multiple of the block size, MOE_EUNSUPPORTED for other types. */
int moe_quantize_row(uint32_t t, const float *src, void *dst, int64_t n);

#ifdef __cplusplus
}
#endif

#endif
