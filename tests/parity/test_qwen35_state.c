/* The recurrent state of qwen35moe's gated delta-net layers (doc/engine.md):
 *  - a sequence reset (or begun again) starts from a zero state: the same
 *    prompt gives bit-identical logits on a fresh and on a reused sequence;
 *  - prefix_cache is ignored: a second sequence beginning with the same
 *    prompt reuses no block (cached = 0) and gets the same logits;
 *  - a step that fails mid-pass (an expert read failing with EIO through
 *    MOE_FAULT_INJECT's in-process twin) leaves the state lost: the next
 *    forward on that sequence is refused until it is reset, and after the
 *    reset the results are exactly a fresh sequence's.
 * On tests/fixtures/arch/tiny-qwen35moe-Q8_0.gguf. And the fixture rewritten
 * (io/gguf_writer.h) with attention.recurrent_layers instead of
 * full_attention_interval and merged ffn_gate_up_exps computes exactly what
 * the original does, resident, with the weights uploaded and at 2 cache
 * slots; rope.dimension_sections that leave a rotary pair outside the t/h/w
 * sections, and a missing ssm.* key, are refused naming the key. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/fault.h"
#include "io/gguf.h"
#include "io/gguf_writer.h"
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

enum rewrite { VARIANT, BAD_SECTIONS, NO_SSM_KEY };

/* The fixture rewritten: VARIANT (recurrent_layers [1, 0, 1] as bools
 * instead of full_attention_interval 2, gate and up experts merged),
 * BAD_SECTIONS (dimension_sections [2, 0, 1, 1]) or NO_SSM_KEY. */
static int rewrite(const char *src, const char *dst, enum rewrite how)
{
    struct moe_gguf *g;
    struct moe_diag d = { 0 };
    if (moe_gguf_open(&g, src, &d) || moe_gguf_map(g, &d))
        return -1;
    struct moe_gguf_writer *w;
    if (moe_gguf_writer_create(&w, dst, &d))
        return -1;
    for (uint64_t i = 0; i < moe_gguf_n_kv(g); i++) {
        const struct moe_gguf_kv *kv = moe_gguf_kv_at(g, i);
        if ((how == VARIANT && strcmp(kv->key, "qwen35moe.full_attention_interval") == 0) ||
            (how == BAD_SECTIONS && strcmp(kv->key, "qwen35moe.rope.dimension_sections") == 0) ||
            (how == NO_SSM_KEY && strcmp(kv->key, "qwen35moe.ssm.state_size") == 0))
            continue;
        moe_gguf_writer_add_value(w, kv->key, &kv->value);
    }
    if (how == VARIANT) {
        const uint8_t flags[3] = { 1, 0, 1 };
        moe_gguf_writer_add_arr(w, "qwen35moe.attention.recurrent_layers", MOE_GGUF_BOOL, 3, flags);
    } else if (how == BAD_SECTIONS) {
        const int32_t sec[4] = { 2, 0, 1, 1 };
        moe_gguf_writer_add_arr(w, "qwen35moe.rope.dimension_sections", MOE_GGUF_INT32, 4, sec);
    }
    char name[128];
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const struct moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        const char *p = strstr(t->name, "ffn_gate_exps.weight");
        if (how == VARIANT && strstr(t->name, "ffn_up_exps.weight"))
            continue;
        if (how == VARIANT && p != NULL) {
            snprintf(name, sizeof(name), "%.*sffn_gate_up_exps.weight", (int)(p - t->name), t->name);
            const uint64_t ne[3] = { t->ne[0], 2 * t->ne[1], t->ne[2] };
            moe_gguf_writer_add_tensor(w, name, 3, ne, t->dtype, NULL);
        } else {
            moe_gguf_writer_add_tensor(w, t->name, t->n_dims, t->ne, t->dtype, NULL);
        }
    }
    moe_gguf_writer_begin_data(w);
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const struct moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        const char *p = strstr(t->name, "ffn_gate_exps.weight");
        if (how == VARIANT && strstr(t->name, "ffn_up_exps.weight"))
            continue;
        if (how != VARIANT || p == NULL) {
            moe_gguf_writer_write(w, moe_gguf_tensor_data(g, t), t->size);
            continue;
        }
        snprintf(name, sizeof(name), "%.*sffn_up_exps.weight", (int)(p - t->name), t->name);
        const struct moe_gguf_tensor *u = moe_gguf_find_tensor(g, name);
        const size_t half = t->size / t->ne[2];
        const uint8_t *gd = moe_gguf_tensor_data(g, t), *ud = moe_gguf_tensor_data(g, u);
        for (uint64_t e = 0; e < t->ne[2]; e++) {
            moe_gguf_writer_write(w, gd + e * half, half);
            moe_gguf_writer_write(w, ud + e * half, half);
        }
    }
    int rc = moe_gguf_writer_finish(w, &d);
    moe_gguf_close(g);
    return rc;
}

/* Logits of every position of a 13-token prompt, then of 4 decode steps. */
static float *logits_of(const char *path, int cache_experts, bool upload, int *V)
{
    struct moe_model_opts o = { .n_threads = 2, .n_ctx = 64, .cache_experts = cache_experts,
                                .upload_weights = upload };
    struct moe_model *m;
    struct moe_diag d = { 0 };
    if (moe_model_load(&m, path, &o, &d) != 0) {
        printf("  load %s: %s\n", path, d.msg);
        return NULL;
    }
    *V = moe_model_cfg(m)->n_vocab;
    int32_t p[NP];
    prompt_of(p, NP, *V, 3);
    float *l = malloc((size_t)(NP + 4) * (size_t)*V * 4);
    struct moe_seq *s;
    int rc = l == NULL || moe_seq_create(&s, m, &d) != 0 ? -1 : 0;
    if (rc == 0)
        rc = moe_model_forward(m, s, p, NP, l, true, NULL, NULL, &d);
    for (int i = 0; i < 4 && rc == 0; i++)
        rc = moe_model_forward(m, s, &p[i], 1, l + (size_t)(NP + i) * (size_t)*V, false, NULL,
                               NULL, &d);
    if (rc == 0)
        moe_seq_free(s);
    moe_model_free(m);
    if (rc) {
        free(l);
        return NULL;
    }
    return l;
}

static void test_variants(void)
{
    char src[4096], dst[4096];
    snprintf(src, sizeof(src), "%s/tests/fixtures/arch/tiny-qwen35moe-F32.gguf",
             getenv("MOE_SOURCE_ROOT"));
    snprintf(dst, sizeof(dst), "%s/qwen35-variant.gguf", moe_test_tmpdir());
    CHECK(rewrite(src, dst, VARIANT) == 0);
    int V = 0, V2 = 0;
    float *want = logits_of(src, 0, false, &V);
    CHECK(want != NULL);
    const size_t bytes = (size_t)(NP + 4) * (size_t)V * 4;
    const struct { int cache; bool upload; } runs[] = { { 0, false }, { 0, true }, { 2, false } };
    for (size_t i = 0; i < sizeof(runs) / sizeof(runs[0]); i++) {
        float *got = logits_of(dst, runs[i].cache, runs[i].upload, &V2);
        CHECK_MSG(got != NULL && V2 == V && memcmp(got, want, bytes) == 0,
                  "variant (recurrent_layers, merged gate/up), cache %d, upload %d: differs",
                  runs[i].cache, runs[i].upload);
        free(got);
    }
    free(want);
    printf("  recurrent_layers + merged gate/up: identical resident, uploaded, at 2 slots\n");

    struct moe_model_opts o = { .n_threads = 2, .n_ctx = 64 };
    struct moe_model *m = NULL;
    struct moe_diag d = { 0 };
    CHECK(rewrite(src, dst, BAD_SECTIONS) == 0);
    CHECK_INT(moe_model_load(&m, dst, &o, &d), ==, MOE_EUNSUPPORTED);
    CHECK_MSG(strstr(d.msg, "dimension_sections") != NULL, "%s", d.msg);
    printf("  refused: %s\n", d.msg);
    moe_diag_clear(&d);
    CHECK(rewrite(src, dst, NO_SSM_KEY) == 0);
    CHECK_INT(moe_model_load(&m, dst, &o, &d), ==, MOE_EFORMAT);
    CHECK_MSG(strstr(d.msg, "qwen35moe.ssm.state_size") != NULL, "%s", d.msg);
    printf("  refused: %s\n", d.msg);
}

int main(void)
{
    MOE_TEST_RUN(test_state);
    MOE_TEST_RUN(test_variants);
    return moe_test_exit_code();
}
