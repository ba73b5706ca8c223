/* Sampler: greedy and its ties, top-k/top-p/min-p cut-offs, temperature,
 * seeded reproducibility, the repetition penalty, and parameter checks. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model/sampling.h"
#include "tests/harness.h"

static struct moe_sampler_params plain(void)
{
    struct moe_sampler_params p;
    moe_sampler_defaults(&p);
    p.top_k = 0;
    p.top_p = 1.0f;
    p.min_p = 0.0f;
    p.temperature = 1.0f;
    return p;
}

static void test_greedy(void)
{
    struct moe_sampler_params p;
    moe_sampler_defaults(&p);
    struct moe_sampler *s;
    CHECK(moe_sampler_create(&s, &p, 5, NULL) == 0);
    float l[5] = { 0.5f, 2.0f, -1.0f, 2.0f, 1.0f };
    CHECK_INT(moe_sampler_sample(s, l, NULL, 0), ==, 1); /* tie -> lowest id */
    moe_sampler_free(s);
}

/* Greedy gives the plain loop's index (first maximum, strict >) on rows
 * with ties, both zeros, -inf, NaNs (at 0 and elsewhere) and lengths that
 * are not multiples of eight. */
static int32_t argmax_loop(const float *l, int n)
{
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (l[i] > l[best])
            best = i;
    return best;
}

static void test_greedy_rows(void)
{
    struct moe_sampler_params p;
    moe_sampler_defaults(&p);
    uint32_t rng = 12345;
    static const int lens[] = { 1, 2, 7, 8, 9, 15, 16, 17, 100, 32000 };
    for (size_t li = 0; li < sizeof(lens) / sizeof(lens[0]); li++) {
        const int n = lens[li];
        float *l = malloc((size_t)n * sizeof(float)), *c = malloc((size_t)n * sizeof(float));
        struct moe_sampler *s;
        CHECK(l && c && moe_sampler_create(&s, &p, n, NULL) == 0);
        for (int rep = 0; rep < 40; rep++) {
            for (int i = 0; i < n; i++) {
                rng = rng * 1664525u + 1013904223u;
                const uint32_t r = rng >> 8;
                /* few distinct values: many ties */
                l[i] = rep % 4 == 0 ? (float)(r % 5) : (float)(int)(r % 2001) / 100.0f - 10.0f;
                switch ((r >> 12) % 16) {
                case 0: l[i] = -INFINITY; break;
                case 1: l[i] = rep % 3 == 1 ? NAN : l[i]; break;
                case 2: l[i] = rep % 5 == 2 ? 0.0f : l[i]; break;
                case 3: l[i] = rep % 5 == 2 ? -0.0f : l[i]; break;
                default: break;
                }
            }
            if (rep % 7 == 3)
                l[0] = NAN;
            if (rep % 7 == 4)
                for (int i = 0; i < n; i++)
                    l[i] = i % 3 ? -INFINITY : NAN;
            if (rep % 7 == 5)
                for (int i = 0; i < n; i++)
                    l[i] = i % 2 ? 0.0f : -0.0f;
            memcpy(c, l, (size_t)n * sizeof(float));
            const int32_t want = argmax_loop(l, n);
            CHECK_MSG(moe_sampler_sample(s, c, NULL, 0) == want, "n %d rep %d: greedy differs from the loop (%d)",
                      n, rep, (int)want);
        }
        moe_sampler_free(s);
        free(l);
        free(c);
    }
}

static void test_distribution(void)
{
    struct moe_sampler_params p = plain();
    p.seed = 42;
    struct moe_sampler *s;
    CHECK(moe_sampler_create(&s, &p, 2, NULL) == 0);
    int ones = 0, N = 20000;
    for (int i = 0; i < N; i++) {
        float l[2] = { 0.0f, logf(3.0f) };
        ones += moe_sampler_sample(s, l, NULL, 0) == 1;
    }
    moe_sampler_free(s);
    CHECK_NEAR((double)ones / N, 0.75, 0.015);
}

static void test_seeded(void)
{
    struct moe_sampler_params p = plain();
    p.seed = 7;
    struct moe_sampler *a, *b;
    CHECK(moe_sampler_create(&a, &p, 100, NULL) == 0);
    CHECK(moe_sampler_create(&b, &p, 100, NULL) == 0);
    float la[100], lb[100];
    for (int r = 0; r < 50; r++) {
        for (int i = 0; i < 100; i++)
            la[i] = lb[i] = sinf((float)(i * 7 + r));
        CHECK_INT(moe_sampler_sample(a, la, NULL, 0), ==, moe_sampler_sample(b, lb, NULL, 0));
    }
    moe_sampler_free(a);
    moe_sampler_free(b);
}

static void test_cutoffs(void)
{
    float base[6] = { 5.0f, 4.9f, 1.0f, 0.0f, -1.0f, 4.8f };
    struct moe_sampler_params p = plain();
    p.top_k = 2;
    struct moe_sampler *s;
    CHECK(moe_sampler_create(&s, &p, 6, NULL) == 0);
    for (int r = 0; r < 500; r++) {
        float l[6];
        memcpy(l, base, sizeof(l));
        int t = moe_sampler_sample(s, l, NULL, 0);
        CHECK_MSG(t == 0 || t == 1, "top_k 2 drew %d", t);
    }
    moe_sampler_free(s);
    p = plain();
    p.min_p = 0.5f;   /* keeps ids with p >= 0.5 * p(max): 0, 1, 5 */
    CHECK(moe_sampler_create(&s, &p, 6, NULL) == 0);
    int seen5 = 0;
    for (int r = 0; r < 500; r++) {
        float l[6];
        memcpy(l, base, sizeof(l));
        int t = moe_sampler_sample(s, l, NULL, 0);
        CHECK_MSG(t == 0 || t == 1 || t == 5, "min_p drew %d", t);
        seen5 |= t == 5;
    }
    CHECK(seen5);
    moe_sampler_free(s);
    p = plain();
    p.top_p = 0.3f;   /* the top candidate alone holds > 0.3 */
    CHECK(moe_sampler_create(&s, &p, 6, NULL) == 0);
    for (int r = 0; r < 100; r++) {
        float l[6];
        memcpy(l, base, sizeof(l));
        CHECK_INT(moe_sampler_sample(s, l, NULL, 0), ==, 0);
    }
    moe_sampler_free(s);
}

static void test_penalty(void)
{
    struct moe_sampler_params p;
    moe_sampler_defaults(&p);
    p.repeat_penalty = 2.0f;
    struct moe_sampler *s;
    CHECK(moe_sampler_create(&s, &p, 3, NULL) == 0);
    float l[3] = { 3.0f, 2.0f, -1.0f };
    int32_t hist[3] = { 0, 0, 2 };
    CHECK_INT(moe_sampler_sample(s, l, hist, 3), ==, 1); /* 3/2 < 2 */
    CHECK_NEAR(l[0], 1.5, 0);     /* penalised once, not twice */
    CHECK_NEAR(l[2], -2.0, 0);    /* negative logits are multiplied */
    moe_sampler_free(s);
}

/* logit_bias is added before greedy selection; the arrays are copied. */
static void test_logit_bias(void)
{
    struct moe_sampler_params p;
    moe_sampler_defaults(&p);
    int32_t ids[2] = { 2, 0 };
    float bias[2] = { 5.0f, -100.0f };
    p.n_bias = 2;
    p.bias_id = ids;
    p.bias = bias;
    struct moe_sampler *s;
    CHECK(moe_sampler_create(&s, &p, 3, NULL) == 0);
    ids[0] = 1;                      /* the sampler kept its own copy */
    float l[3] = { 3.0f, 2.0f, -1.0f };
    CHECK_INT(moe_sampler_sample(s, l, NULL, 0), ==, 2);
    CHECK_NEAR(l[2], 4.0, 0);
    CHECK_NEAR(l[0], -97.0, 0);
    moe_sampler_free(s);
    /* a token outside the vocabulary, a bias out of range */
    struct moe_diag d = { 0 };
    ids[0] = 3;
    CHECK(moe_sampler_create(&s, &p, 3, &d) != 0 && strstr(d.msg, "logit_bias: token 3"));
    ids[0] = 1;
    bias[1] = 101.0f;
    CHECK(moe_sampler_params_check(&p, &d) != 0 && strstr(d.msg, "logit_bias"));
}

/* presence and frequency: logit -= f * count + p * (count > 0), over the
 * tokens this sampler drew (the history passed in does not count). */
static void test_presence_frequency(void)
{
    struct moe_sampler_params p;
    moe_sampler_defaults(&p);
    p.presence_penalty = 0.5f;
    p.frequency_penalty = 1.0f;
    struct moe_sampler *s;
    CHECK(moe_sampler_create(&s, &p, 3, NULL) == 0);
    int32_t hist[4] = { 1, 1, 1, 1 };
    float l[3] = { 3.0f, 2.0f, 0.0f };
    CHECK_INT(moe_sampler_sample(s, l, hist, 4), ==, 0);   /* the prompt is not penalised */
    float l2[3] = { 3.0f, 2.0f, 0.0f };
    CHECK_INT(moe_sampler_sample(s, l2, hist, 4), ==, 1);  /* 0 drawn once: 3 - 1 - 0.5 */
    CHECK_NEAR(l2[0], 1.5, 0);
    CHECK_NEAR(l2[1], 2.0, 0);
    float l3[3] = { 3.0f, 2.0f, 0.0f };
    CHECK_INT(moe_sampler_sample(s, l3, hist, 4), ==, 0);  /* 1.5 against 2 - 1.5 */
    CHECK_NEAR(l3[1], 0.5, 0);
    float l4[3] = { 3.0f, 2.0f, 0.0f };
    moe_sampler_sample(s, l4, hist, 4);
    CHECK_NEAR(l4[0], 0.5, 0);                             /* drawn twice: 3 - 2 - 0.5 */
    CHECK_NEAR(l4[2], 0.0, 0);                             /* never drawn */
    moe_sampler_free(s);
    struct moe_diag d = { 0 };
    p.presence_penalty = 2.5f;
    CHECK(moe_sampler_params_check(&p, &d) != 0 && strstr(d.msg, "presence_penalty"));
}

static void test_bad_params(void)
{
    struct moe_sampler_params p;
    struct moe_diag d = { 0 };
    moe_sampler_defaults(&p);
    p.top_p = 0.0f;
    CHECK(moe_sampler_params_check(&p, &d) != 0);
    CHECK(strstr(d.msg, "top_p") != NULL);
    moe_sampler_defaults(&p);
    p.temperature = NAN;
    CHECK(moe_sampler_params_check(&p, NULL) != 0);
    moe_sampler_defaults(&p);
    p.top_k = -1;
    CHECK(moe_sampler_params_check(&p, NULL) != 0);
}

int main(void)
{
    MOE_TEST_RUN(test_greedy);
    MOE_TEST_RUN(test_greedy_rows);
    MOE_TEST_RUN(test_distribution);
    MOE_TEST_RUN(test_seeded);
    MOE_TEST_RUN(test_cutoffs);
    MOE_TEST_RUN(test_penalty);
    MOE_TEST_RUN(test_logit_bias);
    MOE_TEST_RUN(test_presence_frequency);
    MOE_TEST_RUN(test_bad_params);
    return moe_test_exit_code();
}
