/* The memory plan (plan.h) and the sizes it shares with the loader: the
 * activations for n_batch tokens, the KV cache per sequence, the expert
 * cache's slots. moe_model_load() sizes everything through these
 * functions, so a plan and a loaded model cannot disagree. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "cache/expert_cache.h"
#include "common/alloc.h"
#include "common/dtype.h"
#include "io/expert_src.h"
#include "io/file.h"
#include "io/gguf.h"
#include "io/pack.h"
#include "kernels/cpu/threadpool.h"
#include "kernels/cuda.h"
#include "model/hparams.h"
#include "model/model-impl.h"
#include "model/options.h"
#include "model/plan.h"

static size_t zmax(size_t a, size_t b)
{
    return a > b ? a : b;
}

int moe_model_acts_layout(const struct moe_model_cfg *c, int n_batch, int n_ctx, struct model_acts *a,
                          struct model_act_item *items, size_t *shared, size_t *per_worker)
{
    const size_t B = (size_t)n_batch, K = (size_t)c->n_expert_used, F = sizeof(float);
    const size_t E = (size_t)c->n_embd, H = (size_t)c->n_head, I32 = sizeof(int32_t);
    const size_t qk = c->ad->mla ? (size_t)(c->qk_nope + c->qk_rope) : (size_t)c->head_dim;
    const size_t qd = H * zmax((size_t)c->head_dim, qk);
    const size_t kvd = zmax((size_t)c->n_head_kv * c->head_dim, (size_t)c->k_row);
    const size_t ad = H * zmax((size_t)c->head_dim_v, (size_t)c->v_head_dim);
    const size_t ff = zmax(zmax((size_t)c->n_ff_exp, (size_t)c->n_ff_shexp),
                           c->n_layer_dense_lead > 0 || c->ad->dense_beside_moe ? (size_t)c->n_ff : 0);
    const size_t lat = zmax((size_t)c->kv_lora_rank, zmax((size_t)c->qk_nope, (size_t)c->v_head_dim));
    /* logits go through the backend up to 64 rows at a time */
    a->logit_rows = n_batch < 64 ? n_batch : 64;
    const struct model_act_item list[] = {
        { (void **)&a->x, B * E * F, false },
        { (void **)&a->xn, B * E * F, false },
        { (void **)&a->q, B * qd * F, false },
        { (void **)&a->k, B * kvd * F, false },
        { (void **)&a->v, B * qd * F, false },   /* V rows, or MLA's assembled queries */
        { (void **)&a->att, B * ad * F, false },
        { (void **)&a->tmp, B * zmax(E, ad) * F, false },
        { (void **)&a->qa, B * zmax((size_t)c->q_lora_rank, 1) * F, false },
        { (void **)&a->hq, B * zmax(lat, 1) * F, false },
        { (void **)&a->hout, B * zmax(lat, 1) * F, false },
        { (void **)&a->rlogits, B * (size_t)c->n_expert * F, false },
        { (void **)&a->xe, B * E * F, false },
        { (void **)&a->ge, B * ff * F, false },
        { (void **)&a->ue, B * ff * F, false },
        { (void **)&a->de, B * E * F, false },
        { (void **)&a->slot_out, B * K * E * F, false },
        { (void **)&a->sh_tmp, B * F, false },
        { (void **)&a->logits_dev, (size_t)a->logit_rows * (size_t)c->n_vocab * F, false },
        { (void **)&a->ids, B * K * I32, true },
        { (void **)&a->weights, B * K * F, true },
        { (void **)&a->pos, B * I32, true },
        { (void **)&a->kvrow, B * I32, true },
        { (void **)&a->segs, B * sizeof(struct seg), true },
        { (void **)&a->tok_by_expert, B * K * I32, true },
        { (void **)&a->row_idx, B * K * I32, true },
        { (void **)&a->expert_count, (size_t)c->n_expert * I32, true },
        { (void **)&a->expert_start, (size_t)c->n_expert * I32, true },
    };
    const int n = (int)(sizeof(list) / sizeof(list[0]));
    MOE_ASSERT(n <= MODEL_ACT_ITEMS);
    memcpy(items, list, sizeof(list));
    /* Backend scratch: the largest activation rows of a matmul (f32 is the
     * widest format), and per worker one row of attention scores. */
    size_t widest = zmax(zmax(E, qd), zmax(ff, ad));
    widest = zmax(widest, zmax((size_t)c->q_lora_rank, lat));
    *shared = B * widest * 4 + 4096;
    /* scores, q in K's format (at most 2 bytes an element), a V row; the
     * scores of all the query heads of a KV head (up to 16), which the CPU
     * backend then computes together (kernels/cpu/attn.c) */
    size_t group = c->n_head_kv > 0 ? (size_t)(c->n_head / c->n_head_kv) : 1;
    group = group < 1 ? 1 : group > 16 ? 16 : group;
    *per_worker = ((size_t)n_ctx + 16) * F * group + (size_t)c->head_dim * 2 +
                  (size_t)zmax((size_t)c->head_dim_v, (size_t)c->head_dim) * F + 256;
    return n;
}

uint32_t moe_kv_dtype(int kv_type)
{
    return kv_type == MOE_KV_Q8_0 ? MOE_DTYPE_Q8_0 : kv_type == MOE_KV_F16 ? MOE_DTYPE_F16
                                                                           : MOE_DTYPE_F32;
}

size_t moe_kv_row_bytes(int kv_type, int64_t n)
{
    return (size_t)moe_dtype_row_bytes(moe_kv_dtype(kv_type), (uint64_t)n, NULL);
}

const char *moe_kv_type_name(int kv_type)
{
    return kv_type == MOE_KV_Q8_0 ? "q8_0" : kv_type == MOE_KV_F16 ? "f16" : "f32";
}

/* q8_0 blocks run along each head's dimensions (a block never straddles
 * two heads), as llama.cpp requires of a quantized KV cache. */
static int check_kv_type(const struct moe_model_cfg *c, int kv_type, struct moe_diag *diag)
{
    if (kv_type != MOE_KV_Q8_0)
        return 0;
    if (c->ad->mla) {
        if (c->kv_lora_rank % 32 || (c->kv_lora_rank + c->qk_rope) % 32)
            return moe_diag_set(diag, MOE_EUNSUPPORTED, "kv_type q8_0: the latent KV row of %d + %d"
                                " (kv_lora_rank + qk_rope) is not made of 32-value blocks; use f16",
                                c->kv_lora_rank, c->qk_rope);
        return 0;
    }
    if (c->head_dim % 32)
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "kv_type q8_0: head_dim %d is not a multiple of"
                            " the block size 32; use f16", c->head_dim);
    return 0;
}

int moe_model_plan_opts(const struct moe_model_cfg *c, const struct moe_model_opts *o,
                        struct moe_model_plan *p, struct moe_diag *diag)
{
    p->n_ctx = o->n_ctx > 0 ? o->n_ctx : (c->n_ctx_train < 4096 ? c->n_ctx_train : 4096);
    if (p->n_ctx <= 0 || p->n_ctx > (1 << 20))
        return moe_diag_set(diag, -EINVAL, "context length %d, expected 1..1048576", p->n_ctx);
    p->n_batch = o->n_batch > 0 ? o->n_batch : 512;
    if (p->n_batch > p->n_ctx)
        p->n_batch = p->n_ctx;
    p->n_seqs = o->n_seqs > 0 ? o->n_seqs : 1;
    p->kv_type = o->kv_type;
    int rc = check_kv_type(c, o->kv_type, diag);
    if (rc)
        return rc;
    p->kv_bytes_per_token = (uint64_t)c->n_kv_layers * (uint64_t)(moe_kv_row_bytes(o->kv_type, c->k_row) +
                                                              moe_kv_row_bytes(o->kv_type, c->v_row));
    p->kv_bytes_per_seq = (uint64_t)p->n_ctx * p->kv_bytes_per_token;
    /* The pool: sequences reserve their prompt plus max_tokens, seldom the
     * whole context, so by default half of n_seqs full contexts (one at
     * least); what does not fit waits (daemon/engine.c). */
    p->kv_block = o->kv_block > 0 ? o->kv_block : 16;
    const uint64_t tokens = o->kv_size > 0 ? (uint64_t)o->kv_size
        : (uint64_t)p->n_seqs * (uint64_t)p->n_ctx / 2 > (uint64_t)p->n_ctx
            ? (uint64_t)p->n_seqs * (uint64_t)p->n_ctx / 2 : (uint64_t)p->n_ctx;
    const uint64_t blocks = (tokens + (uint64_t)p->kv_block - 1) / (uint64_t)p->kv_block;
    if (blocks > (1u << 28))
        return moe_diag_set(diag, MOE_ELIMIT, "KV pool of %" PRIu64 " blocks of %d tokens: at most"
                            " %u blocks", blocks, p->kv_block, 1u << 28);
    p->kv_blocks = (int)blocks;
    p->kv_bytes = (uint64_t)p->kv_blocks * (uint64_t)p->kv_block * p->kv_bytes_per_token;
    p->n_expert = c->n_expert;
    p->n_expert_used = c->n_expert_used;
    p->min_slots = c->n_expert_used;
    p->host_bytes = p->expert_cache ? o->host_bytes : 0;
    struct model_acts a;
    struct model_act_item items[MODEL_ACT_ITEMS];
    size_t shared, per_worker;
    const int n = moe_model_acts_layout(c, p->n_batch, p->n_ctx, &a, items, &shared, &per_worker);
    const int workers = o->n_threads > 0 ? o->n_threads : moe_threadpool_default_threads();
    p->workspace_bytes = shared + per_worker * (uint64_t)workers;
    for (int i = 0; i < n; i++)
        p->workspace_bytes += items[i].bytes;
    if (c->deltanet) {   /* model/deltanet.c: the state of each sequence and the scratch */
        const uint64_t D = (uint64_t)c->ssm_d_state, nv = (uint64_t)c->ssm_n_v;
        const uint64_t inner = nv * D, conv = 2 * (uint64_t)c->ssm_n_k * D + inner;
        const uint64_t qd = (uint64_t)c->n_head * (uint64_t)c->head_dim;
        p->recurrent_bytes = (uint64_t)p->n_seqs * (uint64_t)c->n_recurrent *
                             (conv * (uint64_t)(c->ssm_d_conv - 1) + nv * D * D) * 4;
        p->workspace_bytes += p->recurrent_bytes +
                              (uint64_t)p->n_batch * (2 * conv + 2 * inner + 2 * nv + 3 * qd) * 4;
    }
    return 0;
}

/* The read buffers an expert source opens with (io/expert_src.c): each
 * holds a stored expert, bounded here by the slot plus two alignment pages
 * per tensor slice. A GGUF whose every expert is read with O_DIRECT
 * straight into its page-aligned slot (lazy stages) allocates a buffer only
 * for a load that cannot go direct: one is counted. */
static uint64_t staging_for(const struct moe_model_opts *o, const struct moe_model_plan *p, size_t slot)
{
    const struct moe_io_config io = { .uring = { .force_pread = o->force_pread } };
    const uint64_t cap = (slot + 2ull * 4096 * MOE_EXPERT_MAX_SLICES + 4095) & ~4095ull;
    return cap * (p->lazy_stages ? 1 : moe_expert_src_n_staging(&io, (size_t)cap));
}

int moe_model_plan_cache(const struct moe_model_opts *o, size_t slot_bytes, int n_moe_layers,
                         struct moe_model_plan *p, struct moe_diag *diag)
{
    p->slot_bytes = slot_bytes;
    p->slot_stride = moe_expert_cache_slot_stride(slot_bytes);
    p->n_moe_layers = n_moe_layers;
    p->all_slots = n_moe_layers * p->n_expert;
    p->expert_bytes = (uint64_t)p->slot_bytes * (uint64_t)p->all_slots;
    /* With an expert cache the plan fills the memory budget, so nothing used
     * every token may be page cache the kernel can reclaim at the limit:
     * the CPU backend reads the dense weights into anonymous memory
     * (load.c, copy_dense). Without one, they stay mapped with the experts. */
    p->dense_copied = p->expert_cache && o->backend == MOE_BACKEND_CPU && !o->upload_weights;
    if (!p->expert_cache) {
        p->n_slots = 0;
        p->cache_bytes = 0;
        p->staging_bytes = 0;
        return 0;
    }
    p->staging_bytes = staging_for(o, p, slot_bytes);
    if (slot_bytes == 0)
        return moe_diag_set(diag, MOE_EFORMAT, "no expert tensors");
    /* a slot count, or a byte budget met exactly, alignment included
     * (moe_model_opts_check refuses both); no budget: every expert */
    long n_slots = p->all_slots;
    if (o->cache_experts > 0)
        n_slots = o->cache_experts;
    else if (o->cache_bytes > 0)
        n_slots = o->cache_bytes > MOE_CACHE_SLOT_ALIGN
                      ? (long)((o->cache_bytes - MOE_CACHE_SLOT_ALIGN) / p->slot_stride) : 0;
    if (n_slots < p->min_slots)
        return moe_diag_set(diag, MOE_ELIMIT, "expert cache of %ld experts (%zu bytes each) is below"
                            " the minimum of %d: one layer's top-k must fit", n_slots, slot_bytes,
                            p->min_slots);
    if (n_slots > p->all_slots)
        n_slots = p->all_slots;
    p->n_slots = (int)n_slots;
    p->cache_bytes = moe_expert_cache_pool_bytes(slot_bytes, p->n_slots);
    if (p->cache_bytes == 0)
        return moe_diag_set(diag, MOE_ELIMIT, "expert cache: %d slots of %zu bytes overflow",
                            p->n_slots, slot_bytes);
    return 0;
}

/* The largest layer's expert blob and the layers that have experts. */
static void slot_of_layouts(const struct moe_expert_layout *const *lay, uint32_t n, size_t *slot,
                            int *n_moe)
{
    *slot = 0;
    *n_moe = 0;
    for (uint32_t l = 0; l < n; l++) {
        if (lay[l] == NULL || lay[l]->n_slices == 0)
            continue;
        (*n_moe)++;
        if (lay[l]->raw_size > *slot)
            *slot = (size_t)lay[l]->raw_size;
    }
}

int moe_model_slot_of_src(const struct moe_expert_src *src, size_t *slot, int *n_moe, bool *lazy_stages)
{
    *lazy_stages = moe_expert_src_lazy_stages(src);
    const uint32_t n = moe_expert_src_n_layer(src);
    const struct moe_expert_layout *lay[MOE_MAX_LAYERS];
    for (uint32_t l = 0; l < n && l < MOE_MAX_LAYERS; l++)
        lay[l] = moe_expert_src_layout(src, l);
    slot_of_layouts(lay, n < MOE_MAX_LAYERS ? n : MOE_MAX_LAYERS, slot, n_moe);
    return 0;
}

int moe_model_slot_of_gguf(const struct moe_gguf *g, size_t *slot, int *n_moe, bool *all_direct,
                           struct moe_diag *diag)
{
    *all_direct = false;
    struct moe_expert_layout *lays = NULL;
    uint32_t n_layer = 0, n_expert = 0;
    int rc = moe_expert_layouts_from_gguf(g, &lays, &n_layer, &n_expert, diag);
    if (rc)
        return rc;
    const struct moe_expert_layout *lay[MOE_MAX_LAYERS];
    const uint32_t n = n_layer < MOE_MAX_LAYERS ? n_layer : MOE_MAX_LAYERS;
    *all_direct = n > 0;
    for (uint32_t l = 0; l < n; l++) {
        /* as the expert store lays out a GGUF's slots (io/expert_src.c) */
        if (!moe_expert_layout_direct(&lays[l], MOE_EXPERT_DIRECT_ALIGN) && lays[l].n_slices > 0)
            *all_direct = false;
        lay[l] = &lays[l];
    }
    slot_of_layouts(lay, n, slot, n_moe);
    moe_free(lays);
    return 0;
}

/* Whether the file system opens path with O_DIRECT (the expert store then
 * reads GGUF experts straight into their slots). */
static bool o_direct_ok(const char *path)
{
    const int fd = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (fd < 0)
        return false;
    close(fd);
    return true;
}

/* ---- automatic sizing ------------------------------------------------ */

/* A number from a one-line file (cgroup files), 0 when absent or "max". */
static uint64_t read_u64_file(const char *path)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return 0;
    char line[64] = "";
    const bool ok = fgets(line, sizeof(line), f) != NULL;
    fclose(f);
    if (!ok || line[0] < '0' || line[0] > '9')
        return 0;
    return strtoull(line, NULL, 10);
}

/* MemAvailable from /proc/meminfo, in bytes; 0 when unknown. */
static uint64_t mem_available(void)
{
    FILE *f = fopen("/proc/meminfo", "r");
    if (f == NULL)
        return 0;
    char line[256];
    uint64_t kb = 0;
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "MemAvailable: %" SCNu64 " kB", &kb) == 1)
            break;
    fclose(f);
    return kb * 1024;
}

/* A "name value" line of a cgroup's memory.stat; 0 when absent. Page
 * cache nobody has touched lately (inactive_file) is counted in a group's
 * usage but is the first thing reclaimed: it is not in use. */
static uint64_t stat_field(const char *path, const char *name)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return 0;
    char line[256];
    uint64_t v = 0;
    const size_t n = strlen(name);
    while (fgets(line, sizeof(line), f))
        if (strncmp(line, name, n) == 0 && line[n] == ' ') {
            v = strtoull(line + n + 1, NULL, 10);
            break;
        }
    fclose(f);
    return v;
}

/* What the memory cgroup at `dir` (a v1 hierarchy: memory.limit_in_bytes,
 * memory.usage_in_bytes) and each of its ancestors up to `root` still
 * allow: the least of limit less usage; 0 when none is limited. */
static uint64_t cgroup_v1_available(const char *root, char *dir)
{
    uint64_t best = 0;
    for (;;) {
        char path[1400];
        snprintf(path, sizeof(path), "%s%s/memory.limit_in_bytes", root, dir);
        const uint64_t max = read_u64_file(path);
        if (max > 0 && max < (1ull << 60)) {   /* v1's "unlimited" is near 2^63 */
            snprintf(path, sizeof(path), "%s%s/memory.usage_in_bytes", root, dir);
            uint64_t used = read_u64_file(path);
            snprintf(path, sizeof(path), "%s%s/memory.stat", root, dir);
            const uint64_t idle = stat_field(path, "total_inactive_file");
            used = used > idle ? used - idle : 0;
            const uint64_t avail = max > used ? max - used : 1;
            if (best == 0 || avail < best)
                best = avail;
        }
        char *slash = strrchr(dir, '/');
        if (slash == NULL || dir[0] == '\0')
            break;
        *slash = '\0';   /* the parent ("" is the root) */
    }
    return best;
}

/* What this process's cgroup (v2, else v1: its own group from
 * /proc/self/cgroup and the groups above it) still allows, its idle page
 * cache counted as free; 0 when unlimited or unknown. */
static uint64_t cgroup_available(void)
{
    char rel[1024] = "", rel1[1024] = "", path[1200];
    FILE *f = fopen("/proc/self/cgroup", "r");
    if (f) {
        char line[1100];
        while (fgets(line, sizeof(line), f)) {
            line[strcspn(line, "\n")] = '\0';
            if (strncmp(line, "0::", 3) == 0)
                snprintf(rel, sizeof(rel), "%.1000s", line + 3);
            /* v1: "N:memory:/path" (the controller list may name others too) */
            const char *c1 = strchr(line, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
            if (c1 && c2) {
                char ctl[256];
                snprintf(ctl, sizeof(ctl), "%.*s", (int)(c2 - c1 - 1), c1 + 1);
                for (char *tok = strtok(ctl, ","); tok; tok = strtok(NULL, ","))
                    if (strcmp(tok, "memory") == 0)
                        snprintf(rel1, sizeof(rel1), "%.1000s", c2 + 1);
            }
        }
        fclose(f);
    }
    if (strcmp(rel, "/") == 0)
        rel[0] = '\0';
    snprintf(path, sizeof(path), "/sys/fs/cgroup%s/memory.max", rel);
    uint64_t max = read_u64_file(path);
    if (max > 0) {
        snprintf(path, sizeof(path), "/sys/fs/cgroup%s/memory.current", rel);
        uint64_t used = read_u64_file(path);
        snprintf(path, sizeof(path), "/sys/fs/cgroup%s/memory.stat", rel);
        const uint64_t idle = stat_field(path, "inactive_file");
        used = used > idle ? used - idle : 0;
        return max > used ? max - used : 1;
    }
    if (strcmp(rel1, "/") == 0)
        rel1[0] = '\0';
    return cgroup_v1_available("/sys/fs/cgroup/memory", rel1);
}

/* The host memory the plan may use, and where that number comes from. */
static uint64_t host_budget(uint64_t limit, char *why, size_t cap)
{
    const uint64_t avail = mem_available(), cg = cgroup_available();
    uint64_t b = avail;
    const char *src = "MemAvailable";
    if (cg > 0 && (b == 0 || cg < b)) {
        b = cg;
        src = "the cgroup's limit less its usage";
    }
    /* a margin for the rest of the process and the page cache it needs */
    const uint64_t margin = b / 20 > (256ull << 20) ? b / 20 : (256ull << 20);
    b = b > margin ? b - margin : 0;
    if (limit > 0 && (b == 0 || limit < b)) {
        /* the limit caps the whole process: keep a little of it for what
         * the plan does not count (code, heap, the kernel's share), so that
         * under a cgroup limit the mapped dense weights are not reclaimed */
        const uint64_t lm = limit / 32 > (16ull << 20) ? limit / 32 : (16ull << 20);
        snprintf(why, cap, "memory_limit less a margin of %.0f MiB", (double)lm / 1048576.0);
        return limit > lm ? limit - lm : 0;
    }
    snprintf(why, cap, "%s less a margin of %.0f MiB", src, (double)margin / 1048576.0);
    return b;
}

/* Without an expert budget: every expert where they all fit (resident
 * from a GGUF, every slot from a pack), else a cache sized to what is
 * left of the budget. On a GPU the device's free memory bounds the cache
 * and a host tier takes what the host has left. Sets o's budget. */
static int auto_size(struct moe_model_opts *o, size_t slot, int n_moe, struct moe_model_plan *p,
                     struct moe_diag *diag)
{
    p->host_budget = host_budget(o->memory_limit, p->host_why, sizeof(p->host_why));
    if (o->cache_bytes > 0 || o->cache_experts > 0) {
        snprintf(p->cache_why, sizeof(p->cache_why), "cache_%s given", o->cache_bytes ? "bytes" : "experts");
        return 0;
    }
    const bool cuda = o->backend == MOE_BACKEND_CUDA;
    uint64_t budget = p->host_budget;
    if (cuda) {
        struct moe_device_memory dev;
        int rc = moe_model_device_memory(o->backend, &dev, diag);
        if (rc)
            return rc;
        const uint64_t margin = dev.free_bytes / 20 > (512ull << 20) ? dev.free_bytes / 20 : (512ull << 20);
        budget = p->device_budget = dev.free_bytes > margin ? dev.free_bytes - margin : 0;
    }
    const uint64_t fixed = p->dense_bytes + p->kv_bytes + p->workspace_bytes;
    const uint64_t all = moe_expert_cache_pool_bytes(slot, n_moe * p->n_expert);
    const uint64_t min = moe_expert_cache_pool_bytes(slot, p->n_expert_used);
    /* a cache also needs the store's read buffers in host memory */
    const uint64_t staging = staging_for(o, p, slot);
    const uint64_t fixed_c = fixed + (cuda ? 0 : staging);
    const uint64_t left = budget > fixed_c ? budget - fixed_c : 0;
    p->auto_sized = true;
    if (budget >= fixed + all + (p->pack && !cuda ? staging : 0)) {
        snprintf(p->cache_why, sizeof(p->cache_why), "every expert fits in the %s budget",
                 cuda ? "device" : "host");
        return 0;   /* resident (GGUF) or every slot (pack) */
    }
    if (left < min)
        return moe_diag_set(diag, MOE_ELIMIT, "KV pool %.1f MiB (%d sequences (max_seqs) of ctx_size"
                            " %d, kv_size), dense weights %.1f MiB, workspace %.1f MiB and one layer's top-k"
                            " experts %.1f MiB exceed the %s's memory budget of %.0f MiB (%s): lower"
                            " max_seqs, ctx_size or kv_size, or raise memory_limit",
                            (double)p->kv_bytes / 1048576.0, p->n_seqs, p->n_ctx,
                            (double)p->dense_bytes / 1048576.0, (double)p->workspace_bytes / 1048576.0,
                            (double)min / 1048576.0, cuda ? "device" : "host",
                            (double)budget / 1048576.0, cuda ? "free device memory less a margin"
                            : p->host_why);
    o->cache_bytes = left;
    snprintf(p->cache_why, sizeof(p->cache_why), "sized to the %s budget: %.0f MiB less dense, KV,"
             " workspace%s", cuda ? "device" : "host", (double)budget / 1048576.0,
             cuda ? "" : " and read buffers");
    if (cuda) {
        /* what the host has beyond the loads' staging holds more experts */
        const uint64_t host_used = left + staging;
        const uint64_t host_left = p->host_budget > host_used ? p->host_budget - host_used : 0;
        o->host_bytes = host_left < all - left ? host_left : all - left;
    }
    return 0;
}

/* prefetch auto: a layer's missing experts can only be read once its
 * router has run, after its attention, so without prediction decoding
 * takes compute plus I/O; gating the hidden state through the next layers'
 * routers starts their loads a layer or two early (the issue-6 table in
 * doc/benchmarks.md: depth 2 came within 1.0-1.3x of the I/O bound where
 * routing is predictable; where it is not, the governor turns it off). With
 * every expert in memory there is nothing to prefetch. */
static void resolve_prefetch(struct moe_model_opts *o, struct moe_model_plan *p)
{
    const bool auto_pf = o->prefetch == MOE_PREFETCH_AUTO;
    if (auto_pf)
        o->prefetch = p->expert_cache && p->n_slots < p->all_slots ? MOE_PREFETCH_GATE : MOE_PREFETCH_NONE;
    if (o->prefetch_depth <= 0)
        o->prefetch_depth = auto_pf ? 2 : 1;
    const char *name = o->prefetch == MOE_PREFETCH_GATE ? "gate" : o->prefetch == MOE_PREFETCH_HISTORY
                       ? "history" : "none";
    if (o->prefetch == MOE_PREFETCH_NONE)
        snprintf(p->prefetch_why, sizeof(p->prefetch_why), "none: %s", auto_pf ? "every expert is in"
                 " memory" : "prefetch = none");
    else
        snprintf(p->prefetch_why, sizeof(p->prefetch_why), "%s, %d layer%s ahead%s%s", name,
                 o->prefetch_depth, o->prefetch_depth == 1 ? "" : "s", auto_pf ? ": the expert cache"
                 " holds part of the experts" : "", o->prefetch_always ? ", always" : ", governed");
}

/* Header-only: the GGUF (or the pack's embedded one) and the experts'
 * layouts, never the data. */
int moe_model_plan(const char *path, const struct moe_model_opts *opts, struct moe_model_plan *p,
                   struct moe_diag *diag)
{
    memset(p, 0, sizeof(*p));
    struct moe_model_opts o = opts ? *opts : (struct moe_model_opts){ 0 };
    int rc = moe_model_opts_check(&o, diag);
    if (rc)
        return rc;
    struct moe_pack *pack = NULL;
    struct moe_gguf *own = NULL;
    size_t slot = 0;
    int n_moe = 0;
    enum moe_file_kind kind = MOE_FILE_UNKNOWN;
    if ((rc = moe_file_probe(path, &kind, diag)))
        return rc;
    p->pack = kind == MOE_FILE_PACK;
    const struct moe_gguf *g;
    if (p->pack) {
        if ((rc = moe_pack_open(&pack, path, 0, diag)))
            return rc;
        g = moe_pack_gguf(pack);
        const uint32_t n = moe_pack_n_layer(pack) < MOE_MAX_LAYERS ? moe_pack_n_layer(pack) : MOE_MAX_LAYERS;
        const struct moe_expert_layout *lay[MOE_MAX_LAYERS];
        for (uint32_t l = 0; l < n; l++)
            lay[l] = moe_pack_layout(pack, l);
        slot_of_layouts(lay, n, &slot, &n_moe);
    } else {
        if ((rc = moe_gguf_open(&own, path, diag)))
            return rc;
        g = own;
        bool all_direct = false;
        if ((rc = moe_model_slot_of_gguf(g, &slot, &n_moe, &all_direct, diag)))
            goto done;
        /* the source reads with O_DIRECT where the file system takes it */
        p->lazy_stages = all_direct && o_direct_ok(path);
    }
    struct moe_model_cfg c;
    memset(&c, 0, sizeof(c));
    if ((rc = moe_model_read_cfg(g, &c, diag)))
        goto done;
    struct moe_hparams hp;
    struct moe_sizes sz;
    if ((rc = moe_hparams_load(&hp, g, diag)))
        goto done;
    moe_sizes_compute(&sz, g, &hp);
    p->dense_bytes = sz.dense_bytes;
    if ((rc = moe_model_plan_opts(&c, &o, p, diag)))
        goto done;
    if (!o.plan_resolved && (rc = auto_size(&o, slot, n_moe, p, diag)))
        goto done;
    p->expert_cache = p->pack || o.cache_bytes > 0 || o.cache_experts > 0;
    p->host_bytes = p->expert_cache ? o.host_bytes : 0;
    if ((rc = moe_model_plan_cache(&o, slot, n_moe, p, diag)))
        goto done;
    resolve_prefetch(&o, p);
    o.plan_resolved = true;
    p->opts = o;
done:
    if (rc && diag && diag->code == rc && strncmp(diag->msg, path, strlen(path)) != 0) {
        /* name the file in messages that do not */
        char msg[MOE_DIAG_MSG_MAX];
        snprintf(msg, sizeof(msg), "%s", diag->msg);
        moe_diag_clear(diag);
        moe_diag_set(diag, rc, "%s: %s", path, msg);
    }
    moe_gguf_close(own);
    moe_pack_close(pack);
    return rc;
}

int moe_model_device_memory(int backend, struct moe_device_memory *out, struct moe_diag *diag)
{
    memset(out, 0, sizeof(*out));
    if (backend != MOE_BACKEND_CUDA)
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "backend %d has no device memory", backend);
    struct moe_cuda_device dev[1];
    int n = moe_cuda_probe(dev, 1, diag);
    if (n <= 0)
        return n < 0 ? n : moe_diag_set(diag, MOE_EUNSUPPORTED, "backend cuda: no CUDA device");
    int rc = moe_cuda_selftest(0, diag);
    if (rc)
        return rc;
    snprintf(out->name, sizeof(out->name), "%s", dev[0].name);
    out->free_bytes = dev[0].free_mem;
    out->total_bytes = dev[0].total_mem;
    return 0;
}

uint64_t moe_model_plan_device_bytes(const struct moe_model_plan *p)
{
    return p->dense_bytes + p->kv_bytes + p->cache_bytes + p->workspace_bytes +
           (p->expert_cache ? 0 : p->expert_bytes);
}

uint64_t moe_model_plan_host_bytes(const struct moe_model_plan *p, int backend)
{
    if (backend == MOE_BACKEND_CPU)   /* dense (and resident experts) mapped, or dense copied */
        return (p->dense_copied ? p->dense_bytes : 0) + p->kv_bytes + p->cache_bytes + p->host_bytes +
               p->workspace_bytes + p->staging_bytes;
    /* loads are staged per slot in host memory before the upload */
    return p->host_bytes + p->staging_bytes + (p->expert_cache ? p->cache_bytes : 0);
}

static double mib(uint64_t b)
{
    return (double)b / (1024.0 * 1024.0);
}

int moe_model_plan_fits(const struct moe_model_plan *p, int backend, uint64_t host_ram,
                        const struct moe_device_memory *dev, struct moe_diag *diag)
{
    const uint64_t host = moe_model_plan_host_bytes(p, backend);
    char dense[64] = "";
    if (backend == MOE_BACKEND_CPU && p->dense_copied)
        snprintf(dense, sizeof(dense), ", dense weights %.1f MiB", mib(p->dense_bytes));
    if (host_ram > 0 && host > host_ram)
        return moe_diag_set(diag, MOE_ELIMIT, "KV pool %.1f MiB (%d sequences (max_seqs) of ctx_size"
                            " %d, kv_size), with the expert cache %.1f MiB, host tier %.1f MiB, read"
                            " buffers %.1f MiB%s and workspace %.1f MiB, %.1f MiB in all, exceed the"
                            " host's memory of %.1f MiB: lower max_seqs, ctx_size, kv_size,"
                            " cache_bytes or host_bytes", mib(p->kv_bytes), p->n_seqs, p->n_ctx,
                            mib(p->cache_bytes), mib(p->host_bytes), mib(p->staging_bytes), dense,
                            mib(p->workspace_bytes), mib(host), mib(host_ram));
    if (backend == MOE_BACKEND_CPU || dev == NULL)
        return 0;
    const uint64_t need = moe_model_plan_device_bytes(p);
    if (need > dev->free_bytes)
        return moe_diag_set(diag, MOE_ELIMIT, "the plan needs %.0f MiB of GPU memory (dense weights"
                            " %.0f, KV pool %.0f, %s %.0f, workspace %.0f MiB), %.0f MiB"
                            " are free on %s: lower cache_bytes, max_seqs or ctx_size", mib(need),
                            mib(p->dense_bytes), mib(p->kv_bytes),
                            p->expert_cache ? "expert cache" : "resident experts",
                            mib(p->expert_cache ? p->cache_bytes : p->expert_bytes), mib(p->workspace_bytes),
                            mib(dev->free_bytes), dev->name[0] ? dev->name : "the device");
    return 0;
}

int moe_model_plan_format(const struct moe_model_plan *p, struct moe_buf *out)
{
    int rc = 0;
#define LINE(...) do { if (rc == 0) rc = moe_buf_printf(out, __VA_ARGS__); } while (0)
    const uint64_t total = p->dense_bytes + p->kv_bytes + p->cache_bytes + p->host_bytes +
                           p->staging_bytes + p->workspace_bytes +
                           (p->expert_cache ? 0 : p->expert_bytes);
    LINE("  %-16s %12s  %s\n", "component", "MiB", "why");
    LINE("  %-16s %12.1f  dense tensors (embeddings, attention, norms, routers, output), %s\n",
         "dense weights", mib(p->dense_bytes), p->dense_copied ? "read into anonymous memory (the"
         " expert cache fills the budget)" : "mapped from the file");
    LINE("  %-16s %12.1f  paged pool of %d blocks x %d tokens (%s, %.1f KiB a token), shared by"
         " %d sequence%s of up to %d tokens (a full one: %.1f MiB)\n", "KV cache", mib(p->kv_bytes),
         p->kv_blocks, p->kv_block, moe_kv_type_name(p->kv_type), (double)p->kv_bytes_per_token / 1024.0,
         p->n_seqs, p->n_seqs == 1 ? "" : "s", p->n_ctx, mib(p->kv_bytes_per_seq));
    if (p->expert_cache)
        LINE("  %-16s %12.1f  %d of %d experts (%.0f%%), %.2f MiB each; at least %d (one layer's"
             " top-k)%s%s\n", "expert cache", mib(p->cache_bytes), p->n_slots, p->all_slots,
             p->all_slots ? 100.0 * p->n_slots / p->all_slots : 0.0, mib(p->slot_stride), p->min_slots,
             p->cache_why[0] ? "; " : "", p->cache_why);
    else
        LINE("  %-16s %12.1f  every expert, mapped from the file%s%s\n", "experts",
             mib(p->expert_bytes), p->cache_why[0] ? ": " : "", p->cache_why);
    if (p->host_bytes)
        LINE("  %-16s %12.1f  host-RAM tier below the expert cache\n", "host tier", mib(p->host_bytes));
    if (p->staging_bytes)
        LINE("  %-16s %12.1f  the expert store's read buffers (host memory)\n", "read buffers",
             mib(p->staging_bytes));
    LINE("  %-16s %12.1f  activations and scratch for %d tokens per step\n", "workspace",
         mib(p->workspace_bytes), p->n_batch);
    if (p->recurrent_bytes)
        LINE("  %-16s %12.1f  of which the delta-net layers' recurrent state of %d sequence%s\n",
             "  recurrent", mib(p->recurrent_bytes), p->n_seqs, p->n_seqs == 1 ? "" : "s");
    LINE("  %-16s %12.1f\n", "total", mib(total));
    if (p->host_budget)
        LINE("  %-16s %12.1f  %s\n", "host budget", mib(p->host_budget), p->host_why);
    if (p->device_budget)
        LINE("  %-16s %12.1f  the device's free memory less a margin\n", "device budget",
             mib(p->device_budget));
    if (p->prefetch_why[0])
        LINE("  %-16s %12s  %s\n", "prefetch", "-", p->prefetch_why);
#undef LINE
    return rc;
}
