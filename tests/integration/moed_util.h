/* Helpers for tests that drive a real moed over its Unix socket: spawn it
 * (the MOED binary, a model, a socket in the test's tmpdir), wait until it
 * serves, send HTTP/1.1 requests with Connection: close, decode chunked
 * SSE bodies, read /v1/moed/stats, and compute `moectl run`'s greedy answer
 * as the daemon sends it (invalid UTF-8 bytes as U+FFFD). */
#ifndef MOE_TESTS_MOED_UTIL_H
#define MOE_TESTS_MOED_UTIL_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

struct moed_t {
    char model[4096];
    char sock[512];
    char log[600];
    pid_t pid;
};

struct resp {
    int status;
    char *raw;          /* whole response (malloc) */
    const char *body;   /* after the blank line */
};

double mt_now(void);
int mt_connect(const char *path);
int mt_write_all(int fd, const char *p, size_t n);
char *mt_read_all(int fd, size_t *len);
void mt_resp_free(struct resp *r);
int mt_raw(const char *sock, const char *data, size_t n, struct resp *out);
int mt_request(const struct moed_t *m, const char *method, const char *url, const char *body,
               struct resp *out);
/* Decodes a chunked body; returns malloc'ed text. */
char *mt_dechunk(const char *in);
/* The concatenated text of the SSE events of a (dechunked) stream, and
 * whether it ended with an error event (its message copied to err). */
void mt_sse_text(const char *sse, char *text, size_t cap, char *err, size_t errcap, bool *done);
/* Spawns moed with extra args (NULL-terminated); env: "NAME=VALUE" or NULL. */
bool mt_up(struct moed_t *m, const char *const *extra, const char *env);
int mt_wait_exit(pid_t pid, double timeout);
/* SIGTERM and the exit status (-1 on timeout). */
int mt_down(struct moed_t *m);
char *mt_log(const struct moed_t *m);
json_t *mt_stats(const struct moed_t *m);
/* An integer at a path of keys in /v1/moed/stats, e.g. "expert_cache", "loads", "failed". */
long long mt_stat(const struct moed_t *m, const char *k1, const char *k2, const char *k3);
bool mt_wait_idle(const struct moed_t *m);
/* The body's first choice text (completion or chat). */
const char *mt_choice_text(json_t *j);
/* moectl run's greedy text for prompt, n tokens, on model. */
void mt_moectl_greedy(const char *model, const char *prompt, int n, char *out, size_t cap);

#endif
