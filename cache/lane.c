#include "cache/lane.h"

#include <errno.h>
#include <string.h>

#include "common/alloc.h"

static const char *const lane_names[MOE_MISS_LANE_COUNT] = { "auto", "copy", "cpu" };

int moe_miss_lane_from_name(const char *name)
{
    for (int i = 0; i < MOE_MISS_LANE_COUNT; i++)
        if (strcmp(name, lane_names[i]) == 0)
            return i;
    return -1;
}

const char *moe_miss_lane_name(enum moe_miss_lane m)
{
    return (unsigned)m < MOE_MISS_LANE_COUNT ? lane_names[m] : "?";
}

void moe_lane_rates_default(struct moe_lane_rates *r)
{
    /* A desktop: dual-channel DDR5 streams ~50 GB/s into a batch-1 matvec,
     * and a quantized expert needs ~3.6 flop per weight byte per token, so
     * ~0.5 Tflop/s of CPU makes it compute-bound past ~3 tokens; PCIe 4.0
     * x16 moves ~25 GB/s; an NVMe ~5 GB/s; a consumer GPU ~1 TB/s and
     * ~70 Tflop/s. */
    r->cpu_bps = 50e9;
    r->cpu_tok_bps = 150e9;
    r->link_bps = 25e9;
    r->disk_bps = 5e9;
    r->dev_bps = 1e12;
    r->dev_tok_bps = 20e12;
    r->cpu_sync_s = 20e-6;
}

static double roofline(uint64_t bytes, double token_bytes, double bps, double tok_bps)
{
    const double mem = (double)bytes / bps, comp = token_bytes / tok_bps;
    return mem > comp ? mem : comp;
}

double moe_lane_cpu_s(const struct moe_lane_rates *r, uint64_t bytes, int n_tokens)
{
    return roofline(bytes, (double)bytes * (n_tokens > 1 ? n_tokens : 1), r->cpu_bps, r->cpu_tok_bps);
}

double moe_lane_dev_s(const struct moe_lane_rates *r, uint64_t bytes, int n_tokens)
{
    return roofline(bytes, (double)bytes * (n_tokens > 1 ? n_tokens : 1), r->dev_bps, r->dev_tok_bps);
}

double moe_lane_link_s(const struct moe_lane_rates *r, uint64_t bytes)
{
    return (double)bytes / r->link_bps;
}

double moe_lane_disk_s(const struct moe_lane_rates *r, uint64_t bytes)
{
    return (double)bytes / r->disk_bps;
}

void moe_lane_init(struct moe_lane_state *st, enum moe_miss_lane mode,
                   const struct moe_lane_rates *initial)
{
    memset(st, 0, sizeof(*st));
    st->mode = (unsigned)mode < MOE_MISS_LANE_COUNT ? mode : MOE_MISS_LANE_AUTO;
    moe_lane_rates_default(&st->r);
    if (initial) {
        struct moe_lane_rates *r = &st->r;
        const struct moe_lane_rates *in = initial;
        r->cpu_bps = in->cpu_bps > 0 ? in->cpu_bps : r->cpu_bps;
        r->cpu_tok_bps = in->cpu_tok_bps > 0 ? in->cpu_tok_bps : r->cpu_tok_bps;
        r->link_bps = in->link_bps > 0 ? in->link_bps : r->link_bps;
        r->disk_bps = in->disk_bps > 0 ? in->disk_bps : r->disk_bps;
        r->dev_bps = in->dev_bps > 0 ? in->dev_bps : r->dev_bps;
        r->dev_tok_bps = in->dev_tok_bps > 0 ? in->dev_tok_bps : r->dev_tok_bps;
        r->cpu_sync_s = in->cpu_sync_s >= 0 ? in->cpu_sync_s : r->cpu_sync_s;
    }
    st->ewma = 0.2;
    st->reuse_min = 1.0;
    st->bg_horizon = 0.5;
    st->evict_weight = 1.0;
    struct moe_lane_gov *g = &st->gov;
    g->arm = g->best = MOE_MISS_LANE_AUTO;
    g->phase = 0;
    /* a short first window, so that a wrong start is found early */
    g->left = 2 * MOE_LANE_GOV_PROBE;
    g->exploit_len = MOE_LANE_GOV_EXPLOIT_MIN;
}

enum moe_miss_lane moe_lane_current(const struct moe_lane_state *st)
{
    return st->mode == MOE_MISS_LANE_AUTO ? (enum moe_miss_lane)st->gov.arm : st->mode;
}

/* The per-miss rule (doc/cache.md, "Hybrid expert lanes").
 *
 * The step's time is the later of two lanes: the device, which computes
 * the hits and then each copied expert once its upload has arrived (the
 * copy stream is serial), and the CPU, which computes its misses one after
 * the other. Misses are taken in the order of how much better the copy
 * lane suits them (CPU time over copy time: many tokens, a slow CPU, a fast
 * link first) and each goes to the lane that ends the step earlier, so the
 * lanes come out balanced: at batch 1 with a slow link everything goes to
 * the CPU, in a prefill batch the copy lane takes the experts with many
 * tokens and the CPU the rest, a fraction near B_link / (B_link + B_cpu) of
 * the bytes when the tokens are spread evenly.
 *
 * A copy also buys later hits. That does not have to delay this step: an
 * expert the CPU computes can be uploaded as well, in the background, if
 * the link has time to spare. The misses left on the CPU are ranked by the
 * time their later hits would save per second of link, and uploaded while
 * the copy stream's queue stays within bg_horizon predicted step times and
 * their expected reuse is at least reuse_min (a copy also evicts an expert
 * that might have been hit). */
static void fill_fixed(struct moe_lane_state *st, enum moe_miss_lane arm, int n, uint8_t *choice)
{
    const uint8_t c = arm == MOE_MISS_LANE_COPY ? MOE_LANE_COPY : MOE_LANE_CPU;
    for (int i = 0; i < n; i++)
        choice[i] = c;
    if (arm == MOE_MISS_LANE_COPY)
        st->n_copy += (uint64_t)n;
    else
        st->n_cpu += (uint64_t)n;
}

void moe_lane_decide(struct moe_lane_state *st, const struct moe_lane_step *step,
                     const struct moe_lane_miss *m, int n, uint8_t *choice)
{
    const enum moe_miss_lane arm = moe_lane_current(st);
    st->n_decide++;
    if (n <= 0)
        return;
    if (st->mode != MOE_MISS_LANE_AUTO) {
        fill_fixed(st, arm, n, choice);
        return;
    }
    const struct moe_lane_rates *r = &st->r;
    double gpu = 0, link, cpu = 0;
    if (step)
        gpu = roofline(step->hit_bytes, (double)step->hit_token_bytes, r->dev_bps, r->dev_tok_bps);
    if (step && step->link_busy_known)
        link = step->link_busy_s > 0 ? step->link_busy_s : 0;
    else
        link = st->link_pending_s > st->last_step_s ? st->link_pending_s - st->last_step_s : 0;
    const double gpu0 = gpu, link0 = link;
    const double evict = step && step->evict_reuse > 0 ? st->evict_weight * step->evict_reuse : 0;

    /* the order: copy suitability, descending; chunks of MAX for large n */
    enum { MAX = 512 };
    for (int base = 0; base < n; base += MAX) {
        const int k = n - base < MAX ? n - base : MAX;
        int idx[MAX];
        double key[MAX];
        for (int j = 0; j < k; j++) {
            const struct moe_lane_miss *x = &m[base + j];
            const double extra = x->in_host ? 0 : moe_lane_disk_s(r, x->bytes);
            const double c = moe_lane_cpu_s(r, x->bytes, x->n_tokens) + extra;
            const double g = moe_lane_link_s(r, x->bytes) + extra + moe_lane_dev_s(r, x->bytes, x->n_tokens);
            key[j] = g > 0 ? c / g : 1e30;
            int p = j;
            while (p > 0 && key[idx[p - 1]] < key[j]) {
                idx[p] = idx[p - 1];
                p--;
            }
            idx[p] = j;
        }
        for (int j = 0; j < k; j++) {
            const int i = base + idx[j];
            const struct moe_lane_miss *x = &m[i];
            const double extra = x->in_host ? 0 : moe_lane_disk_s(r, x->bytes);
            const double c = moe_lane_cpu_s(r, x->bytes, x->n_tokens) + extra;
            const double l = moe_lane_link_s(r, x->bytes) + extra;
            const double d = moe_lane_dev_s(r, x->bytes, x->n_tokens);
            const double l1 = link + l;
            const double g1 = (gpu > l1 ? gpu : l1) + d;
            /* a copy takes a slot: evicting a more useful expert costs its
             * future misses, charged here (a gain needs no sync copy: the
             * background upload below gets it too) */
            const double net = (x->expected_reuse - evict) *
                               (moe_lane_cpu_s(r, x->bytes, 1) - moe_lane_dev_s(r, x->bytes, 1));
            const double t_copy = (g1 > cpu ? g1 : cpu) + (net < 0 ? -net : 0);
            const double c1 = cpu + c + (cpu == 0 ? r->cpu_sync_s : 0);
            const double t_cpu = c1 > gpu ? c1 : gpu;
            if (t_copy < t_cpu) {
                choice[i] = MOE_LANE_COPY;
                link = l1;
                gpu = g1;
            } else {
                choice[i] = MOE_LANE_CPU;
                cpu = c1;
            }
        }
    }
    const double t_step = gpu > cpu ? gpu : cpu;

    /* background uploads of CPU-lane misses, best saving per link second
     * first; a quadratic pass is fine for the few misses of a step */
    const double token = st->token_s > 0 ? st->token_s : 32 * t_step;
    const double limit = t_step > st->bg_horizon * token ? t_step : st->bg_horizon * token;
    for (;;) {
        int best = -1;
        double best_v = 0;
        for (int i = 0; i < n; i++) {
            const struct moe_lane_miss *x = &m[i];
            if (choice[i] != MOE_LANE_CPU || x->expected_reuse < evict + st->reuse_min)
                continue;
            const double c1 = moe_lane_cpu_s(r, x->bytes, 1), d1 = moe_lane_dev_s(r, x->bytes, 1);
            const double l = moe_lane_link_s(r, x->bytes) + (x->in_host ? 0 : moe_lane_disk_s(r, x->bytes));
            const double v = (x->expected_reuse - evict) * (c1 - d1) / (l > 0 ? l : 1e-12);
            if (v > best_v) {
                best_v = v;
                best = i;
            }
        }
        if (best < 0)
            break;
        const struct moe_lane_miss *x = &m[best];
        const double l = moe_lane_link_s(r, x->bytes) + (x->in_host ? 0 : moe_lane_disk_s(r, x->bytes));
        if (link + l > limit)
            break;
        link += l;
        choice[best] = MOE_LANE_COPY | MOE_LANE_CPU;
    }

    /* what the fixed modes would take for the same misses, for the
     * governor's choice of which of them are worth probing */
    double cpu_all = r->cpu_sync_s, g_all = gpu0, l_all = link0;
    for (int i = 0; i < n; i++) {
        const double extra = m[i].in_host ? 0 : moe_lane_disk_s(r, m[i].bytes);
        cpu_all += moe_lane_cpu_s(r, m[i].bytes, m[i].n_tokens) + extra;
        l_all += moe_lane_link_s(r, m[i].bytes) + extra;
        g_all = (g_all > l_all ? g_all : l_all) + moe_lane_dev_s(r, m[i].bytes, m[i].n_tokens);
    }
    st->gov.pred[MOE_MISS_LANE_AUTO] += t_step;
    st->gov.pred[MOE_MISS_LANE_COPY] += g_all;
    st->gov.pred[MOE_MISS_LANE_CPU] += cpu_all > gpu0 ? cpu_all : gpu0;

    if (arm != MOE_MISS_LANE_AUTO) {
        fill_fixed(st, arm, n, choice);
        st->link_pending_s = arm == MOE_MISS_LANE_COPY ? l_all : link0;
        st->last_step_s = arm == MOE_MISS_LANE_COPY ? g_all : (cpu_all > gpu0 ? cpu_all : gpu0);
        return;
    }
    for (int i = 0; i < n; i++) {
        if (choice[i] == MOE_LANE_COPY)
            st->n_copy++;
        else if (choice[i] == MOE_LANE_CPU)
            st->n_cpu++;
        else
            st->n_both++;
    }
    st->link_pending_s = link;
    st->last_step_s = t_step;
}

static void ewma(double *rate, double x, double w)
{
    *rate = (1 - w) * *rate + w * x;
}

/* Which roof bound the observed work decides which rate it measures. */
static void observe_roof(double *bps, double *tok_bps, double w, uint64_t bytes,
                         uint64_t token_bytes, double seconds)
{
    if (bytes == 0 || !(seconds > 0))
        return;
    const double mem = (double)bytes / *bps, comp = (double)token_bytes / *tok_bps;
    if (mem >= comp)
        ewma(bps, (double)bytes / seconds, w);
    else
        ewma(tok_bps, (double)token_bytes / seconds, w);
}

void moe_lane_observe_cpu(struct moe_lane_state *st, uint64_t bytes, uint64_t token_bytes,
                          double seconds)
{
    observe_roof(&st->r.cpu_bps, &st->r.cpu_tok_bps, st->ewma, bytes, token_bytes, seconds);
}

void moe_lane_observe_dev(struct moe_lane_state *st, uint64_t bytes, uint64_t token_bytes,
                          double seconds)
{
    observe_roof(&st->r.dev_bps, &st->r.dev_tok_bps, st->ewma, bytes, token_bytes, seconds);
}

void moe_lane_observe_link(struct moe_lane_state *st, uint64_t bytes, double seconds)
{
    if (bytes && seconds > 0)
        ewma(&st->r.link_bps, (double)bytes / seconds, st->ewma);
}

void moe_lane_observe_disk(struct moe_lane_state *st, uint64_t bytes, double seconds)
{
    if (bytes && seconds > 0)
        ewma(&st->r.disk_bps, (double)bytes / seconds, st->ewma);
}

void moe_lane_observe_sync(struct moe_lane_state *st, double seconds)
{
    if (seconds >= 0)
        ewma(&st->r.cpu_sync_s, seconds, st->ewma);
}

static double gov_mean(const struct moe_lane_gov *g, int arm)
{
    return g->n[arm] ? g->sum[arm] / g->n[arm] : 1e300;
}

/* phase p in 1..3 probes arm probe_arm[p] */
static const int probe_arm[4] = { -1, MOE_MISS_LANE_COPY, MOE_MISS_LANE_CPU, MOE_MISS_LANE_AUTO };

/* the next probe phase, passing over the arms the model rules out */
static void gov_next_probe(struct moe_lane_gov *g)
{
    do
        g->phase++;
    while (g->phase < 3 && g->skip[probe_arm[g->phase]]);
    g->arm = probe_arm[g->phase];
    g->left = MOE_LANE_GOV_PROBE;
}

void moe_lane_observe_step(struct moe_lane_state *st, double seconds, int n_tokens)
{
    struct moe_lane_gov *g = &st->gov;
    if (n_tokens == 1 && seconds >= 0)
        st->token_s = st->token_s > 0 ? (1 - st->ewma) * st->token_s + st->ewma * seconds : seconds;
    if (st->mode != MOE_MISS_LANE_AUTO) {
        if (n_tokens == 1)
            g->steps[st->mode]++;
        return;
    }
    if (n_tokens != 1 || !(seconds >= 0))
        return;
    g->steps[g->arm]++;
    if (g->phase == 0) {
        g->ex_sum += seconds;
        g->ex_n++;
        if (--g->left > 0)
            return;
        g->ref_s = g->ex_sum / g->ex_n;
        for (int a = 0; a < MOE_MISS_LANE_COUNT; a++) {
            g->sum[a] = 0;
            g->n[a] = 0;
            g->skip[a] = a != MOE_MISS_LANE_AUTO && g->pred[MOE_MISS_LANE_AUTO] > 0 &&
                         g->pred[a] > MOE_LANE_GOV_SKIP * g->pred[MOE_MISS_LANE_AUTO];
            g->probes_skipped += g->skip[a];
        }
        g->phase = 0;
        gov_next_probe(g);
        return;
    }
    const int a = probe_arm[g->phase];
    g->sum[a] += seconds;
    g->n[a]++;
    g->left--;
    /* a fixed mode far slower than what ran before is not worth a full probe */
    if (a != MOE_MISS_LANE_AUTO && g->n[a] >= MOE_LANE_GOV_EARLY && gov_mean(g, a) > 1.25 * g->ref_s)
        g->left = 0;
    if (g->left > 0)
        return;
    if (g->phase < 3) {
        gov_next_probe(g);
        return;
    }
    int best = MOE_MISS_LANE_AUTO;
    const double t_auto = gov_mean(g, MOE_MISS_LANE_AUTO);
    for (int f = MOE_MISS_LANE_COPY; f <= MOE_MISS_LANE_CPU; f++)
        if (gov_mean(g, f) < (1 - MOE_LANE_GOV_MARGIN) * t_auto && gov_mean(g, f) < gov_mean(g, best))
            best = f;
    /* the same winner again: probe half as often */
    if (best == g->best)
        g->exploit_len = g->exploit_len * 2 < MOE_LANE_GOV_EXPLOIT_MAX ? g->exploit_len * 2
                                                                        : MOE_LANE_GOV_EXPLOIT_MAX;
    else
        g->exploit_len = MOE_LANE_GOV_EXPLOIT_MIN;
    if (best != MOE_MISS_LANE_AUTO)
        g->switches++;
    g->best = best;
    g->arm = best;
    g->phase = 0;
    g->left = g->exploit_len;
    g->ex_sum = 0;
    g->ex_n = 0;
    for (int k = 0; k < MOE_MISS_LANE_COUNT; k++)
        g->pred[k] = 0;
}

int moe_lane_reuse_init(struct moe_lane_reuse *ru, int n_layer, int n_expert, int n_used,
                        int n_slots)
{
    memset(ru, 0, sizeof(*ru));
    if (n_layer < 1 || n_expert < 1 || n_used < 1 || n_slots < 1)
        return -EINVAL;
    const size_t nk = (size_t)n_layer * (size_t)n_expert;
    ru->p = moe_malloc(nk * sizeof(float));
    ru->ins = moe_malloc((size_t)n_layer * sizeof(float));
    ru->victim_p = moe_malloc((size_t)n_layer * sizeof(float));
    ru->recent = moe_calloc(nk, 1);
    ru->ins_prev = moe_calloc((size_t)n_layer, sizeof(float));
    ru->batch = moe_calloc((size_t)n_layer, 1);
    if (ru->p == NULL || ru->ins == NULL || ru->victim_p == NULL || ru->recent == NULL ||
        ru->ins_prev == NULL || ru->batch == NULL) {
        moe_lane_reuse_free(ru);
        return -ENOMEM;
    }
    ru->n_layer = n_layer;
    ru->n_expert = n_expert;
    ru->n_slots = n_slots;
    ru->n_used = n_used;
    const float prior = n_used < n_expert ? (float)n_used / (float)n_expert : 1.0f;
    for (size_t i = 0; i < nk; i++)
        ru->p[i] = prior;
    for (int l = 0; l < n_layer; l++) {
        ru->ins[l] = (float)n_used * (1.0f - prior);
        ru->victim_p[l] = n_slots / n_layer >= n_expert ? 0.0f : prior;
    }
    return 0;
}

void moe_lane_reuse_free(struct moe_lane_reuse *ru)
{
    if (ru == NULL)
        return;
    moe_free(ru->p);
    moe_free(ru->ins);
    moe_free(ru->victim_p);
    moe_free(ru->recent);
    moe_free(ru->ins_prev);
    moe_free(ru->batch);
    ru->batch = NULL;
    ru->recent = NULL;
    ru->ins_prev = NULL;
    ru->p = NULL;
    ru->ins = NULL;
    ru->victim_p = NULL;
}

void moe_lane_reuse_visit(struct moe_lane_reuse *ru, int layer, const int32_t *experts, int n,
                          int n_inserted)
{
    if (layer < 0 || layer >= ru->n_layer)
        return;
    const float a = (float)MOE_LANE_REUSE_ALPHA;
    float *p = ru->p + (size_t)layer * (size_t)ru->n_expert;
    uint8_t *rec = ru->recent + (size_t)layer * (size_t)ru->n_expert;
    for (int e = 0; e < ru->n_expert; e++) {
        p[e] *= 1.0f - a;
        rec[e] = 0;
    }
    for (int i = 0; i < n; i++)
        if (experts[i] >= 0 && experts[i] < ru->n_expert && !rec[experts[i]]) {
            p[experts[i]] += a;
            rec[experts[i]] = 1;
        }
    /* the stay is counted in single-token visits (decode): a prefill
     * batch inserts many experts at once, but the visits that will hit
     * them are the decode steps after it */
    ru->ins_prev[layer] = ru->ins[layer];
    ru->batch[layer] = n > ru->n_used;
    if (!ru->batch[layer])
        ru->ins[layer] = 0.9f * ru->ins[layer] + 0.1f * (float)(n_inserted > 0 ? n_inserted : 0);
    /* the marginal expert: the largest x with at least `per` experts at
     * p >= x, by bisection (no sort, no allocation) */
    const int per = ru->n_slots / ru->n_layer;
    if (per >= ru->n_expert) {
        ru->victim_p[layer] = 0;
        return;
    }
    float lo = 0, hi = 1;
    for (int it = 0; it < 24; it++) {
        const float mid = 0.5f * (lo + hi);
        int c = 0;
        for (int e = 0; e < ru->n_expert; e++)
            c += p[e] >= mid;
        if (c >= (per > 0 ? per : 1))
            lo = mid;
        else
            hi = mid;
    }
    ru->victim_p[layer] = lo;
}

void moe_lane_reuse_seed(struct moe_lane_reuse *ru, const uint32_t *uses)
{
    for (int l = 0; l < ru->n_layer; l++) {
        const uint32_t *u = uses + (size_t)l * (size_t)ru->n_expert;
        double tot = 0;
        for (int e = 0; e < ru->n_expert; e++)
            tot += u[e];
        /* tokens through the layer: each routes to n_used experts */
        const double visits = tot / ru->n_used;
        if (visits < 1)
            continue;
        float *p = ru->p + (size_t)l * (size_t)ru->n_expert;
        for (int e = 0; e < ru->n_expert; e++)
            p[e] = (float)(u[e] / visits < 1 ? u[e] / visits : 1);
    }
}

void moe_lane_reuse_inserted(struct moe_lane_reuse *ru, int layer, int n_inserted)
{
    if (layer >= 0 && layer < ru->n_layer && !ru->batch[layer])
        ru->ins[layer] = 0.9f * ru->ins_prev[layer] + 0.1f * (float)(n_inserted > 0 ? n_inserted : 0);
}

static double reuse_of(const struct moe_lane_reuse *ru, int layer, double p)
{
    const double per_layer = (double)ru->n_slots / ru->n_layer;
    const double ins = ru->ins[layer] > 1e-3f ? ru->ins[layer] : 1e-3;
    const double e = p * per_layer / ins;
    return e < MOE_LANE_REUSE_CAP ? e : MOE_LANE_REUSE_CAP;
}

double moe_lane_reuse_victim(const struct moe_lane_reuse *ru, int layer)
{
    if (layer < 0 || layer >= ru->n_layer)
        return 0;
    return reuse_of(ru, layer, ru->victim_p[layer]);
}

double moe_lane_reuse_expect(const struct moe_lane_reuse *ru, int layer, int expert)
{
    if (layer < 0 || layer >= ru->n_layer || expert < 0 || expert >= ru->n_expert)
        return 0;
    const size_t k = (size_t)layer * (size_t)ru->n_expert + (size_t)expert;
    /* the recency bonus lasts about one visit, not the whole stay */
    const double e = reuse_of(ru, layer, ru->p[k]) + (ru->recent[k] ? MOE_LANE_REUSE_RECENT : 0.0);
    return e < MOE_LANE_REUSE_CAP ? e : MOE_LANE_REUSE_CAP;
}
