/* The memory plan: what a model with given options will occupy, term by
 * term, computed from the file's header without allocating. The model's
 * loader sizes everything from the same plan, so what the plan says is
 * what the engine takes.
 *
 * Errors: 0, or a negative code with a message naming the file or option.
 * Thread-safe (no shared state).
 */
#ifndef MOE_MODEL_PLAN_H
#define MOE_MODEL_PLAN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/buf.h"
#include "common/error.h"
#include "model/model.h"

#ifdef __cplusplus
extern "C" {
#endif

struct moe_model_plan {
    /* resolved options */
    int n_ctx;                  /* per sequence */
    int n_batch;                /* tokens per forward pass */
    int n_seqs;                 /* sequences the KV term covers */
    int kv_type;                /* enum moe_kv_type */
    /* the model */
    bool pack;                  /* a .moe expert store (else a GGUF) */
    uint64_t dense_bytes;       /* dense tensors as stored */
    bool dense_copied;          /* read into anonymous memory at load (an expert cache on
                                 * the CPU backend), else mapped from the file */
    uint64_t expert_bytes;      /* every expert, as a cache slot holds it */
    int n_moe_layers, n_expert, n_expert_used;
    /* terms */
    uint64_t kv_bytes_per_token;   /* layers with KV (n_layer less delta-net layers) x
                                    * (K row + V row) bytes (kv_type's rows) */
    uint64_t kv_bytes_per_seq;  /* a full context: n_ctx x kv_bytes_per_token */
    int kv_block;               /* tokens per block of the paged pool */
    int kv_blocks;              /* blocks in the pool: kv_size, or half of n_seqs x n_ctx
                                 * (at least n_ctx) */
    uint64_t kv_bytes;          /* the pool: kv_blocks x kv_block x kv_bytes_per_token */
    bool expert_cache;          /* experts through the cache (a pack, or a budget) */
    size_t slot_bytes;          /* one expert: the largest layer's blob */
    size_t slot_stride;         /* what a slot takes (page-aligned) */
    int n_slots;                /* the cache's slots (0 without a cache) */
    int min_slots;              /* one layer's top-k */
    int all_slots;              /* every expert */
    uint64_t cache_bytes;       /* n_slots x slot_stride + alignment */
    uint64_t host_bytes;        /* host-RAM tier below the cache */
    uint64_t staging_bytes;     /* the expert store's read buffers (host memory; with a cache) */
    bool lazy_stages;           /* GGUF read straight into slots: one read buffer counted, not n_staging */
    uint64_t workspace_bytes;   /* activations and backend scratch for n_batch tokens */
    uint64_t recurrent_bytes;   /* of which the delta-net layers' recurrent state of n_seqs
                                 * sequences (qwen35moe; host memory) */
    /* the budgets the plan was sized against */
    uint64_t host_budget;       /* memory_limit, or what the host makes available */
    char host_why[128];         /* where host_budget comes from */
    uint64_t device_budget;     /* a GPU backend: the device's free memory less a margin */
    bool auto_sized;            /* the expert cache was sized by the plan */
    char prefetch_why[128];     /* the prefetch setting and why (prefetch auto) */
    char cache_why[160];        /* why the experts are cached (or resident) as planned */
    /* options that reproduce this plan exactly (plan_resolved set): load
     * the model with these to get what the plan says */
    struct moe_model_opts opts;
};

/* The plan of `path` (GGUF or .moe pack) loaded with opts (NULL: defaults).
 * Refuses what moe_model_load() would refuse for its configuration or
 * sizes (an expert budget below one layer's top-k: MOE_ELIMIT). */
int moe_model_plan(const char *path, const struct moe_model_opts *opts,
                   struct moe_model_plan *plan, struct moe_diag *diag);

/* The plan as a table, one line per term (component, MiB, why), appended
 * to out. 0 or -ENOMEM / MOE_ELIMIT from the buffer. */
int moe_model_plan_format(const struct moe_model_plan *p, struct moe_buf *out);

/* The memory of the device a backend computes on. */
struct moe_device_memory {
    char name[256];
    uint64_t free_bytes, total_bytes;
};
/* CUDA: device 0, after a self-test kernel proved the toolchain, driver and
 * architectures agree. MOE_EUNSUPPORTED for a backend without device
 * memory (the CPU) or without a device. */
int moe_model_device_memory(int backend, struct moe_device_memory *out, struct moe_diag *diag);

/* Bytes the plan puts in the backend's memory: on a device, the dense
 * weights, the KV caches, the expert slots and the workspace; the host
 * tier stays in host memory. */
uint64_t moe_model_plan_device_bytes(const struct moe_model_plan *p);
/* Bytes the plan reserves in host memory (anonymous, not the page cache of
 * a mapped file): everything on the CPU backend except mapped weights
 * (dense weights count where dense_copied);
 * on a device backend, the host tier and the loads' staging. */
uint64_t moe_model_plan_host_bytes(const struct moe_model_plan *p, int backend);

/* Whether the plan fits: its host bytes in host_ram (0: unknown, not
 * checked) and, on a device backend with dev given, its device bytes in
 * dev's free memory. MOE_ELIMIT otherwise, the message listing the MiB of
 * each component and what to lower (shared/RELIABILITY.md row 19). */
int moe_model_plan_fits(const struct moe_model_plan *p, int backend, uint64_t host_ram,
                        const struct moe_device_memory *dev, struct moe_diag *diag);

#ifdef __cplusplus
}
#endif

#endif
