/* moectl pack / pack --verify: exit codes 0/1/2 and messages naming the
 * layer and expert of a corrupt blob. Runs the subcommand's entry point
 * (client/pack.c) in a child with stdout/stderr captured. */
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "io/pack.h"
#include "tests/harness.h"

int moectl_pack_main(int argc, char **argv);

static char out_text[65536];

static int run(int argc, char **argv)
{
    char path[600];
    snprintf(path, sizeof(path), "%s/out.txt", moe_test_tmpdir());
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        dup2(fd, 1);
        dup2(fd, 2);
        int rc = moectl_pack_main(argc, argv);
        fflush(stdout);
        fflush(stderr);
        _exit(rc);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    size_t n = 0;
    char *t = moe_test_read_file(path, &n);
    snprintf(out_text, sizeof(out_text), "%.*s", (int)n, t ? t : "");
    free(t);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

/* RUN("a", "b") runs `moectl pack a b`. */
static int run_list(const char *first, ...)
{
    char *argv[32] = { "pack" };
    int argc = 1;
    va_list ap;
    va_start(ap, first);
    for (const char *a = first; a && argc < 31; a = va_arg(ap, const char *))
        argv[argc++] = (char *)a;
    va_end(ap);
    argv[argc] = NULL;
    return run(argc, argv);
}
#define RUN(...) run_list(__VA_ARGS__, (const char *)NULL)

static void test_pack_verify_and_corruption(void)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("no shared/ref");
    char src[600], out[600];
    snprintf(src, sizeof(src), "%s/models/tiny-qwen3moe-Q8_0.gguf", ref);
    snprintf(out, sizeof(out), "%s/q.moe", moe_test_tmpdir());
    CHECK_INT(RUN(src, "-o", out, "--threads", "2", "--level", "3"), ==, 0);
    CHECK_MSG(strstr(out_text, "Q8_0") != NULL, "%s", out_text);
    CHECK_INT(RUN("--verify", out), ==, 0);
    CHECK_MSG(strstr(out_text, "ok") && strstr(out_text, "all"), "%s", out_text);
    /* flip a byte of blob (3, 9) */
    struct moe_pack *p = NULL;
    struct moe_diag d = {0};
    CHECK(moe_pack_open(&p, out, 0, &d) == 0);
    struct moe_pack_blob b;
    CHECK(moe_pack_blob(p, 3, 9, &b, &d) == 0);
    moe_pack_close(p);
    int fd = open(out, O_RDWR);
    uint8_t x;
    CHECK(pread(fd, &x, 1, (off_t)b.offset + 100) == 1);
    x ^= 0x80;
    CHECK(pwrite(fd, &x, 1, (off_t)b.offset + 100) == 1);
    close(fd);
    CHECK_INT(RUN("--verify", out), ==, 1);
    CHECK_MSG(strstr(out_text, "layer 3, expert 9") && strstr(out_text, "checksum"), "%s",
              out_text);
}

static void test_usage_and_bad_input(void)
{
    char out[600];
    snprintf(out, sizeof(out), "%s/x.moe", moe_test_tmpdir());
    CHECK_INT(RUN("--level", "0", "a.gguf", "-o", out), ==, 2);
    CHECK_INT(RUN("--min-ratio", "0.5", "a.gguf", "-o", out), ==, 2);
    CHECK_INT(RUN("a.gguf"), ==, 2);
    CHECK_INT(RUN("--bogus"), ==, 2);
    CHECK_INT(RUN("--verify", out, "-o", out), ==, 2);
    CHECK_INT(RUN("/nonexistent.gguf", "-o", out), ==, 1);
    CHECK_MSG(strstr(out_text, "/nonexistent.gguf") != NULL, "%s", out_text);
    CHECK_INT(RUN("--verify", "/nonexistent.moe"), ==, 1);
    CHECK_INT(access(out, F_OK), !=, 0);
}

int main(void)
{
    MOE_TEST_RUN(test_pack_verify_and_corruption);
    MOE_TEST_RUN(test_usage_and_bad_input);
    return moe_test_exit_code();
}
