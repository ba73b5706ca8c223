/* The compute backend interface: one table of operations with a CPU and a
 * CUDA implementation. The engine, the cache and the tests see only this.
 *
 * Memory: pointers passed to ops are backend memory (host memory for the
 * CPU backend, device memory for CUDA) unless a parameter says "host".
 * Activations are float32, row-major: a [n][m] array has n rows of m floats.
 * Weights are in their GGUF block type, one row of n_in elements per output
 * (struct moe_weight).
 *
 * Ops never allocate: scratch comes from the workspace reserved with
 * moe_backend_reserve() at model load. Ops return 0 or a negative code; the
 * CPU backend's ops cannot fail once arguments are valid.
 * Threading: one engine thread drives a backend; the backend may use its own
 * worker threads inside an op. The exceptions, callable from any thread:
 * host_alloc/host_free, upload_async, event_query, event_sync, copy_stats.
 *
 * Streams and events (the overlapped expert upload, shared/DESIGN.md): a
 * backend has a compute stream, on which every op runs in the order it was
 * called, and a copy stream for upload_async. An event marks a point of a
 * stream: it completes when everything queued on that stream before it was
 * recorded has finished. The CPU backend runs everything at once, so its
 * events are always complete and the same code runs the same way there.
 */
#ifndef MOE_KERNELS_BACKEND_H
#define MOE_KERNELS_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

#ifdef __cplusplus
extern "C" {
#endif

struct moe_backend;

/* A weight matrix: n_out rows of n_in elements of type dtype. */
struct moe_weight {
    const void *data;
    uint32_t dtype;      /* enum moe_dtype */
    int64_t n_in;        /* elements per row (ne[0]) */
    int64_t n_out;       /* rows (ne[1]) */
    size_t row_bytes;
};

enum moe_rope_mode {
    MOE_ROPE_NORM = 0,   /* rotate adjacent pairs (x[2i], x[2i+1]): llama */
    MOE_ROPE_NEOX = 2,   /* rotate (x[i], x[i + n_rot/2]): qwen, gpt-oss */
};

struct moe_rope_params {
    enum moe_rope_mode mode;
    int n_rot;           /* rotated dims per head (<= head_dim) */
    float freq_base;
    float freq_scale;    /* 1 / scaling factor; 1 = none */
    /* YaRN (ggml's formulation): with ext_factor != 0, each pair's angle
     * blends interpolated and original frequencies by a ramp over the
     * correction dims, and cos/sin are scaled by
     * attn_factor * (1 + 0.1 ln(1 / freq_scale)); otherwise by attn_factor. */
    float ext_factor;    /* 0 = no YaRN */
    float attn_factor;   /* 1 = none */
    float corr_dims[2];
    /* Per-pair frequency divisors [n_rot/2] (host memory), or NULL: pair i's
     * angle is theta_i / freq_factors[i] (llama.cpp's rope_freqs; Gemma 4's
     * global layers leave pairs unrotated with a factor of 1e30). */
    const float *freq_factors;
};

enum moe_gating {
    MOE_GATING_SOFTMAX = 1,        /* softmax over all experts, then top-k */
    MOE_GATING_SIGMOID = 2,        /* sigmoid per expert, then top-k (deepseek) */
    MOE_GATING_SOFTMAX_TOPK = 3,   /* top-k of logits, softmax over the k (gpt-oss) */
};

struct moe_gating_params {
    enum moe_gating func;
    int n_expert;
    int k;
    int norm;             /* divide the k weights by their sum */
    float scale;          /* multiply weights by this (1 = none) */
    const float *bias;    /* selection bias [n_expert] or NULL (deepseek exp_probs_b) */
    int n_group;          /* > 1: experts in n_group groups; only the n_group_used groups */
    int n_group_used;     /*      with the best top-2 sums are eligible (deepseek) */
};

/* qwen35moe's gated delta rule (gated_delta_net), llama.cpp's qwen35moe
 * graph: n_k key heads and n_v value heads of d_state dims; value head h
 * reads key head h % n_k (ggml's broadcast). */
struct moe_gdn_params {
    int n_k, n_v, d_state;
    float eps;            /* rms_eps: q and k are L2-normalised with eps / d_state,
                           * the output RMS-normed with eps */
    const float *dt_bias; /* [n_v] ssm_dt.bias */
    const float *a;       /* [n_v] ssm_a (the log decay's negative rate) */
    const float *norm;    /* [d_state] ssm_norm */
};

/* One attention call over a single sequence's KV cache. q is
 * [n_tok][n_head][head_dim], out is [n_tok][n_head][head_dim_v]. Cache row
 * c holds kv head h's key at k_cache + c*k_row + h*head_dim, its value at
 * v_cache + c*v_row + h*head_dim_v (MLA points V into the K rows). Position
 * r is in row c = r, or, with a block table (the paged KV pool), in row
 * c = host_blocks[r / block_rows] * block_rows + r % block_rows. */
struct moe_attn_params {
    int n_head, n_head_kv, head_dim, head_dim_v;
    int64_t k_row, v_row; /* elements per cache row */
    float scale;          /* applied to q.k */
    uint32_t kv_type;     /* the caches' dtype: MOE_DTYPE_F32, F16 or Q8_0 (rows of
                           * block_q8_0 along the head dims; k_row, v_row, head dims
                           * and V's offset multiples of 32) */
    const void *k_cache;
    const void *v_cache;
    const int32_t *host_blocks;  /* the sequence's block table (host), or NULL */
    int block_rows;       /* rows per block (with host_blocks) */
    int window;           /* sliding window (0 = none): attend to pos-window+1..pos */
    const float *sinks;   /* per-head sink logits [n_head] or NULL */
};

/* An event of a backend's streams, owned by whoever embeds it: event_init
 * fills it (CUDA: a cudaEvent_t in h; CPU: nothing), event_fini releases
 * it. An event never recorded is complete. */
struct moe_event {
    void *h;
};

/* What upload_async has moved (copy_stats). busy_s is the copy stream's
 * time for the `timed` uploads (CUDA events around each copy; an upload
 * is left untimed when the backend's timing ring is full), so the
 * measured rate is timed_bytes / busy_s. The CPU backend counts calls and
 * bytes and times nothing. */
struct moe_copy_stats {
    uint64_t uploads, bytes;
    uint64_t timed, timed_bytes;
    double busy_s;
};

/* One matmul of matmul_multi: y[t][o] = sum_i w[o][i] * x[t][i] (+ bias[o])
 * for t < n_tok, as the matmul op. */
struct moe_matmul_job {
    float *y;
    struct moe_weight w;
    const float *bias;
    const float *x;
    int64_t n_tok;
};

struct moe_backend_ops {
    const char *name;
    void (*destroy)(struct moe_backend *be);

    /* memory */
    void *(*alloc)(struct moe_backend *be, size_t bytes);   /* NULL on failure */
    void (*free)(struct moe_backend *be, void *p);
    int (*upload)(struct moe_backend *be, void *dst, const void *host_src, size_t n);
    int (*download)(struct moe_backend *be, void *host_dst, const void *src, size_t n);
    /* Scratch for ops: `shared` bytes for one op's temporaries plus
     * `per_worker` bytes for each worker thread (attention scores of one
     * row: n_ctx floats). Called at load, never during a step. */
    int (*reserve)(struct moe_backend *be, size_t shared, size_t per_worker);
    int (*supports)(const struct moe_backend *be, uint32_t wtype);

    /* y[i][:] = row ids[i] of w, as float. */
    int (*get_rows)(struct moe_backend *be, float *y, const struct moe_weight *w,
                    const int32_t *host_ids, int n);
    /* y[r] = x[r] / rms(x[r]) * (w ? w : 1), rows of n. y may equal x. */
    int (*rmsnorm)(struct moe_backend *be, float *y, const float *x, const float *w,
                   int64_t n_rows, int64_t n, float eps);
    /* y[t][o] = sum_i w[o][i] * x[t][i] (+ bias[o]); y is [n_tok][n_out]. */
    int (*matmul)(struct moe_backend *be, float *y, const struct moe_weight *w,
                  const float *bias, const float *x, int64_t n_tok);
    /* Rotates dims [offset, offset + n_rot) of each head of
     * x[n_tok][n_head][head_stride] by position host_pos[t]. */
    int (*rope)(struct moe_backend *be, float *x, int64_t n_tok, int n_head, int head_stride,
                int offset, const int32_t *host_pos, const struct moe_rope_params *rp);
    /* Causal attention of q (token t at position host_pos[t]) over cache
     * rows 0..pos (or the sliding window); see struct moe_attn_params. */
    int (*attention)(struct moe_backend *be, float *out, const float *q, int64_t n_tok,
                     const int32_t *host_pos, const struct moe_attn_params *ap);
    /* Writes rows x[n_tok][n] into cache rows host_pos[t] (cache rows, not
     * positions: the caller maps positions through its block table; row stride
     * `row` elements, starting at element `offset` of the row), converted
     * to kv_type (struct moe_attn_params). */
    int (*kv_store)(struct moe_backend *be, void *cache, const float *x, int64_t n_tok,
                    const int32_t *host_pos, int n, int64_t row, int offset, uint32_t kv_type);
    /* 1 when attention and kv_store take caches of this dtype. */
    int (*kv_supports)(const struct moe_backend *be, uint32_t kv_type);
    /* Router: from logits[n_tok][n_expert], host ids[n_tok][k] (by
     * descending selection value) and host weights[n_tok][k]. */
    int (*router_topk)(struct moe_backend *be, const float *logits, int64_t n_tok,
                       const struct moe_gating_params *gp, int32_t *host_ids,
                       float *host_weights);
    /* y = silu(gate) * up, elementwise over n. */
    int (*swiglu)(struct moe_backend *be, float *y, const float *gate, const float *up,
                  int64_t n);
    /* gpt-oss: x = min(gate, limit), u = clamp(up, -limit, limit),
     * y = x * sigmoid(alpha * x) * (u + 1). */
    int (*swiglu_oai)(struct moe_backend *be, float *y, const float *gate, const float *up,
                      int64_t n, float alpha, float limit);
    /* y += a * x over n (a is a scalar). */
    int (*axpy)(struct moe_backend *be, float *y, float a, const float *x, int64_t n);
    /* y = a + b over n. y may equal a or b. */
    int (*add)(struct moe_backend *be, float *y, const float *a, const float *b, int64_t n);

    /* Moves rows of `len` floats: for i < n, row di of dst (dst + di *
     * dst_stride) = row si of src, with di = host_dst_idx ? host_dst_idx[i]
     * : i and si likewise. Gathers, scatters and strided copies between
     * activation buffers; rows must not overlap. */
    int (*copy_rows)(struct moe_backend *be, float *dst, int64_t dst_stride,
                     const int32_t *host_dst_idx, const float *src, int64_t src_stride,
                     const int32_t *host_src_idx, int64_t n, int64_t len);
    /* y = v over n. */
    int (*fill)(struct moe_backend *be, float *y, float v, int64_t n);
    /* y[r][i] *= sigmoid(g[r]) for rows of n (a gate per row). */
    int (*gate_rows)(struct moe_backend *be, float *y, const float *g, int64_t n_rows, int64_t n);

    /* ---- overlapped uploads (the expert cache's data path) ---- */

    /* Host memory the device reads by DMA (CUDA: page-locked, cudaHostAlloc),
     * 4096-aligned (the expert store reads into it with O_DIRECT). NULL when
     * refused; the caller may fall back to ordinary memory. */
    void *(*host_alloc)(struct moe_backend *be, size_t bytes);
    void (*host_free)(struct moe_backend *be, void *p);
    /* 0 or MOE_EGPU; event_fini accepts an event whose init failed. */
    int (*event_init)(struct moe_backend *be, struct moe_event *ev);
    void (*event_fini)(struct moe_backend *be, struct moe_event *ev);
    /* Queues on the copy stream: a wait for `after` (NULL: none; an event of
     * the compute stream, e.g. the last kernels that read dst), the copy of
     * n bytes of host memory into backend memory dst, then records `done`.
     * Returns without waiting for the copy: host_src must stay unchanged
     * until `done` completes. Any thread. CPU: memcpy, done at once. */
    int (*upload_async)(struct moe_backend *be, void *dst, const void *host_src, size_t n,
                        struct moe_event *after, struct moe_event *done);
    /* Records ev on the compute stream, after every op called so far. */
    int (*event_record)(struct moe_backend *be, struct moe_event *ev);
    /* 1 when ev has completed (or was never recorded), 0 when not yet, or a
     * negative code. Never waits. Any thread. */
    int (*event_query)(struct moe_backend *be, struct moe_event *ev);
    /* The host waits until ev completes. Any thread. */
    int (*event_sync)(struct moe_backend *be, struct moe_event *ev);
    /* Ops called after this on the compute stream start after ev completes;
     * the host does not wait. */
    int (*stream_wait)(struct moe_backend *be, struct moe_event *ev);
    /* Totals since the backend was created (struct moe_copy_stats); the
     * time counts the uploads that have finished. Never waits. */
    void (*copy_stats)(struct moe_backend *be, struct moe_copy_stats *out);

    /* 1: backend memory is host memory (the CPU backend): weights are used
     * in place and loads land directly in cache slots. 0: the model uploads
     * its weights and stages expert loads in host memory. */
    int host_memory;

    /* Optional (NULL: the caller runs matmul once per job): several
     * matmuls in one op (Q, K and V; every expert's gate and up; every
     * expert's down). Jobs may share an input x, which is then converted to
     * the dot products' activation format once; no job's y may overlap
     * another job's x. The CPU backend runs all jobs in one hand-off of its
     * thread pool, split by rows. */
    int (*matmul_multi)(struct moe_backend *be, const struct moe_matmul_job *jobs, int n_jobs);
    /* Optional, last so that positional initializers (the CUDA table) leave
     * them NULL: then the backend cannot run the families that need them
     * (gemma4) and the model refuses those at load.
     * y = gelu(gate) * up over n, with ggml's CPU GELU (tanh form, looked
     * up at gate rounded to fp16, the result rounded to fp16; gate <= -10
     * gives 0, gate >= 10 gives gate * up). */
    int (*geglu)(struct moe_backend *be, float *y, const float *gate, const float *up, int64_t n);
    /* y = x * s over n (s a scalar). y may equal x. */
    int (*scale)(struct moe_backend *be, float *y, const float *x, float s, int64_t n);
    /* y[r][i] = x[r][i] * w[i] for rows of n. y may equal x. */
    int (*mul_rows)(struct moe_backend *be, float *y, const float *x, const float *w,
                    int64_t n_rows, int64_t n);
    /* Optional (NULL: the model refuses qwen35moe's gated delta-net layers
     * at load). Both run over one sequence's n_tok tokens and advance its
     * recurrent state, which is backend memory that the caller owns and
     * zeroes before the sequence's first token.
     *
     * ssm_conv: the short causal conv and silu, per channel c < n_ch:
     * y[t][c] = silu(sum_i win[t + i] * w[c][i]) for i < d_conv, where win
     * is the channel's d_conv - 1 previous inputs (state[c][0..d_conv-2],
     * oldest first) followed by x[0..n_tok)[c]; the state then holds the
     * channel's last d_conv - 1 inputs. x and y are [n_tok][n_ch] and must
     * not overlap; w is [n_ch][d_conv]. */
    int (*ssm_conv)(struct moe_backend *be, float *y, const float *x, float *state,
                    const float *w, int64_t n_tok, int n_ch, int d_conv);
    /* gated_delta_net: qkv [n_tok][2 n_k D + n_v D] (q | k | v, ssm_conv's
     * output; D = d_state) with q and k L2-normalised per head (their
     * parts of qkv may be overwritten), z [n_tok][n_v D], beta and alpha
     * [n_tok][n_v] (projections, before their activations), state
     * [n_v][D][D] (head h, value index j, key index i). Per token and
     * value head h: b = sigmoid(beta), g = softplus(alpha + dt_bias[h]) *
     * a[h], S *= exp(g), d_j = (v_j - sum_i S_ji k_i) b, S_ji += k_i d_j,
     * o_j = (sum_i S_ji q_i) / sqrt(D); out [n_tok][n_v D] = per head
     * rmsnorm(o) * norm * silu(z). */
    int (*gated_delta_net)(struct moe_backend *be, float *out, float *qkv, const float *z,
                           const float *beta, const float *alpha, float *state, int64_t n_tok,
                           const struct moe_gdn_params *p);
};

struct moe_backend {
    const struct moe_backend_ops *ops;
    void *ctx;
};

/* The CPU backend. n_threads >= 1 (the calling thread included). */
int moe_backend_cpu_create(struct moe_backend **out, int n_threads, struct moe_diag *diag);

void moe_backend_destroy(struct moe_backend *be);

#ifdef __cplusplus
}
#endif

#endif
