#include <errno.h>
#include <math.h>
#include <string.h>

#include "common/error.h"
#include "kernels/cpu/quant.h"
#include "kernels/dtype.h"
#include "kernels/fp16.h"

static void put_f16(uint8_t *p, float f)
{
    uint16_t h = moe_fp32_to_fp16(f);
    p[0] = (uint8_t)h;
    p[1] = (uint8_t)(h >> 8);
}

static void quant_q8_0(const float *x, uint8_t *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += 32, y += 34) {
        float amax = 0.0f;
        for (int j = 0; j < 32; j++)
            amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        put_f16(y, d);
        for (int j = 0; j < 32; j++)
            y[2 + j] = (uint8_t)(int8_t)roundf(x[j] * id);
    }
}

static void quant_q4_0(const float *x, uint8_t *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += 32, y += 18) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < 32; j++)
            if (amax < fabsf(x[j])) {
                amax = fabsf(x[j]);
                max = x[j];
            }
        const float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        put_f16(y, d);
        for (int j = 0; j < 16; j++) {
            int8_t q0 = (int8_t)(x[j] * id + 8.5f), q1 = (int8_t)(x[16 + j] * id + 8.5f);
            if (q0 > 15)
                q0 = 15;
            if (q1 > 15)
                q1 = 15;
            y[2 + j] = (uint8_t)(q0 | q1 << 4);
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
    uint8_t *y = dst;
    switch (t) {
    case MOE_DTYPE_F32:
        memcpy(dst, src, (size_t)n * 4);
        break;
    case MOE_DTYPE_F16:
        for (int64_t i = 0; i < n; i++)
            put_f16(y + 2 * i, src[i]);
        break;
    case MOE_DTYPE_BF16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t b = moe_fp32_to_bf16(src[i]);
            y[2 * i] = (uint8_t)b;
            y[2 * i + 1] = (uint8_t)(b >> 8);
        }
        break;
    case MOE_DTYPE_Q8_0:
        quant_q8_0(src, y, n / 32);
        break;
    case MOE_DTYPE_Q4_0:
        quant_q4_0(src, y, n / 32);
        break;
    }
    return 0;
}
