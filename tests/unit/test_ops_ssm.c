/* The CPU backend's delta-net ops (kernels/cpu/ops_ssm.c: ssm_conv,
 * gated_delta_net) against the code model/deltanet.c ran before they
 * existed, kept here verbatim as the reference (a window buffer for the
 * conv, a delta vector for the rule, each pass over the whole state):
 * equal bits, over sequences fed in one call and in several (the state
 * carried between calls), with n_v > n_k (value heads sharing a key head)
 * and state dims that are not a power of two. And the op contract's edges:
 * one token, d_conv 1 (no history), bad dims refused. */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
#include "tests/harness.h"

static uint64_t rng = 0x2545f4914f6cdd1dull;

static float frand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 11) & 0xffffff) / 16777216.0f - 0.5f;
}

static void *xcalloc(size_t n, size_t s)
{
    void *p = calloc(n ? n : 1, s);
    if (p == NULL)
        abort();
    return p;
}

/* ---- the reference: model/deltanet.c as of 4545065 -------------------- */

static inline float silu(float x) { return x / (1.0f + expf(-x)); }
static inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
static inline float softplus(float x) { return x > 20.0f ? x : logf(1.0f + expf(x)); }

static float rms_scale(const float *x, int n, float eps)
{
    double sum = 0.0;
    for (int i = 0; i < n; i++)
        sum += (double)(x[i] * x[i]);
    const float mean = (float)(sum / n);
    return 1.0f / sqrtf(mean + eps);
}

static float dot(const float *a, const float *b, int n)
{
    float s = 0.0f;
    for (int i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

static void ref_conv(int C, int d_conv, const float *w, float *state, const float *qkv, float *out,
                     int64_t n, float *win)
{
    const int K = d_conv, hist = d_conv - 1;
    for (int ch = 0; ch < C; ch++) {
        float *st = state + (size_t)ch * (size_t)hist;
        const float *wc = w + (size_t)ch * (size_t)K;
        memcpy(win, st, (size_t)hist * sizeof(float));
        for (int64_t t = 0; t < n; t++)
            win[hist + t] = qkv[t * C + ch];
        for (int64_t t = 0; t < n; t++) {
            float sum = 0.0f;
            for (int i = 0; i < K; i++)
                sum += win[t + i] * wc[i];
            out[t * C + ch] = silu(sum);
        }
        memcpy(st, win + n, (size_t)hist * sizeof(float));
    }
}

/* the activations, the L2 norms, the recurrence and the gated norm of
 * moe_deltanet_layer over one sequence */
static void ref_gdn(int NK, int NV, int D, float eps, const float *dt, const float *a,
                    const float *norm, float *conv, const float *z, float *beta, float *gdecay,
                    float *ssm, float *core, int64_t n, float *delta)
{
    const int key_dim = NK * D, d_inner = NV * D, C = 2 * key_dim + d_inner;
    for (int64_t t = 0; t < n; t++)
        for (int h = 0; h < NV; h++) {
            beta[t * NV + h] = sigmoid(beta[t * NV + h]);
            gdecay[t * NV + h] = softplus(gdecay[t * NV + h] + dt[h]) * a[h];
        }
    const float l2s = 1.0f / sqrtf((float)D), l2eps = eps / (float)D;
    for (int64_t t = 0; t < n; t++)
        for (int hh = 0; hh < 2 * NK; hh++) {
            float *x = conv + t * C + hh * D;
            const float sc = rms_scale(x, D, l2eps);
            for (int j = 0; j < D; j++)
                x[j] = (x[j] * sc) * l2s;
        }
    const float scale = 1.0f / sqrtf((float)D);
    for (int h = 0; h < NV; h++) {
        float *S = ssm + (size_t)h * (size_t)D * (size_t)D;
        const int hk = h % NK;
        for (int64_t t = 0; t < n; t++) {
            const float *q = conv + t * C + hk * D;
            const float *k = conv + t * C + key_dim + hk * D;
            const float *v = conv + t * C + 2 * key_dim + h * D;
            const float b = beta[t * NV + h], eg = expf(gdecay[t * NV + h]);
            for (int i = 0; i < D * D; i++)
                S[i] *= eg;
            for (int j = 0; j < D; j++)
                delta[j] = (v[j] - dot(S + (size_t)j * D, k, D)) * b;
            for (int j = 0; j < D; j++) {
                float *row = S + (size_t)j * D;
                for (int i = 0; i < D; i++)
                    row[i] += k[i] * delta[j];
            }
            float *o = core + t * d_inner + h * D;
            for (int j = 0; j < D; j++)
                o[j] = dot(S + (size_t)j * D, q, D) * scale;
        }
    }
    for (int64_t t = 0; t < n; t++)
        for (int h = 0; h < NV; h++) {
            float *o = core + t * d_inner + h * D;
            const float *zz = z + t * d_inner + h * D;
            const float sc = rms_scale(o, D, eps);
            for (int j = 0; j < D; j++)
                o[j] = ((o[j] * sc) * norm[j]) * silu(zz[j]);
        }
}

/* ---- the cases ---------------------------------------------------------- */

struct dims {
    int NK, NV, D, d_conv;
};

/* A sequence of n tokens fed in the chunks `split` (summing to n), through
 * the ops and through the reference, from a non-zero state. */
static int run_case(struct moe_backend *be, const struct dims *dm, int n, const int *split, int n_split)
{
    const int NK = dm->NK, NV = dm->NV, D = dm->D, K = dm->d_conv, hist = K - 1;
    const int key_dim = NK * D, d_inner = NV * D, C = 2 * key_dim + d_inner;
    const float eps = 1e-6f;
    float *w = xcalloc((size_t)C * K, 4), *dt = xcalloc(NV, 4), *a = xcalloc(NV, 4);
    float *norm = xcalloc(D, 4);
    float *x = xcalloc((size_t)n * C, 4), *z = xcalloc((size_t)n * d_inner, 4);
    float *beta = xcalloc((size_t)n * NV, 4), *alpha = xcalloc((size_t)n * NV, 4);
    const size_t conv_f = (size_t)C * hist, ssm_f = (size_t)NV * D * D;
    float *st1 = xcalloc(conv_f + ssm_f, 4), *st2 = xcalloc(conv_f + ssm_f, 4);
    for (size_t i = 0; i < (size_t)C * K; i++)
        w[i] = frand();
    for (int i = 0; i < NV; i++) {
        dt[i] = frand() * 2;
        a[i] = -expf(frand() * 2);
    }
    alpha[0] = 30.0f;   /* softplus's linear branch */
    for (int i = 0; i < D; i++)
        norm[i] = 1.0f + frand();
    for (size_t i = 0; i < (size_t)n * C; i++)
        x[i] = frand() * 4;
    for (size_t i = 0; i < (size_t)n * d_inner; i++)
        z[i] = frand() * 4;
    for (size_t i = 1; i < (size_t)n * NV; i++) {
        beta[i] = frand() * 6;
        alpha[i] = frand() * 6;
    }
    for (size_t i = 0; i < conv_f + ssm_f; i++)
        st1[i] = st2[i] = frand() * 0.1f;
    /* ops */
    float *c1 = xcalloc((size_t)n * C, 4), *o1 = xcalloc((size_t)n * d_inner, 4);
    const struct moe_gdn_params gp = { NK, NV, D, eps, dt, a, norm };
    int off = 0, bad = 0;
    for (int s = 0; s < n_split; s++) {
        const int m = split[s];
        if (be->ops->ssm_conv(be, c1 + (size_t)off * C, x + (size_t)off * C, st1, w, m, C, K) != 0 ||
            be->ops->gated_delta_net(be, o1 + (size_t)off * d_inner, c1 + (size_t)off * C,
                                     z + (size_t)off * d_inner, beta + off * NV, alpha + off * NV,
                                     st1 + conv_f, m, &gp) != 0)
            bad = 1;
        off += m;
    }
    /* reference, fed the same chunks */
    float *c2 = xcalloc((size_t)n * C, 4), *o2 = xcalloc((size_t)n * d_inner, 4);
    float *b2 = xcalloc((size_t)n * NV, 4), *g2 = xcalloc((size_t)n * NV, 4);
    float *win = xcalloc((size_t)n + K, 4), *delta = xcalloc(D, 4);
    memcpy(b2, beta, (size_t)n * NV * 4);
    memcpy(g2, alpha, (size_t)n * NV * 4);
    off = 0;
    for (int s = 0; s < n_split; s++) {
        const int m = split[s];
        ref_conv(C, K, w, st2, x + (size_t)off * C, c2 + (size_t)off * C, m, win);
        ref_gdn(NK, NV, D, eps, dt, a, norm, c2 + (size_t)off * C, z + (size_t)off * d_inner,
                b2 + off * NV, g2 + off * NV, st2 + conv_f, o2 + (size_t)off * d_inner, m, delta);
        off += m;
    }
    if (!bad && (memcmp(o1, o2, (size_t)n * d_inner * 4) != 0 || memcmp(st1, st2, (conv_f + ssm_f) * 4) != 0 ||
                 memcmp(c1, c2, (size_t)n * C * 4) != 0)) {
        size_t i = 0;
        while (i < (size_t)n * d_inner && memcmp(&o1[i], &o2[i], 4) == 0)
            i++;
        fprintf(stderr, "  nk %d nv %d D %d d_conv %d n %d in %d calls: first output difference at %zu"
                " (%.9g vs %.9g)\n", NK, NV, D, K, n, n_split, i, i < (size_t)n * d_inner ? o1[i] : 0.0,
                i < (size_t)n * d_inner ? o2[i] : 0.0);
        bad = 1;
    }
    float *all[] = { w, dt, a, norm, x, z, beta, alpha, st1, st2, c1, o1, c2, o2, b2, g2, win, delta };
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        free(all[i]);
    return bad;
}

static struct moe_backend *open_cpu(void)
{
    struct moe_backend *be = NULL;
    struct moe_diag d = { 0 };
    if (moe_backend_cpu_create(&be, 1, &d) != 0)
        return NULL;
    return be;
}

static void test_bit_identical(void)
{
    struct moe_backend *be = open_cpu();
    CHECK(be != NULL && be->ops->ssm_conv != NULL && be->ops->gated_delta_net != NULL);
    const struct dims dims[] = {
        { 2, 4, 16, 4 },    /* qwen35moe's shape in small: n_v = 2 n_k */
        { 1, 3, 24, 4 },    /* three value heads on one key head */
        { 3, 3, 7, 2 },     /* odd dims */
        { 2, 2, 8, 1 },     /* no conv history */
    };
    const int one[] = { 9 }, three[] = { 4, 1, 4 }, singles[] = { 1, 1, 1, 1, 1, 1, 1, 1, 1 };
    for (size_t k = 0; k < sizeof(dims) / sizeof(dims[0]); k++) {
        CHECK_MSG(run_case(be, &dims[k], 9, one, 1) == 0, "dims %zu: one call differs", k);
        CHECK_MSG(run_case(be, &dims[k], 9, three, 3) == 0, "dims %zu: three calls differ", k);
        CHECK_MSG(run_case(be, &dims[k], 9, singles, 9) == 0, "dims %zu: token by token differs", k);
    }
    moe_backend_destroy(be);
}

/* A sequence fed in one call or token by token gives the same bits: the
 * state carries everything between calls. */
static void test_split_invariant(void)
{
    struct moe_backend *be = open_cpu();
    CHECK(be != NULL);
    enum { NK = 2, NV = 4, D = 16, K = 4, N = 6, C = 2 * NK * D + NV * D, DI = NV * D };
    static float w[C * K], dt[NV], a[NV], norm[D], x[N * C], z[N * DI], beta[N * NV], alpha[N * NV];
    static float st[2][C * (K - 1) + NV * D * D], cv[2][N * C], o[2][N * DI];
    for (int i = 0; i < C * K; i++)
        w[i] = frand();
    for (int i = 0; i < NV; i++) {
        dt[i] = frand();
        a[i] = -1.0f - frand();
    }
    for (int i = 0; i < D; i++)
        norm[i] = 1.0f + frand();
    for (int i = 0; i < N * C; i++)
        x[i] = frand() * 3;
    for (int i = 0; i < N * DI; i++)
        z[i] = frand() * 3;
    for (int i = 0; i < N * NV; i++) {
        beta[i] = frand() * 3;
        alpha[i] = frand() * 3;
    }
    memset(st, 0, sizeof(st));
    const struct moe_gdn_params gp = { NK, NV, D, 1e-6f, dt, a, norm };
    float *ssm0 = st[0] + C * (K - 1), *ssm1 = st[1] + C * (K - 1);
    CHECK(be->ops->ssm_conv(be, cv[0], x, st[0], w, N, C, K) == 0);
    CHECK(be->ops->gated_delta_net(be, o[0], cv[0], z, beta, alpha, ssm0, N, &gp) == 0);
    for (int t = 0; t < N; t++) {
        CHECK(be->ops->ssm_conv(be, cv[1] + t * C, x + t * C, st[1], w, 1, C, K) == 0);
        CHECK(be->ops->gated_delta_net(be, o[1] + t * DI, cv[1] + t * C, z + t * DI, beta + t * NV,
                                       alpha + t * NV, ssm1, 1, &gp) == 0);
    }
    CHECK(memcmp(o[0], o[1], sizeof(o[0])) == 0);
    CHECK(memcmp(st[0], st[1], sizeof(st[0])) == 0);
    /* refusals */
    struct moe_gdn_params bad = gp;
    bad.d_state = 0;
    CHECK_INT(be->ops->gated_delta_net(be, o[0], cv[0], z, beta, alpha, ssm0, 1, &bad), ==, -EINVAL);
    CHECK_INT(be->ops->ssm_conv(be, cv[0], x, st[0], w, 1, C, 0), ==, -EINVAL);
    CHECK_INT(be->ops->ssm_conv(be, cv[0], x, st[0], w, 1, 0, K), ==, -EINVAL);
    moe_backend_destroy(be);
}

int main(void)
{
    MOE_TEST_RUN(test_bit_identical);
    MOE_TEST_RUN(test_split_invariant);
    return moe_test_exit_code();
}
