/* Continuous batching must not change any sequence's result: running
 * several sequences in one moe_model_forward_multi() pass (prefill chunks
 * beside decode steps, sequences joining and leaving) gives, bit for bit,
 * the logits of running each sequence alone with moe_model_forward(). Over
 * the shared/ref models (every architecture and a quantized type), with the
 * experts resident and through a small expert cache with prefetch. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "model/options.h"
#include "tests/harness.h"

#define NSEQ 4
#define STEPS 10

static const int32_t prompt_len[NSEQ] = { 7, 1, 12, 3 };
static const int join_at[NSEQ] = { 0, 0, 2, 5 };   /* step at which a sequence starts */

static void run_model(const char *file, int cache_experts, const char *prefetch)
{
    char path[4096];
    if (strchr(file, '/') != NULL) /* a fixture of this tree */
        snprintf(path, sizeof(path), "%s/%s", getenv("MOE_SOURCE_ROOT"), file);
    else
        snprintf(path, sizeof(path), "%s/models/%s", moe_test_ref_dir(), file);
    /* blocks of 3 tokens: the batched sequences' blocks interleave in the
     * pool, the references' do not, and the logits must still be equal */
    struct moe_model_opts o = { .n_threads = 2, .n_ctx = 64, .n_batch = 16,
                                .cache_experts = cache_experts, .n_seqs = 2 * NSEQ, .kv_block = 3 };
    struct moe_model *m;
    struct moe_diag d = { 0 };
    if (prefetch != NULL)
        CHECK_MSG(moe_model_opts_set(&o, "prefetch", prefetch, &d) == 0, "%s", d.msg);
    CHECK_MSG(moe_model_load(&m, path, &o, &d) == 0, "%s: %s", file, d.msg);
    const int V = moe_model_cfg(m)->n_vocab;

    /* token streams: a prompt, then "generated" tokens fixed in advance */
    int32_t toks[NSEQ][64];
    for (int i = 0; i < NSEQ; i++)
        for (int t = 0; t < 64; t++)
            toks[i][t] = (int32_t)((i * 7919 + t * 104729 + 13) % (V - 1)) + 1;

    /* reference: each sequence alone, prompt then one token per step */
    float *ref = malloc((size_t)NSEQ * STEPS * V * sizeof(float));
    float *got = malloc((size_t)NSEQ * STEPS * V * sizeof(float));
    CHECK(ref && got);
    for (int i = 0; i < NSEQ; i++) {
        struct moe_seq *s;
        CHECK(moe_seq_create(&s, m, &d) == 0);
        int pos = 0;
        for (int st = 0; st < STEPS; st++) {
            int n = st == 0 ? prompt_len[i] : 1;
            CHECK_MSG(moe_model_forward(m, s, toks[i] + pos, n, ref + ((size_t)i * STEPS + st) * V,
                                        false, NULL, NULL, &d) == 0, "%s", d.msg);
            pos += n;
        }
        moe_seq_free(s);
        /* the prompt's last row equals itself computed with every row's
         * logits (the last layer's FFN then runs for every row, where a
         * last-token-only forward runs it for the last row alone) */
        if (prompt_len[i] > 1) {
            float *all = malloc((size_t)prompt_len[i] * V * sizeof(float));
            CHECK(all != NULL);
            CHECK(moe_seq_create(&s, m, &d) == 0);
            CHECK_MSG(moe_model_forward(m, s, toks[i], prompt_len[i], all, true, NULL, NULL, &d) == 0, "%s",
                      d.msg);
            CHECK_MSG(memcmp(all + (size_t)(prompt_len[i] - 1) * V, ref + (size_t)i * STEPS * V,
                             (size_t)V * sizeof(float)) == 0,
                      "%s: sequence %d: the last prompt row's logits differ between all rows and the last only",
                      file, i);
            moe_seq_free(s);
            free(all);
        }
    }

    /* batched: at each global step every live sequence contributes its next
     * chunk; long prompts are split in chunks of 5 (chunked prefill) */
    struct moe_seq *s[NSEQ];
    int pos[NSEQ] = { 0 }, step[NSEQ] = { 0 }, fed[NSEQ] = { 0 };
    for (int i = 0; i < NSEQ; i++)
        CHECK(moe_seq_create(&s[i], m, &d) == 0);
    for (int g = 0; g < 40; g++) {
        struct moe_batch_seg segs[NSEQ];
        int ns = 0, total = 0;
        int which[NSEQ];
        for (int i = 0; i < NSEQ; i++) {
            if (g < join_at[i] || step[i] >= STEPS)
                continue;
            int want = step[i] == 0 ? prompt_len[i] - fed[i] : 1;
            int n = want > 5 ? 5 : want;
            bool finishes = n == want;
            segs[ns] = (struct moe_batch_seg){
                .seq = s[i], .tokens = toks[i] + pos[i], .n = n,
                .logits = finishes ? got + ((size_t)i * STEPS + step[i]) * V : NULL,
            };
            which[ns++] = i;
            total += n;
        }
        if (ns == 0)
            break;
        CHECK(total <= 16);
        CHECK_MSG(moe_model_forward_multi(m, segs, ns, &d) == 0, "%s", d.msg);
        for (int j = 0; j < ns; j++) {
            int i = which[j];
            pos[i] += segs[j].n;
            if (segs[j].logits) {
                step[i]++;
                fed[i] = 0;
            } else {
                fed[i] += segs[j].n;
            }
            CHECK_INT(moe_seq_pos(s[i]), ==, pos[i]);
        }
    }
    for (int i = 0; i < NSEQ; i++) {
        CHECK_INT(step[i], ==, STEPS);
        for (int st = 0; st < STEPS; st++) {
            const float *a = ref + ((size_t)i * STEPS + st) * V, *b = got + ((size_t)i * STEPS + st) * V;
            CHECK_MSG(memcmp(a, b, (size_t)V * sizeof(float)) == 0,
                      "%s cache=%d prefetch=%s: sequence %d step %d differs", file, cache_experts,
                      prefetch ? prefetch : "none", i, st);
        }
        moe_seq_free(s[i]);
    }
    printf("  %s cache=%d prefetch=%s: %d sequences x %d steps identical\n", file, cache_experts,
           prefetch ? prefetch : "none", NSEQ, STEPS);

    /* errors: the same sequence twice, too many tokens, bad token */
    struct moe_seq *a;
    CHECK(moe_seq_create(&a, m, &d) == 0);
    int32_t big[32] = { 0 };
    struct moe_batch_seg twice[2] = { { .seq = a, .tokens = big, .n = 1 },
                                      { .seq = a, .tokens = big, .n = 1 } };
    CHECK(moe_model_forward_multi(m, twice, 2, &d) == -EINVAL);
    CHECK(strstr(d.msg, "same sequence") != NULL);
    struct moe_batch_seg over = { .seq = a, .tokens = big, .n = 17 };
    CHECK(moe_model_forward_multi(m, &over, 1, &d) == MOE_ELIMIT);
    int32_t bad = V;
    struct moe_batch_seg badt = { .seq = a, .tokens = &bad, .n = 1 };
    CHECK(moe_model_forward_multi(m, &badt, 1, &d) == -EINVAL);
    CHECK_INT(moe_seq_pos(a), ==, 0);
    moe_seq_free(a);
    free(ref);
    free(got);
    moe_model_free(m);
}

static void test_mixtral(void) { run_model("tiny-mixtral-F32.gguf", 0, NULL); }
static void test_mixtral_q4_cached(void) { run_model("tiny-mixtral-Q4_0.gguf", 2, "gate"); }
static void test_qwen3_q4k_cached(void) { run_model("tiny-qwen3moe-Q4_K_M.gguf", 8, "history"); }
static void test_deepseek2(void) { run_model("tiny-deepseek2-F32.gguf", 0, NULL); }
static void test_gptoss(void) { run_model("tiny-gptoss-MXFP4_MOE.gguf", 5, "gate"); }
/* recurrent state per sequence beside the KV cache (gated delta-net layers) */
static void test_qwen35moe(void) { run_model("tests/fixtures/arch/tiny-qwen35moe-F32.gguf", 0, NULL); }
static void test_qwen35moe_q8_cached(void)
{
    run_model("tests/fixtures/arch/tiny-qwen35moe-Q8_0.gguf", 2, "gate");
}
/* issue 22's families (tests/fixtures/arch, tools/ref/make_family_goldens.py) */
static void test_glm4moe(void) { run_model("tests/fixtures/arch/tiny-glm4moe-F32.gguf", 0, NULL); }
static void test_minimax_m2_cached(void)
{
    run_model("tests/fixtures/arch/tiny-minimax-m2-Q8_0.gguf", 3, "gate");
}
static void test_gemma4(void) { run_model("tests/fixtures/arch/tiny-gemma4-F32.gguf", 0, NULL); }
static void test_gemma4_cached(void)
{
    run_model("tests/fixtures/arch/tiny-gemma4-Q8_0.gguf", 2, "gate");
}

int main(void)
{
    if (moe_test_ref_dir() == NULL)
        return 77;
    moe_test_run("mixtral F32", test_mixtral);
    moe_test_run("mixtral Q4_0 cached + gate", test_mixtral_q4_cached);
    moe_test_run("qwen3moe Q4_K_M cached + history", test_qwen3_q4k_cached);
    moe_test_run("deepseek2 F32 (MLA)", test_deepseek2);
    moe_test_run("gpt-oss MXFP4 cached (SWA, sinks)", test_gptoss);
    moe_test_run("qwen35moe F32 (delta-net)", test_qwen35moe);
    moe_test_run("qwen35moe Q8_0 cached + gate (delta-net)", test_qwen35moe_q8_cached);
    moe_test_run("glm4moe F32", test_glm4moe);
    moe_test_run("minimax-m2 Q8_0 cached + gate", test_minimax_m2_cached);
    moe_test_run("gemma4 F32 (SWA pattern, per-layer dims)", test_gemma4);
    moe_test_run("gemma4 Q8_0 cached + gate", test_gemma4_cached);
    return moe_test_exit_code();
}
