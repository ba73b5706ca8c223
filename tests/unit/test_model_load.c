/* The model loader refuses inconsistent models with a message naming the
 * tensor or key: a missing tensor, a tensor of the wrong shape, a type the
 * backend cannot compute, expert_used_count > expert_count, an unsupported
 * architecture, a dense (non-MoE) model. Models are made by copying a
 * generated one through the GGUF writer with one thing changed. */
#include <stdlib.h>
#include <sys/wait.h>

#include "common/error.h"
#include "io/gguf.h"
#include "io/gguf_writer.h"
#include "common/dtype.h"
#include "model/model.h"
#include "tests/harness.h"

struct mutation {
    const char *drop_tensor;
    const char *reshape_tensor;  /* halve ne[1] */
    const char *retype_tensor;
    uint32_t new_type;
    const char *set_key;         /* a u32 or string key to replace */
    uint32_t set_u32;
    const char *set_str;
};

static const char *base_model(void)
{
    static char path[4096];
    if (path[0])
        return path;
    snprintf(path, sizeof(path), "%s/base.gguf", moe_test_tmpdir());
    char cmd[8192];
    snprintf(cmd, sizeof(cmd), "%s --preset tiny-mixtral --type Q8_0 --quiet -o %s", getenv("MOE_GEN"), path);
    if (system(cmd) != 0)
        path[0] = '\0';
    return path;
}

static int rewrite(const char *dst, const struct mutation *mu)
{
    struct moe_gguf *g;
    struct moe_diag d = { 0 };
    if (moe_gguf_open(&g, base_model(), &d) || moe_gguf_map(g, &d))
        return -1;
    struct moe_gguf_writer *w;
    if (moe_gguf_writer_create(&w, dst, &d))
        return -1;
    for (uint64_t i = 0; i < moe_gguf_n_kv(g); i++) {
        const struct moe_gguf_kv *kv = moe_gguf_kv_at(g, i);
        if (mu->set_key && strcmp(kv->key, mu->set_key) == 0) {
            if (mu->set_str)
                moe_gguf_writer_add_str(w, kv->key, mu->set_str);
            else
                moe_gguf_writer_add_u32(w, kv->key, mu->set_u32);
        } else {
            moe_gguf_writer_add_value(w, kv->key, &kv->value);
        }
    }
    uint64_t sizes[256];
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const struct moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        uint64_t ne[4] = { t->ne[0], t->ne[1], t->ne[2], t->ne[3] };
        uint32_t type = t->dtype;
        sizes[i] = 0;
        if (mu->drop_tensor && strcmp(t->name, mu->drop_tensor) == 0)
            continue;
        if (mu->reshape_tensor && strcmp(t->name, mu->reshape_tensor) == 0)
            ne[1] /= 2;
        if (mu->retype_tensor && strcmp(t->name, mu->retype_tensor) == 0)
            type = mu->new_type;
        moe_gguf_writer_add_tensor(w, t->name, t->n_dims, ne, type, &sizes[i]);
    }
    moe_gguf_writer_begin_data(w);
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const struct moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        if (sizes[i] == 0)
            continue;
        const uint8_t *src = moe_gguf_tensor_data(g, t);
        uint8_t *buf = calloc(1, sizes[i]);
        memcpy(buf, src, sizes[i] < t->size ? sizes[i] : t->size);
        moe_gguf_writer_write(w, buf, sizes[i]);
        free(buf);
    }
    int rc = moe_gguf_writer_finish(w, &d);
    moe_gguf_close(g);
    return rc;
}

static void expect_refused(const struct mutation *mu, int code, const char *needle)
{
    if (getenv("MOE_GEN") == NULL || base_model()[0] == '\0')
        MOE_SKIP("MOE_GEN not available");
    char path[4096];
    snprintf(path, sizeof(path), "%s/case.gguf", moe_test_tmpdir());
    CHECK(rewrite(path, mu) == 0);
    struct moe_model *m = (struct moe_model *)(uintptr_t)1;
    struct moe_diag d = { 0 };
    struct moe_model_opts o = { .n_threads = 1, .n_ctx = 32 };
    int rc = moe_model_load(&m, path, &o, &d);
    CHECK_MSG(rc == code, "expected %d, got %d: %s", code, rc, d.msg);
    CHECK(m == NULL);
    CHECK_MSG(strstr(d.msg, needle) != NULL, "message lacks '%s': %s", needle, d.msg);
    CHECK_MSG(strstr(d.msg, "case.gguf") != NULL, "message lacks the file: %s", d.msg);
}

static void test_base_loads(void)
{
    if (getenv("MOE_GEN") == NULL || base_model()[0] == '\0')
        MOE_SKIP("MOE_GEN not available");
    struct mutation none = { 0 };
    char path[4096];
    snprintf(path, sizeof(path), "%s/same.gguf", moe_test_tmpdir());
    CHECK(rewrite(path, &none) == 0);
    struct moe_model *m;
    struct moe_diag d = { 0 };
    CHECK_MSG(moe_model_load(&m, path, NULL, &d) == 0, "%s", d.msg);
    moe_model_free(m);
}

static void test_missing_tensor(void)
{
    struct mutation mu = { .drop_tensor = "blk.1.ffn_up_exps.weight" };
    expect_refused(&mu, MOE_EFORMAT, "missing tensor 'blk.1.ffn_up_exps.weight'");
}

static void test_wrong_shape(void)
{
    struct mutation mu = { .reshape_tensor = "blk.2.attn_k.weight" };
    expect_refused(&mu, MOE_EFORMAT, "'blk.2.attn_k.weight' has shape [64, 16, 1], expected [64, 32, 1]");
}

static void test_wrong_expert_count(void)
{
    struct mutation mu = { .reshape_tensor = "blk.0.ffn_gate_inp.weight" };
    expect_refused(&mu, MOE_EFORMAT, "blk.0.ffn_gate_inp.weight");
}

static void test_uncomputable_type(void)
{
    struct mutation mu = { .retype_tensor = "blk.3.attn_output.weight", .new_type = MOE_DTYPE_TQ1_0 };
    /* 64-element rows are not a multiple of TQ1_0's 256: use a 1-D-compatible
     * type with 32-blocks that the CPU backend does not compute */
    mu.new_type = MOE_DTYPE_Q8_1;
    expect_refused(&mu, MOE_EUNSUPPORTED, "'blk.3.attn_output.weight' has type Q8_1");
}

static void test_used_exceeds_count(void)
{
    struct mutation mu = { .set_key = "llama.expert_used_count", .set_u32 = 9 };
    expect_refused(&mu, MOE_EFORMAT, "expert_used_count");
}

static void test_unsupported_arch(void)
{
    struct mutation mu = { .set_key = "general.architecture", .set_str = "mamba" };
    expect_refused(&mu, MOE_EUNSUPPORTED, "'mamba' is not supported; supported: llama");
}

static void test_dense_model(void)
{
    struct mutation mu = { .set_key = "llama.expert_count", .set_u32 = 0 };
    expect_refused(&mu, MOE_EFORMAT, "expert_used_count");
}

int main(void)
{
    MOE_TEST_RUN(test_base_loads);
    MOE_TEST_RUN(test_missing_tensor);
    MOE_TEST_RUN(test_wrong_shape);
    MOE_TEST_RUN(test_wrong_expert_count);
    MOE_TEST_RUN(test_uncomputable_type);
    MOE_TEST_RUN(test_used_exceeds_count);
    MOE_TEST_RUN(test_unsupported_arch);
    MOE_TEST_RUN(test_dense_model);
    return moe_test_exit_code();
}
