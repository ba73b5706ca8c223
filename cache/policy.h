/* Eviction policies of the expert cache, shared by the cache and by
 * `moectl cache-sim`.
 *
 * Keys are (layer, expert). The cache asks for a victim among the
 * candidates it can evict (unpinned, ready slots), so a policy never has to
 * know about pinning. Belady (MIN) needs the future and lives in the
 * simulator (cache/sim.h).
 *
 *   lru    least recently used
 *   lfu    least frequently used, counts decayed by `lfu_decay` per token step
 *   layer  moed's policy, Belady in expectation: estimate for each cached
 *          expert the probability p that its layer's next visit uses it
 *          (an exponentially weighted frequency over that layer's visits,
 *          plus a bonus if the latest visit used it), turn it into an
 *          expected time to next use, (layers until the layer's next visit)
 *          + n_layer * (1 - p) / p, and evict the latest. Decoding walks the
 *          layers in a cycle, so recency alone (LRU) keeps the experts of
 *          the layer just computed, which are needed last. doc/cache.md has
 *          the measurements that chose the parameters.
 *   predict the same expected-wait ranking with a better estimate of p,
 *          learned online from the routing stream only: half an
 *          exponentially weighted frequency (its time scale chosen online:
 *          the one whose estimates predicted the past visits best), a
 *          recency term learned from the routing itself (how much more
 *          often than the average expert one last used s visits ago is
 *          used at the next visit, counted over every layer's visits so
 *          far, so a model whose routing repeats from token to token gets a
 *          large term and one whose routing barely does gets almost none),
 *          and a per-layer transition model P(expert b at this visit |
 *          experts used at the layer's previous visit), counted from past
 *          token steps. It also notices layer-major (prefill) order, where
 *          the layer being computed is the one needed next. The closest to
 *          Belady at 5-10% capacity on every real trace measured
 *          (doc/cache.md).
 */
#ifndef MOE_CACHE_POLICY_H
#define MOE_CACHE_POLICY_H

#include <stdint.h>

enum moe_policy_kind {
    MOE_POLICY_LRU,
    MOE_POLICY_LFU,
    MOE_POLICY_LAYER,
    MOE_POLICY_BELADY,   /* simulator only */
    MOE_POLICY_PREDICT,
};

#define MOE_POLICY_COUNT 5

/* "lru", "lfu", "layer", "belady", "predict"; -1 if unknown. */
int moe_policy_from_name(const char *name);
const char *moe_policy_name(enum moe_policy_kind k);

struct moe_policy_params {
    double lfu_decay;     /* per token step, default 0.9 */
    double layer_alpha;   /* frequency EMA weight per layer visit, default 0.05 */
    double layer_beta;    /* weight of the layer distance, default 1 */
    double layer_recent;  /* added to p when the latest visit used it, default 0.2 */
    /* predict: p = pred_freq f + learned recency + pred_trans transition,
     * see policy.c and doc/cache.md */
    double pred_alpha;    /* frequency EMA weight per layer visit; default 0: chosen
                           * online among 0.01, 0.02, 0.04, 0.08, 0.16 by the log
                           * loss of each one's estimates of the visits so far */
    double pred_freq;     /* weight of the frequency, default 0.5 */
    double pred_trans;    /* weight of the transition estimate, default 1.2 */
    double pred_dist;     /* weight of the layers until the next visit, default 1 */
};

void moe_policy_defaults(struct moe_policy_params *p);

struct moe_policy;

/* NULL on allocation failure or for MOE_POLICY_BELADY. `predict` keeps
 * n_layer * n_expert^2 float transition counts (2 MB for 30 x 128) and
 * 10 doubles of frequency counts per expert. */
struct moe_policy *moe_policy_create(enum moe_policy_kind kind, int n_layer, int n_expert,
                                     const struct moe_policy_params *params);
void moe_policy_free(struct moe_policy *p);

/* Records an access at time `now` (a global access counter) in token step
 * `step`. Call for hits and for loads. */
void moe_policy_access(struct moe_policy *p, int layer, int expert, int64_t now, int32_t step);

/* Records that the expert was loaded without being used (a prefetch) at
 * time `now`: recency only (LRU's order, the tie rule); no policy counts it
 * as a use. */
void moe_policy_touch(struct moe_policy *p, int layer, int expert, int64_t now);

/* Warm restarts (cache/warm.h): what a policy learned, exported at the end
 * of one run and seeded into a fresh policy at the start of the next.
 * moe_policy_export fills trans [n_layer][n_expert][n_expert] and follows
 * [n_layer][n_expert] with `predict`'s transition counts (visits using b
 * right after a visit using a; visits using a that were followed by
 * another), rounded; it returns -1 (nothing written) for the other
 * policies, which learn no transitions. moe_policy_seed starts a fresh
 * policy from them: `uses` [n_layer][n_expert] (tokens routed to each
 * expert, every policy but lru/lfu) sets each expert's frequency, as if each
 * layer had seen its tokens (at most 1000 visits) with the expert used at
 * that rate; trans and follows (NULL: none) become `predict`'s transition
 * counts; stats (MOE_POLICY_STATS doubles, NULL: none) `predict`'s
 * learned scalars: how often experts of each recency were used again, and
 * how well each frequency time scale predicted. Which experts were used
 * recently is not carried over. Call before the first access. */
#define MOE_POLICY_STATS 32   /* doubles; MOE_WARM_POLICY_STATS in cache/warm.h */
int moe_policy_export(const struct moe_policy *p, uint32_t *trans, uint32_t *follows, double *stats);
void moe_policy_seed(struct moe_policy *p, const uint32_t *uses, int k, const uint32_t *trans,
                     const uint32_t *follows, const double *stats);

/* Index into keys[0..n) (keys = layer * n_expert + expert) of the entry to
 * evict, while layer `cur_layer` is being computed. */
int moe_policy_victim(struct moe_policy *p, const int32_t *keys, int n, int cur_layer, int32_t step);

#endif
