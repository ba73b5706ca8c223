/* Allocation-failure sweep (shared/RELIABILITY.md row 3) over moe_gguf_open
 * and moe_gguf_open_mem: for N = 0, 1, 2, ... the allocation after N
 * successful ones fails; every attempt before the first success must return
 * -ENOMEM with *out NULL, a message naming the file, and leave the live
 * allocation count where it was. After the first success, closing the
 * object returns every allocation too.
 *
 * Two files: the builder's small base file (every value type; fits in one
 * arena chunk), and a larger one whose metadata needs several chunks,
 * including private chunks for items above the chunk size, so that a
 * failure lands in the middle of parsing and not only at the start. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include "common/alloc.h"
#include "io/gguf.h"
#include "tests/harness.h"
#include "tests/unit/gguf_builder.h"

/* kv: a 300 KB string, an array of 20000 short strings (320 KB of structs
 * plus one arena item per string), then the alignment; two tensors. */
static void build_big(struct gb *b)
{
    memset(b, 0, sizeof(*b));
    gb_bytes(b, "GGUF", 4);
    gb_u32(b, 3);
    gb_u64(b, 2);  /* n_tensors */
    gb_u64(b, 3);  /* n_kv */
    gb_str(b, "big.str");
    gb_u32(b, MOE_GGUF_STRING);
    gb_u64(b, 300000);
    for (int i = 0; i < 300000; i++)
        gb_u8(b, (uint8_t)('a' + i % 26));
    gb_str(b, "many.strs");
    gb_u32(b, MOE_GGUF_ARRAY);
    gb_u32(b, MOE_GGUF_STRING);
    gb_u64(b, 20000);
    for (int i = 0; i < 20000; i++) {
        char s[16];
        snprintf(s, sizeof(s), "s%d", i);
        gb_str(b, s);
    }
    gb_str(b, "general.alignment");
    gb_u32(b, MOE_GGUF_UINT32);
    gb_u32(b, 32);
    gb_str(b, "a");
    gb_u32(b, 1);
    gb_u64(b, 32);
    gb_u32(b, MOE_DTYPE_F32);
    gb_u64(b, 0);
    gb_str(b, "b");
    gb_u32(b, 1);
    gb_u64(b, 32);
    gb_u32(b, MOE_DTYPE_Q8_0);
    gb_u64(b, 128);
    gb_pad(b, 32);
    for (int i = 0; i < 128 + 34; i++)
        gb_u8(b, gb_data_byte((uint64_t)i));
}

static void sweep(const struct gb *b, int use_file, const char *what, uint64_t n_kv)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s.gguf", moe_test_tmpdir(), what);
    if (use_file) {
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        CHECK(fd >= 0);
        CHECK(write(fd, b->p, b->len) == (ssize_t)b->len);
        close(fd);
    }
    const char *name = use_file ? path : "sweep.gguf";
    for (long n = 0; n < 10000; n++) {
        long live = moe_alloc_live();
        struct moe_gguf *g = (struct moe_gguf *)(uintptr_t)1;
        struct moe_diag d = { 0 };
        moe_alloc_fail_after(n);
        int rc = use_file ? moe_gguf_open(&g, path, &d) : moe_gguf_open_mem(&g, b->p, b->len, name, &d);
        moe_alloc_fail_after(-1);
        if (rc == 0) {
            CHECK(g != NULL);
            CHECK_U64(moe_gguf_n_kv(g), ==, n_kv);
            CHECK(moe_gguf_kv_at(g, n_kv - 1) != NULL);
            moe_gguf_close(g);
            CHECK_MSG(moe_alloc_live() == live, "after close: %ld allocations leaked",
                      moe_alloc_live() - live);
            printf("  %s via %s: opened after %ld injected failures\n", what,
                   use_file ? "moe_gguf_open" : "moe_gguf_open_mem", n);
            CHECK(n > 0);
            return;
        }
        CHECK_MSG(rc == -ENOMEM, "N=%ld: rc %d (%s): %s", n, rc, moe_strerror(rc), d.msg);
        CHECK_MSG(g == NULL, "N=%ld: *out not NULL after a failure", n);
        CHECK_MSG(d.code == -ENOMEM && strstr(d.msg, name) != NULL, "N=%ld: message: %s", n, d.msg);
        CHECK_MSG(moe_alloc_live() == live, "N=%ld: %ld allocations leaked", n, moe_alloc_live() - live);
    }
    MOE_FAIL_AT("never succeeded");
}

static void sweep_and_clean(const struct gb *b, int use_file, const char *what, uint64_t n_kv)
{
    sweep(b, use_file, what, n_kv);
    if (use_file) {
        char path[4096];
        snprintf(path, sizeof(path), "%s/%s.gguf", moe_test_tmpdir(), what);
        unlink(path);
    }
}

static void test_sweep_mem(void)
{
    struct gb_spec s;
    struct gb b;
    gb_spec_base(&s);
    gb_build(&b, &s);
    sweep(&b, 0, "base", 18);
    free(b.p);
}

static void test_sweep_file(void)
{
    struct gb_spec s;
    struct gb b;
    gb_spec_base(&s);
    gb_build(&b, &s);
    sweep_and_clean(&b, 1, "base", 18);
    free(b.p);
}

static void test_sweep_big_mem(void)
{
    struct gb b;
    build_big(&b);
    sweep(&b, 0, "big", 3);
    free(b.p);
}

static void test_sweep_big_file(void)
{
    struct gb b;
    build_big(&b);
    sweep_and_clean(&b, 1, "big", 3);
    free(b.p);
}

/* A failure to allocate is not confused with a bad file: the same sweep
 * over a corrupt file gives -ENOMEM until the allocations succeed, then
 * MOE_EFORMAT, never success. */
static void test_sweep_corrupt(void)
{
    struct gb_spec s;
    struct gb b;
    gb_spec_base(&s);
    s.t[1].offset = 0; /* overlap: found after everything is parsed */
    gb_build(&b, &s);
    for (long n = 0; n < 10000; n++) {
        long live = moe_alloc_live();
        struct moe_gguf *g;
        struct moe_diag d = { 0 };
        moe_alloc_fail_after(n);
        int rc = moe_gguf_open_mem(&g, b.p, b.len, "bad.gguf", &d);
        moe_alloc_fail_after(-1);
        CHECK(g == NULL);
        CHECK_INT(moe_alloc_live(), ==, live);
        if (rc == MOE_EFORMAT) {
            CHECK(strstr(d.msg, "overlap") != NULL);
            free(b.p);
            return;
        }
        CHECK_MSG(rc == -ENOMEM, "N=%ld: rc %d: %s", n, rc, d.msg);
    }
    MOE_FAIL_AT("never reached the format error");
}

int main(void)
{
    /* one scratch directory for every case (each runs in a forked child) */
    const char *tmp = moe_test_tmpdir();
    MOE_TEST_RUN(test_sweep_mem);
    MOE_TEST_RUN(test_sweep_file);
    MOE_TEST_RUN(test_sweep_big_mem);
    MOE_TEST_RUN(test_sweep_big_file);
    MOE_TEST_RUN(test_sweep_corrupt);
    rmdir(tmp); /* empty again: each case removes its files */
    return moe_test_exit_code();
}
