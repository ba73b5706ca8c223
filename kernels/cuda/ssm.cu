// qwen35moe's gated delta-net ops (kernels/backend.h ssm_conv,
// gated_delta_net) on the device, over one sequence's tokens and its
// recurrent state in device memory.
//
// ssm_conv: a thread per channel walks the tokens in order (the window is
// read straight from the state and the inputs), then moves the channel's
// last d_conv - 1 inputs into the state.
//
// gated_delta_net: a block per value head, a thread per state row j (value
// index); the tokens in order. Per token the block stages the head's q and
// k, L2-normalises them, and each thread decays its row, takes d_j, updates
// the row and reads o_j; then the block RMS-norms o and gates it with
// silu(z). The head's D x D state stays in shared memory for the whole call
// (transposed, so that the threads of a warp read consecutive banks) when
// it fits the device's opt-in limit (D = 128: 64 KiB), else it is used in
// place in device memory. The per-thread arithmetic is in
// kernels/cuda/ssm-impl.h, which tests/gpu/test_gpu_ssm_host.cu runs on the
// host thread by thread.
//
// Numerics against the CPU backend (kernels/cpu/ops_ssm.c): the same float
// operations in the same order, each rounded as there (__fmul_rn /
// __fadd_rn: no fused multiply-adds), the RMS sums of squares in double
// over the elements in order, sqrtf and divisions correctly rounded
// (nvcc's defaults). What differs is CUDA's expf and logf (within 2 ulp of
// glibc's, not equal) in sigmoid, softplus, exp(g) and silu; those
// differences then pass through the recurrence. Not yet run on a GPU.
#include <errno.h>
#include <math.h>

#include "kernels/cuda/cuda-impl.h"
#include "kernels/cuda/ssm-impl.h"

namespace moecu {

namespace {

__global__ void ssm_conv_kernel(float *y, const float *x, float *state, const float *w, int64_t n_tok,
                                int n_ch, int d_conv)
{
    for (int ch = blockIdx.x * blockDim.x + threadIdx.x; ch < n_ch; ch += gridDim.x * blockDim.x)
        ssm_conv_channel(y, x, state, w, n_tok, n_ch, d_conv, ch);
}

template <bool SH>
__global__ void gdn_kernel(float *out, const float *qkv, const float *z, const float *beta,
                           const float *alpha, float *state, int64_t n_tok, gdn_args p)
{
    extern __shared__ float sh[];   // q [D], k [D], o [D], then (SH) the state, transposed
    __shared__ float scs[2];
    const int D = p.D, h = blockIdx.x, hk = h % p.n_k, j = threadIdx.x;
    const int key_dim = p.n_k * D, d_inner = p.n_v * D, C = 2 * key_dim + d_inner;
    float *qs = sh, *ks = sh + D, *os = sh + 2 * D, *Ss = sh + 3 * D;
    float *Sg = state + (size_t)h * (size_t)D * (size_t)D;   // row j at Sg + j D
    // element (j, i): Ss[i D + j] in shared memory, Sg[j D + i] in place
    float *S = SH ? Ss : Sg;
    const int64_t sj = SH ? 1 : D, si = SH ? D : 1;
    const bool act = j < D;
    const int kt = blockDim.x > 32 ? 32 : 0;   // the k norm's thread, in another warp
    if (SH) {
        for (int e = threadIdx.x; e < D * D; e += blockDim.x)
            Ss[(size_t)(e % D) * D + e / D] = Sg[e];
        __syncthreads();
    }
    for (int64_t t = 0; t < n_tok; t++) {
        const float *row = qkv + t * C;
        if (act) {
            qs[j] = row[hk * D + j];
            ks[j] = row[key_dim + hk * D + j];
        }
        __syncthreads();
        if (threadIdx.x == 0)
            scs[0] = ssm_rms_scale(qs, D, p.l2eps);
        if (threadIdx.x == kt)
            scs[1] = ssm_rms_scale(ks, D, p.l2eps);
        __syncthreads();
        if (act) {
            qs[j] = gdn_l2(qs[j], scs[0], p.l2s);
            ks[j] = gdn_l2(ks[j], scs[1], p.l2s);
        }
        __syncthreads();
        float b, eg;
        gdn_gates(p, beta, alpha, t, h, &b, &eg);
        if (act)
            os[j] = gdn_row(S, sj, si, j, D, qs, ks, row[2 * key_dim + h * D + j], b, eg, p.l2s);
        __syncthreads();
        if (threadIdx.x == 0)
            scs[0] = ssm_rms_scale(os, D, p.eps);
        __syncthreads();
        if (act) {
            const int64_t at = t * d_inner + h * D + j;
            out[at] = gdn_out(os[j], scs[0], p.norm[j], z[at]);
        }
        __syncthreads();   // q, k, o and the scales are the next token's
    }
    if (SH) {
        for (int e = threadIdx.x; e < D * D; e += blockDim.x)
            Sg[e] = Ss[(size_t)(e % D) * D + e / D];
    }
}

} // namespace

int ssm_conv(cuda_ctx *c, float *y, const float *x, float *state, const float *w, int64_t n_tok, int n_ch,
             int d_conv)
{
    if (n_ch <= 0 || d_conv < 1 || n_tok < 0)
        return -EINVAL;
    if (n_tok == 0)
        return 0;
    ssm_conv_kernel<<<grid_for(n_ch, 128), 128, 0, c->stream>>>(y, x, state, w, n_tok, n_ch, d_conv);
    return check(c, cudaGetLastError(), "ssm_conv");
}

int gated_delta_net(cuda_ctx *c, float *out, const float *qkv, const float *z, const float *beta,
                    const float *alpha, float *state, int64_t n_tok, const struct moe_gdn_params *p)
{
    const int D = p->d_state;
    if (D <= 0 || p->n_v <= 0 || p->n_k <= 0 || n_tok < 0)
        return -EINVAL;
    if (D > 1024)
        return MOE_EUNSUPPORTED;   // a thread per state row
    if (n_tok == 0)
        return 0;
    gdn_args a;
    a.n_k = p->n_k;
    a.n_v = p->n_v;
    a.D = D;
    a.eps = p->eps;
    a.l2eps = p->eps / (float)D;
    a.l2s = 1.0f / sqrtf((float)D);
    a.dt = p->dt_bias;
    a.a = p->a;
    a.norm = p->norm;
    const int threads = (D + 31) / 32 * 32;
    const size_t base = (size_t)3 * D * sizeof(float);
    const size_t with_state = base + (size_t)D * D * sizeof(float);
    int optin = 0;
    int rc = check(c, cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, c->device),
                   "gated_delta_net");
    if (rc)
        return rc;
    // the kernel's static shared memory (two floats) counts against the same limit
    if (with_state + 64 <= (size_t)optin) {
        if (with_state > 48 * 1024 &&
            (rc = check(c, cudaFuncSetAttribute(gdn_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                (int)with_state), "gated_delta_net")) != 0)
            return rc;
        gdn_kernel<true><<<(unsigned)p->n_v, threads, with_state, c->stream>>>(out, qkv, z, beta, alpha,
                                                                               state, n_tok, a);
    } else {
        gdn_kernel<false><<<(unsigned)p->n_v, threads, base, c->stream>>>(out, qkv, z, beta, alpha, state,
                                                                          n_tok, a);
    }
    return check(c, cudaGetLastError(), "gated_delta_net");
}

} // namespace moecu
