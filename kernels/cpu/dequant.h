/* Dequantization of ggml block types to float32, one row at a time.
 *
 * Bit-exact with ggml's reference dequantizers and with the `gguf` Python
 * package (tests/parity/test_dequant.c checks every tensor of shared/ref):
 * the float operations are done in the same order, in float32, with no
 * fused multiply-add (C11 mode turns contraction off).
 */
#ifndef MOE_KERNELS_CPU_DEQUANT_H
#define MOE_KERNELS_CPU_DEQUANT_H

#include <stdint.h>

#include "common/dtype.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Whether moe_dequantize_row handles type t. */
int moe_dequantize_supported(uint32_t t);

/* Writes n floats to dst from the blocks at src. n must be a multiple of
 * the type's block size. src may have any alignment (a row that is not
 * aligned like its blocks is copied through an aligned buffer first).
 * Returns 0, -EINVAL for a bad n, MOE_EUNSUPPORTED for a type it cannot
 * compute. Never allocates; thread-safe. */
int moe_dequantize_row(uint32_t t, const void *src, float *dst, int64_t n);

#ifdef __cplusplus
}
#endif

#endif
