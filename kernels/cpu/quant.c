/* Reference quantizers, bit-exact with llama-quantize for F16, BF16, Q8_0
 * and Q4_0 (see quant.h for the rules).
 *
 * Bit-exactness depends on doing the float operations exactly as ggml's
 * reference code does: x * (1/d) rather than x / d, roundf for Q8_0, and a
 * truncating conversion after adding 8.5 for Q4_0, with no fused
 * multiply-add (the project compiles as ISO C11, where GCC does not
 * contract a*b+c; a contraction here would change some codes).
 */
#include <errno.h>
#include <math.h>
#include <string.h>

#include "common/error.h"
#include "kernels/cpu/quant.h"
#include "common/dtype.h"
#include "kernels/fp16.h"

void moe_quantize_row_f16(const float *x, uint16_t *y, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        y[i] = moe_fp32_to_fp16(x[i]);
}

void moe_quantize_row_bf16(const float *x, uint16_t *y, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        y[i] = moe_fp32_to_bf16(x[i]);
}

void moe_dequantize_row_f16(const uint16_t *x, float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        y[i] = moe_fp16_to_fp32(x[i]);
}

void moe_dequantize_row_bf16(const uint16_t *x, float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        y[i] = moe_bf16_to_fp32(x[i]);
}

/* The block quantizers work on 4-float vectors (GCC/Clang vector
 * extensions; SSE2 on x86-64, NEON on arm64). Each element goes through the
 * same IEEE single operations as the scalar reference (products, sums,
 * truncating conversions, comparisons), and max() is exact in any order,
 * so the bytes are the same; the scalar form of each rule is given in the
 * comments. */
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));

static inline f32x4 load4(const float *p)
{
    f32x4 v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static inline f32x4 splat4(float x)
{
    return (f32x4){ x, x, x, x };
}

/* |a| > m ? |a| : m per lane (ggml's MAX(), exact for non-NaN input) */
static inline f32x4 absmax4(f32x4 a, f32x4 m)
{
    a = (f32x4)((i32x4)a & 0x7fffffff);
    i32x4 gt = a > m;
    return (f32x4)(((i32x4)a & gt) | ((i32x4)m & ~gt));
}

/* the largest |x[j]| of a 32-element block */
static inline float block_amax(const float *x)
{
    f32x4 m0 = splat4(0.0f), m1 = splat4(0.0f);
    for (int k = 0; k < 32; k += 8) {
        m0 = absmax4(load4(x + k), m0);
        m1 = absmax4(load4(x + k + 4), m1);
    }
    m0 = absmax4(m1, m0);
    float amax = 0.0f;
    for (int k = 0; k < 4; k++)
        amax = m0[k] > amax ? m0[k] : amax;
    return amax;
}

void moe_quantize_row_q8_0(const float *x, struct moe_block_q8_0 *y, int64_t n)
{
    MOE_ASSERT(n >= 0 && n % MOE_QK8_0 == 0);
    for (int64_t b = 0; b < n / MOE_QK8_0; b++, x += MOE_QK8_0) {
        /* amax = max |x[j]|; d = amax / 127; q[j] = roundf(x[j] * (1/d)) */
        const float amax = block_amax(x);
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = moe_fp32_to_fp16(d);
        const f32x4 vid = splat4(id), half = splat4(0.5f), mhalf = splat4(-0.5f);
        for (int k = 0; k < MOE_QK8_0; k += 4) {
            /* roundf (half away from zero) without libm: the truncation
             * q, then +-1 when the exact remainder v - q reaches +-0.5 */
            const f32x4 v = load4(x + k) * vid;
            i32x4 q = __builtin_convertvector(v, i32x4);
            const f32x4 f = v - __builtin_convertvector(q, f32x4);
            q = q - (f >= half) + (f <= mhalf); /* comparison masks are -1 */
            for (int j = 0; j < 4; j++)
                y[b].qs[k + j] = (int8_t)q[j];
        }
    }
}

void moe_quantize_row_q4_0(const float *x, struct moe_block_q4_0 *y, int64_t n)
{
    MOE_ASSERT(n >= 0 && n % MOE_QK4_0 == 0);
    const i32x4 fifteen = { 15, 15, 15, 15 };
    for (int64_t b = 0; b < n / MOE_QK4_0; b++, x += MOE_QK4_0) {
        /* max = the signed value of the largest magnitude, the first one on
         * ties (0 for an all-zero block); d = max / -8 maps it to code 0
         * exactly and the other side to at most 15:
         * q[j] = min(15, (int8)(x[j] * (1/d) + 8.5)) */
        const float amax = block_amax(x);
        float max = 0.0f;
        if (amax > 0.0f) {
            int j = 0;
            while (fabsf(x[j]) != amax)
                j++;
            max = x[j];
        }
        const float d = max / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = moe_fp32_to_fp16(d);
        const f32x4 vid = splat4(id), bias = splat4(8.5f);
        for (int k = 0; k < MOE_QK4_0 / 2; k += 4) {
            i32x4 lo = __builtin_convertvector(load4(x + k) * vid + bias, i32x4);
            i32x4 hi = __builtin_convertvector(load4(x + 16 + k) * vid + bias, i32x4);
            lo = (lo & (lo <= fifteen)) | (fifteen & (lo > fifteen));
            hi = (hi & (hi <= fifteen)) | (fifteen & (hi > fifteen));
            const i32x4 packed = lo | hi << 4; /* element j low, j + 16 high */
            for (int j = 0; j < 4; j++)
                y[b].qs[k + j] = (uint8_t)packed[j];
        }
    }
}

void moe_dequantize_row_q8_0(const struct moe_block_q8_0 *x, float *y, int64_t n)
{
    MOE_ASSERT(n >= 0 && n % MOE_QK8_0 == 0);
    for (int64_t b = 0; b < n / MOE_QK8_0; b++, y += MOE_QK8_0) {
        const float d = moe_fp16_to_fp32(x[b].d);
        for (int j = 0; j < MOE_QK8_0; j++)
            y[j] = (float)x[b].qs[j] * d;
    }
}

void moe_dequantize_row_q4_0(const struct moe_block_q4_0 *x, float *y, int64_t n)
{
    MOE_ASSERT(n >= 0 && n % MOE_QK4_0 == 0);
    const int half = MOE_QK4_0 / 2;
    for (int64_t b = 0; b < n / MOE_QK4_0; b++, y += MOE_QK4_0) {
        const float d = moe_fp16_to_fp32(x[b].d);
        for (int j = 0; j < half; j++) {
            y[j] = (float)((x[b].qs[j] & 0x0f) - 8) * d;
            y[half + j] = (float)((x[b].qs[j] >> 4) - 8) * d;
        }
    }
}

int moe_quantize_supported(uint32_t t)
{
    return t == MOE_DTYPE_F32 || t == MOE_DTYPE_F16 || t == MOE_DTYPE_BF16 || t == MOE_DTYPE_Q8_0 ||
           t == MOE_DTYPE_Q4_0;
}

int moe_quantize_row(uint32_t t, const float *src, void *dst, int64_t n)
{
    const struct moe_dtype_info *di = moe_dtype_info(t);
    if (di == NULL || !moe_quantize_supported(t))
        return MOE_EUNSUPPORTED;
    if (n < 0 || n % di->block_size != 0)
        return -EINVAL;
    /* dst may be unaligned (a byte buffer at any offset): quantize small
     * chunks into aligned scratch and copy out. */
    enum { CHUNK = 256 };
    union {
        uint16_t h[CHUNK];
        struct moe_block_q8_0 q8[CHUNK / MOE_QK8_0];
        struct moe_block_q4_0 q4[CHUNK / MOE_QK4_0];
    } tmp;
    uint8_t *out = dst;
    if (t == MOE_DTYPE_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        return 0;
    }
    for (int64_t i = 0; i < n; i += CHUNK) {
        const int64_t k = n - i < CHUNK ? n - i : CHUNK;
        size_t bytes = 0;
        switch (t) {
        case MOE_DTYPE_F16:
            moe_quantize_row_f16(src + i, tmp.h, k);
            bytes = (size_t)k * 2;
            break;
        case MOE_DTYPE_BF16:
            moe_quantize_row_bf16(src + i, tmp.h, k);
            bytes = (size_t)k * 2;
            break;
        case MOE_DTYPE_Q8_0:
            moe_quantize_row_q8_0(src + i, tmp.q8, k);
            bytes = (size_t)(k / MOE_QK8_0) * sizeof(struct moe_block_q8_0);
            break;
        case MOE_DTYPE_Q4_0:
            moe_quantize_row_q4_0(src + i, tmp.q4, k);
            bytes = (size_t)(k / MOE_QK4_0) * sizeof(struct moe_block_q4_0);
            break;
        }
        memcpy(out, &tmp, bytes);
        out += bytes;
    }
    return 0;
}
