/* The quantized block formats that moed computes, declared once for the CPU
 * and CUDA backends: each block struct with its size checked at compile
 * time, the lookup grids of the non-linear types, the scale unpacking that
 * several block types share, and the activation format that each weight
 * type's dot product uses.
 *
 * The structs are the bytes of a GGUF tensor as they lie in memory. F16
 * fields are uint16_t holding the half's bits, so that the header is plain
 * C and compiles unchanged in .cu files (kernels/fp16.h and cuda_fp16.h
 * convert them). Multi-byte fields are little-endian, which is why only
 * little-endian hosts are accepted below.
 *
 * Alignment: the structs keep their natural alignment (2 bytes, 4 for
 * Q8_K), as ggml's do, so a pointer to a block must be aligned that much.
 * GGUF tensors and pack slices always are. Code that reads blocks at
 * arbitrary byte offsets (the CUDA kernels stage blocks in shared memory
 * wherever they fall) reads fields through MOE_BLOCK_FIELD, which takes the
 * offset from the struct and needs no alignment.
 *
 * Header-only, no state; everything here is safe to call from any thread
 * and, in CUDA code, from host and device alike.
 */
#ifndef MOE_KERNELS_BLOCKS_H
#define MOE_KERNELS_BLOCKS_H

#include <assert.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "common/dtype.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the block structs are GGUF's little-endian bytes: little-endian hosts only"
#endif

/* The helpers below run on the host and, in CUDA code, on the device. */
#ifdef __CUDACC__
#define MOE_BLOCK_FN static __host__ __device__ __forceinline__
#else
#define MOE_BLOCK_FN static inline
#endif

/* The bytes of field f of a block of type S (struct moe_block_...) that
 * starts at byte pointer p, for reads that must not assume alignment. */
#define MOE_BLOCK_FIELD(p, S, f) ((p) + offsetof(S, f))

/* ---- elements per block ------------------------------------------------ */

/* ggml-common.h: QK4_0 .. QK8_1, QK_K, QK4_NL, QK_MXFP4 */
#define MOE_QK4_0     32
#define MOE_QK4_1     32
#define MOE_QK5_0     32
#define MOE_QK5_1     32
#define MOE_QK8_0     32
#define MOE_QK8_1     32
#define MOE_QK_K      256  /* every K-quant super-block */
#define MOE_QK4_NL    32
#define MOE_QK_MXFP4  32
/* ggml-common.h: K_SCALE_SIZE, the packed scales and mins of Q4_K/Q5_K */
#define MOE_K_SCALE_SIZE 12

/* ---- the 32-element types --------------------------------------------- */

/* In every 32-element type with 4-bit codes, byte j of qs holds element j
 * in its low nibble and element j + 16 in its high nibble. */

/* ggml-common.h: block_q4_0. x = (code - 8) * d */
struct moe_block_q4_0 {
    uint16_t d;                   /* f16 scale */
    uint8_t  qs[MOE_QK4_0 / 2];   /* 4-bit codes */
};

/* ggml-common.h: block_q4_1. x = code * d + m */
struct moe_block_q4_1 {
    uint16_t d;                   /* f16 scale */
    uint16_t m;                   /* f16 minimum */
    uint8_t  qs[MOE_QK4_1 / 2];
};

/* ggml-common.h: block_q5_0. x = (code - 16) * d; the fifth bit of
 * element j is bit j of the little-endian word qh. */
struct moe_block_q5_0 {
    uint16_t d;
    uint8_t  qh[4];
    uint8_t  qs[MOE_QK5_0 / 2];
};

/* ggml-common.h: block_q5_1. x = code * d + m; qh as in Q5_0. */
struct moe_block_q5_1 {
    uint16_t d;
    uint16_t m;
    uint8_t  qh[4];
    uint8_t  qs[MOE_QK5_1 / 2];
};

/* ggml-common.h: block_q8_0. x = q * d; also the activation format of
 * Q4_0, Q5_0, Q8_0, IQ4_NL and MXFP4. */
struct moe_block_q8_0 {
    uint16_t d;
    int8_t   qs[MOE_QK8_0];
};

/* ggml-common.h: block_q8_1, the activation format of Q4_1 and Q5_1: s is
 * d times the sum of qs, rounded to f16, so that the weights' minimum
 * multiplies one number per block. */
struct moe_block_q8_1 {
    uint16_t d;
    uint16_t s;
    int8_t   qs[MOE_QK8_1];
};

/* ggml-common.h: block_iq4_nl. x = moe_iq4nl_values[code] * d */
struct moe_block_iq4_nl {
    uint16_t d;
    uint8_t  qs[MOE_QK4_NL / 2];
};

/* ggml-common.h: block_mxfp4 (OCP MX: E8M0 shared scale, E2M1 elements).
 * x = moe_mxfp4_values[code] * moe_e8m0_half(e) */
struct moe_block_mxfp4 {
    uint8_t e;                    /* E8M0 exponent: scale 2^(e - 127) */
    uint8_t qs[MOE_QK_MXFP4 / 2];
};

/* ---- the K-quants: super-blocks of 256 in groups of 16 or 32 ----------- */

/* ggml-common.h: block_q2_K. 16 groups of 16; scales[g] holds group g's
 * 4-bit scale (low nibble) and 4-bit minimum (high nibble), times d and
 * dmin. */
struct moe_block_q2_k {
    uint8_t  scales[MOE_QK_K / 16];
    uint8_t  qs[MOE_QK_K / 4];    /* 2-bit codes */
    uint16_t d;
    uint16_t dmin;
};

/* ggml-common.h: block_q3_K. 16 groups of 16 with 6-bit scales
 * (moe_q3k_scale); an element is its 2-bit code minus 4 unless its hmask
 * bit is set. */
struct moe_block_q3_k {
    uint8_t  hmask[MOE_QK_K / 8];
    uint8_t  qs[MOE_QK_K / 4];
    uint8_t  scales[12];
    uint16_t d;
};

/* ggml-common.h: block_q4_K. 8 groups of 32 with 6-bit scales and minimums
 * (moe_q4k_scale_min); x = d * scale * code - dmin * min. */
struct moe_block_q4_k {
    uint16_t d;
    uint16_t dmin;
    uint8_t  scales[MOE_K_SCALE_SIZE];
    uint8_t  qs[MOE_QK_K / 2];
};

/* ggml-common.h: block_q5_K. Q4_K plus a fifth bit per element in qh. */
struct moe_block_q5_k {
    uint16_t d;
    uint16_t dmin;
    uint8_t  scales[MOE_K_SCALE_SIZE];
    uint8_t  qh[MOE_QK_K / 8];
    uint8_t  qs[MOE_QK_K / 2];
};

/* ggml-common.h: block_q6_K. 16 groups of 16 with signed 8-bit scales;
 * x = d * scale * (code - 32), the code's low 4 bits in ql and high 2 in qh. */
struct moe_block_q6_k {
    uint8_t  ql[MOE_QK_K / 2];
    uint8_t  qh[MOE_QK_K / 4];
    int8_t   scales[MOE_QK_K / 16];
    uint16_t d;
};

/* ggml-common.h: block_q8_K, the activation format of the K-quants. d is a
 * float, not a half, and bsums[g] is the sum of qs over group g of 16, so
 * that a weight's minimum costs one product per group. */
struct moe_block_q8_k {
    float   d;
    int8_t  qs[MOE_QK_K];
    int16_t bsums[MOE_QK_K / 16];
};

/* ggml's sizes; tests/unit/test_blocks.c checks them against common/dtype.c
 * too, so that the table and the structs cannot drift apart. */
static_assert(sizeof(struct moe_block_q4_0) == 18, "block_q4_0 is 18 bytes");
static_assert(sizeof(struct moe_block_q4_1) == 20, "block_q4_1 is 20 bytes");
static_assert(sizeof(struct moe_block_q5_0) == 22, "block_q5_0 is 22 bytes");
static_assert(sizeof(struct moe_block_q5_1) == 24, "block_q5_1 is 24 bytes");
static_assert(sizeof(struct moe_block_q8_0) == 34, "block_q8_0 is 34 bytes");
static_assert(sizeof(struct moe_block_q8_1) == 36, "block_q8_1 is 36 bytes");
static_assert(sizeof(struct moe_block_iq4_nl) == 18, "block_iq4_nl is 18 bytes");
static_assert(sizeof(struct moe_block_mxfp4) == 17, "block_mxfp4 is 17 bytes");
static_assert(sizeof(struct moe_block_q2_k) == 84, "block_q2_K is 84 bytes");
static_assert(sizeof(struct moe_block_q3_k) == 110, "block_q3_K is 110 bytes");
static_assert(sizeof(struct moe_block_q4_k) == 144, "block_q4_K is 144 bytes");
static_assert(sizeof(struct moe_block_q5_k) == 176, "block_q5_K is 176 bytes");
static_assert(sizeof(struct moe_block_q6_k) == 210, "block_q6_K is 210 bytes");
static_assert(sizeof(struct moe_block_q8_k) == 292, "block_q8_K is 292 bytes");

/* ---- lookup grids ------------------------------------------------------- */

/* Each grid is written once, as four groups of four values handed to a
 * macro X, so that one list yields both the C table (X = MOE_GRID_BYTES)
 * and the little-endian words that the CUDA GEMV looks codes up in with
 * byte permutes (X = MOE_GRID_WORD). */
#define MOE_GRID_BYTES(a, b, c, d) a, b, c, d
#define MOE_GRID_WORD(a, b, c, d)                                              \
    ((uint32_t)(uint8_t)(a) | (uint32_t)(uint8_t)(b) << 8 |                    \
     (uint32_t)(uint8_t)(c) << 16 | (uint32_t)(uint8_t)(d) << 24)

/* ggml-common.h: kvalues_iq4nl, IQ4_NL's non-linear 4-bit grid */
#define MOE_IQ4NL_GRID(X)                                                      \
    X(-127, -104, -83, -65), X(-49, -35, -22, -10),                            \
    X(1, 13, 25, 38), X(53, 69, 89, 113)

/* ggml-common.h: kvalues_mxfp4, the E2M1 values times two (so that they
 * are integers); moe_e8m0_half halves the scale to make up for it. */
#define MOE_MXFP4_GRID(X)                                                      \
    X(0, 1, 2, 3), X(4, 6, 8, 12),                                             \
    X(0, -1, -2, -3), X(-4, -6, -8, -12)

static const int8_t moe_iq4nl_values[16] = { MOE_IQ4NL_GRID(MOE_GRID_BYTES) };
static const int8_t moe_mxfp4_values[16] = { MOE_MXFP4_GRID(MOE_GRID_BYTES) };

/* ---- shared unpacking ---------------------------------------------------- */

/* ggml-impl.h: ggml_e8m0_to_fp32_half. MXFP4's scale 2^(e - 127), halved
 * for the doubled grid: exponents below 2 land in float subnormals. */
MOE_BLOCK_FN float moe_e8m0_half(uint8_t e)
{
    const uint32_t bits = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
#ifdef __CUDA_ARCH__
    return __uint_as_float(bits);
#else
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
#endif
}

/* ggml-quants.c: get_scale_min_k4. Q4_K's and Q5_K's 12 bytes of scales
 * hold 8 six-bit scales and 8 six-bit minimums: groups 0..3 in the low six
 * bits of bytes 0..7, groups 4..7 in the nibbles of bytes 8..11 with their
 * top two bits in the spare high bits of bytes 0..7. */
MOE_BLOCK_FN void moe_q4k_scale_min(int j, const uint8_t *q, int *sc, int *m)
{
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xf) | (q[j - 4] >> 6) << 4;
        *m = (q[j + 4] >> 4) | (q[j] >> 6) << 4;
    }
}

/* ggml-quants.c: dequantize_row_q3_K. Q3_K's 16 six-bit scales, stored
 * with an offset of 32: the low 4 bits of group j in a nibble of bytes
 * 0..7, the high 2 bits in a bit pair of bytes 8..11. */
MOE_BLOCK_FN int moe_q3k_scale(const uint8_t *s, int j)
{
    const int lo = (s[j % 8] >> (4 * (j / 8))) & 0xf;
    const int hi = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
    return (lo | hi << 4) - 32;
}

/* ---- activation formats ------------------------------------------------- */

/* ggml-cpu.c: type_traits_cpu[].vec_dot_type. The type an activation row
 * is converted to before it meets a weight row of type t, or -1 when t has
 * no dot product. Both backends quantize activations this way, and the
 * parity with llama.cpp depends on it: the rounding of the activations,
 * not only of the weights, decides the result. */
MOE_BLOCK_FN int moe_dtype_vec_dot_type(uint32_t t)
{
    switch (t) {
    case MOE_DTYPE_F32: return MOE_DTYPE_F32;
    case MOE_DTYPE_F16: return MOE_DTYPE_F16;
    case MOE_DTYPE_BF16: return MOE_DTYPE_BF16;
    case MOE_DTYPE_Q4_0: return MOE_DTYPE_Q8_0;
    case MOE_DTYPE_Q4_1: return MOE_DTYPE_Q8_1;
    case MOE_DTYPE_Q5_0: return MOE_DTYPE_Q8_0;
    case MOE_DTYPE_Q5_1: return MOE_DTYPE_Q8_1;
    case MOE_DTYPE_Q8_0: return MOE_DTYPE_Q8_0;
    case MOE_DTYPE_IQ4_NL: return MOE_DTYPE_Q8_0;
    case MOE_DTYPE_MXFP4: return MOE_DTYPE_Q8_0;
    case MOE_DTYPE_Q2_K: return MOE_DTYPE_Q8_K;
    case MOE_DTYPE_Q3_K: return MOE_DTYPE_Q8_K;
    case MOE_DTYPE_Q4_K: return MOE_DTYPE_Q8_K;
    case MOE_DTYPE_Q5_K: return MOE_DTYPE_Q8_K;
    case MOE_DTYPE_Q6_K: return MOE_DTYPE_Q8_K;
    default: return -1;
    }
}

#ifdef __cplusplus
}
#endif

#endif
