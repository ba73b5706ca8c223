/* Token sampling: greedy, or a llama.cpp-style chain of logit bias,
 * repetition penalty, OpenAI's presence and frequency penalties, top-k,
 * top-p, min-p and temperature, then a draw from a seeded PRNG (the same
 * seed and inputs give the same tokens). Bias and penalties apply before
 * greedy selection too.
 *
 * The sampler owns its candidate buffer (sized at create for n_vocab) and
 * never allocates while sampling. Not thread-safe: one per sequence.
 */
#ifndef MOE_MODEL_SAMPLING_H
#define MOE_MODEL_SAMPLING_H

#include <stdint.h>

#include "common/error.h"

struct moe_sampler_params {
    float temperature;     /* <= 0: greedy (ties to the lowest id) */
    int top_k;             /* <= 0: off */
    float top_p;           /* >= 1: off */
    float min_p;           /* <= 0: off */
    float repeat_penalty;  /* 1: off */
    int repeat_last_n;     /* tokens of history the penalty looks at */
    /* OpenAI's penalties over the tokens this sampler has drawn (the
     * prompt's do not count): logit -= frequency * count + presence *
     * (count > 0). 0: off; -2..2. */
    float presence_penalty;
    float frequency_penalty;
    /* logit_bias: added to the logits of these tokens (-100..100); the
     * arrays are copied by moe_sampler_create. */
    int n_bias;
    const int32_t *bias_id;
    const float *bias;
    uint64_t seed;
};

/* Defaults: greedy, top_k 40, top_p 0.95, min_p 0.05, penalty 1 (off),
 * last_n 64, seed 0xfeedface. */
void moe_sampler_defaults(struct moe_sampler_params *p);

/* Checks ranges; MOE_EFORMAT-style -EINVAL with the field named. */
int moe_sampler_params_check(const struct moe_sampler_params *p, struct moe_diag *diag);

struct moe_sampler;
int moe_sampler_create(struct moe_sampler **out, const struct moe_sampler_params *p, int n_vocab,
                       struct moe_diag *diag);
void moe_sampler_free(struct moe_sampler *s);

/* Picks a token from logits[n_vocab] (modified in place by the bias and
 * penalties), given the tokens so far (prompt and generated). */
int32_t moe_sampler_sample(struct moe_sampler *s, float *logits, const int32_t *history,
                           int64_t n_history);

#endif
