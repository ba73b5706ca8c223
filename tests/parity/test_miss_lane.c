/* The hybrid expert lanes (doc/cache.md "Hybrid lanes") without a GPU: the
 * CPU backend plays the device (upload_weights: weights in backend memory,
 * expert loads staged and uploaded), and a missed expert is computed by the
 * CPU lane from host memory (the host tier, the mapped GGUF, or read from
 * the file or pack) or copied into a slot, as miss_lane says. Whatever the
 * lane, the logits and the experts chosen must be bit-identical to the
 * all-resident run, on every architecture of shared/ref, from a GGUF
 * directly and from a pack, with and without prefetch and the host tier;
 * the lane counters must show that the forced lane really ran. */
#include <stdlib.h>
#include <string.h>

#include "io/pack.h"
#include "model/model.h"
#include "model/options.h"
#include "tests/harness.h"

#define N_TOK 9
#define N_GEN 5
#define MAX_IDS (64 * (N_TOK + N_GEN) * 16)

struct routes {
    int32_t ids[MAX_IDS];
    int n;
};

static void on_route(void *ud, int64_t token, int layer, const int32_t *ids, const float *w, int k)
{
    struct routes *r = ud;
    (void)token, (void)layer, (void)w;
    for (int i = 0; i < k && r->n < MAX_IDS; i++)
        r->ids[r->n++] = ids[i];
}

static struct routes want_ids, got_ids;

/* prompt logits (every position), then N_GEN greedy steps' last logits */
static float *run(const char *path, const struct moe_model_opts *o, struct routes *r, int *n_vocab,
                  struct moe_cache_stats *st)
{
    struct moe_model *m;
    struct moe_diag d = { 0 };
    if (moe_model_load(&m, path, o, &d) != 0) {
        fprintf(stderr, "  load %s: %s\n", path, d.msg);
        return NULL;
    }
    const int V = moe_model_cfg(m)->n_vocab;
    *n_vocab = V;
    float *lg = malloc((size_t)(N_TOK + N_GEN) * V * sizeof(float));
    int32_t t[N_TOK];
    for (int i = 0; i < N_TOK; i++)
        t[i] = (int32_t)((i * 7919 + 11) % (V - 1)) + 1;
    r->n = 0;
    struct moe_seq *s = NULL;
    int ok = lg && moe_seq_create(&s, m, &d) == 0 &&
             moe_model_forward(m, s, t, N_TOK, lg, true, on_route, r, &d) == 0;
    for (int g = 0; ok && g < N_GEN; g++) {
        const float *last = lg + (size_t)(N_TOK - 1 + g) * V;
        int32_t best = 0;
        for (int v = 1; v < V; v++)
            if (last[v] > last[best])
                best = v;
        ok = moe_model_forward(m, s, &best, 1, lg + (size_t)(N_TOK + g) * V, false, on_route, r, &d) == 0;
        if (ok && moe_model_cache_pinned(m) > 0) {
            fprintf(stderr, "  %d experts still pinned after a forward pass\n", moe_model_cache_pinned(m));
            ok = 0;
        }
    }
    if (!ok)
        fprintf(stderr, "  forward %s: %s\n", path, d.msg);
    if (st && !moe_model_cache_stats(m, st))
        memset(st, 0, sizeof(*st));
    moe_seq_free(s);
    moe_model_free(m);
    if (!ok) {
        free(lg);
        return NULL;
    }
    return lg;
}

static void check_model(const char *file, int k)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    char path[4096], pack[4096];
    snprintf(path, sizeof(path), "%s/models/%s", ref, file);
    snprintf(pack, sizeof(pack), "%s/lane-%s.moe", moe_test_tmpdir(), file);
    struct moe_diag d = { 0 };
    struct moe_pack_write_opts po = { .threads = 2, .min_ratio = 1.0001 };
    CHECK_MSG(moe_pack_write(path, pack, &po, NULL, &d) == 0, "%s", d.msg);

    int V = 0, V2 = 0;
    const struct moe_model_opts base = { .n_threads = 2, .n_ctx = 64 };
    float *want = run(path, &base, &want_ids, &V, NULL);
    CHECK(want != NULL);
    const size_t bytes = (size_t)(N_TOK + N_GEN) * V * sizeof(float);

    static const char *lanes[] = { "copy", "cpu", "auto" };
    /* the CPU lane's four sources: the mapped GGUF, the host tier (a hit, or
     * a reserved entry filled by a read), and a read into the lane's buffer
     * (a pack without the tier, or gpt-oss's expert biases from a GGUF) */
    struct { int pack, slots, host, prefetch; } cfgs[] = {
        { 0, k, 0, 0 }, { 0, k + 1, 1, 1 }, { 1, k, 0, 1 }, { 1, k + 1, 1, 0 },
    };
    for (size_t c = 0; c < sizeof(cfgs) / sizeof(cfgs[0]); c++)
        for (size_t l = 0; l < sizeof(lanes) / sizeof(lanes[0]); l++) {
            struct moe_model_opts o = base;
            o.upload_weights = true;
            o.cache_experts = cfgs[c].slots;
            o.host_bytes = cfgs[c].host ? 64u << 20 : 0;
            o.prefetch = cfgs[c].prefetch ? MOE_PREFETCH_GATE : MOE_PREFETCH_NONE;
            o.prefetch_always = true;
            CHECK(moe_model_opts_set(&o, "miss_lane", lanes[l], NULL) == 0);
            struct moe_cache_stats st;
            float *got = run(cfgs[c].pack ? pack : path, &o, &got_ids, &V2, &st);
            CHECK_MSG(got != NULL, "%s %s lane %s failed", file, cfgs[c].pack ? "pack" : "gguf", lanes[l]);
            CHECK_INT(V2, ==, V);
            CHECK_INT(got_ids.n, ==, want_ids.n);
            CHECK_MSG(memcmp(got_ids.ids, want_ids.ids, (size_t)want_ids.n * sizeof(int32_t)) == 0,
                      "%s lane %s: the experts chosen differ from the resident run", file, lanes[l]);
            CHECK_MSG(memcmp(got, want, bytes) == 0, "%s via %s, %d slots, host tier %d, prefetch %d,"
                      " lane %s: logits differ from the resident run", file,
                      cfgs[c].pack ? "pack" : "GGUF", st.n_slots, cfgs[c].host, cfgs[c].prefetch, lanes[l]);
            printf("  %s %-4s %2d slots host %d pf %d %-4s: cpu %llu (%llu B, %.4f s) copy %llu (%llu B,"
                   " wait %.4f s) both %llu\n", file, cfgs[c].pack ? "pack" : "gguf", st.n_slots,
                   cfgs[c].host, cfgs[c].prefetch, lanes[l], (unsigned long long)st.lane_cpu,
                   (unsigned long long)st.lane_cpu_bytes, st.lane_cpu_s, (unsigned long long)st.lane_copy,
                   (unsigned long long)st.lane_copy_bytes, st.lane_copy_wait_s,
                   (unsigned long long)st.lane_both);
            /* the forced lanes really ran: a small cache misses */
            if (strcmp(lanes[l], "copy") == 0) {
                CHECK(st.lane_copy > 0 && st.lane_copy_bytes > 0);
                CHECK_U64(st.lane_cpu + st.lane_both, ==, 0);
            } else if (strcmp(lanes[l], "cpu") == 0) {
                CHECK(st.lane_cpu > 0 && st.lane_cpu_bytes > 0);
                CHECK_U64(st.lane_copy + st.lane_both, ==, 0);
            } else {
                CHECK(st.lane_cpu + st.lane_copy + st.lane_both > 0);
            }
            free(got);
        }
    /* on the CPU backend without upload_weights there is no device: no lanes */
    struct moe_model_opts o = base;
    o.cache_experts = k;
    CHECK(moe_model_opts_set(&o, "miss_lane", "cpu", NULL) == 0);
    struct moe_cache_stats st;
    float *got = run(path, &o, &got_ids, &V2, &st);
    CHECK(got != NULL);
    CHECK(memcmp(got, want, bytes) == 0);
    CHECK_U64(st.lane_cpu + st.lane_copy + st.lane_both, ==, 0);
    free(got);
    free(want);
}

/* A corrupt expert read by the CPU lane (a raw pack, every blob of layer 1
 * damaged): the pass fails with the read's own message (file, layer,
 * expert, offset), nothing stays pinned or reserved (the host tier's
 * destroy asserts it), and the model goes on for tokens routed elsewhere. */
static void test_corrupt_expert_cpu_lane(void)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    char path[4096], pack[4096];
    snprintf(path, sizeof(path), "%s/models/tiny-mixtral-Q4_0.gguf", ref);
    snprintf(pack, sizeof(pack), "%s/lane-corrupt.moe", moe_test_tmpdir());
    struct moe_diag d = { 0 };
    struct moe_pack_write_opts po = { .threads = 2, .min_ratio = 1000.0 };
    CHECK_MSG(moe_pack_write(path, pack, &po, NULL, &d) == 0, "%s", d.msg);
    struct moe_pack *p;
    CHECK_MSG(moe_pack_open(&p, pack, 0, &d) == 0, "%s", d.msg);
    const uint32_t E = moe_pack_n_expert(p);
    FILE *f = fopen(pack, "r+b");
    CHECK(f != NULL);
    for (uint32_t e = 0; e < E; e++) {
        struct moe_pack_blob b;
        CHECK(moe_pack_blob(p, 1, e, &b, &d) == 0);
        CHECK(fseek(f, (long)(b.offset + b.stored_size / 2), SEEK_SET) == 0);
        const int c = fgetc(f);
        CHECK(fseek(f, (long)(b.offset + b.stored_size / 2), SEEK_SET) == 0);
        fputc(c ^ 0x5a, f);
    }
    fclose(f);
    moe_pack_close(p);
    for (int host = 0; host < 2; host++) {
        struct moe_model_opts o = { .n_threads = 2, .n_ctx = 64, .cache_experts = 4, .upload_weights = true,
                                    .host_bytes = host ? 64u << 20 : 0 };
        CHECK(moe_model_opts_set(&o, "miss_lane", "cpu", NULL) == 0);
        struct moe_model *m;
        CHECK_MSG(moe_model_load(&m, pack, &o, &d) == 0, "%s", d.msg);
        struct moe_seq *s;
        CHECK(moe_seq_create(&s, m, &d) == 0);
        const int32_t t[2] = { 1, 2 };
        memset(&d, 0, sizeof(d));
        const int rc = moe_model_forward(m, s, t, 2, NULL, false, NULL, NULL, &d);
        printf("  host tier %d: forward: %s\n", host, d.msg);
        CHECK_INT(rc, ==, MOE_ECHECKSUM);
        CHECK_MSG(strstr(d.msg, "lane-corrupt.moe") && strstr(d.msg, "layer 1, expert "),
                  "message does not name file, layer and expert: %s", d.msg);
        CHECK_INT(moe_model_cache_pinned(m), ==, 0);
        struct moe_cache_stats st;
        CHECK(moe_model_cache_stats(m, &st));
        CHECK(st.lane_cpu > 0);
        moe_seq_free(s);
        moe_model_free(m);
    }
}

static void test_mixtral_q4_0(void) { check_model("tiny-mixtral-Q4_0.gguf", 2); }
static void test_qwen3moe_q4_k_m(void) { check_model("tiny-qwen3moe-Q4_K_M.gguf", 4); }
static void test_deepseek2(void) { check_model("tiny-deepseek2-F32.gguf", 2); }
static void test_gptoss_mxfp4(void) { check_model("tiny-gptoss-MXFP4_MOE.gguf", 2); }

int main(void)
{
    if (moe_test_ref_dir() == NULL)
        return 77;
    MOE_TEST_RUN(test_mixtral_q4_0);
    MOE_TEST_RUN(test_qwen3moe_q4_k_m);
    MOE_TEST_RUN(test_deepseek2);
    MOE_TEST_RUN(test_gptoss_mxfp4);
    MOE_TEST_RUN(test_corrupt_expert_cpu_lane);
    return moe_test_exit_code();
}
