/* Block layouts (ggml-common.h), all little-endian, QK_K = 256:
 *   Q4_0  { f16 d; u8 qs[16]; }                x = (nibble - 8) * d
 *   Q4_1  { f16 d, m; u8 qs[16]; }             x = nibble * d + m
 *   Q5_0  { f16 d; u8 qh[4]; u8 qs[16]; }      x = (5-bit - 16) * d
 *   Q5_1  { f16 d, m; u8 qh[4]; u8 qs[16]; }   x = 5-bit * d + m
 *   Q8_0  { f16 d; i8 qs[32]; }                x = q * d
 *   Q2_K  { u8 scales[16]; u8 qs[64]; f16 d, dmin; }
 *   Q3_K  { u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d; }
 *   Q4_K  { f16 d, dmin; u8 scales[12]; u8 qs[128]; }
 *   Q5_K  { f16 d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]; }
 *   Q6_K  { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d; }
 *   Q8_K  { f32 d; i8 qs[256]; i16 bsums[16]; }
 *   IQ4_NL{ f16 d; u8 qs[16]; }                x = table[nibble] * d
 *   MXFP4 { u8 e (E8M0); u8 qs[16]; }          x = table[nibble] * 2^(e-128)
 * In the 32-element types the low nibbles hold elements 0..15 and the high
 * nibbles 16..31.
 */
#include <errno.h>
#include <string.h>

#include "common/error.h"
#include "kernels/cpu/dequant.h"
#include "kernels/blocks.h"
#include "kernels/fp16.h"

#define QK_K 256

static inline float f16_to_f32(const uint8_t *p)
{
    return moe_fp16_to_fp32((uint16_t)(p[0] | p[1] << 8));
}

static inline float bits_to_f32(uint32_t bits)
{
    return moe_bits_f32(bits);
}

static inline uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void dq_f16(const uint8_t *x, float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        y[i] = f16_to_f32(x + 2 * i);
}

static void dq_bf16(const uint8_t *x, float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        y[i] = bits_to_f32((uint32_t)(x[2 * i] | x[2 * i + 1] << 8) << 16);
}

static void dq_q4_0(const uint8_t *b, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, b += 18, y += 32) {
        const float d = f16_to_f32(b);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)((b[2 + j] & 0xf) - 8);
            y[j + 16] = d * (float)((b[2 + j] >> 4) - 8);
        }
    }
}

static void dq_q4_1(const uint8_t *b, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, b += 20, y += 32) {
        const float d = f16_to_f32(b), m = f16_to_f32(b + 2);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)(b[4 + j] & 0xf) + m;
            y[j + 16] = d * (float)(b[4 + j] >> 4) + m;
        }
    }
}

static void dq_q5_0(const uint8_t *b, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, b += 22, y += 32) {
        const float d = f16_to_f32(b);
        const uint32_t qh = rd32(b + 2);
        const uint8_t *qs = b + 6;
        for (int j = 0; j < 16; j++) {
            int h0 = (qh >> j) & 1, h1 = (qh >> (j + 16)) & 1;
            y[j] = d * (float)(((qs[j] & 0xf) | h0 << 4) - 16);
            y[j + 16] = d * (float)(((qs[j] >> 4) | h1 << 4) - 16);
        }
    }
}

static void dq_q5_1(const uint8_t *b, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, b += 24, y += 32) {
        const float d = f16_to_f32(b), m = f16_to_f32(b + 2);
        const uint32_t qh = rd32(b + 4);
        const uint8_t *qs = b + 8;
        for (int j = 0; j < 16; j++) {
            int h0 = (qh >> j) & 1, h1 = (qh >> (j + 16)) & 1;
            y[j] = d * (float)((qs[j] & 0xf) | h0 << 4) + m;
            y[j + 16] = d * (float)((qs[j] >> 4) | h1 << 4) + m;
        }
    }
}

static void dq_q8_0(const uint8_t *b, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, b += 34, y += 32) {
        const float d = f16_to_f32(b);
        for (int j = 0; j < 32; j++)
            y[j] = (float)(int8_t)b[2 + j] * d;
    }
}

static void dq_q2_k(const uint8_t *b, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, b += 84) {
        const uint8_t *sc = b, *q = b + 16;
        const float d = f16_to_f32(b + 80), dmin = f16_to_f32(b + 82);
        int is = 0;
        for (int n = 0; n < QK_K; n += 128, q += 32) {
            for (int shift = 0; shift < 8; shift += 2) {
                for (int half = 0; half < 2; half++, is++) {
                    const float dl = d * (float)(sc[is] & 0xf), ml = dmin * (float)(sc[is] >> 4);
                    for (int l = 0; l < 16; l++)
                        *y++ = dl * (float)((q[l + 16 * half] >> shift) & 3) - ml;
                }
            }
        }
    }
}

static void dq_q3_k(const uint8_t *b, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, b += 110) {
        const uint8_t *hm = b, *q = b + 32, *s = b + 96;
        const float d = f16_to_f32(b + 108);
        /* 16 six-bit scales: low 4 bits in s[0..7] (two per byte), high 2
         * bits in s[8..11] (four per byte); stored offset by 32. */
        int8_t scales[16];
        for (int j = 0; j < 16; j++) {
            int lo = (s[j % 8] >> (4 * (j / 8))) & 0xf;
            int hi = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
            scales[j] = (int8_t)((lo | hi << 4) - 32);
        }
        int is = 0;
        uint8_t m = 1;
        for (int n = 0; n < QK_K; n += 128, q += 32) {
            for (int shift = 0; shift < 8; shift += 2, m <<= 1) {
                for (int half = 0; half < 2; half++, is++) {
                    const float dl = d * (float)scales[is];
                    for (int l = 16 * half; l < 16 * half + 16; l++)
                        *y++ = dl * (float)(((q[l] >> shift) & 3) - ((hm[l] & m) ? 0 : 4));
                }
            }
        }
    }
}

static void dq_q4_k(const uint8_t *b, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, b += 144) {
        const float d = f16_to_f32(b), dmin = f16_to_f32(b + 2);
        const uint8_t *scales = b + 4, *q = b + 16;
        for (int j = 0, is = 0; j < QK_K; j += 64, is += 2, q += 32) {
            int sc, m;
            moe_q4k_scale_min(is, scales, &sc, &m);
            const float d1 = d * (float)sc, m1 = dmin * (float)m;
            moe_q4k_scale_min(is + 1, scales, &sc, &m);
            const float d2 = d * (float)sc, m2 = dmin * (float)m;
            for (int l = 0; l < 32; l++)
                *y++ = d1 * (float)(q[l] & 0xf) - m1;
            for (int l = 0; l < 32; l++)
                *y++ = d2 * (float)(q[l] >> 4) - m2;
        }
    }
}

static void dq_q5_k(const uint8_t *b, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, b += 176) {
        const float d = f16_to_f32(b), dmin = f16_to_f32(b + 2);
        const uint8_t *scales = b + 4, *qh = b + 16, *ql = b + 48;
        uint8_t u1 = 1, u2 = 2;
        for (int j = 0, is = 0; j < QK_K; j += 64, is += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
            int sc, m;
            moe_q4k_scale_min(is, scales, &sc, &m);
            const float d1 = d * (float)sc, m1 = dmin * (float)m;
            moe_q4k_scale_min(is + 1, scales, &sc, &m);
            const float d2 = d * (float)sc, m2 = dmin * (float)m;
            for (int l = 0; l < 32; l++)
                *y++ = d1 * (float)((ql[l] & 0xf) + ((qh[l] & u1) ? 16 : 0)) - m1;
            for (int l = 0; l < 32; l++)
                *y++ = d2 * (float)((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2;
        }
    }
}

static void dq_q6_k(const uint8_t *b, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, b += 210) {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        const float d = f16_to_f32(b + 208);
        for (int n = 0; n < QK_K; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
            for (int l = 0; l < 32; l++) {
                int is = l / 16;
                int q1 = ((ql[l] & 0xf) | ((qh[l] >> 0) & 3) << 4) - 32;
                int q2 = ((ql[l + 32] & 0xf) | ((qh[l] >> 2) & 3) << 4) - 32;
                int q3 = ((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32;
                int q4 = ((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32;
                y[l] = d * (float)sc[is] * (float)q1;
                y[l + 32] = d * (float)sc[is + 2] * (float)q2;
                y[l + 64] = d * (float)sc[is + 4] * (float)q3;
                y[l + 96] = d * (float)sc[is + 6] * (float)q4;
            }
        }
    }
}

static void dq_q8_k(const uint8_t *b, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, b += 292, y += QK_K) {
        const float d = bits_to_f32(rd32(b));
        for (int j = 0; j < QK_K; j++)
            y[j] = d * (float)(int8_t)b[4 + j];
    }
}

static void dq_iq4_nl(const uint8_t *b, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, b += 18, y += 32) {
        const float d = f16_to_f32(b);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)moe_iq4nl_values[b[2 + j] & 0xf];
            y[j + 16] = d * (float)moe_iq4nl_values[b[2 + j] >> 4];
        }
    }
}

static void dq_mxfp4(const uint8_t *b, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, b += 17, y += 32) {
        const float d = moe_e8m0_half(b[0]);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)moe_mxfp4_values[b[1 + j] & 0xf];
            y[j + 16] = d * (float)moe_mxfp4_values[b[1 + j] >> 4];
        }
    }
}

typedef void (*dequant_fn)(const uint8_t *b, float *y, int64_t n_blocks_or_elems);

static dequant_fn dequant_for(uint32_t t)
{
    switch (t) {
    case MOE_DTYPE_F16: return dq_f16;
    case MOE_DTYPE_BF16: return dq_bf16;
    case MOE_DTYPE_Q4_0: return dq_q4_0;
    case MOE_DTYPE_Q4_1: return dq_q4_1;
    case MOE_DTYPE_Q5_0: return dq_q5_0;
    case MOE_DTYPE_Q5_1: return dq_q5_1;
    case MOE_DTYPE_Q8_0: return dq_q8_0;
    case MOE_DTYPE_Q2_K: return dq_q2_k;
    case MOE_DTYPE_Q3_K: return dq_q3_k;
    case MOE_DTYPE_Q4_K: return dq_q4_k;
    case MOE_DTYPE_Q5_K: return dq_q5_k;
    case MOE_DTYPE_Q6_K: return dq_q6_k;
    case MOE_DTYPE_Q8_K: return dq_q8_k;
    case MOE_DTYPE_IQ4_NL: return dq_iq4_nl;
    case MOE_DTYPE_MXFP4: return dq_mxfp4;
    default: return NULL;
    }
}

int moe_dequantize_supported(uint32_t t)
{
    return t == MOE_DTYPE_F32 || dequant_for(t) != NULL;
}

int moe_dequantize_row(uint32_t t, const void *src, float *dst, int64_t n)
{
    const struct moe_dtype_info *info = moe_dtype_info(t);
    if (info == NULL || !moe_dequantize_supported(t))
        return MOE_EUNSUPPORTED;
    if (n < 0 || n % info->block_size != 0)
        return -EINVAL;
    if (t == MOE_DTYPE_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        return 0;
    }
    /* Elementwise types take a count of elements, block types of blocks. */
    dequant_for(t)(src, dst, info->block_size == 1 ? n : n / info->block_size);
    return 0;
}
