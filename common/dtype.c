#include <errno.h>
#include <string.h>

#include "common/dtype.h"

/* Block geometry from ggml-common.h's block structs (QK_K = 256). Q8_1 is
 * ggml's 36-byte block (two halves + 32 int8); older gguf-py tables say 40,
 * from the float layout ggml no longer uses, and no model file stores it. */
static const struct moe_dtype_info dtypes[MOE_DTYPE_COUNT] = {
    [MOE_DTYPE_F32]     = { "F32",     1,   4 },
    [MOE_DTYPE_F16]     = { "F16",     1,   2 },
    [MOE_DTYPE_Q4_0]    = { "Q4_0",    32,  18 },
    [MOE_DTYPE_Q4_1]    = { "Q4_1",    32,  20 },
    [MOE_DTYPE_Q5_0]    = { "Q5_0",    32,  22 },
    [MOE_DTYPE_Q5_1]    = { "Q5_1",    32,  24 },
    [MOE_DTYPE_Q8_0]    = { "Q8_0",    32,  34 },
    [MOE_DTYPE_Q8_1]    = { "Q8_1",    32,  36 },
    [MOE_DTYPE_Q2_K]    = { "Q2_K",    256, 84 },
    [MOE_DTYPE_Q3_K]    = { "Q3_K",    256, 110 },
    [MOE_DTYPE_Q4_K]    = { "Q4_K",    256, 144 },
    [MOE_DTYPE_Q5_K]    = { "Q5_K",    256, 176 },
    [MOE_DTYPE_Q6_K]    = { "Q6_K",    256, 210 },
    [MOE_DTYPE_Q8_K]    = { "Q8_K",    256, 292 },
    [MOE_DTYPE_IQ2_XXS] = { "IQ2_XXS", 256, 66 },
    [MOE_DTYPE_IQ2_XS]  = { "IQ2_XS",  256, 74 },
    [MOE_DTYPE_IQ3_XXS] = { "IQ3_XXS", 256, 98 },
    [MOE_DTYPE_IQ1_S]   = { "IQ1_S",   256, 50 },
    [MOE_DTYPE_IQ4_NL]  = { "IQ4_NL",  32,  18 },
    [MOE_DTYPE_IQ3_S]   = { "IQ3_S",   256, 110 },
    [MOE_DTYPE_IQ2_S]   = { "IQ2_S",   256, 82 },
    [MOE_DTYPE_IQ4_XS]  = { "IQ4_XS",  256, 136 },
    [MOE_DTYPE_I8]      = { "I8",      1,   1 },
    [MOE_DTYPE_I16]     = { "I16",     1,   2 },
    [MOE_DTYPE_I32]     = { "I32",     1,   4 },
    [MOE_DTYPE_I64]     = { "I64",     1,   8 },
    [MOE_DTYPE_F64]     = { "F64",     1,   8 },
    [MOE_DTYPE_IQ1_M]   = { "IQ1_M",   256, 56 },
    [MOE_DTYPE_BF16]    = { "BF16",    1,   2 },
    [MOE_DTYPE_TQ1_0]   = { "TQ1_0",   256, 54 },
    [MOE_DTYPE_TQ2_0]   = { "TQ2_0",   256, 66 },
    [MOE_DTYPE_MXFP4]   = { "MXFP4",   32,  17 },
    [MOE_DTYPE_NVFP4]   = { "NVFP4",   64,  36 },
    [MOE_DTYPE_Q1_0]    = { "Q1_0",    128, 18 },
};

const struct moe_dtype_info *moe_dtype_info(uint32_t id)
{
    if (id >= MOE_DTYPE_COUNT || dtypes[id].name == NULL)
        return NULL;
    return &dtypes[id];
}

const char *moe_dtype_name(uint32_t id)
{
    const struct moe_dtype_info *d = moe_dtype_info(id);
    return d ? d->name : "?";
}

int moe_dtype_from_name(const char *name)
{
    for (int i = 0; i < MOE_DTYPE_COUNT; i++)
        if (dtypes[i].name != NULL && strcmp(dtypes[i].name, name) == 0)
            return i;
    return -1;
}

size_t moe_dtype_row_bytes(enum moe_dtype t, uint64_t n, int *err)
{
    const struct moe_dtype_info *d = moe_dtype_info((uint32_t)t);
    if (d == NULL || n % d->block_size != 0) {
        if (err)
            *err = -EINVAL;
        return 0;
    }
    uint64_t bytes;
    if (__builtin_mul_overflow(n / d->block_size, (uint64_t)d->type_size, &bytes) ||
        bytes > SIZE_MAX) {
        if (err)
            *err = -EOVERFLOW;
        return 0;
    }
    if (err)
        *err = 0;
    return (size_t)bytes;
}
