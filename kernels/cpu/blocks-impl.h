/* Pieces of ggml's block formats shared by the dequantizers (dequant.c)
 * and the dot products (vecdot.c). Private to kernels/cpu. */
#ifndef MOE_KERNELS_CPU_BLOCKS_IMPL_H
#define MOE_KERNELS_CPU_BLOCKS_IMPL_H

#include <stdint.h>

#include "kernels/fp16.h"

/* IQ4_NL's non-linear 4-bit grid (ggml kvalues_iq4nl). */
static const int8_t moe_iq4nl_values[16] = {
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
};

/* E2M1 values times two (ggml kvalues_mxfp4); the scale is halved to match. */
static const int8_t moe_mxfp4_values[16] = {
    0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12,
};

/* MXFP4's E8M0 scale 2^(e-127), halved: e < 2 lands in float subnormals. */
static inline float moe_e8m0_half(uint8_t e)
{
    return moe_bits_f32(e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23);
}

/* The 12-byte scale/min packing of Q4_K and Q5_K: 8 six-bit scales and 8
 * six-bit mins; entry j of each. */
static inline void moe_k4_scale_min(int j, const uint8_t *q, int *sc, int *m)
{
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xf) | (q[j - 4] >> 6) << 4;
        *m = (q[j + 4] >> 4) | (q[j] >> 6) << 4;
    }
}

#endif
