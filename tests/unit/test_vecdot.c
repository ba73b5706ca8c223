/* CPU dot products: for every supported weight type, the quantized dot of a
 * weight row with a prepared activation row equals the float dot of the
 * dequantized weight with the dequantized activation (the integer parts
 * are exact; only float summation order may differ), and the AVX2 and
 * scalar paths agree. Plus the activation formats' rounding rules. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/blocks.h"
#include "kernels/cpu/dequant.h"
#include "kernels/cpu/vecdot.h"
#include "kernels/cpu/vecdot-impl.h"
#include "kernels/fp16.h"
#include "tests/harness.h"
#include "tests/simd_paths.h"

static uint64_t rng = 88172645463325252ull;

static uint32_t next32(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 11);
}

static float randn(void)
{
    float u1 = ((float)(next32() & 0xffffff) + 1.0f) / 16777217.0f;
    float u2 = (float)(next32() & 0xffffff) / 16777216.0f;
    return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);
}

/* Random but valid weight blocks: random bytes with finite f16 scales. */
static void random_blocks(uint32_t t, uint8_t *w, size_t bytes)
{
    for (size_t i = 0; i < bytes; i++)
        w[i] = (uint8_t)next32();
    const struct moe_dtype_info *di = moe_dtype_info(t);
    size_t nb = bytes / di->type_size;
    for (size_t b = 0; b < nb; b++) {
        uint8_t *blk = w + b * di->type_size;
        int offs[2] = { -1, -1 };
        switch (t) {
        case MOE_DTYPE_Q4_0: case MOE_DTYPE_Q5_0: case MOE_DTYPE_Q8_0: case MOE_DTYPE_IQ4_NL:
            offs[0] = 0; break;
        case MOE_DTYPE_Q4_1: case MOE_DTYPE_Q5_1: case MOE_DTYPE_Q4_K: case MOE_DTYPE_Q5_K:
            offs[0] = 0; offs[1] = 2; break;
        case MOE_DTYPE_Q2_K: offs[0] = 80; offs[1] = 82; break;
        case MOE_DTYPE_Q3_K: offs[0] = 108; break;
        case MOE_DTYPE_Q6_K: offs[0] = 208; break;
        case MOE_DTYPE_MXFP4: blk[0] = (uint8_t)(118 + next32() % 12); break;
        case MOE_DTYPE_F16: case MOE_DTYPE_BF16: {
            uint16_t *h = (uint16_t *)blk;
            float v = randn() * 0.1f;
            h[0] = t == MOE_DTYPE_F16 ? moe_fp32_to_fp16(v) : moe_fp32_to_bf16(v);
            break;
        }
        case MOE_DTYPE_F32: {
            float v = randn();
            memcpy(blk, &v, 4);
            break;
        }
        default: break;
        }
        for (int k = 0; k < 2; k++) {
            if (offs[k] < 0)
                continue;
            uint16_t h = moe_fp32_to_fp16(randn() * 0.01f);
            blk[offs[k]] = (uint8_t)h;
            blk[offs[k] + 1] = (uint8_t)(h >> 8);
        }
    }
}

/* Dequantizes an activation row (the formats are ggml types too). */
static void act_to_float(uint32_t wt, const void *act, float *x, int64_t n)
{
    switch (wt) {
    case MOE_DTYPE_F32: memcpy(x, act, (size_t)n * 4); return;
    case MOE_DTYPE_F16: moe_dequantize_row(MOE_DTYPE_F16, act, x, n); return;
    case MOE_DTYPE_BF16: moe_dequantize_row(MOE_DTYPE_BF16, act, x, n); return;
    case MOE_DTYPE_Q4_1: case MOE_DTYPE_Q5_1: {
        /* Q8_1: d, s, 32 x int8 */
        const uint8_t *b = act;
        for (int64_t i = 0; i < n / 32; i++, b += 36)
            for (int j = 0; j < 32; j++)
                x[i * 32 + j] = moe_fp16_to_fp32((uint16_t)(b[0] | b[1] << 8)) * (float)(int8_t)b[4 + j];
        return;
    }
    case MOE_DTYPE_Q2_K: case MOE_DTYPE_Q3_K: case MOE_DTYPE_Q4_K: case MOE_DTYPE_Q5_K:
    case MOE_DTYPE_Q6_K:
        moe_dequantize_row(MOE_DTYPE_Q8_K, act, x, n);
        return;
    default:
        moe_dequantize_row(MOE_DTYPE_Q8_0, act, x, n);
    }
}

static void check_len(uint32_t t, int64_t n);

/* Lengths that are not multiples of the kernels' unrolling: one block, odd
 * block counts (the AVX-512 kernels take two 32-blocks at a time), the
 * widths of real models (gpt-oss's 2880 = 90 blocks of 32, Qwen3-30B's
 * expert 768 = 3 super-blocks), and for the element types lengths that
 * leave every remainder of the 16/32/64-element loops. */
static void check_type(uint32_t t)
{
    static const int64_t l32[] = { 32, 96, 1056, 2880 }, l256[] = { 256, 768, 1280, 2048 };
    static const int64_t l1[] = { 1, 17, 33, 95, 1037, 2880 };
    const uint32_t bs = moe_dtype_info(t)->block_size;
    const int64_t *l = bs == 32 ? l32 : bs == 1 ? l1 : l256;
    const size_t nl = bs == 32 ? 4 : bs == 1 ? 6 : 4;
    for (size_t i = 0; i < nl && !moe_test_failed; i++)
        check_len(t, l[i]);
}

static void check_len(uint32_t t, int64_t n)
{
    size_t wb = moe_dtype_row_bytes(t, n, NULL);
    uint8_t *w = malloc(wb), *act = malloc(moe_vecdot_act_bytes(t, n));
    float *x = malloc(n * 4), *wf = malloc(n * 4), *xf = malloc(n * 4);
    CHECK(w && act && x && wf && xf);
    for (int rep = 0; rep < 20; rep++) {
        random_blocks(t, w, wb);
        for (int64_t i = 0; i < n; i++)
            x[i] = randn();
        moe_vecdot_quantize_act(t, x, act, n);
        CHECK(moe_dequantize_row(t, w, wf, n) == 0);
        act_to_float(t, act, xf, n);
        double ref = 0.0, mag = 0.0;
        for (int64_t i = 0; i < n; i++) {
            ref += (double)wf[i] * (double)xf[i];
            mag += fabs((double)wf[i] * (double)xf[i]);
        }
        float got = moe_vecdot(t, w, act, n);
        /* Q4_1/Q5_1 meet Q8_1 activations, whose block sum s is d * sum(q)
         * rounded to f16: the minimum's term m * s carries that rounding
         * (2^-11 relative), which a short row does not average out */
        double slack = 0.0;
        if (t == MOE_DTYPE_Q4_1 || t == MOE_DTYPE_Q5_1) {
            const size_t wsz = moe_dtype_info(t)->type_size;
            for (int64_t b = 0; b < n / 32; b++) {
                const uint8_t *wb_ = w + b * wsz, *ab = (const uint8_t *)act + b * 36;
                const float m = moe_fp16_to_fp32((uint16_t)(wb_[2] | wb_[3] << 8));
                const float sa = moe_fp16_to_fp32((uint16_t)(ab[2] | ab[3] << 8));
                slack += fabs((double)m * (double)sa) * (1.0 / 2048.0);
            }
        }
        CHECK_MSG(fabs(got - ref) <= 1e-5 * mag + slack + 1e-30, "%s n %lld rep %d: %.9g vs %.9g (mag %g)",
                  moe_dtype_name(t), (long long)n, rep, (double)got, ref, mag);
        if (t != MOE_DTYPE_F32 && t != MOE_DTYPE_F16 && t != MOE_DTYPE_BF16) {
            /* the activation quantization error stays within half a step */
            for (int64_t i = 0; i < n; i++)
                CHECK_MSG(fabsf(xf[i] - x[i]) <= 0.02f * fabsf(x[i]) + 0.03f,
                          "%s act[%lld] %g -> %g", moe_dtype_name(t), (long long)i, (double)x[i],
                          (double)xf[i]);
        }
        /* several activation rows at once give each row's moe_vecdot exactly */
        {
            enum { R = MOE_VECDOT_MAX_ROWS };
            const size_t ab = moe_vecdot_act_bytes(t, n);
            uint8_t *acts = malloc(ab * R);
            float outr[R];
            for (int r = 0; r < R; r++) {
                for (int64_t i = 0; i < n; i++)
                    x[i] = randn() * (float)(r + 1);
                moe_vecdot_quantize_act(t, x, acts + (size_t)r * ab, n);
            }
            for (int nr = 1; nr <= R; nr++) {
                moe_vecdot_rows(t, w, acts, ab, n, nr, outr);
                for (int r = 0; r < nr; r++) {
                    const float one = moe_vecdot(t, w, acts + (size_t)r * ab, n);
                    CHECK_MSG(memcmp(&one, &outr[r], sizeof(one)) == 0, "%s n %lld: rows(%d)[%d] %.9g, vecdot %.9g",
                              moe_dtype_name(t), (long long)n, nr, r, (double)outr[r], (double)one);
                }
            }
            free(acts);
        }
    }
    free(w); free(act); free(x); free(wf); free(xf);
}

/* The one-token kernels of vecdot-impl.h (moe_gemm_gemv_*) give every
 * row's moe_vecdot bit for bit (+ the bias), on every path (Q4_0 and
 * IQ4_NL: on the AVX-512 path, the only one they run on): row counts
 * around their groups of four, lengths that leave every remainder of the
 * dot kernels' steps (BF16: 64/32/16 elements; Q8_0 and MXFP4: 4 blocks),
 * a real width, rows too long for the AVX-512 kernels' scale buffers
 * (513 blocks: the row-by-row fallback), Q8_0's extreme bytes (-128
 * weights, activations at +-127) and MXFP4's exponents of every class
 * (subnormal scales from 0 and 1, 254) against random ones. */
typedef void (*gemv_fn)(const uint8_t *w, size_t row_bytes, int64_t n_rows, const uint8_t *act, int64_t n, float *y,
                        const float *bias);

static void check_gemv_shape(uint32_t t, gemv_fn fn, int64_t n_rows, int64_t n, int extreme)
{
    const size_t rb = moe_dtype_row_bytes(t, n, NULL), ab = moe_vecdot_act_bytes(t, n);
    uint8_t *w = malloc(rb * (size_t)n_rows), *act = malloc(ab);
    float *x = malloc((size_t)n * 4), *bias = malloc((size_t)n_rows * 4), *y = malloc((size_t)(n_rows + 1) * 4);
    CHECK(w && act && x && bias && y);
    random_blocks(t, w, rb * (size_t)n_rows);
    if (extreme && t == MOE_DTYPE_Q8_0)
        for (int64_t b = 0; b < n_rows * (n / 32); b++)
            memset(w + (size_t)b * 34 + 2, b % 2 ? 0x80 : 0x7f, 32);
    if (extreme && t == MOE_DTYPE_MXFP4) {
        /* every exponent class of the scale: subnormal (0, 1), normal, the largest */
        static const uint8_t es[] = { 0, 1, 2, 3, 100, 127, 128, 200, 253, 254 };
        const int64_t nb = n / 32;
        for (int64_t b = 0; b < n_rows * nb; b++)   /* even rows: subnormal scales only */
            w[(size_t)b * 17] = (b / nb) % 2 ? es[b % (int64_t)sizeof(es)] : (uint8_t)(b % 2);
    }
    for (int64_t i = 0; i < n; i++)
        x[i] = extreme ? (i % 3 ? -1.0f : 1.0f) : randn();
    moe_vecdot_quantize_act(t, x, act, n);
    for (int64_t r = 0; r < n_rows; r++)
        bias[r] = randn();
    for (int b = 0; b < 2; b++) {
        y[n_rows] = -12345.0f;
        fn(w, rb, n_rows, act, n, y, b ? bias : NULL);
        CHECK_MSG(y[n_rows] == -12345.0f, "%s gemv rows %lld: wrote past the rows", moe_dtype_name(t),
                  (long long)n_rows);
        for (int64_t r = 0; r < n_rows; r++) {
            float want = moe_vecdot(t, w + (size_t)r * rb, act, n);
            if (b)
                want = want + bias[r];
            CHECK_MSG(memcmp(&want, &y[r], 4) == 0, "%s (%s) gemv rows %lld n %lld%s%s: y[%lld] %.9g, vecdot %.9g",
                      moe_dtype_name(t), moe_vecdot_impl(), (long long)n_rows, (long long)n, b ? " bias" : "",
                      extreme ? " extreme" : "", (long long)r, (double)y[r], (double)want);
        }
    }
    free(w); free(act); free(x); free(bias); free(y);
}

static void check_gemv(void)
{
    static const int64_t rows[] = { 1, 2, 3, 4, 5, 7, 8, 9, 17 };
    static const int64_t l1[] = { 17, 32, 95, 100, 160, 2048 }, l32[] = { 32, 96, 160, 224, 2880, 513 * 32 };
    /* Q4_0 and IQ4_NL's are AVX-512 kernels without a fallback (gemm.c
     * calls them on that path only) */
    static const struct { uint32_t t; gemv_fn fn; int avx512_only; } ks[] = {
        { MOE_DTYPE_BF16, moe_gemm_gemv_bf16, 0 },
        { MOE_DTYPE_Q8_0, moe_gemm_gemv_q8_0, 0 },
        { MOE_DTYPE_MXFP4, moe_gemm_gemv_mxfp4, 0 },
        { MOE_DTYPE_Q4_0, moe_gemm_gemv_q4_0, 1 },
        { MOE_DTYPE_IQ4_NL, moe_gemm_gemv_iq4_nl, 1 },
    };
    for (size_t k = 0; k < sizeof(ks) / sizeof(ks[0]); k++) {
        if (ks[k].avx512_only && strcmp(moe_vecdot_impl(), "avx512vnni") != 0)
            continue;
        const int64_t *l = ks[k].t == MOE_DTYPE_BF16 ? l1 : l32;
        for (size_t li = 0; li < 6; li++)
            for (size_t ri = 0; ri < sizeof(rows) / sizeof(rows[0]); ri++) {
                if (li == 5 && ri % 3)
                    continue; /* the longest rows on fewer counts */
                check_gemv_shape(ks[k].t, ks[k].fn, rows[ri], l[li], 0);
                if (moe_test_failed)
                    return;
            }
        check_gemv_shape(ks[k].t, ks[k].fn, 6, l[4], 1);
    }
}

/* moe_vec_axpy (attention's value sums) gives the scalar loop's floats
 * exactly on this path: F16 (normal, subnormal, zero halves) and F32, at
 * lengths that are and are not multiples of the vector width. */
static void check_axpy(void)
{
    static const int64_t lens[] = { 1, 7, 8, 16, 33, 64, 128, 130 };
    for (size_t k = 0; k < sizeof(lens) / sizeof(lens[0]); k++) {
        const int64_t n = lens[k];
        uint16_t h[130];
        float f[130], y[130], ref[130];
        for (int64_t i = 0; i < n; i++) {
            h[i] = (uint16_t)(i % 5 == 0 ? next32() & 0x83ff : next32() & 0xfbff); /* subnormals, no inf/nan */
            f[i] = randn();
            y[i] = ref[i] = randn();
        }
        const float a = randn();
        moe_vec_axpy(MOE_DTYPE_F16, y, a, h, n);
        for (int64_t i = 0; i < n; i++) {
            const float p = a * moe_fp16_to_fp32(h[i]);
            ref[i] = ref[i] + p;
        }
        CHECK_MSG(memcmp(y, ref, (size_t)n * sizeof(float)) == 0, "axpy f16 n %lld differs from the scalar loop",
                  (long long)n);
        moe_vec_axpy(MOE_DTYPE_F32, y, a, f, n);
        for (int64_t i = 0; i < n; i++) {
            const float p = a * f[i];
            ref[i] = ref[i] + p;
        }
        CHECK_MSG(memcmp(y, ref, (size_t)n * sizeof(float)) == 0, "axpy f32 n %lld differs from the scalar loop",
                  (long long)n);
    }
}

/* The activation quantizers give ggml's bytes on this path: a local copy
 * of ggml's reference rules (Q8_0: id = 127/amax, round to nearest even;
 * Q8_K: -127/max of the first value of largest magnitude, clamp 127, sums
 * of 16) on random rows, rows with ties of magnitude and opposite signs,
 * exact halves, and an all-zero block. */
static void ref_q8_0(const float *x, struct moe_block_q8_0 *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += 32) {
        float amax = 0.0f;
        for (int j = 0; j < 32; j++)
            amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
        y[i].d = moe_fp32_to_fp16(d);
        for (int j = 0; j < 32; j++)
            y[i].qs[j] = (int8_t)lrintf(x[j] * id);
    }
}

static void ref_q8_k(const float *x, struct moe_block_q8_k *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += 256) {
        float max = 0.0f, amax = 0.0f;
        for (int j = 0; j < 256; j++)
            if (fabsf(x[j]) > amax) {
                amax = fabsf(x[j]);
                max = x[j];
            }
        memset(&y[i], 0, sizeof(y[i]));
        if (amax == 0.0f)
            continue;
        const float iscale = -127.0f / max;
        for (int j = 0; j < 256; j++) {
            const long v = lrintf(iscale * x[j]);
            y[i].qs[j] = (int8_t)(v < 127 ? v : 127);
            y[i].bsums[j / 16] = (int16_t)(y[i].bsums[j / 16] + y[i].qs[j]);
        }
        y[i].d = 1.0f / iscale;
    }
}

static void check_quant_act(void)
{
    enum { N = 1024 };
    float x[N];
    struct moe_block_q8_0 a0[N / 32], r0[N / 32];
    struct moe_block_q8_k ak[N / 256], rk[N / 256];
    for (int rep = 0; rep < 50; rep++) {
        for (int i = 0; i < N; i++)
            x[i] = randn() * (float)(1 + rep % 7);
        if (rep % 5 == 1)
            for (int i = 0; i < 256; i++)
                x[i] = 0.0f;                       /* a zero block */
        if (rep % 5 == 2) {
            x[300] = 9.0f;                         /* tie of magnitude, opposite signs */
            x[290] = -9.0f;
            x[700] = 8.5f;
            x[701] = -8.5f;
        }
        if (rep % 5 == 3)
            for (int i = 0; i < N; i++)
                x[i] = (float)((int)(randn() * 8.0f)) + 0.5f; /* exact halves after scaling */
        memset(a0, 0, sizeof(a0));
        memset(ak, 0, sizeof(ak));
        moe_vecdot_quantize_act(MOE_DTYPE_Q4_0, x, a0, N);
        ref_q8_0(x, r0, N / 32);
        CHECK_MSG(memcmp(a0, r0, sizeof(a0)) == 0, "Q8_0 activation bytes differ from ggml's rule (rep %d)", rep);
        moe_vecdot_quantize_act(MOE_DTYPE_Q4_K, x, ak, N);
        ref_q8_k(x, rk, N / 256);
        CHECK_MSG(memcmp(ak, rk, sizeof(ak)) == 0, "Q8_K activation bytes differ from ggml's rule (rep %d)", rep);
    }
}

static void test_all_types(void)
{
    static const uint32_t types[] = {
        MOE_DTYPE_F32, MOE_DTYPE_F16, MOE_DTYPE_BF16, MOE_DTYPE_Q4_0, MOE_DTYPE_Q4_1,
        MOE_DTYPE_Q5_0, MOE_DTYPE_Q5_1, MOE_DTYPE_Q8_0, MOE_DTYPE_Q2_K, MOE_DTYPE_Q3_K,
        MOE_DTYPE_Q4_K, MOE_DTYPE_Q5_K, MOE_DTYPE_Q6_K, MOE_DTYPE_IQ4_NL, MOE_DTYPE_MXFP4,
    };
    printf("  implementation: %s\n", moe_vecdot_impl());
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        CHECK(moe_vecdot_supported(types[i]));
        check_type(types[i]);
        if (moe_test_failed)
            return;
    }
    check_gemv();
    if (moe_test_failed)
        return;
    check_axpy();
    if (moe_test_failed)
        return;
    check_quant_act();
}

/* Every type on each path the dispatcher can take (tests/simd_paths.h). */
MOE_TEST_SIMD_PATHS(test_all_types)

/* ggml's Q8_0 activation rounding is to nearest even at exact halves. */
static void test_q8_0_rounding(void)
{
    float x[32] = { 0 };
    x[0] = 127.0f;   /* amax 127 -> id = 1 */
    x[1] = 2.5f;     /* -> 2 (even) */
    x[2] = 3.5f;     /* -> 4 */
    x[3] = -2.5f;    /* -> -2 */
    uint8_t act[34];
    moe_vecdot_quantize_act(MOE_DTYPE_Q8_0, x, act, 32);
    CHECK_INT((int8_t)act[2], ==, 127);
    CHECK_INT((int8_t)act[3], ==, 2);
    CHECK_INT((int8_t)act[4], ==, 4);
    CHECK_INT((int8_t)act[5], ==, -2);
}

int main(void)
{
    MOE_TEST_RUN(test_all_types);
    MOE_TEST_RUN(test_avx512_path);
    MOE_TEST_RUN(test_avx2_path);
    MOE_TEST_RUN(test_scalar_path);
    MOE_TEST_RUN(test_q8_0_rounding);
    return moe_test_exit_code();
}
