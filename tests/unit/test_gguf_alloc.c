/* Allocation-failure sweep (shared/RELIABILITY.md row 3) over moe_gguf_open
 * and moe_gguf_open_mem: for N = 0, 1, 2, ... the Nth allocation fails;
 * every attempt before the first success must return -ENOMEM with *out
 * NULL and leave no allocation behind. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include "common/alloc.h"
#include "io/gguf.h"
#include "tests/harness.h"
#include "tests/unit/gguf_builder.h"

static void sweep(int use_file)
{
    struct gb_spec s;
    gb_spec_base(&s);
    struct gb b;
    gb_build(&b, &s);
    char path[4096];
    snprintf(path, sizeof(path), "%s/alloc.gguf", moe_test_tmpdir());
    if (use_file) {
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        CHECK(fd >= 0 && write(fd, b.p, b.len) == (ssize_t)b.len);
        close(fd);
    }
    int failures = 0;
    for (long n = 0; n < 10000; n++) {
        long live = moe_alloc_live();
        struct moe_gguf *g = (struct moe_gguf *)(uintptr_t)1;
        struct moe_diag d = { 0 };
        moe_alloc_fail_after(n);
        int rc = use_file ? moe_gguf_open(&g, path, &d) : moe_gguf_open_mem(&g, b.p, b.len, "m.gguf", &d);
        moe_alloc_fail_after(-1);
        if (rc == 0) {
            CHECK(g != NULL);
            moe_gguf_close(g);
            CHECK_INT(moe_alloc_live(), ==, live);
            printf("  %s: succeeded after %d injected failures\n", use_file ? "file" : "mem", failures);
            CHECK(failures > 0);
            free(b.p);
            return;
        }
        CHECK_MSG(rc == -ENOMEM, "N=%ld: rc %d (%s)", n, rc, d.msg);
        CHECK(g == NULL);
        CHECK_MSG(moe_alloc_live() == live, "N=%ld: %ld allocations leaked", n, moe_alloc_live() - live);
        failures++;
    }
    MOE_FAIL_AT("never succeeded");
}

static void test_sweep_mem(void) { sweep(0); }
static void test_sweep_file(void) { sweep(1); }

int main(void)
{
    MOE_TEST_RUN(test_sweep_mem);
    MOE_TEST_RUN(test_sweep_file);
    return moe_test_exit_code();
}
