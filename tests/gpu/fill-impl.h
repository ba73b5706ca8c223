/* Random weight blocks for the gpu tests: every byte random, then the
 * scales of each block set to finite, moderate values so that dot products
 * stay in a sane range. C and C++ (test_gpu_lanes.cu includes it). */
#ifndef MOE_TESTS_GPU_FILL_IMPL_H
#define MOE_TESTS_GPU_FILL_IMPL_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/dtype.h"
#include "kernels/fp16.h"

/* uniform in [-1, 1) */
static inline float moe_test_frand(unsigned *seed)
{
    return (float)rand_r(seed) / (float)RAND_MAX * 2.0f - 1.0f;
}

static inline void moe_test_fill_type(uint32_t t, uint8_t *p, int64_t n_elems, unsigned *seed)
{
    const struct moe_dtype_info *inf = moe_dtype_info(t);
    const int64_t nb = n_elems / inf->block_size;
    for (int64_t i = 0; i < nb * (int64_t)inf->type_size; i++)
        p[i] = (uint8_t)rand_r(seed);
    for (int64_t b = 0; b < nb; b++) {
        uint8_t *blk = p + b * inf->type_size;
        const uint16_t h = moe_fp32_to_fp16(0.01f + 0.05f * fabsf(moe_test_frand(seed)));
        const uint16_t h2 = moe_fp32_to_fp16(0.01f + 0.05f * fabsf(moe_test_frand(seed)));
        switch (t) {
        case MOE_DTYPE_F32: {
            const float v = moe_test_frand(seed);
            memcpy(blk, &v, 4);
            break;
        }
        case MOE_DTYPE_F16: {
            const uint16_t v = moe_fp32_to_fp16(moe_test_frand(seed));
            memcpy(blk, &v, 2);
            break;
        }
        case MOE_DTYPE_BF16: {
            const uint16_t v = moe_fp32_to_bf16(moe_test_frand(seed));
            memcpy(blk, &v, 2);
            break;
        }
        case MOE_DTYPE_Q4_0: case MOE_DTYPE_Q5_0: case MOE_DTYPE_Q8_0: case MOE_DTYPE_IQ4_NL:
            memcpy(blk, &h, 2);
            break;
        case MOE_DTYPE_Q4_1: case MOE_DTYPE_Q5_1: case MOE_DTYPE_Q4_K: case MOE_DTYPE_Q5_K:
            memcpy(blk, &h, 2);
            memcpy(blk + 2, &h2, 2);
            break;
        case MOE_DTYPE_Q2_K:
            memcpy(blk + 80, &h, 2);
            memcpy(blk + 82, &h2, 2);
            break;
        case MOE_DTYPE_Q3_K:
            memcpy(blk + 108, &h, 2);
            break;
        case MOE_DTYPE_Q6_K:
            memcpy(blk + 208, &h, 2);
            break;
        case MOE_DTYPE_Q8_K: {
            const float d = 0.01f;
            memcpy(blk, &d, 4);
            break;
        }
        case MOE_DTYPE_MXFP4:
            blk[0] = (uint8_t)(120 + rand_r(seed) % 8);
            break;
        default:
            break;
        }
    }
}

#endif
