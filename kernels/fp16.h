/* IEEE half and bfloat16 conversions, shared by the CPU backend, the
 * quantizers and the tools. Header-only so that hot loops inline them.
 *
 * fp32 -> fp16 rounds to nearest even (what F16C's _mm_cvtps_ph and ggml's
 * conversions do), saturating to inf past 65504; NaN stays NaN (quiet).
 * fp32 -> bf16 rounds to nearest even like ggml; NaN stays a quiet NaN.
 */
#ifndef MOE_KERNELS_FP16_H
#define MOE_KERNELS_FP16_H

#include <stdint.h>
#include <string.h>

static inline uint32_t moe_f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float moe_bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float moe_fp16_to_fp32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0x1f)
        return moe_bits_f32(sign | 0x7f800000u | man << 13);
    if (exp != 0)
        return moe_bits_f32(sign | (exp + 112) << 23 | man << 13);
    /* zero or subnormal: man * 2^-24, exact in float */
    float f = (float)man * 0x1p-24f;
    return sign ? -f : f;
}

static inline uint16_t moe_fp32_to_fp16(float f)
{
    uint32_t u = moe_f32_bits(f);
    uint32_t sign = (u >> 16) & 0x8000;
    u &= 0x7fffffffu;
    if (u > 0x7f800000u)                   /* NaN: keep it quiet */
        return (uint16_t)(sign | 0x7e00 | ((u >> 13) & 0x3ff));
    if (u >= 0x477ff000u)                  /* rounds to >= 65520: inf */
        return (uint16_t)(sign | 0x7c00);
    if (u < 0x38800000u) {                 /* below 2^-14: subnormal or zero */
        /* Adding 0.5 (2^-1) aligns the value so that the float adder's
         * round-to-nearest-even produces the half mantissa in the low bits. */
        float a = moe_bits_f32(u) + 0.5f;
        return (uint16_t)(sign | (moe_f32_bits(a) - 0x3f000000u));
    }
    uint32_t odd = (u >> 13) & 1;
    u += 0xc8000fffu + odd;                /* rebias exponent (-112 << 23) and round */
    return (uint16_t)(sign | (u >> 13));
}

static inline float moe_bf16_to_fp32(uint16_t b)
{
    return moe_bits_f32((uint32_t)b << 16);
}

static inline uint16_t moe_fp32_to_bf16(float f)
{
    uint32_t u = moe_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)   /* NaN: force quiet */
        return (uint16_t)((u >> 16) | 64);
    return (uint16_t)((u + (0x7fff + ((u >> 16) & 1))) >> 16);
}

#endif
