/* The CUDA delta-net kernels' arithmetic, and geglu's fp16 rounding, run on
 * the host: no GPU needed.
 *
 * kernels/cuda/ssm-impl.h holds the per-thread code of ssm_conv_kernel and
 * gdn_kernel. This test runs it the way a block does (every "thread"
 * through one phase, then the next: the kernel's barriers), with the
 * state in both of the kernel's placements (transposed as in shared memory,
 * and in place), and compares with the CPU backend's ops: on the host the
 * code uses plain float operators and glibc's expf / logf, so it must give
 * the CPU's bits; a difference is an index, order or layout bug of the
 * kernel. Also: __float2half_rn (what geglu_kernel rounds the gate with)
 * equals moe_fp32_to_fp16 (what the CPU's table lookup uses) on the gates
 * the table serves.
 * What it cannot check: the device's expf / logf, __fmul_rn and friends,
 * shared memory and barriers themselves (tests/gpu/test_gpu_ops.c does,
 * on a GPU). */
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/ssm-impl.h"
#include "kernels/backend.h"
#include "kernels/fp16.h"
extern "C" {
#include "tests/harness.h"
}

using namespace moecu;

static uint64_t rng = 0x853c49e6748fea9bull;

static float frand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 11) & 0xffffff) / 16777216.0f - 0.5f;
}

static float *fl(size_t n)
{
    float *p = (float *)calloc(n ? n : 1, sizeof(float));
    if (p == NULL)
        abort();
    return p;
}

/* gdn_kernel<SH> for one call, block by block, thread by thread */
static void emulate_gdn(bool sh_layout, float *out, const float *qkv, const float *z, const float *beta,
                        const float *alpha, float *state, int64_t n_tok, const gdn_args &p)
{
    const int D = p.D, key_dim = p.n_k * D, d_inner = p.n_v * D, C = 2 * key_dim + d_inner;
    float *qs = fl((size_t)D), *ks = fl((size_t)D), *os = fl((size_t)D), *Ss = fl((size_t)D * D);
    for (int h = 0; h < p.n_v; h++) {
        const int hk = h % p.n_k;
        float *Sg = state + (size_t)h * D * D;
        float *S = sh_layout ? Ss : Sg;
        const int64_t sj = sh_layout ? 1 : D, si = sh_layout ? D : 1;
        if (sh_layout)
            for (int e = 0; e < D * D; e++)
                Ss[(size_t)(e % D) * D + e / D] = Sg[e];
        for (int64_t t = 0; t < n_tok; t++) {
            const float *row = qkv + t * C;
            for (int j = 0; j < D; j++) {
                qs[j] = row[hk * D + j];
                ks[j] = row[key_dim + hk * D + j];
            }
            const float scq = ssm_rms_scale(qs, D, p.l2eps), sck = ssm_rms_scale(ks, D, p.l2eps);
            for (int j = 0; j < D; j++) {
                qs[j] = gdn_l2(qs[j], scq, p.l2s);
                ks[j] = gdn_l2(ks[j], sck, p.l2s);
            }
            float b, eg;
            gdn_gates(p, beta, alpha, t, h, &b, &eg);
            for (int j = 0; j < D; j++)
                os[j] = gdn_row(S, sj, si, j, D, qs, ks, row[2 * key_dim + h * D + j], b, eg, p.l2s);
            const float sco = ssm_rms_scale(os, D, p.eps);
            for (int j = 0; j < D; j++) {
                const int64_t at = t * d_inner + h * D + j;
                out[at] = gdn_out(os[j], sco, p.norm[j], z[at]);
            }
        }
        if (sh_layout)
            for (int e = 0; e < D * D; e++)
                Sg[e] = Ss[(size_t)(e % D) * D + e / D];
    }
    free(qs);
    free(ks);
    free(os);
    free(Ss);
}

static int check_shape(struct moe_backend *cpu, int NK, int NV, int D, int K, bool sh_layout)
{
    const int C = 2 * NK * D + NV * D, DI = NV * D, hist = K - 1, N = 13;
    const int chunks[3] = { 1, 5, 7 };
    const size_t cf = (size_t)C * hist, sf = (size_t)NV * D * D;
    float *w = fl((size_t)C * K), *dt = fl(NV), *a = fl(NV), *norm = fl(D), *x = fl((size_t)N * C);
    float *z = fl((size_t)N * DI), *beta = fl((size_t)N * NV), *alpha = fl((size_t)N * NV);
    float *st1 = fl(cf + sf), *st2 = fl(cf + sf), *c1 = fl((size_t)N * C), *c2 = fl((size_t)N * C);
    float *o1 = fl((size_t)N * DI), *o2 = fl((size_t)N * DI);
    for (size_t i = 0; i < (size_t)C * K; i++)
        w[i] = frand();
    for (int i = 0; i < NV; i++) {
        dt[i] = frand();
        a[i] = -1.0f - frand();
    }
    for (int i = 0; i < D; i++)
        norm[i] = 1.0f + frand();
    for (size_t i = 0; i < (size_t)N * C; i++)
        x[i] = frand() * 3;
    for (size_t i = 0; i < (size_t)N * DI; i++)
        z[i] = frand() * 3;
    for (size_t i = 0; i < (size_t)N * NV; i++) {
        beta[i] = frand() * 3;
        alpha[i] = frand() * 3;
    }
    alpha[0] = 25.0f;   /* softplus's linear branch */
    for (size_t i = 0; i < cf + sf; i++)
        st1[i] = st2[i] = frand() * 0.1f;
    const struct moe_gdn_params hp = { NK, NV, D, 1e-6f, dt, a, norm };
    gdn_args p;
    p.n_k = NK;
    p.n_v = NV;
    p.D = D;
    p.eps = 1e-6f;
    p.l2eps = 1e-6f / (float)D;
    p.l2s = 1.0f / sqrtf((float)D);
    p.dt = dt;
    p.a = a;
    p.norm = norm;
    int off = 0, bad = 0;
    for (int k = 0; k < 3; k++) {
        const int m = chunks[k];
        const size_t xo = (size_t)off * C, oo = (size_t)off * DI;
        bad |= cpu->ops->ssm_conv(cpu, c1 + xo, x + xo, st1, w, m, C, K) != 0;
        bad |= cpu->ops->gated_delta_net(cpu, o1 + oo, c1 + xo, z + oo, beta + off * NV, alpha + off * NV,
                                         st1 + cf, m, &hp) != 0;
        for (int ch = 0; ch < C; ch++)   /* ssm_conv_kernel: a thread per channel */
            ssm_conv_channel(c2 + xo, x + xo, st2, w, m, C, K, ch);
        emulate_gdn(sh_layout, o2 + oo, c2 + xo, z + oo, beta + off * NV, alpha + off * NV, st2 + cf, m, p);
        off += m;
    }
    /* the CPU normalises q and k in place in its conv output; the kernel
     * does not: compare the v part and the outputs and states */
    for (int t = 0; t < N && !bad; t++)
        bad |= memcmp(c1 + (size_t)t * C + 2 * NK * D, c2 + (size_t)t * C + 2 * NK * D, (size_t)DI * 4) != 0;
    bad |= memcmp(o1, o2, (size_t)N * DI * 4) != 0;
    bad |= memcmp(st1, st2, (cf + sf) * 4) != 0;
    if (bad)
        fprintf(stderr, "  nk %d nv %d D %d d_conv %d %s: differs from the CPU backend\n", NK, NV, D, K,
                sh_layout ? "shared layout" : "in place");
    float *all[] = { w, dt, a, norm, x, z, beta, alpha, st1, st2, c1, c2, o1, o2 };
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        free(all[i]);
    return bad;
}

static void test_delta_net(void)
{
    struct moe_backend *cpu = NULL;
    struct moe_diag d = {};
    CHECK(moe_backend_cpu_create(&cpu, 1, &d) == 0);
    const int shapes[][4] = { { 2, 4, 128, 4 }, { 1, 3, 40, 4 }, { 3, 3, 7, 2 }, { 2, 2, 16, 1 } };
    for (size_t k = 0; k < sizeof(shapes) / sizeof(shapes[0]); k++)
        for (int layout = 0; layout < 2; layout++)
            CHECK_MSG(check_shape(cpu, shapes[k][0], shapes[k][1], shapes[k][2], shapes[k][3], layout) == 0,
                      "shape %zu layout %d", k, layout);
    moe_backend_destroy(cpu);
}

/* geglu_kernel rounds the gate with __float2half_rn and indexes the CPU's
 * table with the bits; the CPU indexes it with moe_fp32_to_fp16. Every
 * float in (-10, 10) rounds to one of ~2^15 halves: check the conversions
 * agree on 2^22 floats spread over the range, every boundary between two
 * halves (a midpoint and its neighbours), and the subnormal range. */
static void test_geglu_rounding(void)
{
    int bad = 0;
    for (uint32_t i = 0; i < (1u << 22) && bad < 5; i++) {
        const float f = -10.0f + 20.0f * (float)i / (float)(1u << 22);
        const uint16_t a = __half_as_ushort(__float2half_rn(f)), b = moe_fp32_to_fp16(f);
        if (a != b && bad++ < 5)
            fprintf(stderr, "  %.9g: __float2half_rn %04x, moe_fp32_to_fp16 %04x\n", f, a, b);
    }
    for (uint32_t h = 0; h < 0x7c00 && bad < 5; h++) {   /* positive finite halves */
        const float lo = moe_fp16_to_fp32((uint16_t)h), hi = moe_fp16_to_fp32((uint16_t)(h + 1));
        const float mid = lo + (hi - lo) * 0.5f;
        if (h + 1 >= 0x7c00 || mid >= 10.0f)
            break;
        const float probes[3] = { mid, nextafterf(mid, 0.0f), nextafterf(mid, 20.0f) };
        for (int k = 0; k < 3; k++)
            for (int sgn = 0; sgn < 2; sgn++) {
                const float f = sgn ? -probes[k] : probes[k];
                const uint16_t a = __half_as_ushort(__float2half_rn(f)), b = moe_fp32_to_fp16(f);
                if (a != b && bad++ < 5)
                    fprintf(stderr, "  %.9g: __float2half_rn %04x, moe_fp32_to_fp16 %04x\n", f, a, b);
            }
    }
    CHECK_MSG(bad == 0, "%d gates round differently", bad);
}

int main(void)
{
    MOE_TEST_RUN(test_delta_net);
    MOE_TEST_RUN(test_geglu_rounding);
    return moe_test_exit_code();
}
