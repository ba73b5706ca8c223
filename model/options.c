#include "model/options.h"

#include <errno.h>
#include <stddef.h>

#include "cache/lane.h"
#include "cache/policy.h"
#include "common/log.h"

#define OFF(f) offsetof(struct moe_model_opts, f)

static const struct moe_opt_choice policies[] = {
    { "lru", MOE_POLICY_LRU }, { "lfu", MOE_POLICY_LFU }, { "layer", MOE_POLICY_LAYER },
    { "predict", MOE_POLICY_PREDICT }, { NULL, 0 },
};
static const struct moe_opt_choice prefetches[] = {
    { "none", MOE_PREFETCH_NONE }, { "gate", MOE_PREFETCH_GATE },
    { "history", MOE_PREFETCH_HISTORY }, { "auto", MOE_PREFETCH_AUTO }, { NULL, 0 },
};
static const struct moe_opt_choice miss_lanes[] = {
    { "auto", MOE_MISS_LANE_AUTO }, { "copy", MOE_MISS_LANE_COPY }, { "cpu", MOE_MISS_LANE_CPU },
    { NULL, 0 },
};
static const struct moe_opt_choice backends[] = {
    { "cpu", MOE_BACKEND_CPU }, { "cuda", MOE_BACKEND_CUDA }, { NULL, 0 },
};

/* kv_f16, the older bool, is an alias of kv_type: its spellings of true
 * and false mean f16 and f32 */
static const struct moe_opt_choice kv_types[] = {
    { "f32", MOE_KV_F32, false }, { "f16", MOE_KV_F16, false }, { "q8_0", MOE_KV_Q8_0, false },
    { "true", MOE_KV_F16, true }, { "yes", MOE_KV_F16, true }, { "on", MOE_KV_F16, true },
    { "1", MOE_KV_F16, true }, { "false", MOE_KV_F32, true }, { "no", MOE_KV_F32, true },
    { "off", MOE_KV_F32, true }, { "0", MOE_KV_F32, true }, { NULL, 0, false },
};

static const struct moe_opt table[] = {
    { "threads", NULL, MOE_OPT_INT, OFF(n_threads), 0, 0, 1024, NULL, "0", 0,
      "CPU threads for compute (0: one per physical core the process may run on, within a"
      " cgroup CPU quota)" },
    { "ctx_size", "ctx", MOE_OPT_INT, OFF(n_ctx), 0, 16, 1 << 20, NULL, "4096", 0,
      "context (prompt + output) per sequence, tokens" },
    { "batch_size", NULL, MOE_OPT_INT, OFF(n_batch), 0, 1, 8192, NULL, "512", 0,
      "tokens per engine step, all sequences together" },
    { "kv_type", "kv_f16", MOE_OPT_ENUM, OFF(kv_type), 0, 0, 0, kv_types, "f16", 0,
      "KV cache element type: f32, f16, or q8_0 (ggml's 32-value blocks; head dims a multiple"
      " of 32); kv_f16 = true|false is the older spelling of f16|f32" },
    { "kv_block", NULL, MOE_OPT_INT, OFF(kv_block), 0, 1, 4096, NULL, "16", 0,
      "tokens per block of the paged KV pool (the unit of allocation and of prefix reuse)" },
    { "kv_size", NULL, MOE_OPT_INT, OFF(kv_size), 0, 0, 1 << 30, NULL, "0", 0,
      "tokens the KV pool holds, all sequences together (0: half of max_seqs x ctx_size, at"
      " least ctx_size); a request that does not fit waits for others to end" },
    { "prefix_cache", NULL, MOE_OPT_BOOL, OFF(prefix_cache), 0, 0, 1, NULL, "true", 0,
      "reuse the KV blocks of earlier requests' identical prompt prefixes (and keep finished"
      " requests' blocks until the pool needs them)" },
    { "cache_bytes", NULL, MOE_OPT_SIZE, OFF(cache_bytes), 0, 0, (int64_t)1 << 50, NULL, "0", 0,
      "expert cache budget (e.g. 12G), slot alignment included; 0 with cache_experts 0:"
      " every expert resident (a pack: every expert cached)" },
    { "cache_experts", NULL, MOE_OPT_INT, OFF(cache_experts), 0, 0, 1 << 24, NULL, "0", 0,
      "expert cache budget in experts (instead of cache_bytes)" },
    { "cache_policy", NULL, MOE_OPT_ENUM, OFF(cache_policy), 0, 0, 0, policies, "predict", 0,
      "eviction policy of the expert cache" },
    { "host_bytes", NULL, MOE_OPT_SIZE, OFF(host_bytes), 0, 0, (int64_t)1 << 50, NULL, "0", 0,
      "host-RAM tier below the expert cache (0: none)" },
    { "prefetch", NULL, MOE_OPT_ENUM, OFF(prefetch), 0, 0, 0, prefetches, "auto", 0,
      "expert prefetch predictor (auto: gate when the expert cache cannot hold every expert,"
      " else none)" },
    { "prefetch_depth", NULL, MOE_OPT_INT, OFF(prefetch_depth), 0, 0, 8, NULL, "0", 0,
      "layers ahead the prefetcher predicts (0: 2 when prefetch is auto, else 1)" },
    { "prefetch_always", NULL, MOE_OPT_BOOL, OFF(prefetch_always), 0, 0, 1, NULL, "false", 0,
      "prefetch on every decode step (default: a governor keeps it only while it makes"
      " decoding faster)" },
    { "upload_weights", NULL, MOE_OPT_BOOL, OFF(upload_weights), 0, 0, 1, NULL, "false", 0,
      "on the cpu backend, copy the weights into backend memory and stage expert loads as on a"
      " GPU: the device data path and the hybrid lanes where there is no GPU (for tests)" },
    { "miss_lane", NULL, MOE_OPT_ENUM, OFF(miss_lane), 0, 0, 0, miss_lanes, "auto", 0,
      "where a missed expert is computed on a device backend: copy (upload it into the cache),"
      " cpu (compute it on the CPU from host memory), auto (decide per miss)" },
    { "backend", NULL, MOE_OPT_ENUM, OFF(backend), 0, 0, 0, backends, "cpu", 0,
      "compute backend (cuda: device 0; see doc/cuda.md)" },
    { "force_pread", NULL, MOE_OPT_BOOL, OFF(force_pread), 0, 0, 1, NULL, "false", 0,
      "read experts with pread instead of io_uring" },
    { "warm_start", NULL, MOE_OPT_BOOL, OFF(warm_start), 0, 0, 1, NULL, "false", 0,
      "read <model>.warm at start (pre-load the experts hottest in the last run, restore the"
      " history predictor) and write it at exit" },
    { "memory_limit", NULL, MOE_OPT_SIZE, OFF(memory_limit), 0, 0, (int64_t)1 << 50, NULL, "0", 0,
      "host memory the plan may use (0: what is available, or the cgroup's limit, less a"
      " margin); without cache_bytes/cache_experts the expert cache is sized to fit it" },
};

const struct moe_opt *moe_model_opt_table(size_t *n)
{
    *n = sizeof(table) / sizeof(table[0]);
    return table;
}

void moe_model_opts_defaults(struct moe_model_opts *o)
{
    *o = (struct moe_model_opts){ 0 };
    struct moe_diag d = { 0 };
    if (moe_opt_defaults(table, sizeof(table) / sizeof(table[0]), o, &d) != 0)
        moe_assert_fail(d.msg, __FILE__, __LINE__);   /* a default outside its own bounds */
}

int moe_model_opts_set(struct moe_model_opts *o, const char *key, const char *value,
                       struct moe_diag *d)
{
    const struct moe_opt *t = moe_opt_find(table, sizeof(table) / sizeof(table[0]), key);
    if (t == NULL)
        return moe_diag_set(d, -EINVAL, "unknown engine option '%s'", key);
    return moe_opt_set(t, o, value, d);
}

int moe_model_opts_check(const struct moe_model_opts *o, struct moe_diag *d)
{
    if (o->cache_bytes > 0 && o->cache_experts > 0)
        return moe_diag_set(d, -EINVAL, "cache_bytes and cache_experts: give one of them");
    for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); i++) {
        const struct moe_opt *t = &table[i];
        const char *p = (const char *)o + t->off;
        if (t->kind == MOE_OPT_ENUM && moe_opt_choice_name(t->choices, *(const int *)p) == NULL)
            return moe_diag_set(d, -EINVAL, "%s: value %d is not one of its choices", t->name,
                                *(const int *)p);
        /* counts: 0 (and below) means the built-in default, checked at use */
        if (t->kind == MOE_OPT_INT && *(const int *)p > t->max)
            return moe_diag_set(d, -ERANGE, "%s: %d is above its maximum %lld", t->name,
                                *(const int *)p, (long long)t->max);
        if (t->kind == MOE_OPT_SIZE && *(const uint64_t *)p > (uint64_t)t->max)
            return moe_diag_set(d, -ERANGE, "%s: %llu is above its maximum %lld", t->name,
                                (unsigned long long)*(const uint64_t *)p, (long long)t->max);
    }
    return 0;
}
