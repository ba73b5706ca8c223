#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cache/sim.h"
#include "common/alloc.h"

int moe_cache_sim(const struct moe_trace *t, enum moe_policy_kind kind, int capacity,
                  const struct moe_policy_params *params, struct moe_sim_result *r)
{
    memset(r, 0, sizeof(*r));
    if (capacity < 1)
        return -EINVAL;
    const int64_t nk = (int64_t)t->n_layer * t->n_expert;
    int32_t *slot_of = moe_malloc((size_t)nk * sizeof(int32_t));
    int32_t *keys = moe_malloc((size_t)capacity * sizeof(int32_t));
    int64_t *next_use = NULL, *next_of_key = NULL, *last_pos = NULL;
    struct moe_policy *p = NULL;
    int rc = -ENOMEM;
    if (slot_of == NULL || keys == NULL)
        goto out;
    for (int64_t k = 0; k < nk; k++)
        slot_of[k] = -1;
    if (kind == MOE_POLICY_BELADY) {
        /* next_use[i]: position of the next access to the same key, or n */
        next_use = moe_malloc((size_t)t->n * sizeof(int64_t));
        next_of_key = moe_malloc((size_t)nk * sizeof(int64_t));
        last_pos = moe_malloc((size_t)nk * sizeof(int64_t));
        if (next_use == NULL || next_of_key == NULL || last_pos == NULL)
            goto out;
        for (int64_t k = 0; k < nk; k++)
            last_pos[k] = t->n;
        for (int64_t i = t->n - 1; i >= 0; i--) {
            const int64_t k = (int64_t)t->a[i].layer * t->n_expert + t->a[i].expert;
            next_use[i] = last_pos[k];
            last_pos[k] = i;
        }
    } else if ((p = moe_policy_create(kind, t->n_layer, t->n_expert, params)) == NULL) {
        goto out;
    }
    int n_cached = 0;
    for (int64_t i = 0; i < t->n; i++) {
        const struct moe_access *a = &t->a[i];
        const int32_t key = a->layer * t->n_expert + a->expert;
        if (slot_of[key] >= 0) {
            r->hits++;
        } else {
            int slot;
            if (n_cached < capacity) {
                slot = n_cached++;
            } else {
                if (kind == MOE_POLICY_BELADY) {
                    slot = 0;
                    for (int s = 1; s < capacity; s++)
                        if (next_of_key[keys[s]] > next_of_key[keys[slot]])
                            slot = s;
                } else {
                    slot = moe_policy_victim(p, keys, capacity, a->layer, a->step);
                }
                slot_of[keys[slot]] = -1;
            }
            keys[slot] = key;
            slot_of[key] = slot;
        }
        if (kind == MOE_POLICY_BELADY)
            next_of_key[key] = next_use[i];
        else
            moe_policy_access(p, a->layer, a->expert, i, a->step);
    }
    r->accesses = t->n;
    r->hit_rate = t->n ? (double)r->hits / (double)t->n : 0.0;
    rc = 0;
out:
    moe_policy_free(p);
    moe_free(slot_of);
    moe_free(keys);
    moe_free(next_use);
    moe_free(next_of_key);
    moe_free(last_pos);
    return rc;
}
