/* The generator's files have the layout of shared/ref's models: the same
 * tensor names with the same shapes, the same metadata keys with the same
 * value types (token lists excepted: the vocabulary is built in), the same
 * per-tensor types as the ref variants of the same type, and the reader and
 * the engine accept them. Also: the same arguments give identical bytes. */
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "io/gguf.h"
#include "kernels/dtype.h"
#include "model/model.h"
#include "tests/harness.h"

static int gen(const char *args, const char *out)
{
    char cmd[8192];
    snprintf(cmd, sizeof(cmd), "%s %s --quiet -o %s", getenv("MOE_GEN"), args, out);
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

static void compare(const char *preset, const char *type, const char *ref_file, int compare_types)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    char out[4096], args[256], rpath[4096];
    snprintf(out, sizeof(out), "%s/%s-%s.gguf", moe_test_tmpdir(), preset, type);
    snprintf(args, sizeof(args), "--preset %s --type %s", preset, type);
    CHECK_INT(gen(args, out), ==, 0);
    snprintf(rpath, sizeof(rpath), "%s/models/%s", ref, ref_file);
    struct moe_gguf *g, *r;
    struct moe_diag d = { 0 };
    CHECK_MSG(moe_gguf_open(&g, out, &d) == 0, "%s", d.msg);
    CHECK_MSG(moe_gguf_open(&r, rpath, &d) == 0, "%s", d.msg);
    CHECK_U64(moe_gguf_n_tensors(g), ==, moe_gguf_n_tensors(r));
    for (uint64_t i = 0; i < moe_gguf_n_tensors(r); i++) {
        const struct moe_gguf_tensor *rt = moe_gguf_tensor_at(r, i);
        const struct moe_gguf_tensor *gt = moe_gguf_find_tensor(g, rt->name);
        CHECK_MSG(gt != NULL, "%s: tensor %s missing", preset, rt->name);
        CHECK_U64(gt->n_dims, ==, rt->n_dims);
        for (int k = 0; k < 4; k++) {
            /* the vocabulary differs: n_vocab dims are not compared */
            int vocab_dim = (strcmp(rt->name, "token_embd.weight") == 0 ||
                             strcmp(rt->name, "output.weight") == 0) && k == 1;
            if (!vocab_dim)
                CHECK_MSG(gt->ne[k] == rt->ne[k], "%s: %s ne[%d] %llu vs %llu", preset, rt->name, k,
                          (unsigned long long)gt->ne[k], (unsigned long long)rt->ne[k]);
        }
        if (compare_types && strcmp(rt->name, "output.weight") != 0 &&
            strstr(rt->name, "attn_k.") == NULL && strstr(rt->name, "attn_v.") == NULL)
            CHECK_MSG(gt->dtype == rt->dtype, "%s: %s type %s vs %s", preset, rt->name,
                      moe_dtype_name(gt->dtype), moe_dtype_name(rt->dtype));
    }
    CHECK_U64(moe_gguf_n_kv(g), ==, moe_gguf_n_kv(r));
    for (uint64_t i = 0; i < moe_gguf_n_kv(r); i++) {
        const struct moe_gguf_kv *rk = moe_gguf_kv_at(r, i);
        const struct moe_gguf_kv *gk = moe_gguf_find_kv(g, rk->key);
        CHECK_MSG(gk != NULL, "%s: key %s missing", preset, rk->key);
        CHECK_MSG(gk->value.type == rk->value.type, "%s: key %s type %s vs %s", preset, rk->key,
                  moe_gguf_type_name(gk->value.type), moe_gguf_type_name(rk->value.type));
        if (rk->value.type == MOE_GGUF_ARRAY)
            CHECK_MSG(gk->value.v.arr.elem_type == rk->value.v.arr.elem_type, "%s: key %s elements",
                      preset, rk->key);
    }
    moe_gguf_close(r);
    moe_gguf_close(g);
    /* the engine runs it */
    struct moe_model *m;
    struct moe_model_opts o = { .n_threads = 2, .n_ctx = 64 };
    CHECK_MSG(moe_model_load(&m, out, &o, &d) == 0, "%s", d.msg);
    struct moe_seq *s;
    CHECK(moe_seq_create(&s, m, &d) == 0);
    int32_t toks[4] = { 1, 10, 20, 30 };
    float *lg = malloc((size_t)moe_model_cfg(m)->n_vocab * sizeof(float));
    CHECK(moe_model_forward(m, s, toks, 4, lg, false, NULL, NULL, &d) == 0);
    for (int i = 0; i < moe_model_cfg(m)->n_vocab; i++)
        CHECK(lg[i] == lg[i]);
    free(lg);
    moe_seq_free(s);
    moe_model_free(m);
}

static void test_mixtral_f32(void) { compare("tiny-mixtral", "F32", "tiny-mixtral-F32.gguf", 1); }
static void test_mixtral_f16(void) { compare("tiny-mixtral", "F16", "tiny-mixtral-F16.gguf", 1); }
static void test_mixtral_q8_0(void) { compare("tiny-mixtral", "Q8_0", "tiny-mixtral-Q8_0.gguf", 1); }
/* llama-quantize's Q4_0 bumps attn_k/attn_v and output to Q8_0; those are
 * skipped by the type comparison above */
static void test_mixtral_q4_0(void) { compare("tiny-mixtral", "Q4_0", "tiny-mixtral-Q4_0.gguf", 1); }
static void test_qwen3moe_f16(void) { compare("tiny-qwen3moe", "F16", "tiny-qwen3moe-F16.gguf", 1); }
static void test_qwen3moe_q8_0(void) { compare("tiny-qwen3moe", "Q8_0", "tiny-qwen3moe-Q8_0.gguf", 1); }

static void test_deterministic(void)
{
    char a[4096], b[4096];
    snprintf(a, sizeof(a), "%s/det-a.gguf", moe_test_tmpdir());
    snprintf(b, sizeof(b), "%s/det-b.gguf", moe_test_tmpdir());
    CHECK_INT(gen("--preset tiny-qwen3moe --type Q4_0 --seed 9", a), ==, 0);
    CHECK_INT(gen("--preset tiny-qwen3moe --type Q4_0 --seed 9", b), ==, 0);
    size_t la = 0, lb = 0;
    char *x = moe_test_read_file(a, &la), *y = moe_test_read_file(b, &lb);
    CHECK(x && y && la == lb && memcmp(x, y, la) == 0);
    free(y);
    CHECK_INT(gen("--preset tiny-qwen3moe --type Q4_0 --seed 10", b), ==, 0);
    y = moe_test_read_file(b, &lb);
    CHECK(y && (la != lb || memcmp(x, y, la) != 0));
    free(x);
    free(y);
}

static void test_usage_errors(void)
{
    char out[4096];
    snprintf(out, sizeof(out), "%s/bad.gguf", moe_test_tmpdir());
    CHECK_INT(gen("--preset nope", out), ==, 2);
    CHECK_INT(gen("--n-head 5 --n-head-kv 2", out), ==, 2);
    CHECK_INT(gen("--n-expert 4 --n-expert-used 5", out), ==, 2);
    CHECK_INT(gen("--type Q4_K", out), ==, 2);
    CHECK_INT(gen("--n-embd 12x", out), ==, 2);
    CHECK_INT(gen("--bogus", out), ==, 2);
    CHECK_INT(gen("--n-vocab 10", out), ==, 2);
    CHECK(access(out, F_OK) != 0);
    char tmp[4200];
    snprintf(tmp, sizeof(tmp), "%s.tmp", out);
    CHECK(access(tmp, F_OK) != 0);
    CHECK_INT(gen("--preset demo", "/nonexistent-dir/x.gguf"), ==, 1);
}

int main(void)
{
    if (getenv("MOE_GEN") == NULL) {
        fprintf(stderr, "MOE_GEN not set\n");
        return 1;
    }
    MOE_TEST_RUN(test_mixtral_f32);
    MOE_TEST_RUN(test_mixtral_f16);
    MOE_TEST_RUN(test_mixtral_q8_0);
    MOE_TEST_RUN(test_mixtral_q4_0);
    MOE_TEST_RUN(test_qwen3moe_f16);
    MOE_TEST_RUN(test_qwen3moe_q8_0);
    MOE_TEST_RUN(test_deterministic);
    MOE_TEST_RUN(test_usage_errors);
    return moe_test_exit_code();
}
