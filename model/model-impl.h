/* Private to model/: the loaded model's pieces and the functions the
 * files of model/ call across each other.
 *
 *   config.c   the forward pass's configuration from GGUF metadata
 *   load.c     binding tensors, uploading weights, scratch, load/free, sequences
 *   forward.c  the forward pass: attention, dense FFN, the MoE block, logits
 *   experts.c  the experts: resident or through the cache, with the predictors
 *
 * Threading: one engine thread drives a model at a time.
 */
#ifndef MOE_MODEL_MODEL_IMPL_H
#define MOE_MODEL_MODEL_IMPL_H

#include <stdbool.h>
#include <stdint.h>

#include "cache/governor.h"
#include "cache/history.h"
#include "cache/lane.h"
#include "cache/stats.h"
#include "model/model.h"
#include "model/plan.h"

struct moe_gguf;
struct moe_expert_src;
struct moe_expert_cache;
struct moe_host_tier;

struct expert_tensor {
    const uint8_t *data;       /* start of the 3-D tensor (resident experts) */
    uint32_t dtype;
    int64_t n_in, n_out;
    size_t row_bytes, expert_bytes;
    size_t expert_stride;      /* resident: bytes from one expert's matrix to the next (=
                                * expert_bytes, or twice it in a merged ffn_gate_up_exps) */
    uint64_t slot_offset;      /* where the slice sits in a cached expert's blob */
    const uint8_t *host;       /* GGUF direct: the 3-D tensor in the mapped file (host
                                * memory, expert_stride apart), for the CPU lane; else NULL */
};

/* gpt-oss expert biases inside a cached expert's blob (offset, or -1) */
struct bias_slices {
    int64_t gate, up, down;
};

struct layer {
    struct moe_weight wq, wk, wv, wo;
    float *bq, *bk, *bv, *bo;            /* owned f32, or NULL */
    float *attn_norm, *ffn_norm;         /* owned f32 */
    float *q_norm, *k_norm;              /* owned f32, or NULL */
    float *sinks;                        /* [n_head] (gpt-oss) */
    int window;                          /* sliding window of this layer, 0 = full */
    int hd, n_kv;                        /* this layer's head dim and KV heads */
    struct moe_rope_params rope;         /* this layer's RoPE (gemma4: per layer kind) */
    bool v_is_k;                         /* no attn_v: V is K's projection (gemma4) */
    /* gemma4: sandwich norms, the MoE branch's norms and scales (owned f32 or NULL) */
    float *attn_post_norm, *ffn_post_norm, *ffn_post_norm_1, *ffn_pre_norm_2, *ffn_post_norm_2;
    float *router_scale;                 /* [n_embd] ffn_gate_inp.scale */
    float *down_scale;                   /* [n_expert] ffn_down_exps.scale (host) */
    float *out_scale;                    /* [1] layer_output_scale (host) */
    /* MLA (deepseek2) */
    struct moe_weight wq_a, wq_b, wkv_a;
    float *q_a_norm, *kv_a_norm;
    struct moe_weight wk_b[256], wv_b[256]; /* per head */
    /* FFN: dense (leading deepseek2 layers) or MoE */
    bool moe;
    struct moe_weight ffn_gate, ffn_up, ffn_down;
    struct moe_weight router;
    float *router_bias;                  /* [n_expert] added to logits (gpt-oss) */
    float *sel_bias;                     /* [n_expert] selection bias (deepseek2) */
    struct expert_tensor gate, up, down;
    float *gate_b, *up_b, *down_b;       /* [n_expert][n] expert biases (gpt-oss) */
    struct bias_slices bias_off;         /* the same, cached experts */
    /* shared expert */
    struct moe_weight sh_gate, sh_up, sh_down;
    float *sh_gate_inp;                  /* [n_embd], or NULL (qwen2moe) */
    /* gated delta-net layer (qwen35moe): no attention weights above but these */
    bool recurrent;
    int kv_slot;                         /* the layer's K/V rows in the pool (attention layers) */
    struct moe_weight ssm_qkv, ssm_z, ssm_beta, ssm_alpha, ssm_out;
    float *ssm_conv;                     /* [conv_dim][d_conv] */
    float *ssm_dt, *ssm_a;               /* [n_v]: decay bias and rate (negative) */
    float *ssm_norm;                     /* [d_state] */
};

/* A weight the model binds: a matrix's data, a stack's slice, a resident
 * expert tensor or a model-owned f32 vector. On a backend whose memory is
 * not host memory each one is uploaded at load; `host` keeps the original
 * pointer so that freeing restores it. */
struct bound {
    void **field;
    size_t bytes;
    void *host;          /* non-NULL once uploaded */
};

/* One sequence's tokens inside a batch: rows off..off+n-1 of the scratch. */
struct seg {
    struct moe_seq *s;
    int64_t off, n;
    int status;          /* 0, or the error that failed this sequence alone */
    char err[256];       /* its message (names the file, layer and expert) */
    /* rows whose last layer's output is read (logits): SEG_OUT_ALL (0,
     * the default), SEG_OUT_LAST (its last row) or SEG_OUT_NONE */
    int out;
    int64_t off_all, n_all;   /* off, n while the last layer's FFN runs on fewer rows */
};
enum { SEG_OUT_ALL, SEG_OUT_LAST, SEG_OUT_NONE };

/* Weights bound from the file, or their copies in backend memory. */
struct model_weights {
    struct moe_weight tok_embd, output;
    float *output_norm;
    float *rope_freqs;                   /* gemma4 global layers' RoPE divisors (host), or NULL */
    struct layer *layers;                /* [n_layer] */
    struct bound *bound;                 /* everything bound, for the upload */
    size_t n_bound, cap_bound;
    bool upload;                         /* weights live in backend memory */
};

/* Activations (backend memory, like every float buffer here unless marked
 * host) and host bookkeeping, sized for n_batch tokens. */
struct model_acts {
    float *x, *xn, *q, *k, *v, *att, *tmp;
    float *qa, *hq, *hout;               /* MLA: q_a, one head's gather/scatter rows */
    float *rlogits;
    int32_t *ids;                        /* host [n_batch][k]: routing */
    float *weights;                      /* host [n_batch][k] */
    float *xe, *ge, *ue, *de, *slot_out, *sh_tmp;
    int32_t *pos;                        /* host [n_batch] */
    int32_t *kvrow;                      /* host [n_batch]: each token's row in the KV pool */
    struct seg *segs;                    /* host [n_batch]: the sequences of this batch */
    int n_segs;
    int fwd_rc;                          /* the last forward_multi's error for every sequence */
    struct moe_diag fwd_diag;            /* (0: none, or each failed alone: segs[].status) */
    int32_t *tok_by_expert;              /* host [n_batch * k]: (token*k + slot) grouped by expert */
    int32_t *row_idx;                    /* host [n_batch * k]: token rows of one expert's batch */
    float *logits_dev;                   /* [logit_rows][n_vocab] */
    int logit_rows;
    int32_t *expert_count, *expert_start;   /* host [n_expert] */
};

/* The experts when they go through a cache: the source, the cache and its
 * host tier, the per-layer acquisition bookkeeping and the predictors. */
struct model_experts {
    struct moe_expert_src *src;          /* NULL: experts resident in the mapped file */
    struct moe_expert_cache *cache;
    struct moe_host_tier *host;
    int32_t *pend_l, *pend_e, *pend_state;   /* host [n_expert] */
    int prefetch_depth;                  /* 0 = off */
    bool prefetch_history;               /* history predictor instead of speculative gating */
    struct moe_history hist;
    struct moe_prefetch_gov gov;
    float *pf_logits;                    /* [n_expert] (prefetch gate) */
    float *pf_x;                         /* [n_embd] */
    /* The CPU lane (a device backend only; lane_be NULL otherwise): missed
     * experts computed by a CPU backend from host memory on the layer's
     * normed hidden states (copied to host), their outputs uploaded into
     * slot_out (experts.c). Host buffers sized for n_batch rows. */
    bool lanes;                          /* a device backend: misses are assigned to lanes */
    int miss_lane;                       /* enum moe_miss_lane (configured) */
    struct moe_lane_state lane;          /* the rule, its measured rates and governor */
    struct moe_lane_reuse reuse;         /* expected reuse of a miss, for the rule */
    bool reuse_seeded;                   /* from the warm start's counts, at the first step */
    struct moe_lane_miss *lane_miss;     /* host [n_expert]: one layer step's misses */
    uint8_t *lane_choice;                /* host [n_expert] */
    int32_t *lane_j;                     /* host [n_expert]: their index in pend_* */
    struct moe_copy_stats link0;         /* the backend's copy stats at the last step */
    struct moe_backend *lane_be;
    float *lane_x;                       /* host [n_batch][n_embd]: the layer's xn */
    bool lane_pinned;                    /* lane_x and lane_de from the backend's host_alloc */
    float *lane_xe, *lane_de;            /* host [n_batch][n_embd]: gathered rows, outputs */
    float *lane_ge, *lane_ue;            /* host [n_batch][ff] */
    int32_t *lane_dst;                   /* host [n_batch]: (token, slot) row of each output */
    uint8_t *lane_blob;                  /* host, slot_bytes: an expert read for the lane */
    struct moe_cache_stats lane_st;      /* the lane_* counters (cache/stats.h) */
    /* warm restarts */
    uint32_t *uses;                      /* host [n_layer][n_expert]: tokens routed, saturating */
    char *warm_path;                     /* "<model>.warm", or NULL when warm_start is off */
    int warm_loads;                      /* loads issued from the file at load time */
};

/* The paged KV pool (model/kv.h keeps its bookkeeping): per layer, K rows
 * [kv_blocks * kv_block][k_row] and V rows [..][v_row] of kv_type, in
 * backend memory. */
struct model_kv {
    struct moe_kv_pool *pool;
    uint8_t *k, *v;                      /* v NULL when V lives in the K rows (MLA) */
    size_t k_layer, v_layer;             /* bytes per layer */
    int block;                           /* rows per block */
    bool prefix_cache;
};

/* The gated delta-net layers' scratch (host memory: these layers run on
 * the CPU backend only) and the recurrent state's layout in a sequence. */
struct model_deltanet {
    int conv_dim, d_inner, key_dim;      /* 2 key_dim + d_inner; n_v x d_state; n_k x d_state */
    size_t conv_floats, ssm_floats;      /* per recurrent layer and sequence */
    int *rs_index;                       /* [n_layer]: the layer's state slot, or -1 */
    /* scratch (backend memory): [n_batch] rows of conv_dim, conv_dim, d_inner,
     * n_v, n_v, d_inner floats */
    float *qkv, *conv, *z, *beta, *gdecay, *core;
    float *qg, *gate;                    /* gated attention: q and gate [n][H][2 hd], gate [n][H hd] */
};

struct moe_model {
    struct moe_model_cfg cfg;
    struct moe_model_plan plan;          /* what everything below was sized from */
    struct moe_gguf *gguf;               /* owned unless ex.src is set (then the source's) */
    struct moe_backend *be;
    int n_ctx, n_batch;
    int kv_type;                         /* enum moe_kv_type */
    uint32_t kv_dtype;                   /* its dtype, what the backend takes */
    int32_t step;                        /* token steps run, for the cache policy */
    struct model_weights w;
    struct model_acts a;
    struct model_experts ex;
    struct model_kv kv;
    struct model_deltanet dn;
};

/* A sequence: its position, its block table into the pool and the tokens
 * its rows hold (the prefix index's keys). */
struct moe_seq {
    struct moe_model *m;
    int pos;
    int32_t *blocks;                     /* [max_blocks]: block ids, n_blocks of them held */
    int n_blocks, max_blocks;
    int reserved;                        /* blocks reserved in the pool, not yet taken */
    int32_t *toks;                       /* [n_ctx]: the token at each position */
    uint64_t *hashes;                    /* [max_blocks]: chain hash of each full block */
    int n_hashed;                        /* full blocks hashed (and offered to the index) */
    /* delta-net models: conv and SSM state of each recurrent layer (backend
     * memory: the device's on CUDA), zeroed when a step starts at position 0;
     * rs_lost after a failed step, which may have advanced part of it (the
     * sequence must then be reset) */
    float *rs;
    bool rs_lost;
};

/* load.c: rows for positions up to `end` (blocks from the reservation,
 * then from the pool); MOE_ELIMIT naming the numbers when the pool is out
 * of blocks. */
int moe_seq_grow(struct moe_seq *s, int end, struct moe_diag *diag);
/* After a forward step: the full blocks not yet hashed are hashed and, with
 * prefix_cache, indexed for later sequences. */
void moe_seq_publish(struct moe_seq *s);
/* The pool row of position p. */
static inline int32_t moe_seq_row(const struct moe_seq *s, int p)
{
    return s->blocks[p / s->m->kv.block] * s->m->kv.block + p % s->m->kv.block;
}

#define TRY(call) do { int rc_ = (call); if (rc_) return rc_; } while (0)

/* Several matmuls: in one backend op where the backend has matmul_multi
 * (the CPU backend: one thread-pool hand-off), else one matmul each. */
static inline int moe_model_matmuls(struct moe_model *m, const struct moe_matmul_job *jobs, int n)
{
    const struct moe_backend_ops *ops = m->be->ops;
    if (ops->matmul_multi != NULL)
        return ops->matmul_multi(m->be, jobs, n);
    for (int i = 0; i < n; i++)
        TRY(ops->matmul(m->be, jobs[i].y, &jobs[i].w, jobs[i].bias, jobs[i].x, jobs[i].n_tok));
    return 0;
}

/* One buffer of the activations: backend memory, or host (bookkeeping). */
struct model_act_item {
    void **field;
    size_t bytes;
    bool host;
};
#define MODEL_ACT_ITEMS 32

/* plan.c: the sizes the plan and the loader share */
/* Lays out a's buffers for n_batch tokens (items[] point into a; returns
 * their count) and the backend scratch to reserve. */
int moe_model_acts_layout(const struct moe_model_cfg *c, int n_batch, int n_ctx, struct model_acts *a,
                          struct model_act_item *items, size_t *shared, size_t *per_worker);
/* The plan's option-driven terms (context, batch, KV, workspace, host
 * tier); p->expert_cache must be set. */
int moe_model_plan_opts(const struct moe_model_cfg *c, const struct moe_model_opts *o,
                        struct moe_model_plan *p, struct moe_diag *diag);
/* The expert cache's slots from the largest expert and the MoE layers. */
int moe_model_plan_cache(const struct moe_model_opts *o, size_t slot_bytes, int n_moe_layers,
                         struct moe_model_plan *p, struct moe_diag *diag);
/* The largest expert (what a slot holds) and the layers with experts, from
 * an expert source's layouts or a GGUF's expert tensors. */
int moe_model_slot_of_src(const struct moe_expert_src *src, size_t *slot, int *n_moe, bool *lazy_stages);
int moe_model_slot_of_gguf(const struct moe_gguf *g, size_t *slot, int *n_moe, bool *all_direct,
                           struct moe_diag *diag);

/* deltanet.c */
/* Scratch (backend memory) and layout for the delta-net layers (nothing
 * without them); MOE_EUNSUPPORTED on a backend without the ssm_conv and
 * gated_delta_net ops. */
int moe_deltanet_init(struct moe_model *m, struct moe_diag *diag);
void moe_deltanet_free(struct moe_model *m);
/* Floats of a sequence's recurrent state (0 without delta-net layers). */
size_t moe_deltanet_state_floats(const struct moe_model *m);
/* Layer il's delta-net mixer over the batch's segments: reads m->a.xn,
 * adds its output to m->a.x, advances each sequence's state. */
int moe_deltanet_layer(struct moe_model *m, int il, int64_t n);
/* Gated attention: splits the [n][H][2 hd] projection in dn.qg into m->a.q
 * and dn.gate; after attention, m->a.att *= sigmoid(dn.gate). */
int moe_attn_gate_split(struct moe_model *m, int64_t n);
int moe_attn_gate_apply(struct moe_model *m, int64_t n);

/* config.c */
int moe_model_read_cfg(const struct moe_gguf *g, struct moe_model_cfg *c, struct moe_diag *diag);

/* experts.c */
/* The expert cache, its host tier and the predictors, when m->ex.src is set. */
int moe_model_experts_create(struct moe_model *m, const struct moe_model_opts *o,
                             struct moe_diag *diag);   /* sized by m->plan */
void moe_model_experts_free(struct moe_model *m);
/* warm.c: reads the statistics file and starts the warm loads (after the
 * cache exists); a missing, stale or corrupt file leaves the run cold
 * (logged). */
void moe_model_warm_load(struct moe_model *m, const char *path);
/* Layer il's experts over the n tokens routed in m->a.ids/weights: each
 * expert's output per (token, slot) into m->a.slot_out. */
int moe_model_experts_run(struct moe_model *m, int il, int64_t n, struct moe_diag *diag);
/* After a forward pass of n tokens that took `seconds`: the hybrid lanes'
 * measurements and governor (no-op without lanes). */
void moe_model_experts_step(struct moe_model *m, int64_t n, double seconds);
/* After layer il: prefetch the predicted experts of the next layers. */
void moe_model_experts_prefetch(struct moe_model *m, int il, int64_t n);

#endif
