/* Quantizers (kernels/cpu/quant.h).
 *
 * - F16/BF16 conversions against independent references: a slow exact
 *   rounding written with double arithmetic, and the CPU's F16C instruction
 *   where there is one; every half and bfloat16 value decodes and re-encodes
 *   to itself; edge values (ties, overflow, subnormals, inf, NaN).
 * - Q8_0/Q4_0: hand-computed blocks, error bounds of quantize->dequantize,
 *   the typed and generic entry points and dequant.c agree.
 * - Bit-exactness with llama.cpp: shared/ref's F16, Q8_0 and Q4_0 variants of
 *   tiny-mixtral were made by llama-quantize from the F32 master, so
 *   quantizing the master's tensors must reproduce their bytes exactly
 *   wherever the variant stores that tensor in that type (skips without
 *   shared/ref). */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

#include "common/error.h"
#include "io/gguf.h"
#include "kernels/cpu/dequant.h"
#include "kernels/cpu/quant.h"
#include "common/dtype.h"
#include "kernels/fp16.h"
#include "tests/harness.h"

/* ---- references ------------------------------------------------------- */

static float f_of(uint32_t u) { return moe_bits_f32(u); }

/* Exact round-to-nearest-even to binary16, computed in double (every step
 * exact), independent of kernels/fp16.h's bit tricks. */
static uint16_t ref_fp16(float f)
{
    uint32_t u = moe_f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    if (isnan(f))
        return (uint16_t)(sign | 0x7e00 | ((u >> 13) & 0x3ff));
    if (isinf(f))
        return (uint16_t)(sign | 0x7c00);
    double a = fabs((double)f);
    if (a == 0.0)
        return sign;
    if (a < 0x1p-14) {                    /* subnormal: units of 2^-24 */
        double m = rint(a * 0x1p24);     /* rint: round to nearest even */
        return (uint16_t)(sign | (uint16_t)m); /* m == 1024 is the smallest normal */
    }
    int e;
    frexp(a, &e);                         /* a = m * 2^e, m in [0.5, 1) */
    e -= 1;                               /* a in [2^e, 2^(e+1)) */
    double m = rint(ldexp(a, 10 - e));    /* 1024..2048 */
    if (m == 2048.0) {
        m = 1024.0;
        e++;
    }
    if (e > 15)
        return (uint16_t)(sign | 0x7c00);
    return (uint16_t)(sign | (uint16_t)((e + 15) << 10) | ((uint16_t)m - 1024));
}

#if defined(__x86_64__)
__attribute__((target("f16c"))) static uint16_t hw_fp16(float f)
{
    return (uint16_t)_cvtss_sh(f, 0); /* 0: round to nearest even */
}

__attribute__((target("f16c"))) static float hw_fp32(uint16_t h)
{
    return _cvtsh_ss(h);
}

/* CPUID.1:ECX F16C (29), AVX (28), OSXSAVE (27), and the OS saving the
 * YMM state (XCR0 bits 1-2): F16C instructions are VEX-encoded. (Not
 * __builtin_cpu_supports: clang 14 does not know "f16c".) */
static int have_f16c(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    if ((c & (7u << 27)) != (7u << 27))
        return 0;
    unsigned lo, hi;
    __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    return (lo & 6) == 6;
}
#else
static uint16_t hw_fp16(float f) { return ref_fp16(f); }
static float hw_fp32(uint16_t h) { return moe_fp16_to_fp32(h); }
static int have_f16c(void) { return 0; }
#endif

/* ---- F16 / BF16 ------------------------------------------------------ */

static void test_block_sizes(void)
{
    CHECK_INT(sizeof(struct moe_block_q8_0), ==, moe_dtype_info(MOE_DTYPE_Q8_0)->type_size);
    CHECK_INT(sizeof(struct moe_block_q4_0), ==, moe_dtype_info(MOE_DTYPE_Q4_0)->type_size);
    CHECK_INT(MOE_QK8_0, ==, moe_dtype_info(MOE_DTYPE_Q8_0)->block_size);
    CHECK_INT(MOE_QK4_0, ==, moe_dtype_info(MOE_DTYPE_Q4_0)->block_size);
}

static void test_fp16_every_half(void)
{
    const int hw = have_f16c();
    for (uint32_t h = 0; h < 0x10000; h++) {
        float f = moe_fp16_to_fp32((uint16_t)h);
        if (hw) {
            /* NaN: F16C quiets a signalling NaN, fp16.h keeps its bits;
             * both are NaN with the same payload */
            float g = hw_fp32((uint16_t)h);
            if (isnan(g))
                CHECK_MSG(isnan(f) && ((moe_f32_bits(f) ^ moe_f32_bits(g)) & ~0x00400000u) == 0,
                          "decode NaN 0x%04x: 0x%08x", h, moe_f32_bits(f));
            else
                CHECK_MSG(moe_f32_bits(f) == moe_f32_bits(g), "decode 0x%04x: 0x%08x vs F16C 0x%08x", h,
                      moe_f32_bits(f), moe_f32_bits(g));
        }
        uint16_t back = moe_fp32_to_fp16(f);
        if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) /* NaN: stays NaN, made quiet */
            CHECK_MSG(back == (h | 0x200), "NaN 0x%04x -> 0x%04x", h, back);
        else
            CHECK_MSG(back == h, "round trip 0x%04x -> %g -> 0x%04x", h, (double)f, back);
    }
}

static void test_fp16_edges(void)
{
    static const struct { uint32_t f; uint16_t h; } cases[] = {
        { 0x00000000u, 0x0000 },  /* +0 */
        { 0x80000000u, 0x8000 },  /* -0 */
        { 0x3f800000u, 0x3c00 },  /* 1 */
        { 0xc0000000u, 0xc000 },  /* -2 */
        { 0x477fe000u, 0x7bff },  /* 65504, the largest half */
        { 0x477fefffu, 0x7bff },  /* just below 65520: rounds down */
        { 0x477ff000u, 0x7c00 },  /* 65520: tie, rounds to even = inf */
        { 0x7f7fffffu, 0x7c00 },  /* FLT_MAX */
        { 0x7f800000u, 0x7c00 },  /* inf */
        { 0xff800000u, 0xfc00 },  /* -inf */
        { 0x7fc00000u, 0x7e00 },  /* quiet NaN */
        { 0x7f800001u, 0x7e00 },  /* signalling NaN, payload below the kept bits: made quiet */
        { 0x38800000u, 0x0400 },  /* 2^-14, the smallest normal */
        { 0x387fc000u, 0x03ff },  /* the largest subnormal */
        { 0x33800000u, 0x0001 },  /* 2^-24, the smallest subnormal */
        { 0x33000000u, 0x0000 },  /* 2^-25: tie between 0 and 2^-24, to even = 0 */
        { 0x33000001u, 0x0001 },  /* just above the tie */
        { 0x33c00000u, 0x0002 },  /* 1.5 * 2^-24: tie, to even = 2 */
        { 0x3f801000u, 0x3c00 },  /* 1 + 2^-11: tie, to even = 1 */
        { 0x3f803000u, 0x3c02 },  /* 1 + 3*2^-11: tie, to even = 1 + 2^-9 */
        { 0x3f801001u, 0x3c01 },  /* just above the tie */
        { 0x387fe000u, 0x0400 },  /* rounds up from subnormal into the smallest normal */
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        uint16_t h = moe_fp32_to_fp16(f_of(cases[i].f));
        CHECK_MSG(h == cases[i].h, "fp16(0x%08x) = 0x%04x, expected 0x%04x", cases[i].f, h, cases[i].h);
        CHECK_MSG(ref_fp16(f_of(cases[i].f)) == cases[i].h, "reference fp16(0x%08x) = 0x%04x",
                  cases[i].f, ref_fp16(f_of(cases[i].f)));
    }
}

/* Every float near a rounding decision (low 13 bits at and around the half
 * way point, for every sign, exponent and kept mantissa) and a strided
 * sweep of all 2^32 bit patterns, against the double reference and F16C. */
static void test_fp16_sweep(void)
{
    const int hw = have_f16c();
    static const uint32_t lows[] = { 0x0000, 0x0001, 0x0fff, 0x1000, 0x1001, 0x1fff };
    uint64_t n = 0;
    for (uint32_t hi = 0; hi < (1u << 19); hi++) {
        for (size_t k = 0; k < sizeof(lows) / sizeof(lows[0]); k++) {
            uint32_t u = hi << 13 | lows[k];
            float f = f_of(u);
            uint16_t h = moe_fp32_to_fp16(f);
            CHECK_MSG(h == ref_fp16(f), "fp16(0x%08x) = 0x%04x, reference 0x%04x", u, h, ref_fp16(f));
            if (hw)
                CHECK_MSG(h == hw_fp16(f), "fp16(0x%08x) = 0x%04x, F16C 0x%04x", u, h, hw_fp16(f));
            n++;
        }
    }
    /* 2^32 / 263 (a prime stride) ~ 16M patterns, all exponents */
    for (uint64_t u = 0; u < (1ull << 32); u += 263) {
        float f = f_of((uint32_t)u);
        uint16_t h = moe_fp32_to_fp16(f);
        CHECK_MSG(h == ref_fp16(f), "fp16(0x%08x) = 0x%04x, reference 0x%04x", (uint32_t)u, h, ref_fp16(f));
        if (hw)
            CHECK_MSG(h == hw_fp16(f), "fp16(0x%08x) = 0x%04x, F16C 0x%04x", (uint32_t)u, h, hw_fp16(f));
        n++;
    }
    printf("  %llu values checked%s\n", (unsigned long long)n, hw ? " (also against F16C)" : "");
}

static void test_bf16(void)
{
    static const struct { uint32_t f; uint16_t b; } cases[] = {
        { 0x3f800000u, 0x3f80 },  /* 1 */
        { 0x3f808000u, 0x3f80 },  /* 1 + 2^-8: tie, to even */
        { 0x3f818000u, 0x3f82 },  /* 1 + 3*2^-8: tie, to even (up) */
        { 0x3f808001u, 0x3f81 },  /* above the tie */
        { 0x3f807fffu, 0x3f80 },  /* below the tie */
        { 0x80000000u, 0x8000 },  /* -0 */
        { 0x7f800000u, 0x7f80 },  /* inf */
        { 0xff800000u, 0xff80 },  /* -inf */
        { 0x7f7fffffu, 0x7f80 },  /* FLT_MAX rounds to inf */
        { 0x7f800001u, 0x7fc0 },  /* signalling NaN made quiet */
        { 0xffc00001u, 0xffc0 },  /* quiet negative NaN */
        { 0x00010000u, 0x0001 },  /* subnormals are kept (no flush) */
        { 0x00018000u, 0x0002 },  /* subnormal tie, to even */
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        uint16_t b = moe_fp32_to_bf16(f_of(cases[i].f));
        CHECK_MSG(b == cases[i].b, "bf16(0x%08x) = 0x%04x, expected 0x%04x", cases[i].f, b, cases[i].b);
    }
    for (uint32_t b = 0; b < 0x10000; b++) {
        float f = moe_bf16_to_fp32((uint16_t)b);
        CHECK(moe_f32_bits(f) == b << 16);
        uint16_t back = moe_fp32_to_bf16(f);
        if ((b & 0x7f80) == 0x7f80 && (b & 0x7f))
            CHECK_MSG(back == (b | 0x40), "NaN 0x%04x -> 0x%04x", b, back);
        else
            CHECK_MSG(back == b, "round trip 0x%04x -> 0x%04x", b, back);
    }
    /* a sweep against the definition: the nearer of the two neighbours,
     * the even one on a tie */
    for (uint64_t u = 0; u < (1ull << 32); u += 65537) {
        uint32_t x = (uint32_t)u;
        if ((x & 0x7fffffffu) >= 0x7f800000u)
            continue;
        uint32_t lo = x & 0xffff0000u, rest = x & 0xffffu;
        uint16_t want = (uint16_t)(lo >> 16);
        if (rest > 0x8000u || (rest == 0x8000u && (want & 1)))
            want++;
        CHECK_MSG(moe_fp32_to_bf16(f_of(x)) == want, "bf16(0x%08x)", x);
    }
    /* row functions */
    float x[5] = { 1.0f, -2.5f, 3.14159f, 0.0f, 65504.0f }, y[5];
    uint16_t h[5];
    moe_quantize_row_bf16(x, h, 5);
    moe_dequantize_row_bf16(h, y, 5);
    for (int i = 0; i < 5; i++)
        CHECK_NEAR(y[i], x[i], fabs(x[i]) / 256);
    moe_quantize_row_f16(x, h, 5);
    moe_dequantize_row_f16(h, y, 5);
    for (int i = 0; i < 5; i++)
        CHECK_NEAR(y[i], x[i], fabs(x[i]) / 2048);
}

/* ---- Q8_0 / Q4_0 ----------------------------------------------------- */

static void test_known_blocks(void)
{
    float x[32];
    for (int j = 0; j < 32; j++)
        x[j] = (float)(j - 16); /* -16..15: the largest magnitude is -16 */
    struct moe_block_q8_0 q8;
    moe_quantize_row_q8_0(x, &q8, 32);
    CHECK_INT(q8.d, ==, moe_fp32_to_fp16(16.0f / 127.0f));
    CHECK_INT(q8.qs[0], ==, -127);
    CHECK_INT(q8.qs[16], ==, 0);
    CHECK_INT(q8.qs[31], ==, 119);   /* roundf(15 * 127/16) = roundf(119.06) */
    CHECK_INT(q8.qs[20], ==, 32);    /* roundf(4 * 127/16) = roundf(31.75) */
    CHECK_INT(q8.qs[15], ==, -8);    /* roundf(-1 * 127/16) = roundf(-7.94) */

    struct moe_block_q4_0 q4;
    moe_quantize_row_q4_0(x, &q4, 32);
    CHECK_INT(q4.d, ==, moe_fp32_to_fp16(2.0f)); /* d = -16 / -8 */
    /* q = (int8)(x/2 + 8.5): x=-16 -> 0, x=0 -> 8, x=15 -> 16 -> capped at 15 */
    CHECK_INT(q4.qs[0], ==, 0x80);   /* element 0 (q 0) low, element 16 (q 8) high */
    CHECK_INT(q4.qs[15], ==, 0xf8);  /* element 15 (x -1: -0.5 + 8.5 = 8) low, element 31 (15) high */
    float y[32];
    moe_dequantize_row_q4_0(&q4, y, 32);
    CHECK(y[0] == -16.0f);
    CHECK(y[16] == 0.0f);
    CHECK(y[31] == 14.0f);
}

static void test_zero_block(void)
{
    float x[64] = { 0 }, y[64];
    struct moe_block_q8_0 q8[2];
    struct moe_block_q4_0 q4[2];
    moe_quantize_row_q8_0(x, q8, 64);
    moe_quantize_row_q4_0(x, q4, 64);
    for (int b = 0; b < 2; b++) {
        /* Q4_0: d = max / -8 = -0.0 (as ggml computes it) */
        CHECK_INT(q8[b].d, ==, 0x0000);
        CHECK_INT(q4[b].d, ==, 0x8000);
        for (int j = 0; j < 32; j++)
            CHECK(q8[b].qs[j] == 0);
        for (int j = 0; j < 16; j++)
            CHECK(q4[b].qs[j] == 0x88);
    }
    moe_dequantize_row_q8_0(q8, y, 64);
    for (int j = 0; j < 64; j++)
        CHECK(y[j] == 0.0f);
    moe_dequantize_row_q4_0(q4, y, 64);
    for (int j = 0; j < 64; j++)
        CHECK(y[j] == 0.0f);
}

static uint64_t lcg(uint64_t *s)
{
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return *s >> 11;
}

/* Error bounds: Q8_0 |err| <= d/2 plus d's own F16 rounding (relative
 * 2^-11, times up to 127 steps); Q4_0 |err| <= d (the side opposite the
 * largest magnitude is capped at +7 steps) plus 8 steps of F16 rounding. */
static void test_error_bounds(void)
{
    enum { N = 32 * 512 };
    static float x[N], y[N], z[N];
    static struct moe_block_q8_0 q8[N / 32];
    static struct moe_block_q4_0 q4[N / 32];
    uint64_t s = 42;
    for (int i = 0; i < N; i++) {
        double u = (double)lcg(&s) / 9007199254740992.0 - 0.5;
        /* blocks from 2^-6 to 2^13: d stays a normal F16 (a smaller block
         * flushes its d to zero: F16 has no range for it) */
        float scale = (float)ldexp(1.0, (int)(i / 32 % 20) - 6);
        x[i] = (float)u * scale;
    }
    moe_quantize_row_q8_0(x, q8, N);
    moe_dequantize_row_q8_0(q8, y, N);
    CHECK(moe_dequantize_row(MOE_DTYPE_Q8_0, q8, z, N) == 0);
    CHECK(memcmp(y, z, sizeof(y)) == 0);
    for (int b = 0; b < N / 32; b++) {
        float amax = 0;
        for (int j = 0; j < 32; j++)
            amax = fmaxf(amax, fabsf(x[b * 32 + j]));
        double d = amax / 127.0, tol = d * 0.5 + d * 127 * 0x1p-11 + 1e-30;
        for (int j = 0; j < 32; j++)
            CHECK_MSG(fabs(y[b * 32 + j] - x[b * 32 + j]) <= tol, "Q8_0 block %d [%d]: %g -> %g", b, j,
                      (double)x[b * 32 + j], (double)y[b * 32 + j]);
    }
    moe_quantize_row_q4_0(x, q4, N);
    moe_dequantize_row_q4_0(q4, y, N);
    CHECK(moe_dequantize_row(MOE_DTYPE_Q4_0, q4, z, N) == 0);
    CHECK(memcmp(y, z, sizeof(y)) == 0);
    for (int b = 0; b < N / 32; b++) {
        float amax = 0;
        for (int j = 0; j < 32; j++)
            amax = fmaxf(amax, fabsf(x[b * 32 + j]));
        double d = amax / 8.0, tol = d + d * 8 * 0x1p-11 + 1e-30;
        for (int j = 0; j < 32; j++)
            CHECK_MSG(fabs(y[b * 32 + j] - x[b * 32 + j]) <= tol, "Q4_0 block %d [%d]: %g -> %g", b, j,
                      (double)x[b * 32 + j], (double)y[b * 32 + j]);
    }
}

/* ggml's reference quantizers written out plainly (quantize_row_q8_0_ref,
 * quantize_row_q4_0_ref: MAX(), roundf, division by -8); quant.c computes
 * the same with vectors and without libm, and must give the same bytes. */
static void ref_q8_0(const float *x, uint8_t *y)
{
    float amax = 0.0f;
    for (int j = 0; j < 32; j++)
        amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
    const float d = amax / 127.0f, id = d ? 1.0f / d : 0.0f;
    uint16_t h = moe_fp32_to_fp16(d);
    memcpy(y, &h, 2);
    for (int j = 0; j < 32; j++)
        y[2 + j] = (uint8_t)(int8_t)roundf(x[j] * id);
}

static void ref_q4_0(const float *x, uint8_t *y)
{
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 32; j++)
        if (amax < fabsf(x[j])) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    const float d = max / -8, id = d ? 1.0f / d : 0.0f;
    uint16_t h = moe_fp32_to_fp16(d);
    memcpy(y, &h, 2);
    for (int j = 0; j < 16; j++) {
        const float x0 = x[j] * id, x1 = x[16 + j] * id;
        const int8_t q0 = (int8_t)(x0 + 8.5f), q1 = (int8_t)(x1 + 8.5f);
        y[2 + j] = (uint8_t)((q0 < 15 ? q0 : 15) | (q1 < 15 ? q1 : 15) << 4);
    }
}

static void test_vs_scalar_reference(void)
{
    enum { NB = 20000 };
    static float x[NB * 32];
    uint64_t s = 99;
    for (int b = 0; b < NB; b++) {
        float *v = x + b * 32;
        const int kind = b % 8;
        const float scale = (float)ldexp(1.0, (int)(lcg(&s) % 60) - 30);
        for (int j = 0; j < 32; j++) {
            double u = (double)lcg(&s) / 9007199254740992.0 - 0.5;
            switch (kind) {
            case 0: case 1: case 2: /* uniform, random scale */
                v[j] = (float)u * scale;
                break;
            case 3: /* small integers: ties in magnitude, codes on .5 boundaries */
                v[j] = (float)((int)(u * 34.0)) * scale;
                break;
            case 4: /* multiples of amax/254 and amax/16: x * id lands near k + 0.5 */
                v[j] = (float)((int)(u * 508.0)) * (1.0f / 508.0f) * scale;
                break;
            case 5: /* many zeros, some -0 */
                v[j] = (lcg(&s) & 3) ? (j & 1 ? -0.0f : 0.0f) : (float)u;
                break;
            case 6: /* +a and -a as the largest magnitudes */
                v[j] = (j == 5) ? -scale : (j == 20) ? scale : (float)u * scale;
                break;
            default: /* subnormal to huge */
                v[j] = (float)u * (float)ldexp(1.0, (int)(lcg(&s) % 250) - 140);
                break;
            }
        }
        if (b == 1)
            for (int j = 0; j < 32; j++)
                v[j] = -0.0f; /* all -0: max stays +0, d = -0 */
    }
    static _Alignas(16) uint8_t got[NB * 34], want[NB * 34];
    moe_quantize_row_q8_0(x, (struct moe_block_q8_0 *)(void *)got, (int64_t)NB * 32);
    for (int b = 0; b < NB; b++)
        ref_q8_0(x + b * 32, want + b * 34);
    for (int b = 0; b < NB; b++)
        CHECK_MSG(memcmp(got + b * 34, want + b * 34, 34) == 0, "Q8_0 block %d (kind %d) differs", b, b % 8);
    moe_quantize_row_q4_0(x, (struct moe_block_q4_0 *)(void *)got, (int64_t)NB * 32);
    for (int b = 0; b < NB; b++)
        ref_q4_0(x + b * 32, want + b * 18);
    for (int b = 0; b < NB; b++)
        CHECK_MSG(memcmp(got + b * 18, want + b * 18, 18) == 0, "Q4_0 block %d (kind %d) differs", b, b % 8);
}

/* moe_quantize_row (byte buffers, any alignment) gives the typed functions'
 * bytes, and dequant.c reads them back the same way. */
static void test_generic_entry(void)
{
    enum { N = 1024 };
    static float x[N], y[N], z[N];
    static _Alignas(16) uint8_t a[N * 4 + 1], b[N * 4];
    uint64_t s = 7;
    for (int i = 0; i < N; i++)
        x[i] = (float)((double)lcg(&s) / 9007199254740992.0 - 0.5) * 3.0f;
    static const uint32_t types[] = { MOE_DTYPE_F32, MOE_DTYPE_F16, MOE_DTYPE_BF16, MOE_DTYPE_Q8_0,
                                      MOE_DTYPE_Q4_0, MOE_DTYPE_Q4_K, MOE_DTYPE_Q5_K, MOE_DTYPE_Q6_K,
                                      MOE_DTYPE_MXFP4 };
    for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); t++) {
        size_t rb = moe_dtype_row_bytes(types[t], N, NULL);
        CHECK(moe_quantize_row(types[t], x, a + 1, N) == 0); /* unaligned */
        switch (types[t]) {
        case MOE_DTYPE_F32: memcpy(b, x, sizeof(x)); break;
        case MOE_DTYPE_F16: moe_quantize_row_f16(x, (uint16_t *)(void *)b, N); break;
        case MOE_DTYPE_BF16: moe_quantize_row_bf16(x, (uint16_t *)(void *)b, N); break;
        case MOE_DTYPE_Q8_0: moe_quantize_row_q8_0(x, (struct moe_block_q8_0 *)(void *)b, N); break;
        case MOE_DTYPE_Q4_0: moe_quantize_row_q4_0(x, (struct moe_block_q4_0 *)(void *)b, N); break;
        case MOE_DTYPE_Q4_K: moe_quantize_row_q4_k(x, (struct moe_block_q4_k *)(void *)b, N); break;
        case MOE_DTYPE_Q5_K: moe_quantize_row_q5_k(x, (struct moe_block_q5_k *)(void *)b, N); break;
        case MOE_DTYPE_Q6_K: moe_quantize_row_q6_k(x, (struct moe_block_q6_k *)(void *)b, N); break;
        case MOE_DTYPE_MXFP4: moe_quantize_row_mxfp4(x, (struct moe_block_mxfp4 *)(void *)b, N); break;
        }
        CHECK_MSG(memcmp(a + 1, b, rb) == 0, "%s: generic and typed bytes differ", moe_dtype_name(types[t]));
        CHECK(moe_dequantize_row(types[t], b, y, N) == 0);
        switch (types[t]) {
        case MOE_DTYPE_F32: memcpy(z, b, sizeof(z)); break;
        case MOE_DTYPE_F16: moe_dequantize_row_f16((uint16_t *)(void *)b, z, N); break;
        case MOE_DTYPE_BF16: moe_dequantize_row_bf16((uint16_t *)(void *)b, z, N); break;
        case MOE_DTYPE_Q8_0: moe_dequantize_row_q8_0((struct moe_block_q8_0 *)(void *)b, z, N); break;
        case MOE_DTYPE_Q4_0: moe_dequantize_row_q4_0((struct moe_block_q4_0 *)(void *)b, z, N); break;
        default: {
            /* no typed dequantizer here: the round trip must stay close */
            float err = 0.0f, amax = 0.0f;
            for (int i = 0; i < N; i++) {
                err = fmaxf(err, fabsf(y[i] - x[i]));
                amax = fmaxf(amax, fabsf(x[i]));
            }
            CHECK_MSG(err <= amax * (types[t] == MOE_DTYPE_MXFP4 ? 0.25f : 0.15f), "%s: round trip error %g",
                      moe_dtype_name(types[t]), (double)err);
            memcpy(z, y, sizeof(z));
        }
        }
        CHECK_MSG(memcmp(y, z, sizeof(y)) == 0, "%s: dequant.c and quant.c disagree", moe_dtype_name(types[t]));
    }
}

static void test_arguments(void)
{
    float x[64] = { 0 };
    uint8_t buf[256];
    CHECK_INT(moe_quantize_row(MOE_DTYPE_Q8_0, x, buf, 33), ==, -EINVAL);
    CHECK_INT(moe_quantize_row(MOE_DTYPE_Q4_0, x, buf, -32), ==, -EINVAL);
    CHECK_INT(moe_quantize_row(MOE_DTYPE_Q4_K, x, buf, 255), ==, -EINVAL);
    CHECK_INT(moe_quantize_row(MOE_DTYPE_Q2_K, x, buf, 256), ==, MOE_EUNSUPPORTED);
    CHECK_INT(moe_quantize_row(4, x, buf, 32), ==, MOE_EUNSUPPORTED);
    CHECK_INT(moe_quantize_row(1000, x, buf, 32), ==, MOE_EUNSUPPORTED);
    CHECK_INT(moe_quantize_row(MOE_DTYPE_F16, x, buf, 0), ==, 0);
    CHECK(moe_quantize_supported(MOE_DTYPE_Q6_K));
    CHECK(!moe_quantize_supported(MOE_DTYPE_IQ4_NL));
}

/* ---- bit-exactness against llama-quantize ---------------------------- */

static void check_model(const char *model, const char *variant, int min_tensors)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    char p32[4096], pq[4096];
    snprintf(p32, sizeof(p32), "%s/models/%s-F32.gguf", ref, model);
    snprintf(pq, sizeof(pq), "%s/models/%s-%s.gguf", ref, model, variant);
    struct moe_gguf *g32, *gq;
    struct moe_diag d = { 0 };
    CHECK_MSG(moe_gguf_open(&g32, p32, &d) == 0, "%s", d.msg);
    if (moe_gguf_open(&gq, pq, &d) != 0) {
        moe_gguf_close(g32);
        CHECK_MSG(0, "%s", d.msg);
    }
    int compared = 0, by_type[MOE_DTYPE_COUNT] = { 0 };
    uint8_t *out = NULL;
    if (moe_gguf_map(g32, &d) != 0 || moe_gguf_map(gq, &d) != 0) {
        MOE_FAIL_AT("%s", d.msg);
        goto done;
    }
    for (uint64_t i = 0; i < moe_gguf_n_tensors(gq); i++) {
        const struct moe_gguf_tensor *tq = moe_gguf_tensor_at(gq, i);
        const struct moe_gguf_tensor *t32 = moe_gguf_find_tensor(g32, tq->name);
        if (t32 == NULL || t32->dtype != MOE_DTYPE_F32) {
            MOE_FAIL_AT("%s: %s not F32 in the master", variant, tq->name);
            goto done;
        }
        if (tq->dtype == MOE_DTYPE_F32)
            continue;
        if (!moe_quantize_supported(tq->dtype)) {
            MOE_FAIL_AT("%s: %s has type %s", variant, tq->name, moe_dtype_name(tq->dtype));
            goto done;
        }
        out = malloc(tq->size);
        if (out == NULL) {
            MOE_FAIL_AT("out of memory");
            goto done;
        }
        size_t rb = moe_dtype_row_bytes(tq->dtype, tq->ne[0], NULL);
        const float *src = moe_gguf_tensor_data(g32, t32);
        for (uint64_t r = 0; r < tq->n_elements / tq->ne[0]; r++)
            moe_quantize_row(tq->dtype, src + r * tq->ne[0], out + r * rb, (int64_t)tq->ne[0]);
        const uint8_t *want = moe_gguf_tensor_data(gq, tq);
        if (memcmp(out, want, tq->size) != 0) {
            uint64_t k = 0;
            while (out[k] == want[k])
                k++;
            MOE_FAIL_AT("%s: %s (%s) differs from llama-quantize at byte %llu: 0x%02x vs 0x%02x", variant,
                        tq->name, moe_dtype_name(tq->dtype), (unsigned long long)k, out[k], want[k]);
            goto done;
        }
        free(out);
        out = NULL;
        compared++;
        by_type[tq->dtype]++;
    }
    printf("  %s-%s: %d tensors bit-exact (F16 %d, Q8_0 %d, Q4_0 %d, MXFP4 %d)\n", model, variant, compared,
           by_type[MOE_DTYPE_F16], by_type[MOE_DTYPE_Q8_0], by_type[MOE_DTYPE_Q4_0], by_type[MOE_DTYPE_MXFP4]);
    if (compared < min_tensors)
        MOE_FAIL_AT("%s: only %d tensors compared", variant, compared);
done:
    free(out);
    moe_gguf_close(g32);
    moe_gguf_close(gq);
}

static void test_f16_vs_llama_quantize(void) { check_model("tiny-mixtral", "F16", 30); }
static void test_q8_0_vs_llama_quantize(void) { check_model("tiny-mixtral", "Q8_0", 30); }
static void test_q4_0_vs_llama_quantize(void) { check_model("tiny-mixtral", "Q4_0", 30); }
static void test_mxfp4_vs_llama_quantize(void) { check_model("tiny-gptoss", "MXFP4_MOE", 16); }

int main(void)
{
    MOE_TEST_RUN(test_block_sizes);
    MOE_TEST_RUN(test_fp16_every_half);
    MOE_TEST_RUN(test_fp16_edges);
    MOE_TEST_RUN(test_fp16_sweep);
    MOE_TEST_RUN(test_bf16);
    MOE_TEST_RUN(test_known_blocks);
    MOE_TEST_RUN(test_zero_block);
    MOE_TEST_RUN(test_error_bounds);
    MOE_TEST_RUN(test_vs_scalar_reference);
    MOE_TEST_RUN(test_generic_entry);
    MOE_TEST_RUN(test_arguments);
    MOE_TEST_RUN(test_f16_vs_llama_quantize);
    MOE_TEST_RUN(test_q8_0_vs_llama_quantize);
    MOE_TEST_RUN(test_q4_0_vs_llama_quantize);
    MOE_TEST_RUN(test_mxfp4_vs_llama_quantize);
    return moe_test_exit_code();
}
