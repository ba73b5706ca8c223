/* Weight quantizers: float32 rows to GGUF block types, bit-exact with
 * llama-quantize (ggml's reference quantizers, no importance matrix) for
 * the types here: F16 and BF16 (round to nearest even), Q8_0 (d = amax/127,
 * q = roundf(x/d)), Q4_0 (d = max/-8 with max the signed largest-magnitude
 * value, q = min(15, (int8)(x/d + 8.5))).
 * Used by the test-model generator; never on a hot path. */
#ifndef MOE_KERNELS_CPU_QUANT_H
#define MOE_KERNELS_CPU_QUANT_H

#include <stdint.h>

/* Whether moe_quantize_row can write type t. */
int moe_quantize_supported(uint32_t t);

/* Writes n floats as type t; n a multiple of the block size. Returns 0,
 * -EINVAL (bad n) or MOE_EUNSUPPORTED. */
int moe_quantize_row(uint32_t t, const float *src, void *dst, int64_t n);

#endif
