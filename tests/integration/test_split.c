/* Split GGUF sets (`<name>-0000K-of-0000N.gguf`, llama.cpp's gguf-split
 * layout: the first part holds every key plus split.no/count/tensors.count
 * and its share of the tensors, the others only the split keys and their
 * tensors): opened as one model by the reader, by model load (logits equal
 * to the single file's), by the memory plan and by the pack writer (the
 * pack equals the single file's pack past its header);
 * hostile sets refused naming the part. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/gguf.h"
#include "io/gguf_writer.h"
#include "io/pack.h"
#include "model/model.h"
#include "model/plan.h"
#include "tests/harness.h"

enum hostile { OK, WRONG_NO, WRONG_COUNT, DUP_TENSOR, WRONG_TOTAL };

/* Writes src as n parts under dir/name-0000K-of-0000N.gguf; `bad` spoils
 * part 2 (or the first part's total) the way the case says. */
static int write_split(const char *src, const char *dir, const char *name, int n, enum hostile bad)
{
    struct moe_gguf *g;
    struct moe_diag d = { 0 };
    if (moe_gguf_open(&g, src, &d) || moe_gguf_map(g, &d))
        return -1;
    const uint64_t nt = moe_gguf_n_tensors(g);
    int rc = 0;
    for (int p = 0; p < n && rc == 0; p++) {
        char path[4096];
        snprintf(path, sizeof(path), "%s/%s-%05d-of-%05d.gguf", dir, name, p + 1, n);
        struct moe_gguf_writer *w;
        if (moe_gguf_writer_create(&w, path, &d))
            return -1;
        if (p == 0)
            for (uint64_t i = 0; i < moe_gguf_n_kv(g); i++)
                moe_gguf_writer_add_value(w, moe_gguf_kv_at(g, i)->key, &moe_gguf_kv_at(g, i)->value);
        const uint16_t no = (uint16_t)(p == 1 && bad == WRONG_NO ? 2 : p);
        const uint16_t cnt = (uint16_t)(p == 1 && bad == WRONG_COUNT ? n + 1 : n);
        const int32_t total = (int32_t)(p == 0 && bad == WRONG_TOTAL ? nt + 1 : nt);
        moe_gguf_writer_add_scalar(w, "split.no", MOE_GGUF_UINT16, &no);
        moe_gguf_writer_add_scalar(w, "split.count", MOE_GGUF_UINT16, &cnt);
        moe_gguf_writer_add_scalar(w, "split.tensors.count", MOE_GGUF_INT32, &total);
        /* part p holds tensors [lo, hi); a duplicate repeats part 0's first */
        const uint64_t lo = nt * (uint64_t)p / (uint64_t)n, hi = nt * (uint64_t)(p + 1) / (uint64_t)n;
        const bool dup = p == 1 && bad == DUP_TENSOR;
        for (uint64_t i = lo; i < hi; i++) {
            const struct moe_gguf_tensor *t = moe_gguf_tensor_at(g, dup && i == lo ? 0 : i);
            moe_gguf_writer_add_tensor(w, t->name, t->n_dims, t->ne, t->dtype, NULL);
        }
        moe_gguf_writer_begin_data(w);
        for (uint64_t i = lo; i < hi; i++) {
            const struct moe_gguf_tensor *t = moe_gguf_tensor_at(g, dup && i == lo ? 0 : i);
            moe_gguf_writer_write(w, moe_gguf_tensor_data(g, t), (size_t)t->size);
        }
        rc = moe_gguf_writer_finish(w, &d);
    }
    moe_gguf_close(g);
    return rc;
}

static float *logits_of(const char *path, int *V)
{
    struct moe_model *m;
    struct moe_diag d = { 0 };
    struct moe_model_opts o = { .n_threads = 2, .n_ctx = 32 };
    if (moe_model_load(&m, path, &o, &d)) {
        fprintf(stderr, "  %s: %s\n", path, d.msg);
        return NULL;
    }
    *V = moe_model_cfg(m)->n_vocab;
    const int32_t toks[6] = { 1, 7, 99, 1000, 5, 42 };
    float *lg = malloc((size_t)6 * *V * sizeof(float));
    struct moe_seq *s;
    int ok = moe_seq_create(&s, m, &d) == 0 && moe_model_forward(m, s, toks, 6, lg, true, NULL, NULL, &d) == 0;
    if (!ok)
        fprintf(stderr, "  %s: %s\n", path, d.msg);
    moe_seq_free(s);
    moe_model_free(m);
    if (!ok) {
        free(lg);
        return NULL;
    }
    return lg;
}

static void test_split_set(void)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    char src[4096], first[4096];
    snprintf(src, sizeof(src), "%s/models/tiny-qwen3moe-Q4_K_M.gguf", ref);
    CHECK(write_split(src, moe_test_tmpdir(), "q3", 3, OK) == 0);
    snprintf(first, sizeof(first), "%s/q3-00001-of-00003.gguf", moe_test_tmpdir());
    struct moe_gguf *a, *b;
    struct moe_diag d = { 0 };
    CHECK_MSG(moe_gguf_open(&a, src, &d) == 0, "%s", d.msg);
    CHECK_MSG(moe_gguf_open(&b, first, &d) == 0, "%s", d.msg);
    CHECK_INT(moe_gguf_n_parts(b), ==, 3);
    CHECK_INT(moe_gguf_n_tensors(b), ==, moe_gguf_n_tensors(a));
    CHECK(moe_gguf_map(a, &d) == 0 && moe_gguf_map(b, &d) == 0);
    /* every tensor, by name, same bytes through map and pread */
    for (uint64_t i = 0; i < moe_gguf_n_tensors(a); i++) {
        const struct moe_gguf_tensor *ta = moe_gguf_tensor_at(a, i);
        const struct moe_gguf_tensor *tb = moe_gguf_find_tensor(b, ta->name);
        CHECK_MSG(tb != NULL && tb->size == ta->size, "%s", ta->name);
        CHECK(memcmp(moe_gguf_tensor_data(a, ta), moe_gguf_tensor_data(b, tb), (size_t)ta->size) == 0);
        uint8_t x[64];
        const size_t k = ta->size < sizeof(x) ? (size_t)ta->size : sizeof(x);
        CHECK(moe_gguf_pread(b, tb, ta->size - k, x, k, &d) == 0);
        CHECK(memcmp(x, (const uint8_t *)moe_gguf_tensor_data(a, ta) + ta->size - k, k) == 0);
    }
    moe_gguf_close(a);
    moe_gguf_close(b);

    /* the model and its plan */
    int V1 = 0, V2 = 0;
    float *l1 = logits_of(src, &V1), *l2 = logits_of(first, &V2);
    CHECK(l1 && l2 && V1 == V2);
    CHECK_MSG(memcmp(l1, l2, (size_t)6 * V1 * sizeof(float)) == 0, "logits of the split set differ");
    free(l1);
    free(l2);
    struct moe_model_plan p1, p2;
    struct moe_model_opts o = { .n_ctx = 32 };
    CHECK(moe_model_plan(src, &o, &p1, &d) == 0 && moe_model_plan(first, &o, &p2, &d) == 0);
    CHECK(p1.dense_bytes == p2.dense_bytes && p1.slot_bytes == p2.slot_bytes && p1.all_slots == p2.all_slots);

    /* a pack of the set equals the single file's pack, expert by expert */
    char pk1[4096], pk2[4096];
    snprintf(pk1, sizeof(pk1), "%s/one.moe", moe_test_tmpdir());
    snprintf(pk2, sizeof(pk2), "%s/split.moe", moe_test_tmpdir());
    struct moe_pack_write_opts po = { .threads = 2 };
    CHECK_MSG(moe_pack_write(src, pk1, &po, NULL, &d) == 0, "%s", d.msg);
    CHECK_MSG(moe_pack_write(first, pk2, &po, NULL, &d) == 0, "%s", d.msg);
    size_t n1, n2;
    char *f1 = moe_test_read_file(pk1, &n1), *f2 = moe_test_read_file(pk2, &n2);
    CHECK(f1 && f2);
    /* all but the header, which records the source's size on disk (and its
     * own checksum): the set's three headers make it larger */
    CHECK_MSG(n1 == n2 && n1 > 160 && memcmp(f1 + 160, f2 + 160, n1 - 160) == 0,
              "packs differ (%zu vs %zu bytes)", n1, n2);
    free(f1);
    free(f2);
    float *l3 = logits_of(pk2, &V2);
    l1 = logits_of(src, &V1);
    CHECK(l1 && l3 && memcmp(l1, l3, (size_t)6 * V1 * sizeof(float)) == 0);
    free(l1);
    free(l3);

    /* with an expert budget the set must be packed first: refused, saying so */
    struct moe_model *m;
    struct moe_model_opts oc = { .n_ctx = 32, .cache_experts = 8 };
    memset(&d, 0, sizeof(d));
    CHECK(moe_model_load(&m, first, &oc, &d) == MOE_EUNSUPPORTED);
    CHECK_MSG(strstr(d.msg, "split GGUF") && strstr(d.msg, "moectl pack"), "%s", d.msg);
}

static void expect_bad(const char *name, enum hostile bad, bool remove_part2, bool open_second,
                       const char *needle)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    char src[4096], path[4096];
    snprintf(src, sizeof(src), "%s/models/tiny-mixtral-Q8_0.gguf", ref);
    CHECK(write_split(src, moe_test_tmpdir(), name, 3, bad) == 0);
    if (remove_part2) {
        snprintf(path, sizeof(path), "%s/%s-00002-of-00003.gguf", moe_test_tmpdir(), name);
        CHECK(unlink(path) == 0);
    }
    snprintf(path, sizeof(path), "%s/%s-0000%d-of-00003.gguf", moe_test_tmpdir(), name,
             open_second ? 2 : 1);
    struct moe_gguf *g = (struct moe_gguf *)(uintptr_t)1;
    struct moe_diag d = { 0 };
    int rc = moe_gguf_open(&g, path, &d);
    printf("  %s: %s\n", name, d.msg);
    CHECK(rc != 0 && g == NULL);
    CHECK_MSG(strstr(d.msg, needle) != NULL, "message lacks '%s': %s", needle, d.msg);
}

static void test_missing_part(void) { expect_bad("miss", OK, true, false, "part 2 of 3 is missing"); }
static void test_wrong_no(void) { expect_bad("wno", WRONG_NO, false, false, "a part of another set"); }
static void test_wrong_count(void) { expect_bad("wcnt", WRONG_COUNT, false, false, "wcnt-00002-of-00003.gguf: split part 2 of 3"); }
static void test_dup_tensor(void) { expect_bad("dup", DUP_TENSOR, false, false, "is in split parts 1 and 2"); }
static void test_wrong_total(void) { expect_bad("tot", WRONG_TOTAL, false, false, "split.tensors.count says"); }
static void test_second_part(void) { expect_bad("sec", OK, false, true, "open the first part"); }

int main(void)
{
    MOE_TEST_RUN(test_split_set);
    MOE_TEST_RUN(test_missing_part);
    MOE_TEST_RUN(test_wrong_no);
    MOE_TEST_RUN(test_wrong_count);
    MOE_TEST_RUN(test_dup_tensor);
    MOE_TEST_RUN(test_wrong_total);
    MOE_TEST_RUN(test_second_part);
    return moe_test_exit_code();
}
