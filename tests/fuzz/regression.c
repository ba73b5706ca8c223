/* Replays fuzz inputs through LLVMFuzzerTestOneInput in ordinary builds (the
 * zstd tests/fuzz/regression_driver.c pattern), so that CI runs every
 * corpus file without libFuzzer:
 *
 *   fuzz_<x>_replay DIR|FILE...
 *
 * Every regular file under the arguments (directories recursively, entries
 * in sorted order, dot files skipped) is read (moe_test_read_file) into an
 * exact-size heap buffer (so ASan sees any read past the input) and run
 * under a time limit (MOE_FUZZ_TIMEOUT seconds, default 10). A hang, a crash or a sanitizer
 * report ends the process with the input's path on stderr; otherwise it
 * prints how many inputs ran and exits 0 (1 if an argument could not be
 * read or held no input). */
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/alloc.h"
#include "common/buf.h"
#include "tests/harness.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Present in ASan/UBSan builds only: run when a sanitizer ends the process. */
void __sanitizer_set_death_callback(void (*callback)(void)) __attribute__((weak));

static const char *current;
static int n_run;

static void say_current(const char *what)
{
    /* async-signal-safe: write(2) only */
    if (current == NULL)
        return;
    ssize_t r = write(2, what, strlen(what));
    r += write(2, current, strlen(current));
    r += write(2, "\n", 1);
    (void)r;
}

static void on_alarm(int sig)
{
    (void)sig;
    say_current("regression: input timed out: ");
    _exit(1);
}

static void on_fatal(int sig)
{
    say_current("regression: crashed on input: ");
    signal(sig, SIG_DFL);
    raise(sig);
}

static void on_sanitizer_death(void)
{
    say_current("regression: sanitizer report on input: ");
}

static int run_file(const char *path, unsigned timeout)
{
    size_t n = 0;
    uint8_t *data = moe_test_read_file(path, &n);
    /* without the reader's NUL: a read one past the input is an ASan report */
    uint8_t *exact = data ? realloc(data, n ? n : 1) : NULL;
    if (data != NULL && exact == NULL) {
        free(data);
        errno = ENOMEM;
    }
    data = exact;
    if (data == NULL) {
        perror(path);
        return -1;
    }
    current = path;
    alarm(timeout);
    LLVMFuzzerTestOneInput(data, n);
    alarm(0);
    current = NULL;
    free(data);
    n_run++;
    return 0;
}

static int cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int run_path(const char *path, unsigned timeout)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        perror(path);
        return -1;
    }
    if (!S_ISDIR(st.st_mode))
        return S_ISREG(st.st_mode) ? run_file(path, timeout) : 0;
    DIR *d = opendir(path);
    if (d == NULL) {
        perror(path);
        return -1;
    }
    char **names = NULL;
    size_t n = 0, cap = 0;
    int rc = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        if (moe_array_grow((void **)&names, &cap, n + 1, sizeof(char *), 0) != 0) {
            rc = -1;
            break;
        }
        size_t len = strlen(path) + strlen(e->d_name) + 2;
        if ((names[n] = malloc(len)) == NULL) {
            rc = -1;
            break;
        }
        snprintf(names[n], len, "%s/%s", path, e->d_name);
        n++;
    }
    closedir(d);
    if (rc != 0)
        fprintf(stderr, "%s: out of memory listing the directory\n", path);
    if (n)
        qsort(names, n, sizeof(char *), cmp);
    for (size_t i = 0; i < n; i++) {
        rc |= run_path(names[i], timeout);
        free(names[i]);
    }
    moe_free(names);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s DIR|FILE...\n"
                "Replays every file through the fuzz entry; MOE_FUZZ_TIMEOUT = seconds per input"
                " (default 10).\n", argv[0]);
        return 2;
    }
    const char *t = getenv("MOE_FUZZ_TIMEOUT");
    unsigned timeout = t && atoi(t) > 0 ? (unsigned)atoi(t) : 10;
    signal(SIGALRM, on_alarm);
    /* A trap (SIGILL) or abort names the input in every build; SEGV and the
     * like are left to the sanitizers' own handlers when they are there. */
    signal(SIGILL, on_fatal);
    signal(SIGABRT, on_fatal);
    if (__sanitizer_set_death_callback != NULL) {
        __sanitizer_set_death_callback(on_sanitizer_death);
    } else {
        signal(SIGSEGV, on_fatal);
        signal(SIGBUS, on_fatal);
        signal(SIGFPE, on_fatal);
    }
    int rc = 0;
    for (int i = 1; i < argc; i++)
        rc |= run_path(argv[i], timeout);
    printf("regression: %d inputs replayed\n", n_run);
    if (n_run == 0) {
        fprintf(stderr, "regression: no inputs found\n");
        return 1;
    }
    return rc ? 1 : 0;
}
