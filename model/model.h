/* The model: weights bound from a GGUF file, and the forward pass.
 *
 * moe_model_load() opens a GGUF, checks that its architecture is supported
 * and that every tensor the architecture needs is present with the right
 * shape and a computable type (refusing with a message naming the tensor or
 * key otherwise), maps the file and binds the weights. The dense weights
 * are used in place (CPU backend); experts are reached through an expert
 * source, by default slices of the mapped expert tensors.
 *
 * A struct moe_seq holds one sequence's KV cache and position. The forward
 * pass runs a batch of tokens of one sequence at the next positions.
 *
 * Threading: a model is driven by one engine thread at a time; the backend
 * parallelizes inside ops.
 */
#ifndef MOE_MODEL_MODEL_H
#define MOE_MODEL_MODEL_H

#include <stdbool.h>
#include <stdint.h>

#include "cache/stats.h"
#include "common/error.h"
#include "kernels/backend.h"
#include "model/arch.h"
#include "model/kv.h"

#ifdef __cplusplus
extern "C" {
#endif

struct moe_model;
struct moe_seq;
struct moe_gguf;

/* What the forward pass needs, from the GGUF metadata and the
 * architecture's row (model/arch.h), whose flags it reads directly. */
struct moe_model_cfg {
    const struct moe_arch_desc *ad;   /* the architecture's row */
    char arch_name[32];
    int n_vocab, n_embd, n_layer, n_ctx_train;
    int n_head, n_head_kv;
    int head_dim, head_dim_v;     /* per head, as attention sees it (MLA: latent + rope) */
    int n_expert, n_expert_used, n_ff_exp;
    int n_ff;                     /* dense FFN width (deepseek2 leading layers) */
    int n_layer_dense_lead;       /* leading layers with a dense FFN (deepseek2) */
    int n_ff_shexp;               /* shared expert width, 0 if none */
    float rms_eps;
    struct moe_rope_params rope;
    struct moe_gating_params gating; /* bias filled per layer */
    int n_expert_groups, n_group_used; /* group-limited routing (deepseek), 0 = off */
    bool sinks;                   /* attention sinks (gpt-oss) */
    int swa_window;               /* sliding window on alternating layers, 0 = none */
    /* MLA (deepseek2) */
    bool mla;
    int q_lora_rank, kv_lora_rank, qk_nope, qk_rope, v_head_dim;
    float kq_scale;
    int64_t k_row, v_row;         /* KV cache row lengths in elements (v_row 0: V inside K) */
    /* Gated delta-net layers (qwen35moe; model/deltanet.c): the layers marked in
     * recurrent_mask have no attention but a recurrent state per sequence */
    bool deltanet;
    int ssm_d_conv;               /* causal conv taps */
    int ssm_d_state;              /* head dim of keys and values */
    int ssm_n_k, ssm_n_v;         /* key heads, value heads (a multiple of key heads) */
    int n_recurrent;              /* layers with a recurrent state */
    int n_kv_layers;              /* layers with KV rows in the pool: n_layer - n_recurrent */
    uint64_t recurrent_mask[64];  /* bit il: layer il is a delta-net layer */
    /* Gemma 4 (rows with swa_pattern; head_dim and n_head_kv above are then
     * the largest of any layer, what the buffers and KV rows are sized by) */
    float embd_scale;             /* token embeddings x this, 0 = none */
    float logit_softcap;          /* final logits: cap * tanh(logit / cap), 0 = none */
    int head_dim_full, head_dim_swa;  /* global and sliding layers' head dims */
    int n_rot_swa;                /* sliding layers' rotary dims */
    float rope_base_swa;          /* sliding layers' RoPE base */
    uint8_t layer_swa[4096];      /* per layer: 1 = sliding (MOE_MAX_LAYERS) */
    uint16_t layer_n_head_kv[4096];   /* per layer KV heads */
};

static inline bool moe_model_cfg_recurrent(const struct moe_model_cfg *c, int il)
{
    return il >= 0 && il < 4096 && ((c->recurrent_mask[il / 64] >> (il % 64)) & 1u) != 0;
}

enum moe_prefetch_mode {
    MOE_PREFETCH_NONE = 0,
    MOE_PREFETCH_GATE,      /* after layer L, apply the routers of layers L+1..L+depth to the
                             * hidden state and load their predicted experts at low priority */
    MOE_PREFETCH_HISTORY,   /* predict them from transition counts (previous token, layer) */
    MOE_PREFETCH_AUTO,      /* the memory plan chooses: gate when experts go through a cache
                             * that cannot hold them all, else none (model/plan.h) */
};

/* The KV cache's element type (option kv_type). Zero is f32, so that a
 * zeroed struct moe_model_opts computes exactly as llama.cpp's goldens
 * (shared/ref: KV F32); the option table's default is f16. q8_0 is ggml's
 * block_q8_0 (32 values, an fp16 scale) along each head's dimensions. */
enum moe_kv_type {
    MOE_KV_F32 = 0,
    MOE_KV_F16,
    MOE_KV_Q8_0,
};

/* The dtype (common/dtype.h) of a kv_type, and bytes of a cache row of n
 * elements (q8_0: n a multiple of 32). */
uint32_t moe_kv_dtype(int kv_type);
size_t moe_kv_row_bytes(int kv_type, int64_t n);
const char *moe_kv_type_name(int kv_type);

enum moe_backend_kind {
    MOE_BACKEND_CPU = 0,
    MOE_BACKEND_CUDA,       /* device 0 */
};

/* The engine's options. Each field is a row of the option table in
 * model/options.c (key, bounds, default, help), which moed's config and
 * moectl's flags both read; moe_model_opts_defaults() gives the table's
 * defaults. A zeroed struct is valid too: zero means "the built-in
 * default" for the counts below, and LRU / no prefetch / CPU for the enums. */
struct moe_model_opts {
    int n_threads;        /* threads: CPU threads; <= 0: all online CPUs */
    int n_ctx;            /* ctx_size: context per sequence; <= 0: min(n_ctx_train, 4096) */
    int n_batch;          /* batch_size: max tokens per forward call; <= 0: 512 */
    int n_seqs;           /* sequences the caller will run, for the plan's KV term; <= 0: 1 */
    int kv_type;          /* enum moe_kv_type (kv_type; kv_f16 = true is f16) */
    /* The paged KV pool (kv_block, kv_size): one pool of blocks of kv_block
     * tokens for every sequence; kv_size tokens in all, <= 0: half of
     * n_seqs x n_ctx, at least n_ctx (model/plan.h). */
    int kv_block;         /* <= 0: 16 */
    int kv_size;
    bool prefix_cache;    /* sequences started with moe_seq_begin reuse cached prompt blocks */
    /* Expert cache. A .moe pack always goes through it; a GGUF does when a
     * budget is given (else its experts are used in place, all resident).
     * Budget: cache_experts slots, or cache_bytes (slots and their
     * alignment within it), not both; with neither, room for every expert.
     * The minimum is n_expert_used (one layer's top-k). */
    uint64_t cache_bytes;
    int cache_experts;
    int cache_policy;           /* enum moe_policy_kind (cache/policy.h), not BELADY */
    int prefetch;               /* enum moe_prefetch_mode */
    int prefetch_depth;         /* <= 0: the plan's choice with prefetch auto (2), else 1 */
    bool prefetch_always;       /* no governor: prefetch on every decode step (by default
                                 * decode steps alternate probes with it on and off and keep
                                 * whichever is faster; cache/governor.h) */
    bool force_pread;           /* expert reads without io_uring */
    uint64_t host_bytes;        /* host-RAM tier below the cache (0 = none) */
    /* Weights copied into backend memory and expert loads staged in host
     * memory even on the CPU backend (always so on a GPU backend): tests
     * the GPU data path where there is no GPU. */
    bool upload_weights;
    /* Where a missed expert is computed when the backend is a device (or
     * upload_weights): enum moe_miss_lane (cache/lane.h). */
    int miss_lane;
    int backend;                /* enum moe_backend_kind */
    /* What the memory plan may use on the host (memory_limit): 0 = the
     * memory available to this process (MemAvailable, or the cgroup's limit
     * less its usage, whichever is lower, less a margin). With no expert
     * budget given, the plan sizes the expert cache (and, on a GPU, the
     * host tier) to fit it: model/plan.h. */
    uint64_t memory_limit;
    /* Warm restarts (cache/warm.h): at load, read "<model>.warm" and start
     * loading the experts it says were hottest into empty slots (and the
     * history predictor's counts); moe_model_warm_save() writes it. */
    bool warm_start;
    /* Set by moe_model_plan() in the options it resolves: the sizes are
     * final, no automatic choice is made again. */
    bool plan_resolved;
    /* Loading progress (optional): called on the loading thread with the
     * phase ("binding", "uploading") and the fraction done, 0..1. */
    void (*progress)(void *ud, const char *phase, double done);
    void *progress_ud;
};

/* Cache statistics (cache/stats.h); false when the model has no expert cache. */
bool moe_model_cache_stats(struct moe_model *m, struct moe_cache_stats *out);
/* Decode steps run with prefetch on and off (the governor's choices);
 * false when prefetch is not configured. */
bool moe_model_prefetch_steps(const struct moe_model *m, uint64_t *on, uint64_t *off);
/* Per-layer hits, misses, bytes loaded and stall (out has room for max
 * entries); -1 without a cache, else n_layer. */
int moe_model_cache_layer_stats(struct moe_model *m, struct moe_cache_layer_stats *out, int max);
/* Writes the warm-start statistics beside the model ("<model>.warm") when
 * the model was loaded with warm_start and has an expert cache; 0 when
 * there is nothing to write. Atomic (cache/warm.h). */
int moe_model_warm_save(struct moe_model *m, struct moe_diag *diag);
/* Warm loads issued at load time from the statistics file (0: cold). */
int moe_model_warm_loads(const struct moe_model *m);
/* Experts pinned right now (0 between forward passes), -1 without a cache. */
int moe_model_cache_pinned(struct moe_model *m);

/* Called for every token and MoE layer during a forward pass: the chosen
 * experts, highest weight first, and the weights the model applies. */
typedef void (*moe_route_fn)(void *ud, int64_t token, int layer, const int32_t *ids,
                             const float *weights, int k);

int moe_model_load(struct moe_model **out, const char *path, const struct moe_model_opts *opts,
                   struct moe_diag *diag);
void moe_model_free(struct moe_model *m);

const struct moe_model_cfg *moe_model_cfg(const struct moe_model *m);
/* The GGUF the model was loaded from (borrowed, valid until free). */
const struct moe_gguf *moe_model_gguf(const struct moe_model *m);
int moe_model_n_ctx(const struct moe_model *m);
int moe_model_n_batch(const struct moe_model *m);
struct moe_model_plan;
/* The memory plan the model was loaded with (model/plan.h; borrowed). */
const struct moe_model_plan *moe_model_plan_of(const struct moe_model *m);

/* Sequences hold blocks of the model's paged KV pool (struct
 * moe_model_opts kv_block, kv_size): moe_seq_create allocates none; the
 * forward pass takes blocks as positions need them (MOE_ELIMIT when the
 * pool has none left); moe_seq_reset and moe_seq_free give them back.
 * Blocks that filled up stay in the pool after that, indexed by their
 * tokens, until the pool needs them (prefix_cache). */
int moe_seq_create(struct moe_seq **out, struct moe_model *m, struct moe_diag *diag);
void moe_seq_free(struct moe_seq *s);
int moe_seq_pos(const struct moe_seq *s);      /* tokens in the KV cache */
void moe_seq_reset(struct moe_seq *s);
/* Resets s and starts it on a prompt of n tokens that will grow to at most
 * n_total tokens (prompt and generated ones whose KV is stored; n_total <=
 * n_ctx): with prefix_cache, the longest run of the prompt's full blocks
 * already in the pool is reused (never the last prompt token: its logits
 * are needed) and s starts at that position, *cached; then the blocks for
 * the rest of n_total are reserved, so the forward passes of s cannot run
 * out of blocks. Run prompt[*cached..n) next.
 * -EAGAIN: the pool cannot reserve that much now (s is left reset; retry
 * when other sequences have ended); MOE_ELIMIT: it never can (n_total
 * needs more blocks than the pool has), with the numbers in diag. */
int moe_seq_begin(struct moe_seq *s, const int32_t *prompt, int n, int n_total, int *cached,
                  struct moe_diag *diag);
/* The KV pool's counters (model/kv.h). */
void moe_model_kv_stats(const struct moe_model *m, struct moe_kv_stats *out);

/* Runs tokens[0..n) at positions pos..pos+n-1 of s (n may exceed n_batch:
 * it is split). logits: NULL, or [n][n_vocab] (all_logits) or [n_vocab]
 * (the last token's). route: optional routing callback. */
int moe_model_forward(struct moe_model *m, struct moe_seq *s, const int32_t *tokens, int64_t n,
                      float *logits, bool all_logits, moe_route_fn route, void *route_ud,
                      struct moe_diag *diag);

/* One sequence's part of a multi-sequence batch. */
struct moe_batch_seg {
    struct moe_seq *seq;
    const int32_t *tokens;
    int n;                  /* tokens, at positions seq's pos..pos+n-1 */
    float *logits;          /* NULL, or [n_vocab]: the logits after the last token */
};

/* Runs several sequences in one pass (continuous batching): tokens of every
 * sequence share each layer's matmuls and, above all, each expert's load and
 * compute. Each sequence's result equals moe_model_forward() of its own
 * tokens. The sequences must be distinct; the tokens in all must not exceed
 * n_batch. On error, positions are unchanged only if validation failed.
 *
 * Failure isolation: when an expert fails to load (an I/O error, a
 * checksum mismatch, a truncated store), only the sequences with a token
 * routed to it fail; the others' results are complete and exactly what
 * they would have been without the failure. The call then returns that
 * error and moe_model_forward_failed() tells each segment's fate. */
int moe_model_forward_multi(struct moe_model *m, const struct moe_batch_seg *segs, int n_segs,
                            struct moe_diag *diag);
/* After moe_model_forward_multi() returned an error: 0 when segment i
 * nevertheless completed (its position advanced, its logits written), or
 * the error that failed it with its message in diag (naming the file,
 * layer and expert when an expert's load failed it). A failed segment's
 * position is unchanged; its KV cache past that position is unspecified.
 * Valid until the next forward call. */
int moe_model_forward_failed(const struct moe_model *m, int i, struct moe_diag *diag);

#ifdef __cplusplus
}
#endif

#endif
