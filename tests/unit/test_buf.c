/* common/buf.h: the bounded growable buffer and array growth. Appends past
 * the limit fail and change nothing; every allocation failure is -ENOMEM
 * with the buffer unchanged and nothing leaked; reads stop at the limit. */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "common/alloc.h"
#include "common/buf.h"
#include "common/error.h"
#include "tests/harness.h"

static void test_append_and_terminator(void)
{
    struct moe_buf b;
    moe_buf_init(&b, 0);
    CHECK(b.data == NULL && b.len == 0);
    for (int i = 0; i < 1000; i++)
        CHECK_INT(moe_buf_printf(&b, "%d,", i), ==, 0);
    CHECK_INT(b.len, ==, strlen(b.data));
    CHECK(strncmp(b.data, "0,1,2,", 6) == 0);
    CHECK(strcmp(b.data + b.len - 4, "999,") == 0);
    /* a formatted piece longer than the stack buffer */
    char big[1000];
    memset(big, 'x', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    size_t before = b.len;
    CHECK_INT(moe_buf_printf(&b, "[%s]", big), ==, 0);
    CHECK_INT(b.len, ==, before + 1001);
    CHECK(b.data[b.len] == '\0' && b.data[b.len - 1] == ']');
    moe_buf_consume(&b, before);
    CHECK_INT(b.len, ==, 1001);
    CHECK(b.data[0] == '[');
    size_t n;
    char *p = moe_buf_take(&b, &n);
    CHECK(p != NULL && n == 1001 && strlen(p) == 1001);
    CHECK(b.data == NULL && b.len == 0);
    moe_free(p);
    p = moe_buf_take(&b, &n); /* empty: "" */
    CHECK(p != NULL && n == 0 && p[0] == '\0');
    moe_free(p);
}

static void test_limit(void)
{
    struct moe_buf b;
    moe_buf_init(&b, 10);
    CHECK_INT(moe_buf_append(&b, "0123456789", 10), ==, 0);
    CHECK_INT(moe_buf_putc(&b, 'x'), ==, MOE_ELIMIT);
    CHECK_INT(b.len, ==, 10);
    CHECK_STR(b.data, "0123456789");
    CHECK(b.cap <= 11);   /* never allocated past what the limit can use */
    moe_buf_clear(&b);
    CHECK_INT(moe_buf_printf(&b, "%s", "01234567890"), ==, MOE_ELIMIT);
    CHECK_INT(b.len, ==, 0);
    CHECK_INT(moe_buf_reserve(&b, SIZE_MAX), ==, MOE_ELIMIT);
    moe_buf_free(&b);
    moe_buf_init(&b, 0);
    CHECK_INT(moe_buf_reserve(&b, SIZE_MAX - 1), ==, MOE_ELIMIT);
    moe_buf_free(&b);
}

static void test_alloc_failure(void)
{
    for (long n = 0; n < 20; n++) {
        long live = moe_alloc_live();
        struct moe_buf b;
        moe_buf_init(&b, 0);
        moe_alloc_fail_after(n);
        int rc = 0;
        for (int i = 0; i < 200 && rc == 0; i++) {
            size_t len = b.len;
            rc = moe_buf_puts(&b, "abcdefghij");
            if (rc) {
                CHECK_INT(rc, ==, -ENOMEM);
                CHECK_INT(b.len, ==, len);   /* unchanged */
            }
        }
        moe_alloc_fail_after(-1);
        moe_buf_free(&b);
        CHECK_INT(moe_alloc_live(), ==, live);
    }
    int *arr = NULL;
    size_t cap = 0;
    moe_alloc_fail_after(0);
    CHECK_INT(moe_array_grow((void **)&arr, &cap, 5, sizeof(int), 0), ==, -ENOMEM);
    moe_alloc_fail_after(-1);
    CHECK(arr == NULL && cap == 0);
}

static void test_array_grow(void)
{
    int64_t *a = NULL;
    size_t cap = 0;
    for (size_t i = 0; i < 1000; i++) {
        CHECK_INT(moe_array_grow((void **)&a, &cap, i + 1, sizeof(*a), 0), ==, 0);
        CHECK(cap >= i + 1);
        a[i] = (int64_t)i;
    }
    for (size_t i = 0; i < 1000; i++)
        CHECK_INT(a[i], ==, (long long)i);
    CHECK_INT(moe_array_grow((void **)&a, &cap, 2000, sizeof(*a), 1500), ==, MOE_ELIMIT);
    CHECK(cap >= 1000 && cap <= 1500);
    CHECK_INT(moe_array_grow((void **)&a, &cap, SIZE_MAX / 4, sizeof(*a), 0), ==, MOE_ELIMIT);
    size_t c2 = cap;
    CHECK_INT(moe_array_grow((void **)&a, &c2, 1500, sizeof(*a), 1500), ==, 0);
    CHECK_INT(c2, ==, 1500);  /* capped at the limit, not doubled past it */
    moe_free(a);
}

static void test_read_fd(void)
{
    int p[2];
    CHECK(pipe(p) == 0);
    char data[100000];
    for (size_t i = 0; i < sizeof(data); i++)
        data[i] = (char)('a' + i % 26);
    /* the pipe holds 64 KiB: write from a child */
    pid_t pid = fork();
    if (pid == 0) {
        close(p[0]);
        size_t off = 0;
        while (off < sizeof(data)) {
            ssize_t w = write(p[1], data + off, sizeof(data) - off);
            if (w <= 0)
                _exit(1);
            off += (size_t)w;
        }
        _exit(0);
    }
    close(p[1]);
    struct moe_buf b;
    moe_buf_init(&b, 0);
    CHECK_INT(moe_buf_read_fd(&b, p[0]), ==, 0);
    close(p[0]);
    CHECK_INT(b.len, ==, sizeof(data));
    CHECK(memcmp(b.data, data, sizeof(data)) == 0 && b.data[b.len] == '\0');
    moe_buf_free(&b);

    /* a file longer than the limit: MOE_ELIMIT with the limit's bytes */
    char path[4096];
    snprintf(path, sizeof(path), "%s/buf.txt", moe_test_tmpdir());
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    fwrite(data, 1, 5000, f);
    fclose(f);
    moe_buf_init(&b, 4999);
    CHECK_INT(moe_buf_read_file(&b, path), ==, MOE_ELIMIT);
    CHECK_INT(b.len, ==, 4999);
    moe_buf_free(&b);
    moe_buf_init(&b, 5000);
    CHECK_INT(moe_buf_read_file(&b, path), ==, 0);   /* exactly the limit: fine */
    CHECK_INT(b.len, ==, 5000);
    moe_buf_free(&b);
    f = fopen(path, "rb");
    CHECK(f != NULL);
    moe_buf_init(&b, 0);
    CHECK_INT(moe_buf_read_stream(&b, f), ==, 0);
    fclose(f);
    CHECK_INT(b.len, ==, 5000);
    CHECK(memcmp(b.data, data, 5000) == 0);
    moe_buf_free(&b);
    CHECK_INT(moe_buf_read_file(&b, "/nonexistent/x"), ==, -ENOENT);
}

int main(void)
{
    MOE_TEST_RUN(test_append_and_terminator);
    MOE_TEST_RUN(test_limit);
    MOE_TEST_RUN(test_alloc_failure);
    MOE_TEST_RUN(test_array_grow);
    MOE_TEST_RUN(test_read_fd);
    return moe_test_exit_code();
}
