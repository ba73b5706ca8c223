/* The CUDA decode GEMV's arithmetic, run on the host: no GPU needed.
 *
 * kernels/cuda/matvec-impl.h holds the per-block code of the GEMV kernels as
 * __host__ __device__ functions. This test calls them the way a warp of
 * gemv_q_kernel does (32 lanes stage a chunk of a row, each lane computes
 * its share, a butterfly sum across lanes) and checks against the CPU
 * backend:
 *   - the activation quantizers (Q8_0, Q8_1, Q8_K) give the CPU's bytes;
 *   - every weight type's row dot products match moe_vecdot within float
 *     rounding (the integer sums are the same), for rows whose start is not
 *     16-byte aligned, row lengths that leave a partial last chunk, and 1
 *     to 8 tokens;
 *   - the 16-entry tables packed for byte_perm equal the CPU's tables.
 * What it cannot check: the device intrinsics (their host stand-ins are
 * checked against plain C here), shared-memory alignment, shuffles. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/matvec-impl.h"
#include "common/dtype.h"
#include "kernels/blocks.h"
#include "kernels/cpu/dequant.h"
extern "C" {
#include "kernels/cpu/vecdot.h"
#include "tests/harness.h"
}
#include "tests/gpu/fill-impl.h"

using namespace moecu;

static unsigned seed = 7;

static void *alloc256(size_t n)
{
    void *p = NULL;
    if (posix_memalign(&p, 256, n ? n : 1) != 0)
        return NULL;
    memset(p, 0, n);
    return p;
}

/* ---- tables and intrinsics' stand-ins ------------------------------------- */

static void test_tables(void)
{
    const uint32_t iq[4] = { MOE_IQ4NL_GRID(MOE_GRID_WORD) };
    const uint32_t mx[4] = { MOE_MXFP4_GRID(MOE_GRID_WORD) };
    for (int i = 0; i < 16; i++) {
        CHECK_INT((int8_t)(iq[i / 4] >> 8 * (i % 4)), ==, moe_iq4nl_values[i]);
        CHECK_INT((int8_t)(mx[i / 4] >> 8 * (i % 4)), ==, moe_mxfp4_values[i]);
    }
    /* lut16 on every code in every byte position */
    for (uint32_t c = 0; c < 16; c++)
        for (int pos = 0; pos < 4; pos++) {
            const uint32_t q = c << (8 * pos) | (uint32_t)((15 - c) << (8 * ((pos + 1) % 4)));
            const uint32_t r = lut16(q, iq[0], iq[1], iq[2], iq[3]);
            CHECK_INT((int8_t)(r >> 8 * pos), ==, moe_iq4nl_values[c]);
            CHECK_INT((int8_t)(r >> 8 * ((pos + 1) % 4)), ==, moe_iq4nl_values[15 - c]);
            CHECK_INT((int8_t)(lut_mxfp4(q) >> 8 * pos), ==, moe_mxfp4_values[c]);
        }
    for (int i = 0; i < 1000; i++) {
        const uint32_t a = (uint32_t)rand_r(&seed) * 2654435761u, b = (uint32_t)rand_r(&seed) * 40503u;
        int ref = 0;
        for (int k = 0; k < 4; k++)
            ref += (int8_t)(a >> 8 * k) * (int8_t)(b >> 8 * k);
        CHECK_INT(dp4a(a, b, 5), ==, ref + 5);
        const uint32_t d = vsub4(a, b);
        for (int k = 0; k < 4; k++)
            CHECK_INT((uint8_t)(d >> 8 * k), ==, (uint8_t)((uint8_t)(a >> 8 * k) - (uint8_t)(b >> 8 * k)));
    }
}

/* ---- activation quantization ------------------------------------------------ */

/* Quantizes nt rows as matvec.cu's kernels do (one block per thread). */
static mv_act quantize(int f, const float *x, int nt, int64_t n_in, void *buf)
{
    mv_act a = act_q_layout(f, buf, nt, n_in);
    if (f == MOE_DTYPE_Q8_K) {
        for (int64_t i = 0; i < nt * (n_in / 256); i++)
            quant_block_q8_k(x + i * 256, (int8_t *)a.q + i * 256, (float *)a.d + i, (int32_t *)a.sum16 + i * 16);
    } else {
        for (int64_t i = 0; i < nt * (n_in / 32); i++)
            quant_block_q8_0(x + i * 32, (int8_t *)a.q + i * 32, (float *)a.d + i,
                             f == MOE_DTYPE_Q8_1 ? (float *)a.s + i : NULL);
    }
    return a;
}

static void test_act_quant(void)
{
    const int64_t n = 1024;
    float *x = (float *)malloc(n * sizeof(float));
    void *buf = alloc256(act_q_bytes(MOE_DTYPE_Q8_K, 1, n) + act_q_bytes(MOE_DTYPE_Q8_1, 1, n));
    uint8_t *ref = (uint8_t *)malloc(moe_vecdot_act_bytes(MOE_DTYPE_Q2_K, n) + 4096);
    for (int round = 0; round < 4; round++) {
        for (int64_t i = 0; i < n; i++)
            x[i] = moe_test_frand(&seed) * (round == 0 ? 1.0f : round == 1 ? 1e-3f : 300.0f);
        if (round == 3) {
            for (int64_t i = 0; i < 256; i++)
                x[i] = 0.0f;          /* an all-zero block */
            x[300] = 500.0f;           /* ties of magnitude, opposite signs */
            x[301] = -500.0f;
            x[600] = -500.0f;
            x[601] = 500.0f;
            for (int64_t i = 64; i < 96; i++)
                x[i] = 0.5f * (float)(i - 80);   /* exact halves: rounding ties */
        }
        const uint32_t types[3] = { MOE_DTYPE_Q8_0, MOE_DTYPE_Q4_1, MOE_DTYPE_Q4_K };
        for (int k = 0; k < 3; k++) {
            const int f = moe_dtype_vec_dot_type(types[k]);
            moe_vecdot_quantize_act(types[k], x, ref, n);
            const mv_act a = quantize(f, x, 1, n, buf);
            if (f == MOE_DTYPE_Q8_K) {
                for (int64_t b = 0; b < n / 256; b++) {
                    const uint8_t *r = ref + b * 292;
                    float d;
                    memcpy(&d, r, 4);
                    CHECK_MSG(memcmp(&d, &a.d[b], 4) == 0, "round %d Q8_K block %lld: d %g vs %g", round,
                              (long long)b, a.d[b], d);
                    CHECK_MSG(memcmp(r + 4, a.q + b * 256, 256) == 0, "round %d Q8_K block %lld: q", round,
                              (long long)b);
                    for (int j = 0; j < 16; j++) {
                        int16_t bs;
                        memcpy(&bs, r + 260 + 2 * j, 2);
                        CHECK_INT(a.sum16[b * 16 + j], ==, bs);
                    }
                }
            } else {
                const int bb = f == MOE_DTYPE_Q8_1 ? 36 : 34, qo = f == MOE_DTYPE_Q8_1 ? 4 : 2;
                for (int64_t b = 0; b < n / 32; b++) {
                    const uint8_t *r = ref + b * bb;
                    uint16_t dh;
                    memcpy(&dh, r, 2);
                    CHECK_MSG(moe_fp16_to_fp32(dh) == a.d[b], "round %d block %lld: d %g vs %g", round,
                              (long long)b, a.d[b], moe_fp16_to_fp32(dh));
                    CHECK_MSG(memcmp(r + qo, a.q + b * 32, 32) == 0, "round %d fmt %d block %lld: q", round,
                              (int)f, (long long)b);
                    if (f == MOE_DTYPE_Q8_1) {
                        uint16_t sh;
                        memcpy(&sh, r + 2, 2);
                        CHECK(moe_fp16_to_fp32(sh) == a.s[b]);
                    }
                }
            }
        }
    }
    free(x);
    free(buf);
    free(ref);
}

/* ---- the GEMV, warp by warp ------------------------------------------------------ */

template <uint32_t T, int NT>
static void gemv_row_host(const uint8_t *wr, const mv_act &a, int nt, float *out)
{
    constexpr int TS = wtraits<T>::TS, LPB = wtraits<T>::LPB;
    constexpr int BPL = mvchunk<T>::BPL, REP = mvchunk<T>::REP, CB = mvchunk<T>::CB;
    static uint8_t sb_mem[MV_SBUF + 16] __attribute__((aligned(16)));
    uint8_t *sb = sb_mem;
    float acc[32][NT];
    memset(acc, 0, sizeof(acc));
    const int64_t nb = a.n_in / wtraits<T>::BLK;
    for (int64_t b0 = 0; b0 < nb; b0 += CB) {
        const int ncb = nb - b0 < CB ? (int)(nb - b0) : CB;
        memset(sb_mem, 0xa5, sizeof(sb_mem));   /* stale bytes must not matter */
        int head = 0;
        for (int lane = 0; lane < 32; lane++)
            head = stage(sb, wr + b0 * TS, ncb * TS, lane);
        for (int lane = 0; lane < 32; lane++)
            for (int r = 0; r < REP; r++) {
                const int kb = r * BPL + lane / LPB;
                if (kb < ncb)
                    dot_block<T, NT>(sb + head + kb * TS, lane % LPB, a, b0 + kb, nt, acc[lane]);
            }
    }
    /* __shfl_xor_sync butterfly, as the kernel sums */
    for (int o = 16; o > 0; o >>= 1) {
        float nxt[32][NT];
        for (int l = 0; l < 32; l++)
            for (int t = 0; t < NT; t++)
                nxt[l][t] = acc[l][t] + acc[l ^ o][t];
        memcpy(acc, nxt, sizeof(acc));
    }
    for (int t = 0; t < nt; t++)
        out[t] = acc[0][t];
}

template <uint32_t T, int NT>
static int check_gemv(int64_t n_in, int nt, int misalign)
{
    const struct moe_dtype_info *inf = moe_dtype_info(T);
    const int64_t n_out = 5;
    const size_t rb = (size_t)(n_in / inf->block_size) * inf->type_size;
    uint8_t *wbuf = (uint8_t *)alloc256(rb * n_out + 64);
    uint8_t *w = wbuf + misalign;
    moe_test_fill_type(T, w, n_in * n_out, &seed);
    float *x = (float *)malloc((size_t)(nt * n_in) * sizeof(float));
    for (int64_t i = 0; i < nt * n_in; i++)
        x[i] = moe_test_frand(&seed) * (i % 7 == 0 ? 4.0f : 1.0f);
    const int f = moe_dtype_vec_dot_type(T);
    void *buf = alloc256(act_q_bytes(f, nt, n_in));
    const mv_act a = quantize(f, x, nt, n_in, buf);
    uint8_t *ref_act = (uint8_t *)malloc(moe_vecdot_act_bytes(T, n_in));
    float *wf = (float *)malloc((size_t)n_in * sizeof(float));
    int bad = 0;
    for (int64_t o = 0; o < n_out && !bad; o++) {
        float got[8];
        gemv_row_host<T, NT>(w + o * rb, a, nt, got);
        moe_dequantize_row(T, w + o * rb, wf, n_in);
        for (int t = 0; t < nt && !bad; t++) {
            moe_vecdot_quantize_act(T, x + t * n_in, ref_act, n_in);
            const float want = moe_vecdot(T, w + o * rb, ref_act, n_in);
            double mag = 0.0;
            for (int64_t i = 0; i < n_in; i++)
                mag += fabs((double)wf[i] * x[t * n_in + i]);
            if (!(fabs((double)got[t] - want) <= 1e-5 * mag + 1e-6)) {
                MOE_FAIL_AT("%s n_in %lld nt %d misalign %d row %lld tok %d: %.9g, cpu %.9g (sum|wx| %g)",
                            inf->name, (long long)n_in, nt, misalign, (long long)o, t, got[t], want, mag);
                bad = 1;
            }
        }
    }
    free(wbuf);
    free(x);
    free(buf);
    free(ref_act);
    free(wf);
    return bad;
}

template <uint32_t T>
static void check_type(void)
{
    const int blk = wtraits<T>::BLK;
    const int64_t lens[3] = { blk == 32 ? 32 : 256, blk == 32 ? 32 * 70 : 256 * 9,
                              blk == 32 ? 32 * 131 : 256 * 17 };
    for (int li = 0; li < 3; li++) {
        if (check_gemv<T, 1>(lens[li], 1, li * 5 % 16))
            return;
        if (check_gemv<T, 4>(lens[li], 3, li == 1 ? 1 : 6))
            return;
        if (check_gemv<T, 8>(lens[li], 8, li == 2 ? 15 : 2))
            return;
    }
}

int main(void)
{
    moe_test_run("tables and intrinsics", test_tables);
    moe_test_run("activation quantizers = CPU", test_act_quant);
    moe_test_run("Q4_0", check_type<MOE_DTYPE_Q4_0>);
    moe_test_run("Q4_1", check_type<MOE_DTYPE_Q4_1>);
    moe_test_run("Q5_0", check_type<MOE_DTYPE_Q5_0>);
    moe_test_run("Q5_1", check_type<MOE_DTYPE_Q5_1>);
    moe_test_run("Q8_0", check_type<MOE_DTYPE_Q8_0>);
    moe_test_run("IQ4_NL", check_type<MOE_DTYPE_IQ4_NL>);
    moe_test_run("MXFP4", check_type<MOE_DTYPE_MXFP4>);
    moe_test_run("Q2_K", check_type<MOE_DTYPE_Q2_K>);
    moe_test_run("Q3_K", check_type<MOE_DTYPE_Q3_K>);
    moe_test_run("Q4_K", check_type<MOE_DTYPE_Q4_K>);
    moe_test_run("Q5_K", check_type<MOE_DTYPE_Q5_K>);
    moe_test_run("Q6_K", check_type<MOE_DTYPE_Q6_K>);
    return moe_test_exit_code();
}
