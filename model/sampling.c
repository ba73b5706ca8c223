#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>

#include "common/alloc.h"
#include "common/rng.h"
#include "model/sampling.h"

struct cand {
    int32_t id;
    float logit;
    float p;
};

struct moe_sampler {
    struct moe_sampler_params p;
    int n_vocab;
    struct cand *c;
    uint64_t rng[4];
    int32_t *bias_id;     /* copies of p.bias_id / p.bias */
    float *bias;
    int32_t *count;       /* per token: times drawn (presence/frequency on) */
};

void moe_sampler_defaults(struct moe_sampler_params *p)
{
    p->temperature = 0.0f;
    p->top_k = 40;
    p->top_p = 0.95f;
    p->min_p = 0.05f;
    p->repeat_penalty = 1.0f;
    p->repeat_last_n = 64;
    p->presence_penalty = 0.0f;
    p->frequency_penalty = 0.0f;
    p->n_bias = 0;
    p->bias_id = NULL;
    p->bias = NULL;
    p->seed = 0xfeedfaceu;
}

int moe_sampler_params_check(const struct moe_sampler_params *p, struct moe_diag *diag)
{
    if (!(p->temperature >= 0.0f && p->temperature <= 100.0f))
        return moe_diag_set(diag, -EINVAL, "temperature %g, expected 0..100", (double)p->temperature);
    if (p->top_k < 0)
        return moe_diag_set(diag, -EINVAL, "top_k %d, expected >= 0", p->top_k);
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        return moe_diag_set(diag, -EINVAL, "top_p %g, expected (0, 1]", (double)p->top_p);
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f))
        return moe_diag_set(diag, -EINVAL, "min_p %g, expected 0..1", (double)p->min_p);
    if (!(p->repeat_penalty > 0.0f && p->repeat_penalty <= 10.0f))
        return moe_diag_set(diag, -EINVAL, "repeat_penalty %g, expected (0, 10]",
                            (double)p->repeat_penalty);
    if (p->repeat_last_n < 0)
        return moe_diag_set(diag, -EINVAL, "repeat_last_n %d, expected >= 0", p->repeat_last_n);
    if (!(p->presence_penalty >= -2.0f && p->presence_penalty <= 2.0f))
        return moe_diag_set(diag, -EINVAL, "presence_penalty %g, expected -2..2",
                            (double)p->presence_penalty);
    if (!(p->frequency_penalty >= -2.0f && p->frequency_penalty <= 2.0f))
        return moe_diag_set(diag, -EINVAL, "frequency_penalty %g, expected -2..2",
                            (double)p->frequency_penalty);
    if (p->n_bias < 0 || (p->n_bias > 0 && (p->bias_id == NULL || p->bias == NULL)))
        return moe_diag_set(diag, -EINVAL, "logit_bias: %d entries without arrays", p->n_bias);
    for (int i = 0; i < p->n_bias; i++)
        if (!(p->bias[i] >= -100.0f && p->bias[i] <= 100.0f) || p->bias_id[i] < 0)
            return moe_diag_set(diag, -EINVAL, "logit_bias: token %d bias %g, expected a token"
                                " id and -100..100", p->bias_id[i], (double)p->bias[i]);
    return 0;
}

int moe_sampler_create(struct moe_sampler **out, const struct moe_sampler_params *p, int n_vocab,
                       struct moe_diag *diag)
{
    *out = NULL;
    int rc = moe_sampler_params_check(p, diag);
    if (rc)
        return rc;
    if (n_vocab <= 0)
        return moe_diag_set(diag, -EINVAL, "sampler: n_vocab %d", n_vocab);
    for (int i = 0; i < p->n_bias; i++)
        if (p->bias_id[i] >= n_vocab)
            return moe_diag_set(diag, -EINVAL, "logit_bias: token %d, the vocabulary has %d",
                                p->bias_id[i], n_vocab);
    struct moe_sampler *s = moe_calloc(1, sizeof(*s));
    const bool counts = p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f;
    const size_t nb = p->n_bias > 0 ? (size_t)p->n_bias : 1;
    if (s == NULL || (s->c = moe_calloc((size_t)n_vocab, sizeof(struct cand))) == NULL ||
        (s->bias_id = moe_calloc(nb, sizeof(int32_t))) == NULL ||
        (s->bias = moe_calloc(nb, sizeof(float))) == NULL ||
        (counts && (s->count = moe_calloc((size_t)n_vocab, sizeof(int32_t))) == NULL)) {
        moe_sampler_free(s);
        return moe_diag_set(diag, -ENOMEM, "sampler: out of memory");
    }
    s->p = *p;
    for (int i = 0; i < p->n_bias; i++) {
        s->bias_id[i] = p->bias_id[i];
        s->bias[i] = p->bias[i];
    }
    s->p.bias_id = s->bias_id;
    s->p.bias = s->bias;
    s->n_vocab = n_vocab;
    uint64_t x = p->seed;
    for (int i = 0; i < 4; i++)
        s->rng[i] = moe_splitmix64(&x);
    *out = s;
    return 0;
}

void moe_sampler_free(struct moe_sampler *s)
{
    if (s == NULL)
        return;
    moe_free(s->c);
    moe_free(s->bias_id);
    moe_free(s->bias);
    moe_free(s->count);
    moe_free(s);
}

static int cmp_cand(const void *a, const void *b)
{
    const struct cand *x = a, *y = b;
    if (x->logit != y->logit)
        return x->logit > y->logit ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

/* logit_bias, then OpenAI's presence and frequency penalties. */
static void bias_and_penalize(const struct moe_sampler *s, float *logits)
{
    const struct moe_sampler_params *p = &s->p;
    for (int i = 0; i < p->n_bias; i++)
        logits[p->bias_id[i]] += p->bias[i];
    if (s->count == NULL)
        return;
    for (int t = 0; t < s->n_vocab; t++)
        if (s->count[t] > 0)
            logits[t] -= p->frequency_penalty * (float)s->count[t] + p->presence_penalty;
}

static int32_t pick(struct moe_sampler *s, float *logits, const int32_t *history, int64_t n_history);

/* Greedy: the index the loop `best = 0; for i: if (x[i] > x[best]) best = i`
 * gives (the first maximum; NaNs never win, a NaN at 0 wins), found without
 * that loop's chain of a load and a compare per element (about 75 us for
 * 32000 logits, a serial piece of every decode step): the maximum in eight
 * independent chains, then the first element equal to it. Equal includes
 * -0 == +0, as `>` never prefers one zero to the other; when every other
 * element is NaN or -inf the maximum is x[0]'s or -inf, found at 0. */
static int32_t argmax_first(const float *x, int n)
{
    if (n <= 0 || x[0] != x[0])
        return 0;
    float m[8];
    for (int k = 0; k < 8; k++)
        m[k] = -INFINITY;
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++)
            m[k] = x[i + k] > m[k] ? x[i + k] : m[k];
    for (; i < n; i++)
        m[0] = x[i] > m[0] ? x[i] : m[0];
    float mx = m[0];
    for (int k = 1; k < 8; k++)
        mx = m[k] > mx ? m[k] : mx;
    for (i = 0; i < n; i++)
        if (x[i] == mx)
            return i;
    return 0;
}

int32_t moe_sampler_sample(struct moe_sampler *s, float *logits, const int32_t *history,
                           int64_t n_history)
{
    bias_and_penalize(s, logits);
    const int32_t t = pick(s, logits, history, n_history);
    if (s->count && s->count[t] < INT32_MAX)
        s->count[t]++;
    return t;
}

static int32_t pick(struct moe_sampler *s, float *logits, const int32_t *history, int64_t n_history)
{
    const struct moe_sampler_params *p = &s->p;
    const int n = s->n_vocab;
    /* Repetition penalty on the distinct tokens of the last repeat_last_n. */
    if (p->repeat_penalty != 1.0f && p->repeat_last_n > 0) {
        int64_t from = n_history > p->repeat_last_n ? n_history - p->repeat_last_n : 0;
        for (int64_t i = from; i < n_history; i++) {
            int32_t t = history[i];
            if (t < 0 || t >= n)
                continue;
            int seen = 0;
            for (int64_t j = from; j < i && !seen; j++)
                seen = history[j] == t;
            if (seen)
                continue;
            logits[t] = logits[t] > 0.0f ? logits[t] / p->repeat_penalty : logits[t] * p->repeat_penalty;
        }
    }
    if (p->temperature <= 0.0f)
        return argmax_first(logits, n);
    int m = n;
    if (p->top_k > 0 && p->top_k < n) {
        /* Keep the top_k in a min-heap (root = weakest kept), then sort
         * just those: O(n log k) instead of sorting the vocabulary. */
        m = p->top_k;
        struct cand *h = s->c;
        for (int i = 0; i < n; i++) {
            struct cand x = { .id = i, .logit = logits[i] };
            int j;
            if (i < m) {
                j = i;
                while (j > 0 && cmp_cand(&h[(j - 1) / 2], &x) < 0) {
                    h[j] = h[(j - 1) / 2];
                    j = (j - 1) / 2;
                }
                h[j] = x;
                continue;
            }
            if (cmp_cand(&x, &h[0]) >= 0)
                continue; /* not better than the weakest kept */
            j = 0;
            for (;;) {
                int l = 2 * j + 1, r = l + 1, w = j;
                const struct cand *wc = &x;
                if (l < m && cmp_cand(&h[l], wc) > 0) {
                    w = l;
                    wc = &h[l];
                }
                if (r < m && cmp_cand(&h[r], wc) > 0)
                    w = r;
                if (w == j)
                    break;
                h[j] = h[w];
                j = w;
            }
            h[j] = x;
        }
        qsort(s->c, (size_t)m, sizeof(struct cand), cmp_cand);
    } else {
        for (int i = 0; i < n; i++) {
            s->c[i].id = i;
            s->c[i].logit = logits[i];
        }
        qsort(s->c, (size_t)n, sizeof(struct cand), cmp_cand);
    }
    /* softmax over the kept candidates */
    double sum = 0.0;
    for (int i = 0; i < m; i++) {
        s->c[i].p = expf(s->c[i].logit - s->c[0].logit);
        sum += s->c[i].p;
    }
    for (int i = 0; i < m; i++)
        s->c[i].p = (float)(s->c[i].p / sum);
    if (p->top_p < 1.0f) {
        double cum = 0.0;
        for (int i = 0; i < m; i++) {
            cum += s->c[i].p;
            if (cum >= p->top_p) {
                m = i + 1;
                break;
            }
        }
    }
    if (p->min_p > 0.0f) {
        const float floor_p = s->c[0].p * p->min_p;
        int keep = 1;
        while (keep < m && s->c[keep].p >= floor_p)
            keep++;
        m = keep;
    }
    /* temperature, then draw */
    sum = 0.0;
    for (int i = 0; i < m; i++) {
        s->c[i].p = expf((s->c[i].logit - s->c[0].logit) / p->temperature);
        sum += s->c[i].p;
    }
    double r = (double)(moe_xoshiro256ss(s->rng) >> 11) * 0x1.0p-53 * sum, acc = 0.0;
    for (int i = 0; i < m; i++) {
        acc += s->c[i].p;
        if (r < acc)
            return s->c[i].id;
    }
    return s->c[m - 1].id;
}
