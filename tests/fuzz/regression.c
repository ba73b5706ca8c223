/* Replays fuzz inputs through LLVMFuzzerTestOneInput in ordinary builds:
 * every regular file under the directories (or files) given, in sorted
 * order, each with a time limit (MOE_FUZZ_TIMEOUT seconds, default 10).
 * A crash or sanitizer report ends the process; a hang is killed by the
 * alarm. Prints how many inputs ran. */
#include <dirent.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *current;
static int n_run;

static void on_alarm(int sig)
{
    (void)sig;
    static const char msg[] = "regression: input timed out: ";
    write(2, msg, sizeof(msg) - 1);
    write(2, current, strlen(current));
    write(2, "\n", 1);
    _exit(1);
}

static int run_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        perror(path);
        return -1;
    }
    size_t cap = 4096, n = 0;
    uint8_t *buf = malloc(cap);
    for (;;) {
        if (n == cap) {
            uint8_t *nb = realloc(buf, cap *= 2);
            if (nb == NULL)
                break;
            buf = nb;
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        if (r == 0)
            break;
        n += r;
    }
    fclose(f);
    /* exact-size copy so that sanitizers catch reads past the input */
    uint8_t *exact = malloc(n ? n : 1);
    memcpy(exact, buf, n);
    free(buf);
    const char *t = getenv("MOE_FUZZ_TIMEOUT");
    current = path;
    alarm(t && atoi(t) > 0 ? (unsigned)atoi(t) : 10);
    LLVMFuzzerTestOneInput(exact, n);
    alarm(0);
    free(exact);
    n_run++;
    return 0;
}

static int cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int run_path(const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        perror(path);
        return -1;
    }
    if (!S_ISDIR(st.st_mode))
        return S_ISREG(st.st_mode) ? run_file(path) : 0;
    DIR *d = opendir(path);
    if (d == NULL) {
        perror(path);
        return -1;
    }
    char **names = NULL;
    size_t n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        names = realloc(names, (n + 1) * sizeof(char *));
        size_t len = strlen(path) + strlen(e->d_name) + 2;
        names[n] = malloc(len);
        snprintf(names[n], len, "%s/%s", path, e->d_name);
        n++;
    }
    closedir(d);
    qsort(names, n, sizeof(char *), cmp);
    int rc = 0;
    for (size_t i = 0; i < n; i++) {
        rc |= run_path(names[i]);
        free(names[i]);
    }
    free(names);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s DIR|FILE...\n", argv[0]);
        return 2;
    }
    signal(SIGALRM, on_alarm);
    int rc = 0;
    for (int i = 1; i < argc; i++)
        rc |= run_path(argv[i]);
    printf("regression: %d inputs replayed\n", n_run);
    if (n_run == 0) {
        fprintf(stderr, "regression: no inputs found\n");
        return 1;
    }
    return rc ? 1 : 0;
}
