/* qwen35moe's gated delta-net ops on the CPU, as llama.cpp computes them
 * (ggml's CPU ssm_conv, l2_norm, gated_delta_net and rms_norm ops in its
 * qwen35moe graph). The float operations and their order are those of
 * model/deltanet.c before these ops existed, so results are bit-identical
 * to it (tests/unit/test_ops_ssm.c keeps that implementation as its
 * reference). Nothing here allocates: the conv reads its window straight
 * from the state and the inputs, and the delta rule updates one state row
 * at a time (row j's update needs only row j). */
#include <errno.h>
#include <math.h>

#include "kernels/cpu/ops_ssm.h"

static inline float silu(float x) { return x / (1.0f + expf(-x)); }
static inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
static inline float softplus(float x) { return x > 20.0f ? x : logf(1.0f + expf(x)); }

/* ggml's rms_norm scale (sum of squares in double) of x[n] */
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

int moe_cpu_ssm_conv(struct moe_backend *be, float *y, const float *x, float *state, const float *w,
                     int64_t n_tok, int n_ch, int d_conv)
{
    (void)be;
    if (n_ch <= 0 || d_conv < 1 || n_tok < 0)
        return -EINVAL;
    const int hist = d_conv - 1;
    for (int ch = 0; ch < n_ch; ch++) {
        float *st = state + (size_t)ch * (size_t)hist;
        const float *wc = w + (size_t)ch * (size_t)d_conv;
        /* window position p: the state's p-th input, then the tokens' */
#define WIN(p) ((p) < hist ? st[(p)] : x[((int64_t)(p) - hist) * n_ch + ch])
        for (int64_t t = 0; t < n_tok; t++) {
            float sum = 0.0f;
            for (int i = 0; i < d_conv; i++)
                sum += WIN(t + i) * wc[i];
            y[t * n_ch + ch] = silu(sum);
        }
        /* the last hist inputs; ascending, st[j] is written after
         * st[n_tok + j] (a later element) was read */
        for (int j = 0; j < hist; j++)
            st[j] = WIN(n_tok + j);
#undef WIN
    }
    return 0;
}

int moe_cpu_gated_delta_net(struct moe_backend *be, float *out, float *qkv, const float *z,
                            const float *beta, const float *alpha, float *state, int64_t n_tok,
                            const struct moe_gdn_params *p)
{
    (void)be;
    const int D = p->d_state, NV = p->n_v, NK = p->n_k;
    if (D <= 0 || NV <= 0 || NK <= 0 || n_tok < 0)
        return -EINVAL;
    const int key_dim = NK * D, d_inner = NV * D, C = 2 * key_dim + d_inner;
    /* q and k: L2 norm per key head, as ggml's rms_norm(eps / D) x 1/sqrt(D) */
    const float l2s = 1.0f / sqrtf((float)D), l2eps = p->eps / (float)D;
    for (int64_t t = 0; t < n_tok; t++)
        for (int hh = 0; hh < 2 * NK; hh++) {
            float *x = qkv + t * C + hh * D;
            const float sc = rms_scale(x, D, l2eps);
            for (int j = 0; j < D; j++)
                x[j] = (x[j] * sc) * l2s;
        }
    const float scale = 1.0f / sqrtf((float)D);
    for (int h = 0; h < NV; h++) {
        float *S = state + (size_t)h * (size_t)D * (size_t)D; /* row j: S[j][.] */
        const int hk = h % NK;
        for (int64_t t = 0; t < n_tok; t++) {
            const float *q = qkv + t * C + hk * D;
            const float *k = qkv + t * C + key_dim + hk * D;
            const float *v = qkv + t * C + 2 * key_dim + h * D;
            const float b = sigmoid(beta[t * NV + h]);
            const float g = softplus(alpha[t * NV + h] + p->dt_bias[h]) * p->a[h];
            const float eg = expf(g);
            float *o = out + t * d_inner + h * D;
            for (int j = 0; j < D; j++) {
                float *row = S + (size_t)j * D;
                for (int i = 0; i < D; i++)
                    row[i] *= eg;
                const float dj = (v[j] - dot(row, k, D)) * b;
                for (int i = 0; i < D; i++)
                    row[i] += k[i] * dj;
                o[j] = dot(row, q, D) * scale;
            }
        }
    }
    /* gated RMSNorm per value head */
    for (int64_t t = 0; t < n_tok; t++)
        for (int h = 0; h < NV; h++) {
            float *o = out + t * d_inner + h * D;
            const float *zz = z + t * d_inner + h * D;
            const float sc = rms_scale(o, D, p->eps);
            for (int j = 0; j < D; j++)
                o[j] = ((o[j] * sc) * p->norm[j]) * silu(zz[j]);
        }
    return 0;
}
