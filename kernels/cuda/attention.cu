// Attention over one sequence's KV cache (kernels/backend.h attention).
//
// A block of 128 threads takes one (token, head) pair and a range of cache
// rows: scores for chunks of ATT_CHUNK rows (a warp per row, lanes over the
// head dims), an online softmax across chunks, and the weighted sum of the
// V rows (a thread per V dim). With few pairs (decode: n_head pairs for one
// token) the rows are split over n_split blocks per pair (flash-decoding):
// each writes its running max, sum and unnormalized output to the
// workspace, and a second kernel merges them with the sink logit. With
// many pairs (prefill) n_split is 1 and the first kernel finishes alone.
//
// Numerics against the CPU backend: with an f16 cache q is rounded to f16
// as there; the CPU also rounds each probability to f16 before it weights
// V, which an online softmax cannot do (its probabilities are known only at
// the end), so f16-cache results differ by up to about 1e-3 relative.
#include <cuda_fp16.h>
#include <errno.h>
#include <math.h>

#include "common/dtype.h"
#include "kernels/cuda/cuda-impl.h"
#include "kernels/cuda/reduce-impl.h"

namespace moecu {

namespace {

constexpr int ATT_CHUNK = 128;
constexpr int ATT_THREADS = 128;
constexpr int ATT_MAX_SPLIT = 64;

__device__ __forceinline__ float cache_at(const void *c, int64_t i, int f16)
{
    return f16 ? __half2float(((const __half *)c)[i]) : ((const float *)c)[i];
}

// The cache row of position r: ix holds the n_tok positions, then the
// block table (kernels/backend.h) when block_rows > 0.
__device__ __forceinline__ int64_t cache_row(const ints_arg &ix, int64_t tab0, int block_rows, int r)
{
    return block_rows > 0 ? (int64_t)ix[tab0 + r / block_rows] * block_rows + r % block_rows : r;
}

// blockIdx.x = t * n_head + h, blockIdx.y = split. part: [pairs][n_split]
// (max, sum) pairs, then [pairs][n_split][head_dim_v] outputs.
__global__ void __launch_bounds__(ATT_THREADS)
attention_kernel(float *out, float *part, const float *q, const ints_arg pos, struct moe_attn_params ap,
                 int n_split, int64_t n_pairs, int64_t tab0)
{
    const int brows = ap.host_blocks ? ap.block_rows : 0;   // the table itself is in pos
    extern __shared__ float sm[];
    float *qv = sm;                          // [head_dim]
    float *acc = qv + ap.head_dim;           // [head_dim_v]
    float *sc = acc + ap.head_dim_v;         // [ATT_CHUNK]
    __shared__ float red[32];
    const int64_t pair = blockIdx.x;
    const int64_t t = pair / ap.n_head;
    const int h = (int)(pair % ap.n_head);
    const int split = blockIdx.y;
    const int kvh = h / (ap.n_head / ap.n_head_kv);
    const float *qr = q + pair * ap.head_dim;
    for (int d = threadIdx.x; d < ap.head_dim; d += blockDim.x)
        qv[d] = ap.kv_type == MOE_DTYPE_F16 ? __half2float(__float2half_rn(qr[d])) : qr[d];
    for (int d = threadIdx.x; d < ap.head_dim_v; d += blockDim.x)
        acc[d] = 0.0f;
    __syncthreads();
    const int p = pos[t];
    const int first = ap.window > 0 && p - ap.window + 1 > 0 ? p - ap.window + 1 : 0;
    const int len = p - first + 1, per = (len + n_split - 1) / n_split;
    const int r0 = first + split * per, r1 = min(r0 + per, p + 1);
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    float m = -INFINITY, l = 0.0f;
    for (int c0 = r0; c0 < r1; c0 += ATT_CHUNK) {
        const int nc = min(ATT_CHUNK, r1 - c0);
        for (int j = wid; j < nc; j += nw) {
            const int64_t off = cache_row(pos, tab0, brows, c0 + j) * ap.k_row +
                                (int64_t)kvh * ap.head_dim;
            float s = 0.0f;
            for (int d = lane; d < ap.head_dim; d += 32)
                s += qv[d] * cache_at(ap.k_cache, off + d, ap.kv_type == MOE_DTYPE_F16);
            for (int o = 16; o > 0; o >>= 1)
                s += __shfl_xor_sync(0xffffffffu, s, o);
            if (lane == 0)
                sc[j] = s * ap.scale;
        }
        __syncthreads();
        float cm = -INFINITY;
        for (int j = threadIdx.x; j < nc; j += blockDim.x)
            cm = fmaxf(cm, sc[j]);
        cm = block_max(cm, red);
        const float nm = fmaxf(m, cm);
        const float fac = m == -INFINITY ? 0.0f : expf(m - nm);
        __syncthreads();   // every thread has read sc for the max
        float cs = 0.0f;
        for (int j = threadIdx.x; j < nc; j += blockDim.x) {
            sc[j] = expf(sc[j] - nm);
            cs += sc[j];
        }
        cs = block_sum(cs, red);   // its barriers also publish sc[]
        l = l * fac + cs;
        for (int d = threadIdx.x; d < ap.head_dim_v; d += blockDim.x) {
            float a = acc[d] * fac;
            for (int j = 0; j < nc; j++) {
                const int64_t off = cache_row(pos, tab0, brows, c0 + j) * ap.v_row +
                                    (int64_t)kvh * ap.head_dim_v + d;
                a += sc[j] * cache_at(ap.v_cache, off, ap.kv_type == MOE_DTYPE_F16);
            }
            acc[d] = a;
        }
        m = nm;
        __syncthreads();   // sc is rewritten by the next chunk
    }
    if (n_split > 1) {
        const int64_t slot = pair * n_split + split;
        if (threadIdx.x == 0) {
            part[2 * slot] = m;
            part[2 * slot + 1] = l;
        }
        float *po = part + 2 * n_pairs * n_split + slot * ap.head_dim_v;
        for (int d = threadIdx.x; d < ap.head_dim_v; d += blockDim.x)
            po[d] = acc[d];
        return;
    }
    float fac = 1.0f;
    if (ap.sinks) {
        const float s = ap.sinks[h];
        const float nm = fmaxf(m, s);
        fac = m == -INFINITY ? 0.0f : expf(m - nm);
        l = l * fac + expf(s - nm);
    }
    float *o = out + pair * ap.head_dim_v;
    const float inv = fac / l;
    for (int d = threadIdx.x; d < ap.head_dim_v; d += blockDim.x)
        o[d] = acc[d] * inv;
}

// One block per pair: merges the n_split partial results and the sink.
__global__ void __launch_bounds__(ATT_THREADS)
attention_merge_kernel(float *out, const float *part, struct moe_attn_params ap, int n_split,
                       int64_t n_pairs)
{
    const int64_t pair = blockIdx.x;
    const int h = (int)(pair % ap.n_head);
    const float *ml = part + 2 * pair * n_split;
    const float *po = part + 2 * n_pairs * n_split + pair * n_split * ap.head_dim_v;
    float mx = ap.sinks ? ap.sinks[h] : -INFINITY;
    for (int s = 0; s < n_split; s++)
        mx = fmaxf(mx, ml[2 * s]);
    float l = ap.sinks ? expf(ap.sinks[h] - mx) : 0.0f;
    for (int s = 0; s < n_split; s++)
        if (ml[2 * s] != -INFINITY)
            l += ml[2 * s + 1] * expf(ml[2 * s] - mx);
    const float inv = 1.0f / l;
    float *o = out + pair * ap.head_dim_v;
    for (int d = threadIdx.x; d < ap.head_dim_v; d += blockDim.x) {
        float a = 0.0f;
        for (int s = 0; s < n_split; s++)
            if (ml[2 * s] != -INFINITY)
                a += po[(int64_t)s * ap.head_dim_v + d] * expf(ml[2 * s] - mx);
        o[d] = a * inv;
    }
}

} // namespace

int attention(cuda_ctx *c, float *out, const float *q, int64_t n_tok, const int32_t *host_pos,
              const struct moe_attn_params *ap)
{
    if (ap->n_head <= 0 || ap->n_head_kv <= 0 || ap->n_head % ap->n_head_kv != 0 ||
        ap->head_dim <= 0 || ap->head_dim_v <= 0)
        return -EINVAL;
    if (ap->kv_type != MOE_DTYPE_F32 && ap->kv_type != MOE_DTYPE_F16)
        return MOE_EUNSUPPORTED;   // q8_0: not yet (doc/cuda.md)
    if (n_tok <= 0)
        return 0;
    if (ap->host_blocks && ap->block_rows <= 0)
        return -EINVAL;
    int max_len = 0, max_pos = 0;
    for (int64_t t = 0; t < n_tok; t++) {
        const int p = host_pos[t];
        if (p < 0)
            return -EINVAL;
        max_pos = p > max_pos ? p : max_pos;
        const int first = ap->window > 0 && p - ap->window + 1 > 0 ? p - ap->window + 1 : 0;
        if (p - first + 1 > max_len)
            max_len = p - first + 1;
    }
    // positions, then the block table up to the last position's block
    ints_arg pos;
    const int64_t n_tab = ap->host_blocks ? max_pos / ap->block_rows + 1 : 0;
    int rc = make_ints2(c, host_pos, n_tok, ap->host_blocks, n_tab, &pos);
    if (rc)
        return rc;
    const int64_t pairs = n_tok * ap->n_head;
    // split the rows when the pairs alone would not fill the device twice
    int n_split = 1;
    const int64_t want = 2 * (int64_t)c->n_sm;
    if (pairs < want && max_len > 2 * ATT_CHUNK) {
        int64_t s = (want + pairs - 1) / pairs;
        const int64_t by_len = (max_len + ATT_CHUNK - 1) / ATT_CHUNK;
        s = s < by_len ? s : by_len;
        s = s < ATT_MAX_SPLIT ? s : ATT_MAX_SPLIT;
        while (s > 1 && (size_t)(pairs * s) * (size_t)(ap->head_dim_v + 2) * sizeof(float) > c->part_bytes)
            s--;
        n_split = (int)s;
    }
    const size_t sm = (size_t)(ap->head_dim + ap->head_dim_v + ATT_CHUNK) * sizeof(float);
    if (sm > 48 * 1024)
        return MOE_EUNSUPPORTED;   // head dims beyond 12k floats
    const dim3 grid((unsigned)pairs, (unsigned)n_split);
    attention_kernel<<<grid, ATT_THREADS, sm, c->stream>>>(out, c->part, q, pos, *ap, n_split, pairs,
                                                                  n_tok);
    if ((rc = check(c, cudaGetLastError(), "attention")) != 0)
        return rc;
    if (n_split > 1) {
        attention_merge_kernel<<<(unsigned)pairs, ATT_THREADS, 0, c->stream>>>(out, c->part, *ap, n_split,
                                                                               pairs);
        rc = check(c, cudaGetLastError(), "attention merge");
    }
    return rc;
}

} // namespace moecu
