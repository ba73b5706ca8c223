#include "cache/governor.h"

#include <string.h>

void moe_prefetch_gov_init(struct moe_prefetch_gov *g, bool always)
{
    memset(g, 0, sizeof(*g));
    g->always = always;
    g->phase = 0;
    g->left = MOE_GOV_PROBE;
}

bool moe_prefetch_gov_on(const struct moe_prefetch_gov *g)
{
    if (g->always)
        return true;
    return g->phase == 0 || (g->phase == 2 && g->use);
}

void moe_prefetch_gov_step(struct moe_prefetch_gov *g, bool on, double dt)
{
    g->steps[on]++;
    if (g->always)
        return;
    if (g->phase < 2) {
        g->sum[on] += dt;
        g->n[on]++;
    }
    if (--g->left > 0)
        return;
    if (g->phase == 0) {
        g->phase = 1;
        g->left = MOE_GOV_PROBE;
    } else if (g->phase == 1) {
        const double on_t = g->sum[1] / (g->n[1] ? g->n[1] : 1);
        const double off_t = g->sum[0] / (g->n[0] ? g->n[0] : 1);
        g->use = on_t < 0.97 * off_t;
        g->phase = 2;
        g->left = MOE_GOV_EXPLOIT;
    } else {
        g->phase = 0;
        g->left = MOE_GOV_PROBE;
        g->sum[0] = g->sum[1] = 0;
        g->n[0] = g->n[1] = 0;
    }
}
