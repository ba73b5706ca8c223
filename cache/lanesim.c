#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cache/lanesim.h"
#include "common/alloc.h"

/* The machines of issue 21. B_cpu and B_link are the figures
 * (their ratio sets where copying pays); the compute-bound rates assume a
 * quantized expert needs ~3.6 flop per weight byte per token. */
static const struct moe_lanesim_profile profiles[] = {
    { "desktop", "dual-channel DDR5 60 GB/s, PCIe 4.0 x16 25 GB/s, NVMe 7 GB/s, a 1 TB/s GPU",
      { .cpu_bps = 60e9, .cpu_tok_bps = 400e9, .link_bps = 25e9, .disk_bps = 7e9,
        .dev_bps = 0.9e12, .dev_tok_bps = 10e12, .cpu_sync_s = 20e-6 } },
    { "server", "8-channel 110 GB/s, PCIe 5.0 x16 50 GB/s, NVMe 12 GB/s, a 3 TB/s GPU",
      { .cpu_bps = 110e9, .cpu_tok_bps = 1500e9, .link_bps = 50e9, .disk_bps = 12e9,
        .dev_bps = 3e12, .dev_tok_bps = 40e12, .cpu_sync_s = 15e-6 } },
    { "egpu", "laptop DDR5 60 GB/s, eGPU over PCIe 3.0 x4 / Thunderbolt 1.1 GB/s, NVMe 3 GB/s",
      { .cpu_bps = 60e9, .cpu_tok_bps = 300e9, .link_bps = 1.1e9, .disk_bps = 3e9,
        .dev_bps = 0.9e12, .dev_tok_bps = 10e12, .cpu_sync_s = 40e-6 } },
};

#define N_PROFILES ((int)(sizeof(profiles) / sizeof(profiles[0])))

const struct moe_lanesim_profile *moe_lanesim_profiles(int *n)
{
    *n = N_PROFILES;
    return profiles;
}

const struct moe_lanesim_profile *moe_lanesim_profile_find(const char *name)
{
    for (int i = 0; i < N_PROFILES; i++)
        if (strcmp(profiles[i].name, name) == 0)
            return &profiles[i];
    return NULL;
}

static uint64_t field_u64(const char *s, const char *e, const char *key, int *found)
{
    const size_t kl = strlen(key);
    for (const char *p = s; p + kl < e; p++) {
        if ((p == s || p[-1] == ' ') && memcmp(p, key, kl) == 0) {
            uint64_t v = 0;
            const char *q = p + kl;
            for (; q < e && *q >= '0' && *q <= '9' && v < (1ull << 50); q++)
                v = v * 10 + (uint64_t)(*q - '0');
            *found = q > p + kl;
            return v;
        }
    }
    *found = 0;
    return 0;
}

int moe_lanesim_read_bytes(const char *text, size_t len, int n_layer, uint64_t *expert_bytes,
                           uint64_t *dense_bytes)
{
    int n = 0;
    const char *p = text, *end = text + len;
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        const char *le = eol ? eol : end;
        const char *s = p;
        p = eol ? eol + 1 : end;
        if (s == le || *s != '#')
            continue;
        int f_l, f_e, f_d;
        const uint64_t l = field_u64(s, le, "layer=", &f_l);
        const uint64_t eb = field_u64(s, le, "expert_bytes=", &f_e);
        const uint64_t db = field_u64(s, le, "dense_bytes=", &f_d);
        if (!f_l || l >= (uint64_t)n_layer)
            continue;
        if (f_e && eb > 0)
            expert_bytes[l] = eb;
        if (f_d && dense_bytes)
            dense_bytes[l] = db;
        n += f_e && eb > 0;
    }
    return n;
}

struct lsim {
    const struct moe_trace *t;
    const struct moe_lanesim_opts *o;
    struct moe_lanesim_result *r;
    struct moe_policy *p;
    int cap, n_cached;
    int32_t *slot_of;          /* [key] slot or -1 */
    int32_t *keys;             /* [slot] */
    double *ready_at;          /* [slot] upload arrival */
    int32_t *cand, *cand_slot;
    int64_t *used_stamp;       /* [key] the layer step that last used it */
    /* host tier (LRU) when it does not hold everything */
    uint8_t *host_in;          /* [key] */
    int64_t *host_stamp;       /* [key] last use */
    int host_n;
    int64_t clock;             /* access counter for the policy and the host LRU */
};

static double roof(double bytes, double token_bytes, double bps, double tok_bps)
{
    const double a = bytes / bps, b = token_bytes / tok_bps;
    return a > b ? a : b;
}

/* Inserts key for layer at time tr; the slot, or -1 when every slot is in
 * use by this step or in flight (the expert is then used once, not kept). */
static int lsim_insert(struct lsim *s, int32_t key, int layer, int32_t step, int64_t step_id, double tr,
                       double ready)
{
    int slot;
    if (s->n_cached < s->cap) {
        slot = s->n_cached++;
    } else {
        int n = 0;
        for (int i = 0; i < s->cap; i++)
            if (s->used_stamp[s->keys[i]] != step_id && s->ready_at[i] <= tr) {
                s->cand[n] = s->keys[i];
                s->cand_slot[n++] = i;
            }
        if (n == 0)
            return -1;
        slot = s->cand_slot[moe_policy_victim(s->p, s->cand, n, layer, step)];
        s->slot_of[s->keys[slot]] = -1;
    }
    s->keys[slot] = key;
    s->slot_of[key] = slot;
    s->ready_at[slot] = ready;
    return slot;
}

static void host_use(struct lsim *s, int32_t key)
{
    s->host_stamp[key] = s->clock;
    if (s->host_in[key])
        return;
    const int64_t nk = (int64_t)s->t->n_layer * s->t->n_expert;
    if (s->host_n >= s->o->host_capacity) {
        int64_t victim = -1;
        for (int64_t k = 0; k < nk; k++)
            if (s->host_in[k] && k != key && (victim < 0 || s->host_stamp[k] < s->host_stamp[victim]))
                victim = k;
        if (victim >= 0) {
            s->host_in[victim] = 0;
            s->host_n--;
        }
    }
    s->host_in[key] = 1;
    s->host_n++;
}

static int cmp_count_desc(const void *a, const void *b, void *ctx)
{
    const int64_t *cnt = ctx;
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    if (cnt[x] != cnt[y])
        return cnt[x] > cnt[y] ? -1 : 1;
    return x < y ? -1 : x > y;
}

int moe_lanesim_run(const struct moe_trace *t, const struct moe_lanesim_opts *o,
                    struct moe_lanesim_result *r)
{
    memset(r, 0, sizeof(*r));
    if (o->capacity < 1 || o->policy == MOE_POLICY_BELADY || (unsigned)o->policy >= MOE_POLICY_COUNT ||
        (unsigned)o->mode >= MOE_MISS_LANE_COUNT || o->expert_bytes == NULL || t->n_layer < 1 ||
        t->n_expert < 1 || !(o->hw.cpu_bps > 0 && o->hw.cpu_tok_bps > 0 && o->hw.link_bps > 0 &&
                             o->hw.disk_bps > 0 && o->hw.dev_bps > 0 && o->hw.dev_tok_bps > 0 &&
                             o->hw.cpu_sync_s >= 0))
        return -EINVAL;
    for (int l = 0; l < t->n_layer; l++)
        if (o->expert_bytes[l] == 0)
            return -EINVAL;
    const int64_t nk = (int64_t)t->n_layer * t->n_expert;
    const int E = t->n_expert;
    const struct moe_lane_rates *hw = &o->hw;
    const bool host_all = o->host_capacity <= 0 || o->host_capacity >= nk;
    struct lsim s = { .t = t, .o = o, .r = r, .cap = o->capacity };
    struct moe_lane_state st;
    struct moe_lane_reuse ru = { 0 };
    int32_t *ids = NULL, *order = NULL;
    int *cnt = NULL;
    int64_t *uses = NULL;
    struct moe_lane_miss *m = NULL;
    uint8_t *choice = NULL;
    double *avail = NULL;
    int rc = -ENOMEM;
    s.slot_of = moe_malloc((size_t)nk * sizeof(int32_t));
    s.keys = moe_malloc((size_t)s.cap * sizeof(int32_t));
    s.ready_at = moe_malloc((size_t)s.cap * sizeof(double));
    s.cand = moe_malloc((size_t)s.cap * sizeof(int32_t));
    s.cand_slot = moe_malloc((size_t)s.cap * sizeof(int32_t));
    s.used_stamp = moe_malloc((size_t)nk * sizeof(int64_t));
    s.host_in = moe_calloc((size_t)nk, 1);
    s.host_stamp = moe_calloc((size_t)nk, sizeof(int64_t));
    ids = moe_malloc((size_t)E * sizeof(int32_t));
    cnt = moe_calloc((size_t)E, sizeof(int));
    uses = moe_calloc((size_t)nk, sizeof(int64_t));
    order = moe_malloc((size_t)nk * sizeof(int32_t));
    m = moe_malloc((size_t)E * sizeof(*m));
    choice = moe_malloc((size_t)E);
    avail = moe_malloc((size_t)E * sizeof(double));
    if (!s.slot_of || !s.keys || !s.ready_at || !s.cand || !s.cand_slot || !s.used_stamp || !s.host_in ||
        !s.host_stamp || !ids || !cnt || !uses || !order || !m || !choice || !avail)
        goto out;
    if ((s.p = moe_policy_create(o->policy, t->n_layer, E, o->params)) == NULL)
        goto out;
    const int K = t->n_expert_used > 0 ? t->n_expert_used : 1;
    if ((rc = moe_lane_reuse_init(&ru, t->n_layer, E, K < E ? K : E, s.cap)) != 0)
        goto out;
    rc = -ENOMEM;
    moe_lane_init(&st, o->mode, o->uncalibrated ? NULL : hw);
    if (o->reuse_min >= 0)
        st.reuse_min = o->reuse_min;
    if (o->bg_horizon >= 0)
        st.bg_horizon = o->bg_horizon;
    for (int64_t k = 0; k < nk; k++) {
        s.slot_of[k] = -1;
        s.used_stamp[k] = -1;
        order[k] = (int32_t)k;
    }
    for (int64_t i = 0; i < t->n; i++)
        if (t->a[i].layer >= 0 && t->a[i].layer < t->n_layer && t->a[i].expert >= 0 && t->a[i].expert < E)
            uses[(int64_t)t->a[i].layer * E + t->a[i].expert]++;
    qsort_r(order, (size_t)nk, sizeof(int32_t), cmp_count_desc, uses);
    if (o->warm)
        for (int64_t k = 0; k < nk && s.n_cached < s.cap && uses[order[k]] > 0; k++) {
            const int32_t key = order[k];
            const int slot = s.n_cached++;
            s.keys[slot] = key;
            s.slot_of[key] = slot;
            s.ready_at[slot] = 0;
            moe_policy_touch(s.p, key / E, key % E, 0);
        }
    if (o->warm) {
        /* the warm file's counts seed the reuse estimate too */
        uint32_t *u32 = moe_malloc((size_t)nk * sizeof(uint32_t));
        if (u32 == NULL)
            goto out;
        for (int64_t k = 0; k < nk; k++)
            u32[k] = uses[k] < UINT32_MAX ? (uint32_t)uses[k] : UINT32_MAX;
        moe_lane_reuse_seed(&ru, u32);
        moe_free(u32);
    }
    if (!host_all)
        for (int64_t k = 0; k < o->host_capacity; k++) {
            s.host_in[order[k]] = 1;
            s.host_n++;
        }

    double now = 0, link_free = 0, disk_free = 0, pass_start = 0;
    int prev_layer = -1, pass_tokens = 0;
    int64_t step_id = 0;
    for (int64_t i = 0; i <= t->n; step_id++) {
        const int layer = i < t->n ? t->a[i].layer : -1;
        /* a pass over the layers ends: a token step for the governor */
        if (i == t->n || layer <= prev_layer) {
            if (pass_tokens > 0) {
                const double dt = now - pass_start;
                if (pass_tokens == 1) {
                    r->decode_s += dt;
                    r->decode_tokens++;
                } else {
                    r->prefill_s += dt;
                    r->prefill_tokens += pass_tokens;
                }
                if (o->mode == MOE_MISS_LANE_AUTO && !o->no_governor)
                    moe_lane_observe_step(&st, dt, pass_tokens);
            }
            pass_start = now;
            pass_tokens = 0;
            if (i == t->n)
                break;
        }
        prev_layer = layer;
        if (layer < 0 || layer >= t->n_layer) {
            rc = -EINVAL;
            goto out;
        }
        /* the run of this layer: distinct experts, tokens per expert */
        int64_t j = i;
        int ntok = 0, nd = 0;
        int32_t last_step = INT32_MIN;
        for (; j < t->n && t->a[j].layer == layer; j++) {
            const int e = t->a[j].expert;
            if (e < 0 || e >= E) {
                rc = -EINVAL;
                goto out;
            }
            if (t->a[j].step != last_step) {
                last_step = t->a[j].step;
                ntok++;
            }
            if (cnt[e]++ == 0)
                ids[nd++] = e;
        }
        if (ntok > pass_tokens)
            pass_tokens = ntok;
        r->layer_steps++;
        const uint64_t eb = o->expert_bytes[layer];
        const double db = o->dense_bytes ? (double)o->dense_bytes[layer] : 0;
        double gpu = now + (db > 0 ? roof(db, db * ntok, hw->dev_bps, hw->dev_tok_bps) : 0);
        const double tr = gpu;
        /* hits and misses; misses first in ids[0..nm) after this */
        uint64_t hit_b = 0, hit_tb = 0;
        int nm = 0;
        for (int k = 0; k < nd; k++) {
            const int32_t key = (int32_t)(layer * E + ids[k]);
            s.used_stamp[key] = step_id;
            if (s.slot_of[key] < 0) {
                const int32_t tmp = ids[nm];
                ids[nm] = ids[k];
                ids[k] = tmp;
                nm++;
            }
        }
        for (int k = nm; k < nd; k++) {
            hit_b += eb;
            hit_tb += eb * (uint64_t)cnt[ids[k]];
        }
        r->hits += nd - nm;
        r->misses += nm;
        moe_lane_reuse_visit(&ru, layer, ids, nd, nm);
        for (int k = 0; k < nm; k++) {
            const int32_t key = (int32_t)(layer * E + ids[k]);
            m[k] = (struct moe_lane_miss){ .bytes = eb, .n_tokens = cnt[ids[k]],
                                           .in_host = host_all || s.host_in[key],
                                           .expected_reuse = moe_lane_reuse_expect(&ru, layer, ids[k]) };
        }
        const struct moe_lane_step ls = { .hit_bytes = hit_b, .hit_token_bytes = hit_tb,
                                          .link_busy_s = link_free > tr ? link_free - tr : 0,
                                          .link_busy_known = true,
                                          .evict_reuse = moe_lane_reuse_victim(&ru, layer) };
        moe_lane_decide(&st, &ls, m, nm, choice);
        int n_ins = 0;
        for (int k = 0; k < nm; k++)
            n_ins += (choice[k] & MOE_LANE_COPY) != 0;
        moe_lane_reuse_inserted(&ru, layer, n_ins);
        /* the store: misses outside the host tier, one read at a time */
        uint64_t disk_b = 0;
        for (int k = 0; k < nm; k++) {
            avail[k] = tr;
            if (!m[k].in_host) {
                disk_free = (disk_free > tr ? disk_free : tr) + (double)eb / hw->disk_bps;
                avail[k] = disk_free;
                disk_b += eb;
                r->disk_reads++;
            }
            if (!host_all)
                host_use(&s, (int32_t)(layer * E + ids[k]));
        }
        if (!host_all)
            for (int k = nm; k < nd; k++)
                s.host_stamp[layer * E + ids[k]] = s.clock;
        /* the device: hits (waiting for any in flight), then the copies */
        double dev_c = 0, link_c = 0, cpu_c = 0;
        uint64_t dev_b = 0, dev_tb = 0, link_b = 0, cpu_b = 0, cpu_tb = 0;
        for (int k = nm; k < nd; k++) {
            const int slot = s.slot_of[layer * E + ids[k]];
            const double d = moe_lane_dev_s(hw, eb, cnt[ids[k]]);
            gpu = (gpu > s.ready_at[slot] ? gpu : s.ready_at[slot]) + d;
            dev_c += d;
        }
        dev_b += hit_b;
        dev_tb += hit_tb;
        for (int k = 0; k < nm; k++) {
            if (choice[k] != MOE_LANE_COPY)
                continue;
            const double l = (double)eb / hw->link_bps;
            link_free = (link_free > avail[k] ? link_free : avail[k]) + l;
            link_c += l;
            link_b += eb;
            const double d = moe_lane_dev_s(hw, eb, cnt[ids[k]]);
            gpu = (gpu > link_free ? gpu : link_free) + d;
            dev_c += d;
            dev_b += eb;
            dev_tb += eb * (uint64_t)cnt[ids[k]];
            lsim_insert(&s, (int32_t)(layer * E + ids[k]), layer, t->a[i].step, step_id, tr, link_free);
            r->n_copy++;
        }
        /* the CPU lane, and the background uploads of its experts */
        double cpu = tr;
        bool cpu_used = false;
        for (int k = 0; k < nm; k++) {
            if (!(choice[k] & MOE_LANE_CPU))
                continue;
            if (!cpu_used) {
                cpu += hw->cpu_sync_s;
                cpu_used = true;
            }
            const double c = moe_lane_cpu_s(hw, eb, cnt[ids[k]]);
            cpu = (cpu > avail[k] ? cpu : avail[k]) + c;
            cpu_c += c;
            cpu_b += eb;
            cpu_tb += eb * (uint64_t)cnt[ids[k]];
            if (choice[k] & MOE_LANE_COPY) {
                const double l = (double)eb / hw->link_bps;
                link_free = (link_free > avail[k] ? link_free : avail[k]) + l;
                link_c += l;
                link_b += eb;
                lsim_insert(&s, (int32_t)(layer * E + ids[k]), layer, t->a[i].step, step_id, tr, link_free);
                r->n_both++;
            } else {
                r->n_cpu++;
            }
        }
        if (o->serial) {
            /* one processor plays both lanes (the CPU backend as the
             * device): nothing overlaps, uploads included */
            now = tr + (disk_free > tr && disk_b ? (double)disk_b / hw->disk_bps : 0) + dev_c + link_c + cpu_c +
                  (cpu_used ? hw->cpu_sync_s : 0);
            link_free = now;
            for (int k = 0; k < nm; k++)
                if (choice[k] & MOE_LANE_COPY) {
                    const int slot = s.slot_of[layer * E + ids[k]];
                    if (slot >= 0)
                        s.ready_at[slot] = now;
                }
            disk_free = now;
        } else {
            now = gpu > cpu ? gpu : cpu;
        }
        r->link_busy_s += link_c;
        r->cpu_busy_s += cpu_c;
        if (o->mode == MOE_MISS_LANE_AUTO) {
            moe_lane_observe_cpu(&st, cpu_b, cpu_tb, cpu_c);
            moe_lane_observe_dev(&st, dev_b, dev_tb, dev_c);
            moe_lane_observe_link(&st, link_b, link_c);
            moe_lane_observe_disk(&st, disk_b, (double)disk_b / hw->disk_bps);
            if (cpu_used)
                moe_lane_observe_sync(&st, hw->cpu_sync_s);
        }
        for (int64_t k = i; k < j; k++)
            moe_policy_access(s.p, layer, t->a[k].expert, s.clock++, t->a[k].step);
        for (int k = 0; k < nd; k++)
            cnt[ids[k]] = 0;
        i = j;
    }
    r->total_s = now;
    for (int a = 0; a < MOE_MISS_LANE_COUNT; a++)
        r->gov_steps[a] = st.gov.steps[a];
    rc = 0;
out:
    moe_policy_free(s.p);
    moe_lane_reuse_free(&ru);
    moe_free(s.slot_of);
    moe_free(s.keys);
    moe_free(s.ready_at);
    moe_free(s.cand);
    moe_free(s.cand_slot);
    moe_free(s.used_stamp);
    moe_free(s.host_in);
    moe_free(s.host_stamp);
    moe_free(ids);
    moe_free(cnt);
    moe_free(uses);
    moe_free(order);
    moe_free(m);
    moe_free(choice);
    moe_free(avail);
    return rc;
}
