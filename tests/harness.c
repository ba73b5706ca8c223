#include <errno.h>
#include <ftw.h>
#include <stdbool.h>
#include <stdio.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/buf.h"
#include "common/error.h"
#include "tests/harness.h"

int moe_test_failed;
int moe_test_skipped;

static int n_pass, n_fail, n_skip;

static char tmpdir_buf[4096];
static pid_t tmpdir_pid;   /* the process that created it: a case's child, or main */

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path) == 0 || errno == ENOENT ? 0 : -1;
}

/* The scratch directory goes with the process that made it when that
 * passed; a failure keeps it for a look (and says where), as does
 * MOE_TEST_KEEP_TMP=1. Each case runs in its own child, which makes its own
 * directory unless main made one before the fork. */
static void tmpdir_done(bool passed)
{
    if (tmpdir_buf[0] == '\0' || tmpdir_pid != getpid())
        return;
    if (passed && getenv("MOE_TEST_KEEP_TMP") == NULL)
        nftw(tmpdir_buf, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    else
        printf("  scratch files kept in %s\n", tmpdir_buf);
}

/* Each test runs in a forked child so that a crash, an abort or a hang in
 * one case is reported as that case's failure and the others still run. */
void moe_test_run(const char *name, void (*fn)(void))
{
    unsigned timeout = 60;
    const char *t = getenv("MOE_TEST_TIMEOUT");
    if (t && atoi(t) > 0)
        timeout = (unsigned)atoi(t);
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        n_fail++;
        return;
    }
    if (pid == 0) {
        alarm(timeout);
        moe_test_failed = 0;
        moe_test_skipped = 0;
        fn();
        tmpdir_done(moe_test_failed == 0);
        fflush(stdout);
        fflush(stderr);
        _exit(moe_test_failed ? 1 : moe_test_skipped ? MOE_TEST_SKIP : 0);
    }
    int st = 0;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
    if (WIFEXITED(st) && WEXITSTATUS(st) == 0) {
        printf("ok   %s\n", name);
        n_pass++;
    } else if (WIFEXITED(st) && WEXITSTATUS(st) == MOE_TEST_SKIP) {
        printf("skip %s\n", name);
        n_skip++;
    } else if (WIFSIGNALED(st)) {
        printf("FAIL %s (signal %d%s)\n", name, WTERMSIG(st),
               WTERMSIG(st) == SIGALRM ? ": timeout" : "");
        n_fail++;
    } else {
        printf("FAIL %s\n", name);
        n_fail++;
    }
    fflush(stdout);
}

int moe_test_exit_code(void)
{
    printf("%d passed, %d failed, %d skipped\n", n_pass, n_fail, n_skip);
    tmpdir_done(n_fail == 0);
    if (n_fail)
        return 1;
    if (n_pass == 0 && n_skip > 0)
        return MOE_TEST_SKIP;
    return 0;
}

uint8_t *moe_test_gguf_set_str(const uint8_t *data, size_t len, const char *key, const char *val, size_t *out_len)
{
    const uint64_t kl = strlen(key);
    for (size_t at = 0; at + 8 + kl + 12 <= len; at++) {
        uint64_t n;
        memcpy(&n, data + at, 8);
        if (n != kl || memcmp(data + at + 8, key, kl) != 0)
            continue;
        const size_t p = at + 8 + kl;
        uint32_t type;
        uint64_t sl;
        memcpy(&type, data + p, 4);
        memcpy(&sl, data + p + 4, 8);
        if (type != 8 || p + 12 + sl > len)
            return NULL;
        const uint64_t nl = strlen(val);
        uint8_t *o = malloc(len - sl + nl);
        if (o == NULL)
            return NULL;
        memcpy(o, data, p + 4);
        memcpy(o + p + 4, &nl, 8);
        memcpy(o + p + 12, val, nl);
        memcpy(o + p + 12 + nl, data + p + 12 + sl, len - (p + 12 + sl));
        *out_len = len - sl + nl;
        return o;
    }
    return NULL;
}

const char *moe_test_ref_dir(void)
{
    static char buf[4096];
    const char *d = getenv("MOE_REF_DIR");
    if (d == NULL)
        d = "";
    snprintf(buf, sizeof(buf), "%s/manifest.json", d);
    if (d[0] == '\0' || access(buf, R_OK) != 0) {
        const char *ci = getenv("CI");
        if (ci && strcmp(ci, "true") == 0) {
            fprintf(stderr, "shared/ref missing at %s (required in CI)\n", d);
            exit(1);
        }
        return NULL;
    }
    return d;
}

const char *moe_test_tmpdir(void)
{
    char *buf = tmpdir_buf;
    if (buf[0])
        return buf;
    const char *base = getenv("TMPDIR");
    snprintf(buf, sizeof(tmpdir_buf), "%s/moe-test-XXXXXX", base && base[0] ? base : "/tmp");
    if (mkdtemp(buf) == NULL) {
        perror("mkdtemp");
        exit(1);
    }
    tmpdir_pid = getpid();
    return buf;
}

int moe_test_run_cmd(const char *cmd, char *out, size_t cap)
{
    fflush(stdout);
    FILE *p = popen(cmd, "r");
    if (p == NULL)
        return -1;
    size_t n = 0, r;
    /* read everything, keep what fits: the child must not block on a full pipe */
    char sink[4096];
    while ((r = fread(n + 1 < cap ? out + n : sink, 1, n + 1 < cap ? cap - 1 - n : sizeof(sink), p)) > 0)
        if (n + 1 < cap)
            n += r;
    out[n] = '\0';
    int st = pclose(p);
    if (st < 0)
        return -1;
    return WIFSIGNALED(st) ? 128 + WTERMSIG(st) : WEXITSTATUS(st);
}

void *moe_test_read_file(const char *path, size_t *len)
{
    struct moe_buf b;
    moe_buf_init(&b, 0);
    int rc = moe_buf_read_file(&b, path);
    /* Handed over as a malloc block of the file's size plus the NUL that
     * lets callers treat text as a string (ASan reports a read past that),
     * so the caller's free() leaves the library's allocation counters,
     * which tests compare, as they were. */
    char *out = NULL;
    if (rc == 0 && (out = malloc(b.len + 1)) == NULL)
        rc = -ENOMEM;
    if (rc == 0) {
        if (b.len)
            memcpy(out, b.data, b.len);
        out[b.len] = '\0';
        if (len)
            *len = b.len;
    }
    moe_buf_free(&b);
    if (rc != 0)
        errno = rc == MOE_ELIMIT ? EFBIG : -rc;
    return out;
}
