/* Dequantizers of the block types, one row at a time (see dequant.h); the
 * block layouts are kernels/blocks.h's structs, where each type's formula
 * is written down. The float operations follow ggml's reference
 * dequantizers term by term, which is what makes them bit-exact. */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "common/error.h"
#include "kernels/blocks.h"
#include "kernels/cpu/dequant.h"
#include "kernels/fp16.h"

static inline float f16(uint16_t h)
{
    return moe_fp16_to_fp32(h);
}

/* Q5_0's and Q5_1's fifth bits: element j's is bit j of this word. */
static inline uint32_t high_bits(const uint8_t qh[4])
{
    uint32_t v;
    memcpy(&v, qh, sizeof(v));
    return v;
}

static void dq_f32(const void *vx, float *y, int64_t n)
{
    memcpy(y, vx, (size_t)n * sizeof(float));
}

static void dq_f16(const void *vx, float *y, int64_t n)
{
    const uint16_t *x = vx;
    for (int64_t i = 0; i < n; i++)
        y[i] = moe_fp16_to_fp32(x[i]);
}

static void dq_bf16(const void *vx, float *y, int64_t n)
{
    const uint16_t *x = vx;
    for (int64_t i = 0; i < n; i++)
        y[i] = moe_bf16_to_fp32(x[i]);
}

static void dq_q4_0(const void *vx, float *y, int64_t nb)
{
    const struct moe_block_q4_0 *x = vx;
    for (int64_t i = 0; i < nb; i++, y += MOE_QK4_0) {
        const float d = f16(x[i].d);
        for (int j = 0; j < MOE_QK4_0 / 2; j++) {
            y[j] = d * (float)((x[i].qs[j] & 0xf) - 8);
            y[j + 16] = d * (float)((x[i].qs[j] >> 4) - 8);
        }
    }
}

static void dq_q4_1(const void *vx, float *y, int64_t nb)
{
    const struct moe_block_q4_1 *x = vx;
    for (int64_t i = 0; i < nb; i++, y += MOE_QK4_1) {
        const float d = f16(x[i].d), m = f16(x[i].m);
        for (int j = 0; j < MOE_QK4_1 / 2; j++) {
            y[j] = d * (float)(x[i].qs[j] & 0xf) + m;
            y[j + 16] = d * (float)(x[i].qs[j] >> 4) + m;
        }
    }
}

static void dq_q5_0(const void *vx, float *y, int64_t nb)
{
    const struct moe_block_q5_0 *x = vx;
    for (int64_t i = 0; i < nb; i++, y += MOE_QK5_0) {
        const float d = f16(x[i].d);
        const uint32_t qh = high_bits(x[i].qh);
        const uint8_t *qs = x[i].qs;
        for (int j = 0; j < MOE_QK5_0 / 2; j++) {
            int h0 = (qh >> j) & 1, h1 = (qh >> (j + 16)) & 1;
            y[j] = d * (float)(((qs[j] & 0xf) | h0 << 4) - 16);
            y[j + 16] = d * (float)(((qs[j] >> 4) | h1 << 4) - 16);
        }
    }
}

static void dq_q5_1(const void *vx, float *y, int64_t nb)
{
    const struct moe_block_q5_1 *x = vx;
    for (int64_t i = 0; i < nb; i++, y += MOE_QK5_1) {
        const float d = f16(x[i].d), m = f16(x[i].m);
        const uint32_t qh = high_bits(x[i].qh);
        const uint8_t *qs = x[i].qs;
        for (int j = 0; j < MOE_QK5_1 / 2; j++) {
            int h0 = (qh >> j) & 1, h1 = (qh >> (j + 16)) & 1;
            y[j] = d * (float)((qs[j] & 0xf) | h0 << 4) + m;
            y[j + 16] = d * (float)((qs[j] >> 4) | h1 << 4) + m;
        }
    }
}

static void dq_q8_0(const void *vx, float *y, int64_t nb)
{
    const struct moe_block_q8_0 *x = vx;
    for (int64_t i = 0; i < nb; i++, y += MOE_QK8_0) {
        const float d = f16(x[i].d);
        for (int j = 0; j < MOE_QK8_0; j++)
            y[j] = (float)x[i].qs[j] * d;
    }
}

static void dq_q2_k(const void *vx, float *y, int64_t nb)
{
    const struct moe_block_q2_k *x = vx;
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *sc = x[i].scales, *q = x[i].qs;
        const float d = f16(x[i].d), dmin = f16(x[i].dmin);
        int is = 0;
        for (int n = 0; n < MOE_QK_K; n += 128, q += 32) {
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

static void dq_q3_k(const void *vx, float *y, int64_t nb)
{
    const struct moe_block_q3_k *x = vx;
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *hm = x[i].hmask, *q = x[i].qs;
        const float d = f16(x[i].d);
        int is = 0;
        uint8_t m = 1;
        for (int n = 0; n < MOE_QK_K; n += 128, q += 32) {
            for (int shift = 0; shift < 8; shift += 2, m <<= 1) {
                for (int half = 0; half < 2; half++, is++) {
                    const float dl = d * (float)moe_q3k_scale(x[i].scales, is);
                    for (int l = 16 * half; l < 16 * half + 16; l++)
                        *y++ = dl * (float)(((q[l] >> shift) & 3) - ((hm[l] & m) ? 0 : 4));
                }
            }
        }
    }
}

static void dq_q4_k(const void *vx, float *y, int64_t nb)
{
    const struct moe_block_q4_k *x = vx;
    for (int64_t i = 0; i < nb; i++) {
        const float d = f16(x[i].d), dmin = f16(x[i].dmin);
        const uint8_t *q = x[i].qs;
        for (int j = 0, is = 0; j < MOE_QK_K; j += 64, is += 2, q += 32) {
            int sc, m;
            moe_q4k_scale_min(is, x[i].scales, &sc, &m);
            const float d1 = d * (float)sc, m1 = dmin * (float)m;
            moe_q4k_scale_min(is + 1, x[i].scales, &sc, &m);
            const float d2 = d * (float)sc, m2 = dmin * (float)m;
            for (int l = 0; l < 32; l++)
                *y++ = d1 * (float)(q[l] & 0xf) - m1;
            for (int l = 0; l < 32; l++)
                *y++ = d2 * (float)(q[l] >> 4) - m2;
        }
    }
}

static void dq_q5_k(const void *vx, float *y, int64_t nb)
{
    const struct moe_block_q5_k *x = vx;
    for (int64_t i = 0; i < nb; i++) {
        const float d = f16(x[i].d), dmin = f16(x[i].dmin);
        const uint8_t *qh = x[i].qh, *ql = x[i].qs;
        uint8_t u1 = 1, u2 = 2;
        for (int j = 0, is = 0; j < MOE_QK_K; j += 64, is += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
            int sc, m;
            moe_q4k_scale_min(is, x[i].scales, &sc, &m);
            const float d1 = d * (float)sc, m1 = dmin * (float)m;
            moe_q4k_scale_min(is + 1, x[i].scales, &sc, &m);
            const float d2 = d * (float)sc, m2 = dmin * (float)m;
            for (int l = 0; l < 32; l++)
                *y++ = d1 * (float)((ql[l] & 0xf) + ((qh[l] & u1) ? 16 : 0)) - m1;
            for (int l = 0; l < 32; l++)
                *y++ = d2 * (float)((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2;
        }
    }
}

static void dq_q6_k(const void *vx, float *y, int64_t nb)
{
    const struct moe_block_q6_k *x = vx;
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *ql = x[i].ql, *qh = x[i].qh;
        const int8_t *sc = x[i].scales;
        const float d = f16(x[i].d);
        for (int n = 0; n < MOE_QK_K; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
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

static void dq_q8_k(const void *vx, float *y, int64_t nb)
{
    const struct moe_block_q8_k *x = vx;
    for (int64_t i = 0; i < nb; i++, y += MOE_QK_K) {
        for (int j = 0; j < MOE_QK_K; j++)
            y[j] = x[i].d * (float)x[i].qs[j];
    }
}

static void dq_iq4_nl(const void *vx, float *y, int64_t nb)
{
    const struct moe_block_iq4_nl *x = vx;
    for (int64_t i = 0; i < nb; i++, y += MOE_QK4_NL) {
        const float d = f16(x[i].d);
        for (int j = 0; j < MOE_QK4_NL / 2; j++) {
            y[j] = d * (float)moe_iq4nl_values[x[i].qs[j] & 0xf];
            y[j + 16] = d * (float)moe_iq4nl_values[x[i].qs[j] >> 4];
        }
    }
}

static void dq_mxfp4(const void *vx, float *y, int64_t nb)
{
    const struct moe_block_mxfp4 *x = vx;
    for (int64_t i = 0; i < nb; i++, y += MOE_QK_MXFP4) {
        const float d = moe_e8m0_half(x[i].e);
        for (int j = 0; j < MOE_QK_MXFP4 / 2; j++) {
            y[j] = d * (float)moe_mxfp4_values[x[i].qs[j] & 0xf];
            y[j + 16] = d * (float)moe_mxfp4_values[x[i].qs[j] >> 4];
        }
    }
}

/* Converts n_blocks blocks (elements, for the float types) at x. */
typedef void (*dequant_fn)(const void *x, float *y, int64_t n_blocks);

/* The dequantizer of each type and the alignment its struct needs. */
static const struct {
    dequant_fn fn;
    size_t align;
} dequant_types[MOE_DTYPE_COUNT] = {
    [MOE_DTYPE_F32] = { dq_f32, 1 },   /* memcpy: any alignment */
    [MOE_DTYPE_F16] = { dq_f16, _Alignof(uint16_t) },
    [MOE_DTYPE_BF16] = { dq_bf16, _Alignof(uint16_t) },
    [MOE_DTYPE_Q4_0] = { dq_q4_0, _Alignof(struct moe_block_q4_0) },
    [MOE_DTYPE_Q4_1] = { dq_q4_1, _Alignof(struct moe_block_q4_1) },
    [MOE_DTYPE_Q5_0] = { dq_q5_0, _Alignof(struct moe_block_q5_0) },
    [MOE_DTYPE_Q5_1] = { dq_q5_1, _Alignof(struct moe_block_q5_1) },
    [MOE_DTYPE_Q8_0] = { dq_q8_0, _Alignof(struct moe_block_q8_0) },
    [MOE_DTYPE_Q2_K] = { dq_q2_k, _Alignof(struct moe_block_q2_k) },
    [MOE_DTYPE_Q3_K] = { dq_q3_k, _Alignof(struct moe_block_q3_k) },
    [MOE_DTYPE_Q4_K] = { dq_q4_k, _Alignof(struct moe_block_q4_k) },
    [MOE_DTYPE_Q5_K] = { dq_q5_k, _Alignof(struct moe_block_q5_k) },
    [MOE_DTYPE_Q6_K] = { dq_q6_k, _Alignof(struct moe_block_q6_k) },
    [MOE_DTYPE_Q8_K] = { dq_q8_k, _Alignof(struct moe_block_q8_k) },
    [MOE_DTYPE_IQ4_NL] = { dq_iq4_nl, _Alignof(struct moe_block_iq4_nl) },
    [MOE_DTYPE_MXFP4] = { dq_mxfp4, _Alignof(struct moe_block_mxfp4) },
};

int moe_dequantize_supported(uint32_t t)
{
    return t < MOE_DTYPE_COUNT && dequant_types[t].fn != NULL;
}

int moe_dequantize_row(uint32_t t, const void *src, float *dst, int64_t n)
{
    const struct moe_dtype_info *info = moe_dtype_info(t);
    if (info == NULL || !moe_dequantize_supported(t))
        return MOE_EUNSUPPORTED;
    if (n < 0 || n % info->block_size != 0)
        return -EINVAL;
    const dequant_fn fn = dequant_types[t].fn;
    const int64_t nb = n / info->block_size;
    if ((uintptr_t)src % dequant_types[t].align == 0) {
        fn(src, dst, nb);
        return 0;
    }
    /* The structs want their alignment, which GGUF tensors and pack slices
     * always have; a GGUF file may still declare general.alignment = 1.
     * Such a row goes through an aligned buffer, a few KiB at a time. */
    union {
        max_align_t align;
        unsigned char b[4096];
    } tmp;
    const int64_t per = (int64_t)(sizeof(tmp.b) / info->type_size);
    const unsigned char *s = src;
    for (int64_t i = 0; i < nb; i += per) {
        const int64_t k = nb - i < per ? nb - i : per;
        memcpy(tmp.b, s + (size_t)i * info->type_size, (size_t)k * info->type_size);
        fn(tmp.b, dst + i * info->block_size, k);
    }
    return 0;
}
