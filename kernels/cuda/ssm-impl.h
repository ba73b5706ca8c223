// The per-thread arithmetic of the delta-net kernels (kernels/cuda/ssm.cu),
// written as __host__ __device__ functions so that the same code runs on
// the host in tests/gpu/test_gpu_ssm_host.cu, one "thread" after another
// between the kernel's barriers, against the CPU backend's ops. On the
// device the products and sums are __fmul_rn / __fadd_rn / __fsub_rn (no
// fused multiply-adds, as the CPU backend computes them); on the host the
// plain operators (the host compiler does not contract in ISO C++ mode), and
// expf / logf are glibc's there, so the host run must give the CPU's bits.
// C++ (nvcc) only.
#ifndef MOE_KERNELS_CUDA_SSM_IMPL_H
#define MOE_KERNELS_CUDA_SSM_IMPL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

namespace moecu {

#define SSM_HD __host__ __device__ __forceinline__

#ifdef __CUDA_ARCH__
#define SSM_MUL(a, b) __fmul_rn((a), (b))
#define SSM_ADD(a, b) __fadd_rn((a), (b))
#define SSM_SUB(a, b) __fsub_rn((a), (b))
#else
#define SSM_MUL(a, b) ((a) * (b))
#define SSM_ADD(a, b) ((a) + (b))
#define SSM_SUB(a, b) ((a) - (b))
#endif

SSM_HD float ssm_silu(float x) { return x / (1.0f + expf(-x)); }
SSM_HD float ssm_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
SSM_HD float ssm_softplus(float x) { return x > 20.0f ? x : logf(1.0f + expf(x)); }

// ggml's rms_norm scale: the sum of squares in double, in element order
SSM_HD float ssm_rms_scale(const float *x, int n, float eps)
{
    double sum = 0.0;
    for (int i = 0; i < n; i++)
        sum += (double)SSM_MUL(x[i], x[i]);
    const float mean = (float)(sum / n);
    return 1.0f / sqrtf(mean + eps);
}

// ssm_conv for one channel over the sequence's n_tok tokens, then the
// channel's state: its last d_conv - 1 inputs (ascending, so st[j] is
// written after st[n_tok + j] was read)
SSM_HD void ssm_conv_channel(float *y, const float *x, float *state, const float *w, int64_t n_tok,
                             int n_ch, int d_conv, int ch)
{
    const int hist = d_conv - 1;
    float *st = state + (size_t)ch * (size_t)hist;
    const float *wc = w + (size_t)ch * (size_t)d_conv;
    for (int64_t t = 0; t < n_tok; t++) {
        float sum = 0.0f;
        for (int i = 0; i < d_conv; i++) {
            const int64_t p = t + i;
            const float v = p < hist ? st[p] : x[(p - hist) * n_ch + ch];
            sum = SSM_ADD(sum, SSM_MUL(v, wc[i]));
        }
        y[t * n_ch + ch] = ssm_silu(sum);
    }
    for (int j = 0; j < hist; j++) {
        const int64_t p = n_tok + j;
        st[j] = p < hist ? st[p] : x[(p - hist) * n_ch + ch];
    }
}

struct gdn_args {
    int n_k, n_v, D;
    float eps, l2eps, l2s;   // output norm eps; q/k norm eps / D; 1 / sqrt(D)
    const float *dt, *a, *norm;
};

// b = sigmoid(beta), exp(g) with g = softplus(alpha + dt_bias) * a, for
// head h of token t
SSM_HD void gdn_gates(const gdn_args &p, const float *beta, const float *alpha, int64_t t, int h,
                      float *b, float *eg)
{
    *b = ssm_sigmoid(beta[t * p.n_v + h]);
    const float g = SSM_MUL(ssm_softplus(SSM_ADD(alpha[t * p.n_v + h], p.dt[h])), p.a[h]);
    *eg = expf(g);
}

// Row j of a head's state (element i at S[j * sj + i * si]) for one token:
// decay, d_j, update, and o_j = row . q / sqrt(D). q and k normalised.
SSM_HD float gdn_row(float *S, int64_t sj, int64_t si, int j, int D, const float *q, const float *k,
                     float v, float b, float eg, float l2s)
{
    float *r = S + (int64_t)j * sj;
    float s = 0.0f;
    for (int i = 0; i < D; i++) {
        const float e = SSM_MUL(r[i * si], eg);
        r[i * si] = e;
        s = SSM_ADD(s, SSM_MUL(e, k[i]));
    }
    const float dj = SSM_MUL(SSM_SUB(v, s), b);
    float o = 0.0f;
    for (int i = 0; i < D; i++) {
        const float e = SSM_ADD(r[i * si], SSM_MUL(k[i], dj));
        r[i * si] = e;
        o = SSM_ADD(o, SSM_MUL(e, q[i]));
    }
    return SSM_MUL(o, l2s);
}

// x * sc * l2s (the L2 norm's element), and the gated norm's output element
SSM_HD float gdn_l2(float x, float sc, float l2s) { return SSM_MUL(SSM_MUL(x, sc), l2s); }
SSM_HD float gdn_out(float o, float sc, float norm, float z)
{
    return SSM_MUL(SSM_MUL(SSM_MUL(o, sc), norm), ssm_silu(z));
}

} // namespace moecu

#endif
