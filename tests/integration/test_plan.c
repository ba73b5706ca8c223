/* The memory plan (model/plan.h): computed from the header alone, it
 * equals the plan the loaded model was sized from, term by term, for a
 * GGUF resident, a GGUF with a budget, a pack, and every architecture in
 * shared/ref; a byte budget is never exceeded and is used as fully as a
 * whole slot allows; a slot count and bytes together are refused; a budget below one
 * layer's top-k is refused naming the file. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
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
    F(n_ctx) F(n_batch) F(n_seqs) F(kv_type) F(pack) F(dense_bytes) F(expert_bytes)
    F(n_moe_layers) F(n_expert) F(n_expert_used) F(kv_bytes_per_seq) F(kv_bytes) F(kv_block) F(kv_blocks) F(kv_bytes_per_token)
    F(expert_cache) F(slot_bytes) F(slot_stride) F(n_slots) F(min_slots) F(all_slots)
    F(cache_bytes) F(host_bytes) F(staging_bytes) F(workspace_bytes) F(dense_copied)
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
    /* the paged pool: half of n_seqs full contexts, at least one, in whole blocks */
    CHECK_INT(p.kv_bytes, ==, (uint64_t)p.kv_blocks * (uint64_t)p.kv_block * p.kv_bytes_per_token);
    CHECK_INT(p.kv_bytes_per_seq, ==, (uint64_t)p.n_ctx * p.kv_bytes_per_token);
    const long want = o->kv_size > 0 ? o->kv_size
                      : p.n_seqs * p.n_ctx / 2 > p.n_ctx ? p.n_seqs * p.n_ctx / 2 : p.n_ctx;
    CHECK_INT((long)p.kv_blocks * p.kv_block, >=, want);
    CHECK_INT((long)p.kv_blocks * p.kv_block, <, want + p.kv_block);
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
        o.kv_type = MOE_KV_F16;
        o.kv_block = 5;
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

/* With an expert cache on the CPU backend the dense weights are read into
 * anonymous memory and counted on the host (the cache fills the budget:
 * mapped weights would be page cache reclaimed and refaulted at the
 * limit); resident experts keep them mapped, and a device backend (here
 * upload_weights) uploads them. The loaded model computes the same. */
static void test_dense_copied(void)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    char path[4096];
    snprintf(path, sizeof(path), "%s/models/tiny-mixtral-Q4_0.gguf", ref);
    struct moe_diag d = { 0 };
    struct moe_model_opts o = { .n_threads = 2, .n_ctx = 64 };
    struct moe_model_plan p;
    CHECK_MSG(moe_model_plan(path, &o, &p, &d) == 0, "%s", d.msg);
    CHECK(!p.expert_cache && !p.dense_copied);
    CHECK_INT(moe_model_plan_host_bytes(&p, MOE_BACKEND_CPU), ==,
              p.kv_bytes + p.workspace_bytes);
    o.cache_experts = 5;
    CHECK_MSG(moe_model_plan(path, &o, &p, &d) == 0, "%s", d.msg);
    CHECK(p.expert_cache && p.dense_copied && p.dense_bytes > 0);
    CHECK_INT(moe_model_plan_host_bytes(&p, MOE_BACKEND_CPU), ==, p.dense_bytes + p.kv_bytes +
              p.cache_bytes + p.host_bytes + p.workspace_bytes + p.staging_bytes);
    struct moe_buf b;
    moe_buf_init(&b, 0);
    CHECK(moe_model_plan_format(&p, &b) == 0);
    CHECK_MSG(strstr(b.data, "read into anonymous memory"), "%s", b.data);
    moe_buf_free(&b);
    o.upload_weights = true;
    CHECK_MSG(moe_model_plan(path, &o, &p, &d) == 0, "%s", d.msg);
    CHECK(p.expert_cache && !p.dense_copied);
    /* the same logits from copied and mapped dense weights */
    const int32_t toks[] = { 1, 5, 9, 200, 31 };
    float *lg[2] = { NULL, NULL };
    int n_vocab = 0;
    for (int k = 0; k < 2; k++) {
        struct moe_model_opts ok = { .n_threads = 2, .n_ctx = 64, .cache_experts = k ? 5 : 0 };
        struct moe_model *m;
        struct moe_seq *s = NULL;
        CHECK_MSG(moe_model_load(&m, path, &ok, &d) == 0, "%s", d.msg);
        CHECK_INT(moe_model_plan_of(m)->dense_copied, ==, k == 1);
        n_vocab = moe_model_cfg(m)->n_vocab;
        lg[k] = calloc((size_t)n_vocab, sizeof(float));
        CHECK_MSG(moe_seq_create(&s, m, &d) == 0, "%s", d.msg);
        CHECK_MSG(moe_model_forward(m, s, toks, 5, lg[k], false, NULL, NULL, &d) == 0, "%s", d.msg);
        moe_seq_free(s);
        moe_model_free(m);
    }
    CHECK(memcmp(lg[0], lg[1], (size_t)n_vocab * sizeof(float)) == 0);
    free(lg[0]);
    free(lg[1]);
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

/* Peak resident set of a command (its own, via wait4), in bytes; -1 on
 * failure. stdout/stderr go to `log`. */
static long long peak_rss(char *const argv[], const char *log)
{
    pid_t pid = fork();
    if (pid == 0) {
        FILE *f = freopen(log, "w", stderr);
        (void)f;
        if (freopen("/dev/null", "w", stdout) == NULL)
            _exit(126);
        execv(argv[0], argv);
        _exit(127);
    }
    int st;
    struct rusage ru;
    if (pid < 0 || wait4(pid, &st, 0, &ru) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
        return -1;
    return (long long)ru.ru_maxrss * 1024;
}

static long long json_num(const char *text, const char *key)
{
    char k[64];
    snprintf(k, sizeof(k), "\"%s\": ", key);
    const char *p = strstr(text, k);
    return p ? atoll(p + strlen(k)) : -1;
}

/* memory_limit holds: a model four times the limit runs with its expert
 * cache sized by the plan, and the process's resident memory (above what
 * the same binary holds doing nothing with a model) stays within the plan;
 * without the limit the experts are mapped and the resident set holds
 * them all, which shows the limit is what kept it down. */
static void test_memory_limit_rss(void)
{
#if defined(__SANITIZE_ADDRESS__)
    MOE_SKIP("AddressSanitizer's shadow memory and quarantine are not the plan's to count");
#endif
#if defined(__SANITIZE_THREAD__)
    /* a measurement, not a race: TSan's shadow memory (several times the
     * application's) put the resident set at 506 MiB above a 120 MiB plan */
    MOE_SKIP("ThreadSanitizer's shadow memory is not the plan's to count");
#endif
    const char *gen = getenv("MOE_GEN"), *ctl = getenv("MOECTL");
    if (gen == NULL || ctl == NULL || moe_test_ref_dir() == NULL)
        MOE_SKIP("MOE_GEN / MOECTL / shared/ref not available");
    char model[4096], cmd[8192], log[4096], tiny[4096];
    snprintf(model, sizeof(model), "%s/big.gguf", moe_test_tmpdir());
    snprintf(log, sizeof(log), "%s/rss.log", moe_test_tmpdir());
    snprintf(tiny, sizeof(tiny), "%s/models/tiny-mixtral-Q4_0.gguf", moe_test_ref_dir());
    /* 4 layers x 32 experts of 3.2 MiB: 408 MiB of experts */
    snprintf(cmd, sizeof(cmd), "%s --arch llama --type Q8_0 --n-embd 512 --n-layer 4 --n-head 8"
             " --n-head-kv 4 --head-dim 64 --n-expert 32 --n-expert-used 2 --n-ff-exp 2048"
             " --n-vocab 2000 --quiet -o %s", gen, model);
    CHECK(system(cmd) == 0);
    char *base_argv[] = { (char *)ctl, "info", tiny, NULL };
    const long long base = peak_rss(base_argv, log);
    CHECK(base > 0);
    char *argv[] = { (char *)ctl, "run", "--model", model, "--tokens", "1,2,3,4,5,6,7,8", "-n", "24",
                     "--threads", "2", "--ctx-size", "256", "--memory-limit", "120M", "--stats", NULL };
    const long long peak = peak_rss(argv, log);
    size_t n;
    char *out = moe_test_read_file(log, &n);
    CHECK(peak > 0 && out != NULL);
    const long long plan_host = json_num(out, "plan_host_bytes"), slots = json_num(out, "cache_slots");
    printf("  limit 120 MiB: plan %.1f MiB on the host, %lld slots; peak RSS %.1f MiB above the"
           " binary's %.1f MiB\n", plan_host / 1048576.0, slots, (peak - base) / 1048576.0,
           base / 1048576.0);
    free(out);
    CHECK_MSG(plan_host > 0 && plan_host <= 120ll << 20, "plan %lld over the limit", plan_host);
    CHECK(slots > 0 && slots < 128);
    CHECK_MSG(peak - base <= plan_host + (16ll << 20), "resident %lld above the plan %lld",
              peak - base, plan_host);
    argv[13] = "0";   /* no limit: every expert fits, mapped */
    const long long all = peak_rss(argv, log);
    printf("  no limit: peak RSS %.1f MiB above the binary's\n", (all - base) / 1048576.0);
    CHECK(all - base > (300ll << 20));
    unlink(model);
}

int main(void)
{
    MOE_TEST_RUN(test_every_model);
    MOE_TEST_RUN(test_dense_copied);
    MOE_TEST_RUN(test_missing_and_garbage);
    MOE_TEST_RUN(test_memory_limit_rss);
    return moe_test_exit_code();
}
