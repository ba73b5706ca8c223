/* Hybrid expert lanes: for each expert that a layer step misses in the
 * device's expert cache, whether to copy it to the device (the copy lane),
 * compute it on the CPU from host memory (the CPU lane), or both (compute
 * it now on the CPU and upload it in the background for later hits).
 *
 * At batch 1 computing a missed expert of S bytes on the CPU costs about
 * S / B_cpu (memory-bound); copying costs S / B_link, after which its later
 * hits are nearly free. Which wins depends on the machine (a desktop with
 * DDR5 and PCIe 4.0, a server, an eGPU over PCIe 3.0 x4 differ by 40x in
 * B_link / B_cpu), on the tokens routed to the expert in this step (a
 * prefill batch makes the CPU compute-bound while the device's GEMM
 * amortises) and on how often the expert will be hit again before it is
 * evicted. So the rates are measured online, kept as EWMAs, and a governor
 * checks end to end that the per-miss rule is not slower than the fixed
 * modes (doc/cache.md, "Hybrid expert lanes").
 *
 * How the engine calls it (one struct moe_lane_state per model, owned by
 * the engine thread, plain data, no allocation, not thread-safe):
 *
 *   at load     moe_lane_init(&st, mode, NULL or measured rates);
 *               optionally moe_lane_reuse_init(&ru, n_layer, n_expert,
 *               n_slots) for the expected-reuse estimate.
 *   each layer step, after routing, before the experts are computed:
 *               moe_lane_reuse_visit(&ru, layer, ids, n_ids, n_misses)
 *               (all experts routed at this layer in the step), then for
 *               the n misses fill struct moe_lane_miss (bytes, tokens routed
 *               to it in the step, in the host tier or not, expected reuse =
 *               moe_lane_reuse_expect(&ru, layer, expert)), fill
 *               struct moe_lane_step with the hits' work, and call
 *               moe_lane_decide(&st, &step, m, n, choice). choice[i] has
 *               MOE_LANE_COPY and/or MOE_LANE_CPU set, never neither:
 *                 COPY       upload, the device computes it (this step waits)
 *                 CPU        the CPU lane computes it; not inserted
 *                 COPY|CPU   the CPU lane computes it now, and the upload is
 *                            queued behind the step's copies; the expert
 *                            becomes a hit once it has arrived
 *               and moe_lane_reuse_inserted(&ru, layer, copies made).
 *               step.evict_reuse = moe_lane_reuse_victim(&ru, layer).
 *   after the step, the measurements, each optional (rates not observed
 *   keep their initial values):
 *               moe_lane_observe_cpu(&st, bytes, token_bytes, seconds)
 *               moe_lane_observe_link(&st, bytes, seconds)
 *               moe_lane_observe_disk(&st, bytes, seconds)
 *               moe_lane_observe_dev(&st, bytes, token_bytes, seconds)
 *               moe_lane_observe_sync(&st, seconds)  (a CPU-lane round trip
 *               less its compute, when the engine can time it)
 *   after each token step (the governor's clock; only steps of one token,
 *   decode, are compared, longer ones just run in the current mode):
 *               moe_lane_observe_step(&st, seconds, n_tokens)
 *
 * `bytes` are weight bytes of the experts computed or moved; `token_bytes`
 * is the sum over those experts of bytes x tokens routed to it (the
 * compute-bound work). Rates are bytes per second; a measurement of zero
 * bytes or a non-positive time is ignored.
 */
#ifndef MOE_CACHE_LANE_H
#define MOE_CACHE_LANE_H

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The `miss_lane` setting. */
enum moe_miss_lane {
    MOE_MISS_LANE_AUTO,
    MOE_MISS_LANE_COPY,     /* every miss uploaded, computed on the device */
    MOE_MISS_LANE_CPU,      /* every miss computed on the CPU, never uploaded */
};

#define MOE_MISS_LANE_COUNT 3

/* "auto", "copy", "cpu"; -1 if unknown. */
int moe_miss_lane_from_name(const char *name);
const char *moe_miss_lane_name(enum moe_miss_lane m);

/* Bits of a decision. */
enum { MOE_LANE_COPY = 1, MOE_LANE_CPU = 2 };

/* Throughputs in bytes per second. Costs are rooflines: an expert of S
 * bytes with n tokens takes max(S / *_bps, n S / *_tok_bps). */
struct moe_lane_rates {
    double cpu_bps;       /* CPU lane, weight bytes/s at one token (memory-bound) */
    double cpu_tok_bps;   /* CPU lane, weight bytes x tokens / s (compute-bound) */
    double link_bps;      /* host -> device copy */
    double disk_bps;      /* expert store -> host memory */
    double dev_bps;       /* device expert compute, weight bytes/s at one token */
    double dev_tok_bps;   /* device, weight bytes x tokens / s */
    double cpu_sync_s;    /* seconds (not a rate): the fixed cost of a step that uses the
                           * CPU lane, the hidden states to the host and its results back */
};

/* Throughputs in bytes per second and the sync latency. Rates a fresh state assumes before anything is measured: a desktop (DDR5,
 * PCIe 4.0 x16, NVMe, a GPU with ~1 TB/s), so that the first steps make a
 * plausible choice; the EWMAs replace them within a few steps. */
void moe_lane_rates_default(struct moe_lane_rates *r);

/* Seconds for one expert of `bytes` with `n_tokens` tokens. */
double moe_lane_cpu_s(const struct moe_lane_rates *r, uint64_t bytes, int n_tokens);
double moe_lane_dev_s(const struct moe_lane_rates *r, uint64_t bytes, int n_tokens);
double moe_lane_link_s(const struct moe_lane_rates *r, uint64_t bytes);
double moe_lane_disk_s(const struct moe_lane_rates *r, uint64_t bytes);

struct moe_lane_miss {
    uint64_t bytes;          /* the expert's weight bytes */
    int n_tokens;            /* tokens routed to it in this step, >= 1 */
    bool in_host;            /* in host memory; else read from the store first */
    double expected_reuse;   /* hits expected before eviction if it were cached */
};

/* The step's other work, for balancing the lanes (zeros are fine). */
struct moe_lane_step {
    uint64_t hit_bytes;        /* weight bytes of the experts the device computes from its cache */
    uint64_t hit_token_bytes;  /* sum over those of bytes x tokens */
    /* Seconds of uploads still queued on the copy stream when the step's
     * misses are known, if the engine knows it (link_busy_known); else
     * the state's own prediction from its earlier decisions is used. */
    double link_busy_s;
    bool link_busy_known;
    /* Expected reuse of what a copy would evict (moe_lane_reuse_victim),
     * 0 when unknown: a copy of an expert less useful than that one is
     * not worth a slot. */
    double evict_reuse;
};

/* The governor (auto only): arms are AUTO, COPY and CPU. It runs the
 * current arm for `left` decode steps of its phase, then probes the other
 * arms MOE_LANE_GOV_PROBE steps each (a probe more than 25% slower than the
 * reference after MOE_LANE_GOV_EARLY steps stops early), then re-measures
 * auto and exploits the fastest; auto is kept unless a fixed mode is faster
 * by MOE_LANE_GOV_MARGIN. While the same arm keeps winning the window
 * doubles up to MOE_LANE_GOV_EXPLOIT_MAX, so probing costs less than 1% of
 * steps once settled. A fixed mode that the cost model, with the measured
 * rates, predicts MOE_LANE_GOV_SKIP times slower than the rule's choices
 * over the exploit window (the MoE part of the steps) is not probed: on an
 * eGPU a copy-only probe would cost several steps' time for nothing. */
enum {
    MOE_LANE_GOV_PROBE = 8,
    MOE_LANE_GOV_EARLY = 3,
    MOE_LANE_GOV_EXPLOIT_MIN = 64,
    MOE_LANE_GOV_EXPLOIT_MAX = 1024,
};
#define MOE_LANE_GOV_MARGIN 0.02
#define MOE_LANE_GOV_SKIP 1.5

struct moe_lane_gov {
    int arm;                 /* enum moe_miss_lane running now */
    int best;                /* the arm exploited */
    int phase;               /* 0: exploit, 1: probe copy, 2: probe cpu, 3: probe auto */
    int left;                /* decode steps left in the phase */
    int exploit_len;
    double sum[MOE_MISS_LANE_COUNT];   /* seconds of the latest probe of each arm */
    int n[MOE_MISS_LANE_COUNT];
    double ref_s;            /* mean step time of the arm exploited, in its window */
    double ex_sum;
    int ex_n;
    uint64_t steps[MOE_MISS_LANE_COUNT];  /* decode steps run in each arm */
    uint64_t switches;       /* exploit phases that chose a fixed mode */
    double pred[MOE_MISS_LANE_COUNT];  /* predicted seconds of each arm over the window */
    bool skip[MOE_MISS_LANE_COUNT];    /* not probed this round */
    uint64_t probes_skipped;
};

struct moe_lane_state {
    enum moe_miss_lane mode;           /* configured */
    struct moe_lane_rates r;           /* current estimates (EWMA) */
    double ewma;                       /* weight of a new measurement, default 0.2 */
    double reuse_min;                  /* background copy only when the expected reuse beats the
                                        * evicted one's by this much */
    double bg_horizon;                 /* background copies may keep the link busy this fraction
                                        * of a decode token step ahead */
    double token_s;                    /* decode token step, EWMA of moe_lane_observe_step */
    double evict_weight;               /* the evicted expert's reuse counts this many times */
    double link_pending_s;             /* predicted copy-stream backlog after the last decision */
    double last_step_s;                /* predicted duration of the last layer step */
    struct moe_lane_gov gov;
    /* decisions made, by kind */
    uint64_t n_copy, n_cpu, n_both;
    uint64_t n_decide;
};

/* mode: the configured setting; initial: NULL for moe_lane_rates_default(),
 * else measured or profile rates (a rate <= 0 takes the default's;
 * cpu_sync_s is taken as given unless negative). */
void moe_lane_init(struct moe_lane_state *st, enum moe_miss_lane mode,
                   const struct moe_lane_rates *initial);

/* The lane mode the next step runs in: the configured fixed mode, or the
 * governor's arm under auto (which may be a fixed mode while it probes or
 * after it fell back). */
enum moe_miss_lane moe_lane_current(const struct moe_lane_state *st);

/* Chooses a lane for each of the n misses of one layer step; choice[i] gets
 * MOE_LANE_COPY, MOE_LANE_CPU or both. step may be NULL. No allocation. */
void moe_lane_decide(struct moe_lane_state *st, const struct moe_lane_step *step,
                     const struct moe_lane_miss *m, int n, uint8_t *choice);

/* Measurements (EWMA into st->r). */
void moe_lane_observe_cpu(struct moe_lane_state *st, uint64_t bytes, uint64_t token_bytes,
                          double seconds);
void moe_lane_observe_dev(struct moe_lane_state *st, uint64_t bytes, uint64_t token_bytes,
                          double seconds);
void moe_lane_observe_link(struct moe_lane_state *st, uint64_t bytes, double seconds);
void moe_lane_observe_disk(struct moe_lane_state *st, uint64_t bytes, double seconds);
void moe_lane_observe_sync(struct moe_lane_state *st, double seconds);

/* A token step of n_tokens took `seconds`: the governor's input. */
void moe_lane_observe_step(struct moe_lane_state *st, double seconds, int n_tokens);

/* Expected reuse of an expert: hits before eviction if it were cached now.
 * Per (layer, expert) the probability p that a visit of its layer uses it,
 * estimated as the `layer` cache policy does (cache/policy.h): an
 * exponentially weighted frequency per visit (weight MOE_LANE_REUSE_ALPHA,
 * prior n_used / n_expert, or seeded from a warm file's counts) plus
 * MOE_LANE_REUSE_RECENT when the layer's latest visit used it; and per
 * layer the mean number of experts inserted per visit (the misses, weight
 * 0.1). By Little's law a cached expert stays about (slots / n_layer) /
 * inserted_per_visit visits, so the expected hits are the frequency times
 * that, plus the recency bonus once (it lasts about one visit), capped at
 * MOE_LANE_REUSE_CAP. Allocates at init; the rest does not. */
#define MOE_LANE_REUSE_ALPHA 0.05
#define MOE_LANE_REUSE_RECENT 0.2
#define MOE_LANE_REUSE_CAP 1000.0

struct moe_lane_reuse {
    int n_layer, n_expert, n_slots, n_used;
    float *p;                 /* [n_layer][n_expert] frequency */
    uint8_t *recent;          /* [n_layer][n_expert] used at the latest visit */
    float *ins;               /* [n_layer] inserted per visit, EWMA */
    float *ins_prev;          /* [n_layer] before the latest visit */
    uint8_t *batch;           /* [n_layer] the latest visit had more experts than one token routes */
    float *victim_p;          /* [n_layer] p of the marginal cached expert */
};

/* 0, -EINVAL (a size < 1) or -ENOMEM. n_used: experts routed per token. */
int moe_lane_reuse_init(struct moe_lane_reuse *ru, int n_layer, int n_expert, int n_used,
                        int n_slots);
void moe_lane_reuse_free(struct moe_lane_reuse *ru);
/* Seeds the frequencies from tokens routed per expert ([n_layer][n_expert],
 * struct moe_warm's `uses`); layers without counts keep the prior. */
void moe_lane_reuse_seed(struct moe_lane_reuse *ru, const uint32_t *uses);
/* One visit of `layer`: the n distinct experts it routed to, n_inserted of
 * them missed (and may be inserted). Out-of-range ids are ignored. */
void moe_lane_reuse_visit(struct moe_lane_reuse *ru, int layer, const int32_t *experts, int n,
                          int n_inserted);
/* Optional, after moe_lane_decide: how many of the visit's misses were
 * really inserted (copied), replacing the visit's n_inserted; under auto
 * most misses stay on the CPU and do not turn the cache over. */
void moe_lane_reuse_inserted(struct moe_lane_reuse *ru, int layer, int n_inserted);
double moe_lane_reuse_expect(const struct moe_lane_reuse *ru, int layer, int expert);
/* The expected reuse of the marginal cached expert of `layer`: the
 * (slots / n_layer)-th most likely expert's, as of the latest visit; what
 * an eviction loses, for struct moe_lane_step's evict_reuse. */
double moe_lane_reuse_victim(const struct moe_lane_reuse *ru, int layer);

#ifdef __cplusplus
}
#endif

#endif
