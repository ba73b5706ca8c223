/* The memory plan (model/plan.h): computed from the header alone, it
 * equals the plan the loaded model was sized from, term by term, for a
 * GGUF resident, a GGUF with a budget, a pack, and every architecture in
 * shared/ref; a byte budget is never exceeded and is used as fully as a
 * whole slot allows; a slot count and bytes together are refused; a budget below one
 * layer's top-k is refused naming the file. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "common/buf.h"
#include "io/pack.h"
#include "model/model.h"
#include "model/plan.h"
#include "tests/harness.h"

static int same_plan(const struct moe_model_plan *a, const struct moe_model_plan *b)
{
#define F(x) if (a->x != b->x) { fprintf(stderr, "  plan." #x ": %lld vs %lld\n", \
                                         (long long)a->x, (long long)b->x); return 0; }
    F(n_ctx) F(n_batch) F(n_seqs) F(kv_f16) F(pack) F(dense_bytes) F(expert_bytes)
    F(n_moe_layers) F(n_expert) F(n_expert_used) F(kv_bytes_per_seq) F(kv_bytes)
    F(expert_cache) F(slot_bytes) F(slot_stride) F(n_slots) F(min_slots) F(all_slots)
    F(cache_bytes) F(host_bytes) F(workspace_bytes)
#undef F
    return 1;
}

static void check(const char *path, const struct moe_model_opts *o)
{
    struct moe_model_plan p;
    struct moe_diag d = { 0 };
    CHECK_MSG(moe_model_plan(path, o, &p, &d) == 0, "%s", d.msg);
    struct moe_model *m;
    CHECK_MSG(moe_model_load(&m, path, o, &d) == 0, "%s", d.msg);
    int same = same_plan(&p, moe_model_plan_of(m));
    struct moe_seq *s = NULL;
    /* the KV term is what a sequence allocates (asserted inside) */
    CHECK_MSG(moe_seq_create(&s, m, &d) == 0, "%s", d.msg);
    moe_seq_free(s);
    moe_model_free(m);
    CHECK_MSG(same, "%s: the plan from the header differs from the loaded model's", path);
    CHECK_INT(p.kv_bytes, ==, p.kv_bytes_per_seq * (uint64_t)p.n_seqs);
    if (o->cache_bytes > 0 && o->cache_experts == 0 && p.n_slots < p.all_slots) {
        CHECK_MSG(p.cache_bytes <= o->cache_bytes, "pool %llu over the budget %zu",
                  (unsigned long long)p.cache_bytes, o->cache_bytes);
        CHECK_MSG(p.cache_bytes + p.slot_stride > o->cache_bytes, "a whole slot more fits");
    }
    if (o->cache_experts > 0)
        CHECK_INT(p.n_slots, ==, o->cache_experts < p.all_slots ? o->cache_experts : p.all_slots);
    struct moe_buf b;
    moe_buf_init(&b, 0);
    CHECK(moe_model_plan_format(&p, &b) == 0);
    CHECK(strstr(b.data, "KV cache") && strstr(b.data, "workspace") && strstr(b.data, "total"));
    CHECK(strstr(b.data, p.expert_cache ? "expert cache" : "mapped from the file"));
    moe_buf_free(&b);
}

static void test_every_model(void)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    static const char *const files[] = {
        "tiny-mixtral-Q4_0.gguf", "tiny-qwen3moe-Q4_K_M.gguf", "tiny-deepseek2-F32.gguf",
        "tiny-gptoss-MXFP4_MOE.gguf", "tiny-mixtral-F16.gguf",
    };
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        char path[4096], pack[4096];
        snprintf(path, sizeof(path), "%s/models/%s", ref, files[i]);
        snprintf(pack, sizeof(pack), "%s/%s.moe", moe_test_tmpdir(), files[i]);
        struct moe_diag d = { 0 };
        struct moe_pack_write_opts po = { .threads = 2 };
        CHECK_MSG(moe_pack_write(path, pack, &po, NULL, &d) == 0, "%s", d.msg);
        struct moe_model_opts o = { .n_threads = 2, .n_ctx = 96, .n_seqs = 3 };
        check(path, &o);                     /* resident */
        check(pack, &o);                     /* every expert in the cache */
        o.kv_f16 = true;
        o.n_batch = 17;
        o.cache_experts = 5;
        check(path, &o);
        check(pack, &o);
        o.cache_bytes = 1;                   /* both: refused, naming them */
        struct moe_model_plan both;
        CHECK_INT(moe_model_plan(pack, &o, &both, &d), ==, -EINVAL);
        CHECK_MSG(strstr(d.msg, "give one of them"), "%s", d.msg);
        memset(&d, 0, sizeof(d));
        o.cache_experts = 0;
        struct moe_model_plan all;
        o.cache_bytes = 0;
        CHECK(moe_model_plan(pack, &o, &all, &d) == 0);
        /* budgets around whole slots: never over, never a slot short */
        const size_t page = 4096, stride = all.slot_stride;
        const size_t budgets[] = { 7 * stride + page, 7 * stride + page - 1, 7 * stride + page + stride - 1 };
        for (size_t k = 0; k < 3; k++) {
            o.cache_bytes = budgets[k];
            o.host_bytes = 1 << 20;
            check(k % 2 ? pack : path, &o);
        }
        /* below one layer's top-k: refused, naming the file */
        o.cache_bytes = 1 * stride + page;
        struct moe_model_plan p;
        memset(&d, 0, sizeof(d));
        CHECK_INT(moe_model_plan(path, &o, &p, &d), ==, MOE_ELIMIT);
        CHECK_MSG(strstr(d.msg, files[i]) && strstr(d.msg, "minimum"), "%s", d.msg);
    }
}

static void test_missing_and_garbage(void)
{
    struct moe_model_plan p;
    struct moe_diag d = { 0 };
    CHECK(moe_model_plan("/nonexistent/m.gguf", NULL, &p, &d) < 0);
    CHECK_MSG(strstr(d.msg, "/nonexistent/m.gguf") != NULL, "%s", d.msg);
    char path[4096];
    snprintf(path, sizeof(path), "%s/garbage.gguf", moe_test_tmpdir());
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    fputs("GGUF but not really", f);
    fclose(f);
    memset(&d, 0, sizeof(d));
    CHECK(moe_model_plan(path, NULL, &p, &d) < 0);
    CHECK_MSG(strstr(d.msg, "garbage.gguf") != NULL, "%s", d.msg);
}

int main(void)
{
    MOE_TEST_RUN(test_every_model);
    MOE_TEST_RUN(test_missing_and_garbage);
    return moe_test_exit_code();
}
