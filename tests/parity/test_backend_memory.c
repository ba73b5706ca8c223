/* The GPU data path, exercised where there is no GPU: with upload_weights
 * the model copies every weight into backend memory (restoring the host
 * pointers when freed) and the expert cache stages each load in host memory
 * and uploads it into the slot; the forward pass then touches activations
 * and weights only through backend ops. On the CPU backend the results must
 * be bit-identical to the normal in-place path, for every architecture,
 * with experts resident, through a small cache, with the host tier and with
 * prefetch. The issue-22 families with state or ops of their own (qwen35moe:
 * the delta-net ops and a recurrent state per sequence in backend memory;
 * gemma4: GELU, scale, row multiply, host-side scales) from
 * tests/fixtures/arch. */
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "model/options.h"
#include "tests/harness.h"

/* shared/ref/models/<file>, or tests/fixtures/arch/<file> for "arch:<file>" */
static void model_path(char *path, size_t n, const char *file)
{
    if (strncmp(file, "arch:", 5) == 0)
        snprintf(path, n, "%s/tests/fixtures/arch/%s", getenv("MOE_SOURCE_ROOT"), file + 5);
    else
        snprintf(path, n, "%s/models/%s", moe_test_ref_dir(), file);
}

static float *run(const char *file, bool upload, int cache_experts, size_t host_bytes,
                  const char *prefetch, int n_tok, int n_gen)
{
    char path[4096];
    model_path(path, sizeof(path), file);
    struct moe_model_opts o = { .n_threads = 2, .n_ctx = 128, .cache_experts = cache_experts,
                                .host_bytes = host_bytes, .prefetch_always = true,
                                .upload_weights = upload };
    if (prefetch != NULL && moe_model_opts_set(&o, "prefetch", prefetch, NULL) != 0)
        return NULL;
    struct moe_model *m;
    struct moe_diag d = { 0 };
    if (moe_model_load(&m, path, &o, &d) != 0) {
        fprintf(stderr, "%s: %s\n", file, d.msg);
        return NULL;
    }
    const int V = moe_model_cfg(m)->n_vocab;
    float *out = malloc((size_t)(n_tok + n_gen) * V * sizeof(float));
    struct moe_seq *s;
    int32_t tok[64];
    for (int i = 0; i < n_tok + n_gen; i++)
        tok[i] = (int32_t)((i * 7919 + 11) % (V - 1)) + 1;
    int rc = moe_seq_create(&s, m, &d);
    /* a prefill of all logits, then single-token steps */
    if (rc == 0)
        rc = moe_model_forward(m, s, tok, n_tok, out, true, NULL, NULL, &d);
    for (int i = 0; rc == 0 && i < n_gen; i++)
        rc = moe_model_forward(m, s, tok + n_tok + i, 1, out + (size_t)(n_tok + i) * V, false, NULL,
                               NULL, &d);
    if (rc) {
        fprintf(stderr, "%s: %s\n", file, d.msg);
        free(out);
        out = NULL;
    }
    moe_seq_free(s);
    moe_model_free(m);
    return out;
}

static void same(const char *file, int cache_experts, size_t host_bytes, const char *prefetch)
{
    const int n_tok = 9, n_gen = 6;
    float *a = run(file, false, cache_experts, host_bytes, prefetch, n_tok, n_gen);
    float *b = run(file, true, cache_experts, host_bytes, prefetch, n_tok, n_gen);
    CHECK(a && b);
    char path[4096];
    model_path(path, sizeof(path), file);
    struct moe_model *m;
    struct moe_model_opts o = { .n_threads = 1, .n_ctx = 16 };
    CHECK(moe_model_load(&m, path, &o, NULL) == 0);
    const int V = moe_model_cfg(m)->n_vocab;
    moe_model_free(m);
    CHECK_MSG(memcmp(a, b, (size_t)(n_tok + n_gen) * V * sizeof(float)) == 0,
              "%s cache=%d host=%zu prefetch=%s: uploaded weights / staged loads differ", file,
              cache_experts, host_bytes, prefetch ? prefetch : "none");
    printf("  %s cache=%d host=%zu prefetch=%s: identical\n", file, cache_experts, host_bytes,
           prefetch ? prefetch : "none");
    free(a);
    free(b);
}

static void test_mixtral(void) { same("tiny-mixtral-F32.gguf", 0, 0, NULL); }
static void test_mixtral_q4_cache(void) { same("tiny-mixtral-Q4_0.gguf", 2, 0, "gate"); }
static void test_qwen3_host_tier(void) { same("tiny-qwen3moe-Q4_K_M.gguf", 8, 64 << 20, "history"); }
static void test_deepseek2(void) { same("tiny-deepseek2-F32.gguf", 0, 0, NULL); }
static void test_deepseek2_cache(void) { same("tiny-deepseek2-F32.gguf", 6, 0, "gate"); }
static void test_gptoss(void) { same("tiny-gptoss-MXFP4_MOE.gguf", 5, 0, NULL); }
static void test_qwen35moe(void) { same("arch:tiny-qwen35moe-F32.gguf", 0, 0, NULL); }
static void test_qwen35moe_cache(void) { same("arch:tiny-qwen35moe-Q8_0.gguf", 2, 0, "gate"); }
static void test_gemma4(void) { same("arch:tiny-gemma4-F32.gguf", 0, 0, NULL); }
static void test_gemma4_cache(void) { same("arch:tiny-gemma4-Q8_0.gguf", 2, 0, "gate"); }

int main(void)
{
    if (moe_test_ref_dir() == NULL)
        return 77;
    moe_test_run("mixtral F32 resident", test_mixtral);
    moe_test_run("mixtral Q4_0 cache + prefetch", test_mixtral_q4_cache);
    moe_test_run("qwen3moe Q4_K_M cache + host tier", test_qwen3_host_tier);
    moe_test_run("deepseek2 resident (MLA, sel bias)", test_deepseek2);
    moe_test_run("deepseek2 cache", test_deepseek2_cache);
    moe_test_run("gpt-oss MXFP4 cache (sinks, biases)", test_gptoss);
    if (getenv("MOE_SOURCE_ROOT") != NULL) {
        moe_test_run("qwen35moe F32 resident (delta-net state in backend memory)", test_qwen35moe);
        moe_test_run("qwen35moe Q8_0 cache", test_qwen35moe_cache);
        moe_test_run("gemma4 F32 resident", test_gemma4);
        moe_test_run("gemma4 Q8_0 cache", test_gemma4_cache);
    }
    return moe_test_exit_code();
}
