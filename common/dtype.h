/* ggml tensor block types: ids as stored in GGUF, names, block geometry.
 *
 * The ids are the on-disk values of `ggml_type` (GGUF spec); gaps are ids
 * that ggml removed and that no valid file carries. Sizes follow ggml's
 * block structs (ggml-common.h). Computing a type is the CPU/CUDA backends'
 * business; this table only names and sizes them so that any file can be
 * read, sized and described.
 */
#ifndef MOE_COMMON_DTYPE_H
#define MOE_COMMON_DTYPE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum moe_dtype {
    MOE_DTYPE_F32     = 0,
    MOE_DTYPE_F16     = 1,
    MOE_DTYPE_Q4_0    = 2,
    MOE_DTYPE_Q4_1    = 3,
    MOE_DTYPE_Q5_0    = 6,
    MOE_DTYPE_Q5_1    = 7,
    MOE_DTYPE_Q8_0    = 8,
    MOE_DTYPE_Q8_1    = 9,
    MOE_DTYPE_Q2_K    = 10,
    MOE_DTYPE_Q3_K    = 11,
    MOE_DTYPE_Q4_K    = 12,
    MOE_DTYPE_Q5_K    = 13,
    MOE_DTYPE_Q6_K    = 14,
    MOE_DTYPE_Q8_K    = 15,
    MOE_DTYPE_IQ2_XXS = 16,
    MOE_DTYPE_IQ2_XS  = 17,
    MOE_DTYPE_IQ3_XXS = 18,
    MOE_DTYPE_IQ1_S   = 19,
    MOE_DTYPE_IQ4_NL  = 20,
    MOE_DTYPE_IQ3_S   = 21,
    MOE_DTYPE_IQ2_S   = 22,
    MOE_DTYPE_IQ4_XS  = 23,
    MOE_DTYPE_I8      = 24,
    MOE_DTYPE_I16     = 25,
    MOE_DTYPE_I32     = 26,
    MOE_DTYPE_I64     = 27,
    MOE_DTYPE_F64     = 28,
    MOE_DTYPE_IQ1_M   = 29,
    MOE_DTYPE_BF16    = 30,
    MOE_DTYPE_TQ1_0   = 34,
    MOE_DTYPE_TQ2_0   = 35,
    MOE_DTYPE_MXFP4   = 39,
    MOE_DTYPE_NVFP4   = 40,
    MOE_DTYPE_Q1_0    = 41,
    MOE_DTYPE_COUNT   = 42, /* one past the largest id; not a type */
};

struct moe_dtype_info {
    const char *name;        /* "Q4_K"; NULL for ids that are not a type */
    uint32_t    block_size;  /* elements per block */
    uint32_t    type_size;   /* bytes per block */
};

/* NULL when id is not a known type (out of range or a removed id). */
const struct moe_dtype_info *moe_dtype_info(uint32_t id);
/* "F32"...; "?" for unknown ids. */
const char *moe_dtype_name(uint32_t id);
/* -1 when no type has that name (case-sensitive, ggml spelling). */
int moe_dtype_from_name(const char *name);

/* Bytes of one row of n elements; 0 with *err set to -EINVAL when n is not
 * a multiple of the block size or the type is unknown. */
size_t moe_dtype_row_bytes(enum moe_dtype t, uint64_t n, int *err);

#ifdef __cplusplus
}
#endif

#endif
