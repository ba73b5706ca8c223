/* The recurrent state of qwen35moe's gated delta-net layers (doc/engine.md):
 *  - a sequence reset (or begun again) starts from a zero state: the same
 *    prompt gives bit-identical logits on a fresh and on a reused sequence;
 *  - prefix_cache is ignored: a second sequence beginning with the same
 *    prompt reuses no block (cached = 0) and gets the same logits;
 *  - a step that fails mid-pass (an expert read failing with EIO through
 *    MOE_FAULT_INJECT's in-process twin) leaves the state lost: the next
 *    forward on that sequence is refused until it is reset, and after the
 *    reset the results are exactly a fresh sequence's.
 * On tests/fixtures/arch/tiny-qwen35moe-Q8_0.gguf. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/fault.h"
#include "model/model.h"
#include "tests/harness.h"

#define NP 13

static void prompt_of(int32_t *t, int n, int V, int salt)
{
    for (int i = 0; i < n; i++)
        t[i] = (int32_t)((i * 7919 + salt * 104729 + 13) % (V - 1)) + 1;
}

static void test_state(void)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/tests/fixtures/arch/tiny-qwen35moe-Q8_0.gguf",
             getenv("MOE_SOURCE_ROOT"));
    struct moe_model_opts o = { .n_threads = 2, .n_ctx = 64, .n_seqs = 2, .kv_block = 4,
                                .prefix_cache = true, .cache_experts = 2 };
    struct moe_model *m;
    struct moe_diag d = { 0 };
    CHECK_MSG(moe_model_load(&m, path, &o, &d) == 0, "%s", d.msg);
    const int V = moe_model_cfg(m)->n_vocab;
    int32_t p[NP], q[NP];
    prompt_of(p, NP, V, 1);
    prompt_of(q, NP, V, 2);
    float *a = malloc((size_t)V * 4), *b = malloc((size_t)V * 4), *c = malloc((size_t)V * 4);
    CHECK(a && b && c);
    struct moe_seq *s1, *s2;
    CHECK(moe_seq_create(&s1, m, &d) == 0 && moe_seq_create(&s2, m, &d) == 0);

    /* fresh: p, then one more token */
    int cached = -1;
    CHECK_MSG(moe_seq_begin(s1, p, NP, NP + 4, &cached, &d) == 0, "%s", d.msg);
    CHECK_INT(cached, ==, 0);
    CHECK(moe_model_forward(m, s1, p, NP, NULL, false, NULL, NULL, &d) == 0);
    int32_t t1 = 5;
    CHECK(moe_model_forward(m, s1, &t1, 1, a, false, NULL, NULL, &d) == 0);

    /* the same prompt on a second sequence: no block reused, same logits */
    CHECK_MSG(moe_seq_begin(s2, p, NP, NP + 4, &cached, &d) == 0, "%s", d.msg);
    CHECK_INT(cached, ==, 0);
    CHECK(moe_model_forward(m, s2, p, NP, NULL, false, NULL, NULL, &d) == 0);
    CHECK(moe_model_forward(m, s2, &t1, 1, b, false, NULL, NULL, &d) == 0);
    CHECK_MSG(memcmp(a, b, (size_t)V * 4) == 0, "second sequence differs");
    struct moe_kv_stats ks;
    moe_model_kv_stats(m, &ks);
    CHECK_INT((int)ks.hits, ==, 0);
    CHECK_INT(ks.cached, ==, 0);

    /* s1 reused for another prompt, then p again: a zero state each time */
    CHECK(moe_seq_begin(s1, q, NP, NP, &cached, &d) == 0);
    CHECK(moe_model_forward(m, s1, q, NP, NULL, false, NULL, NULL, &d) == 0);
    CHECK(moe_seq_begin(s1, p, NP, NP + 4, &cached, &d) == 0);
    CHECK(moe_model_forward(m, s1, p, NP, NULL, false, NULL, NULL, &d) == 0);
    CHECK(moe_model_forward(m, s1, &t1, 1, c, false, NULL, NULL, &d) == 0);
    CHECK_MSG(memcmp(a, c, (size_t)V * 4) == 0, "reused sequence differs from a fresh one");

    /* a failed step: every expert read fails; layer 0's delta-net mixer has
     * run by then, so the state is lost and further steps are refused */
    moe_seq_reset(s2);
    CHECK(moe_model_forward(m, s2, p, 3, NULL, false, NULL, NULL, &d) == 0);
    CHECK(moe_fault_set("eio:*:*:*") == 0);
    int rc = moe_model_forward(m, s2, p + 3, NP - 3, NULL, false, NULL, NULL, &d);
    moe_fault_set(NULL);
    CHECK_MSG(rc != 0, "the step did not fail");
    CHECK_INT(moe_seq_pos(s2), ==, 3);
    int32_t t2 = 7;
    moe_diag_clear(&d);
    rc = moe_model_forward(m, s2, &t2, 1, NULL, false, NULL, NULL, &d);
    CHECK_INT(rc, ==, -EINVAL);
    CHECK_MSG(strstr(d.msg, "recurrent state was lost") != NULL, "%s", d.msg);
    const struct moe_batch_seg seg = { .seq = s2, .tokens = &t2, .n = 1 };
    moe_diag_clear(&d);
    CHECK_INT(moe_model_forward_multi(m, &seg, 1, &d), ==, -EINVAL);
    CHECK_MSG(strstr(d.msg, "recurrent state was lost") != NULL, "%s", d.msg);
    moe_diag_clear(&d);
    moe_seq_reset(s2);
    CHECK(moe_model_forward(m, s2, p, NP, NULL, false, NULL, NULL, &d) == 0);
    CHECK(moe_model_forward(m, s2, &t1, 1, b, false, NULL, NULL, &d) == 0);
    CHECK_MSG(memcmp(a, b, (size_t)V * 4) == 0, "after reset: differs from a fresh sequence");
    printf("  fresh, reused, second sequence and after a failed step + reset: identical;"
           " prefix reuse off\n");

    moe_seq_free(s1);
    moe_seq_free(s2);
    free(a);
    free(b);
    free(c);
    moe_model_free(m);
}

int main(void)
{
    MOE_TEST_RUN(test_state);
    return moe_test_exit_code();
}
