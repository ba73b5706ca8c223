/* .moe pack: writer and reader. Every tensor of every shared/ref model
 * round-trips bit-exactly; corruption of a blob, an index entry, the header
 * and truncation are reported with the right code and layer/expert; a
 * killed pack leaves nothing under the final name; allocation failures in
 * moe_pack_open leave nothing behind (shared/RELIABILITY.md rows 3-5, 7). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <xxhash.h>

#include "common/alloc.h"
#include "io/pack-impl.h"
#include "tests/harness.h"

static char models[64][512];
static int n_models;

static void find_models(void)
{
    n_models = 0;
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        return;
    char dir[512];
    snprintf(dir, sizeof(dir), "%s/models", ref);
    struct dirent **ents;
    int n = scandir(dir, &ents, NULL, alphasort);
    for (int i = 0; i < n; i++) {
        size_t len = strlen(ents[i]->d_name);
        if (len > 5 && strcmp(ents[i]->d_name + len - 5, ".gguf") == 0 && n_models < 64)
            snprintf(models[n_models++], sizeof(models[0]), "%s/%s", dir, ents[i]->d_name);
        free(ents[i]);
    }
    if (n >= 0)
        free(ents);
}

static const char *model_named(const char *part)
{
    for (int i = 0; i < n_models; i++)
        if (strstr(models[i], part))
            return models[i];
    return NULL;
}

/* Compares every expert of the pack with the GGUF's slices and every dense
 * tensor and key with the GGUF's. Returns 0 or prints the first mismatch. */
static int compare_pack(const char *gguf_path, const char *pack_path)
{
    struct moe_diag d = {0};
    struct moe_gguf *g = NULL;
    struct moe_pack *p = NULL;
    int bad = 1;
    uint8_t *a = NULL, *b = NULL;
    if (moe_gguf_open(&g, gguf_path, &d) < 0 || moe_pack_open(&p, pack_path, 0, &d) < 0) {
        fprintf(stderr, "  open: %s\n", d.msg);
        goto out;
    }
    if (moe_pack_n_bad_entries(p) != 0) {
        fprintf(stderr, "  bad entries\n");
        goto out;
    }
    const struct moe_gguf *pg = moe_pack_gguf(p);
    uint64_t n_dense = 0, n_exp = 0;
    a = malloc(moe_pack_max_raw(p) + 1);
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const struct moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        size_t sz = (size_t)t->size;
        free(b);
        b = malloc(sz + 1);
        uint32_t layer;
        if (moe_expert_tensor_name(t->name, &layer)) {
            n_exp++;
            if (moe_gguf_find_tensor(pg, t->name) != NULL) {
                fprintf(stderr, "  %s: expert tensor in the dense section\n", t->name);
                goto out;
            }
            const struct moe_expert_layout *L = moe_pack_layout(p, layer);
            const struct moe_expert_slice *s = NULL;
            for (uint32_t k = 0; L && k < L->n_slices; k++)
                if (strcmp(L->s[k].name, t->name) == 0)
                    s = &L->s[k];
            uint64_t ne_e = t->ne[t->n_dims - 1];
            if (s == NULL || s->dtype != t->dtype || s->size * ne_e != t->size ||
                ne_e != moe_pack_n_expert(p)) {
                fprintf(stderr, "  %s: slice missing or wrong\n", t->name);
                goto out;
            }
            if (moe_gguf_pread(g, t, 0, b, sz, &d) < 0)
                goto out;
            for (uint32_t e = 0; e < ne_e; e++) {
                if (moe_pack_read_expert(p, layer, e, a, (size_t)L->raw_size, NULL, &d) < 0) {
                    fprintf(stderr, "  read_expert: %s\n", d.msg);
                    goto out;
                }
                if (memcmp(a + s->offset, b + e * s->size, (size_t)s->size) != 0) {
                    fprintf(stderr, "  %s expert %u differs\n", t->name, e);
                    goto out;
                }
            }
        } else {
            n_dense++;
            const struct moe_gguf_tensor *u = moe_gguf_find_tensor(pg, t->name);
            if (u == NULL || u->dtype != t->dtype || u->n_dims != t->n_dims || u->size != t->size ||
                memcmp(u->ne, t->ne, sizeof(t->ne)) != 0) {
                fprintf(stderr, "  dense %s missing or misshapen\n", t->name);
                goto out;
            }
            free(a);
            a = malloc(sz + 1);
            if (moe_gguf_pread(g, t, 0, b, sz, &d) < 0 || moe_gguf_pread(pg, u, 0, a, sz, &d) < 0 ||
                memcmp(a, b, sz) != 0) {
                fprintf(stderr, "  dense %s differs\n", t->name);
                goto out;
            }
            free(a);
            a = malloc(moe_pack_max_raw(p) + 1);
        }
    }
    if (n_exp == 0 || moe_gguf_n_tensors(pg) != n_dense || moe_gguf_n_kv(pg) != moe_gguf_n_kv(g)) {
        fprintf(stderr, "  tensor or key counts differ\n");
        goto out;
    }
    for (uint64_t i = 0; i < moe_gguf_n_kv(g); i++) {
        const struct moe_gguf_kv *x = moe_gguf_kv_at(g, i), *y = moe_gguf_kv_at(pg, i);
        if (strcmp(x->key, y->key) != 0 || x->value.type != y->value.type) {
            fprintf(stderr, "  key %s differs\n", x->key);
            goto out;
        }
    }
    if (moe_gguf_alignment(pg) != moe_gguf_alignment(g) || moe_pack_verify_dense(p, &d) < 0) {
        fprintf(stderr, "  dense: %s\n", d.msg);
        goto out;
    }
    bad = 0;
out:
    free(a);
    free(b);
    moe_pack_close(p);
    moe_gguf_close(g);
    return bad;
}

static void test_roundtrip_every_ref_model(void)
{
    find_models();
    if (n_models == 0)
        MOE_SKIP("no shared/ref models");
    for (int i = 0; i < n_models; i++) {
        char out[600];
        snprintf(out, sizeof(out), "%s/m%d.moe", moe_test_tmpdir(), i);
        struct moe_diag d = {0};
        struct moe_pack_stats st;
        struct moe_pack_write_opts o = { .threads = 2 };
        int rc = moe_pack_write(models[i], out, &o, &st, &d);
        CHECK_MSG(rc == 0, "%s: %s", models[i], d.msg);
        CHECK_MSG(compare_pack(models[i], out) == 0, "%s", models[i]);
        CHECK(st.n_blobs > 0 && st.raw_bytes > 0);
        struct stat sb;
        char tmp[620];
        snprintf(tmp, sizeof(tmp), "%s.tmp", out);
        CHECK(stat(tmp, &sb) < 0 && errno == ENOENT);
        CHECK(stat(out, &sb) == 0 && (uint64_t)sb.st_size == st.file_size);
        CHECK(sb.st_size % MOE_PACK_BLOB_ALIGN == 0);
        unlink(out);
    }
}

/* Both codecs and raw storage, on a 16-bit model (byte grouping) and a
 * quantized one, with 1 and 3 threads. */
static void test_roundtrip_codecs(void)
{
    find_models();
    const char *names[] = { "tiny-qwen3moe-F16", "tiny-mixtral-Q8_0", "tiny-gptoss-MXFP4" };
    const double ratios[] = { 1.0, 1000.0 };
    int tested = 0;
    for (unsigned m = 0; m < 3; m++) {
        const char *src = model_named(names[m]);
        if (src == NULL)
            continue;
        for (unsigned r = 0; r < 2; r++) {
            char out[600];
            snprintf(out, sizeof(out), "%s/c.moe", moe_test_tmpdir());
            struct moe_diag d = {0};
            struct moe_pack_stats st;
            struct moe_pack_write_opts o = { .threads = 1 + 2 * r, .min_ratio = ratios[r],
                                             .level = 1 };
            CHECK_MSG(moe_pack_write(src, out, &o, &st, &d) == 0, "%s", d.msg);
            if (r == 1)
                CHECK_U64(st.n_compressed, ==, 0);
            else if (m == 0)
                CHECK_U64(st.n_compressed, ==, st.n_blobs); /* F16 always shrinks */
            CHECK_MSG(compare_pack(src, out) == 0, "%s ratio %g", src, ratios[r]);
            tested++;
        }
    }
    if (tested == 0)
        MOE_SKIP("no shared/ref models");
}

/* Packs the Q8_0 mixtral (or the first model) into the tmpdir. */
static int make_pack(char *out, size_t n, double min_ratio)
{
    find_models();
    const char *src = model_named("tiny-mixtral-F16");
    if (src == NULL)
        return -1;
    snprintf(out, n, "%s/t.moe", moe_test_tmpdir());
    struct moe_diag d = {0};
    struct moe_pack_write_opts o = { .threads = 2, .min_ratio = min_ratio };
    int rc = moe_pack_write(src, out, &o, NULL, &d);
    if (rc < 0)
        fprintf(stderr, "  make_pack: %s\n", d.msg);
    return rc;
}

static int read_header(const char *path, struct pack_header *h)
{
    int fd = open(path, O_RDONLY);
    int ok = fd >= 0 && pread(fd, h, sizeof(*h), 0) == (ssize_t)sizeof(*h);
    if (fd >= 0)
        close(fd);
    return ok ? 0 : -1;
}

static int patch(const char *path, uint64_t off, const void *p, size_t n)
{
    int fd = open(path, O_RDWR);
    int ok = fd >= 0 && pwrite(fd, p, n, (off_t)off) == (ssize_t)n;
    if (fd >= 0)
        close(fd);
    return ok ? 0 : -1;
}

static void test_blob_bitflip_is_checksum_error(void)
{
    char path[600];
    if (make_pack(path, sizeof(path), 0) < 0)
        MOE_SKIP("no model");
    struct moe_diag d = {0};
    struct moe_pack *p = NULL;
    CHECK(moe_pack_open(&p, path, 0, &d) == 0);
    struct moe_pack_blob b;
    CHECK(moe_pack_blob(p, 1, 2, &b, &d) == 0);
    size_t raw = (size_t)b.raw_size;
    moe_pack_close(p);
    uint8_t byte;
    int fd = open(path, O_RDONLY);
    CHECK(pread(fd, &byte, 1, (off_t)(b.offset + b.stored_size / 2)) == 1);
    close(fd);
    byte ^= 0x10;
    CHECK(patch(path, b.offset + b.stored_size / 2, &byte, 1) == 0);

    CHECK(moe_pack_open(&p, path, 0, &d) == 0);
    uint8_t *dst = malloc(raw);
    memset(dst, 0xab, raw);
    int rc = moe_pack_read_expert(p, 1, 2, dst, raw, NULL, &d);
    CHECK_INT(rc, ==, MOE_ECHECKSUM);
    CHECK_MSG(strstr(d.msg, "layer 1, expert 2") != NULL, "%s", d.msg);
    for (size_t i = 0; i < raw; i++)
        CHECK_MSG(dst[i] == 0xab, "dst written at %zu", i);
    /* the neighbours still load */
    moe_diag_clear(&d);
    CHECK_MSG(moe_pack_read_expert(p, 1, 1, dst, raw, NULL, &d) == 0, "%s", d.msg);
    CHECK(moe_pack_read_expert(p, 1, 3, dst, raw, NULL, &d) == 0);
    free(dst);
    moe_pack_close(p);
}

static uint64_t entry_off(const struct pack_header *h, uint32_t layer, uint32_t expert)
{
    return h->index_offset + ((uint64_t)layer * h->n_expert + expert) * sizeof(struct pack_entry_rec);
}

static void test_index_entry_corruption(void)
{
    char path[600];
    if (make_pack(path, sizeof(path), 0) < 0)
        MOE_SKIP("no model");
    struct pack_header h;
    CHECK(read_header(path, &h) == 0);
    /* (a) a flipped bit in layer 2 expert 3's raw size; (b) layer 3 expert
     * 0 gets a wrong size with a recomputed entry checksum (a hostile
     * writer): structural checks catch it too. */
    struct pack_entry_rec r;
    int fd = open(path, O_RDONLY);
    CHECK(pread(fd, &r, sizeof(r), (off_t)entry_off(&h, 2, 3)) == (ssize_t)sizeof(r));
    r.raw_size ^= 4;
    CHECK(patch(path, entry_off(&h, 2, 3), &r, sizeof(r)) == 0);
    CHECK(pread(fd, &r, sizeof(r), (off_t)entry_off(&h, 3, 0)) == (ssize_t)sizeof(r));
    close(fd);
    r.stored_size = r.stored_size + (1u << 30);
    r.entry_xxh3 = XXH3_64bits(&r, PACK_ENTRY_HASHED);
    CHECK(patch(path, entry_off(&h, 3, 0), &r, sizeof(r)) == 0);

    struct moe_diag d = {0};
    struct moe_pack *p = NULL;
    CHECK_MSG(moe_pack_open(&p, path, 0, &d) == 0, "%s", d.msg);
    CHECK_U64(moe_pack_n_bad_entries(p), ==, 2);
    size_t raw = (size_t)moe_pack_layout(p, 2)->raw_size;
    uint8_t *dst = malloc(raw);
    memset(dst, 0xcd, raw);
    int rc = moe_pack_read_expert(p, 2, 3, dst, raw, NULL, &d);
    CHECK_INT(rc, ==, MOE_EFORMAT);
    CHECK_MSG(strstr(d.msg, "layer 2, expert 3") && strstr(d.msg, "index entry"), "%s", d.msg);
    moe_diag_clear(&d);
    rc = moe_pack_read_expert(p, 3, 0, dst, raw, NULL, &d);
    CHECK_INT(rc, ==, MOE_EFORMAT);
    CHECK_MSG(strstr(d.msg, "layer 3, expert 0") && strstr(d.msg, "stored size"), "%s", d.msg);
    for (size_t i = 0; i < raw; i++)
        CHECK_MSG(dst[i] == 0xcd, "dst written at %zu", i);
    CHECK(moe_pack_read_expert(p, 2, 4, dst, raw, NULL, &d) == 0);
    CHECK(moe_pack_read_expert(p, 3, 1, dst, raw, NULL, &d) == 0);
    free(dst);
    moe_pack_close(p);
}

static void test_header_and_truncation(void)
{
    char path[600];
    if (make_pack(path, sizeof(path), 0) < 0)
        MOE_SKIP("no model");
    struct stat sb;
    CHECK(stat(path, &sb) == 0);
    struct moe_diag d = {0};
    struct moe_pack *p = NULL;
    /* truncated by one block, then mid-header, then empty */
    const off_t cuts[] = { sb.st_size - 4096, sb.st_size - 1, 100, 0 };
    for (unsigned i = 0; i < 4; i++) {
        CHECK(truncate(path, cuts[i]) == 0);
        moe_diag_clear(&d);
        int rc = moe_pack_open(&p, path, 0, &d);
        CHECK_INT(rc, ==, MOE_EFORMAT);
        CHECK(p == NULL);
        CHECK_MSG(strstr(d.msg, path) != NULL, "%s", d.msg);
        if (i == 0)
            CHECK_MSG(strstr(d.msg, "truncated") != NULL, "%s", d.msg);
    }
    CHECK(make_pack(path, sizeof(path), 0) == 0);
    uint32_t nexp = 1u << 20;  /* n_expert: header checksum catches it */
    CHECK(patch(path, offsetof(struct pack_header, n_expert), &nexp, 4) == 0);
    moe_diag_clear(&d);
    CHECK_INT(moe_pack_open(&p, path, 0, &d), ==, MOE_ECHECKSUM);
    CHECK_MSG(strstr(d.msg, "header") != NULL, "%s", d.msg);
    /* without checksums (fuzz mode) the structural check still refuses */
    moe_diag_clear(&d);
    CHECK_INT(moe_pack_open(&p, path, MOE_PACK_OPEN_NO_META_CHECKSUMS, &d), ==, MOE_EFORMAT);
    CHECK(make_pack(path, sizeof(path), 0) == 0);
    struct pack_header h;
    CHECK(read_header(path, &h) == 0);
    uint8_t x = 0x55;
    CHECK(patch(path, h.tensors_offset + 3, &x, 1) == 0);
    moe_diag_clear(&d);
    CHECK_INT(moe_pack_open(&p, path, 0, &d), ==, MOE_ECHECKSUM);
    CHECK_MSG(strstr(d.msg, "tensor table") != NULL, "%s", d.msg);
    CHECK(make_pack(path, sizeof(path), 0) == 0);
    CHECK(patch(path, h.dense_offset + h.dense_size / 2, &x, 1) == 0);
    moe_diag_clear(&d);
    /* dense corruption: caught by verify (open checks only its structure) */
    if (moe_pack_open(&p, path, 0, &d) == 0) {
        CHECK_INT(moe_pack_verify_dense(p, &d), ==, MOE_ECHECKSUM);
        moe_pack_close(p);
    }
}

static void on_progress(void *arg, uint64_t done, uint64_t total)
{
    (void)done;
    (void)total;
    int fd = *(int *)arg;
    if (write(fd, "x", 1) != 1)
        _exit(3);
    for (;;)
        pause();  /* wait for SIGKILL */
}

static void test_sigkill_during_pack(void)
{
    find_models();
    const char *src = model_named("tiny-qwen3moe-F16");
    if (src == NULL)
        MOE_SKIP("no model");
    char out[600], tmp[620];
    snprintf(out, sizeof(out), "%s/k.moe", moe_test_tmpdir());
    snprintf(tmp, sizeof(tmp), "%s.tmp", out);
    int pfd[2];
    CHECK(pipe(pfd) == 0);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        close(pfd[0]);
        struct moe_pack_write_opts o = { .threads = 2, .progress = on_progress,
                                         .progress_arg = &pfd[1] };
        moe_pack_write(src, out, &o, NULL, NULL);
        _exit(4);
    }
    close(pfd[1]);
    char c;
    CHECK(read(pfd[0], &c, 1) == 1);  /* the first blob is written */
    close(pfd[0]);
    struct stat sb;
    CHECK(stat(tmp, &sb) == 0);
    kill(pid, SIGKILL);
    int st;
    waitpid(pid, &st, 0);
    CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
    CHECK(stat(out, &sb) < 0 && errno == ENOENT);
    CHECK(stat(tmp, &sb) == 0);
    /* a reader never takes the temporary file for a pack */
    struct moe_pack *p = NULL;
    struct moe_diag d = {0};
    CHECK(moe_pack_open(&p, tmp, 0, &d) < 0);
    /* the next pack removes it and succeeds */
    struct moe_pack_stats s2;
    struct moe_pack_write_opts o = { .threads = 2, .level = 1 };
    CHECK_MSG(moe_pack_write(src, out, &o, &s2, &d) == 0, "%s", d.msg);
    CHECK(s2.removed_stale_tmp);
    CHECK(stat(tmp, &sb) < 0 && errno == ENOENT);
    CHECK(stat(out, &sb) == 0);
}

static void test_busy_tmp_and_bad_input(void)
{
    find_models();
    const char *src = model_named("tiny-mixtral-Q4_0");
    if (src == NULL)
        MOE_SKIP("no model");
    char out[600], tmp[620];
    snprintf(out, sizeof(out), "%s/b.moe", moe_test_tmpdir());
    snprintf(tmp, sizeof(tmp), "%s.tmp", out);
    int fd = open(tmp, O_RDWR | O_CREAT, 0644);
    CHECK(fd >= 0 && flock(fd, LOCK_EX) == 0);
    struct moe_diag d = {0};
    CHECK_INT(moe_pack_write(src, out, NULL, NULL, &d), ==, -EBUSY);
    struct stat sb;
    CHECK(stat(out, &sb) < 0 && stat(tmp, &sb) == 0);
    close(fd);
    unlink(tmp);
    /* a pack is not a GGUF; a missing file; output = input */
    CHECK(moe_pack_write(src, out, NULL, NULL, &d) == 0);
    moe_diag_clear(&d);
    char out2[620];
    snprintf(out2, sizeof(out2), "%s/b2.moe", moe_test_tmpdir());
    CHECK_INT(moe_pack_write(out, out2, NULL, NULL, &d), ==, MOE_EFORMAT);
    CHECK(stat(out2, &sb) < 0 && stat(tmp, &sb) < 0);
    moe_diag_clear(&d);
    CHECK_INT(moe_pack_write("/nonexistent.gguf", out2, NULL, NULL, &d), ==, -ENOENT);
    moe_diag_clear(&d);
    CHECK(moe_pack_write(src, src, NULL, NULL, &d) < 0);
    /* a GGUF is not a pack */
    struct moe_pack *p = NULL;
    moe_diag_clear(&d);
    CHECK_INT(moe_pack_open(&p, src, 0, &d), ==, MOE_EFORMAT);
    CHECK_MSG(strstr(d.msg, "magic") != NULL, "%s", d.msg);
}

static void test_open_allocation_failures(void)
{
    char path[600];
    if (make_pack(path, sizeof(path), 0) < 0)
        MOE_SKIP("no model");
    long base = moe_alloc_live();
    int ok = 0;
    for (long n = 0; n < 10000 && !ok; n++) {
        struct moe_pack *p = NULL;
        struct moe_diag d = {0};
        moe_alloc_fail_after(n);
        int rc = moe_pack_open(&p, path, 0, &d);
        moe_alloc_fail_after(-1);
        if (rc == 0) {
            ok = 1;
            moe_pack_close(p);
        } else {
            CHECK_MSG(rc == -ENOMEM, "n=%ld: %d %s", n, rc, d.msg);
            CHECK(p == NULL);
        }
        CHECK_INT(moe_alloc_live(), ==, base);
    }
    CHECK(ok);
}

int main(void)
{
    MOE_TEST_RUN(test_roundtrip_every_ref_model);
    MOE_TEST_RUN(test_roundtrip_codecs);
    MOE_TEST_RUN(test_blob_bitflip_is_checksum_error);
    MOE_TEST_RUN(test_index_entry_corruption);
    MOE_TEST_RUN(test_header_and_truncation);
    MOE_TEST_RUN(test_sigkill_during_pack);
    MOE_TEST_RUN(test_busy_tmp_and_bad_input);
    MOE_TEST_RUN(test_open_allocation_failures);
    return moe_test_exit_code();
}
