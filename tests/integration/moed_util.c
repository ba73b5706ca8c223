#include "tests/integration/moed_util.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tests/harness.h"

double mt_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

int mt_connect(const char *path)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    snprintf(a.sun_path, sizeof(a.sun_path), "%s", path);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    struct timeval tv = { .tv_sec = 60 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    return fd;
}

int mt_write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

char *mt_read_all(int fd, size_t *len)
{
    size_t cap = 65536, n = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (n + 1 >= cap)
            buf = realloc(buf, cap *= 2);
        ssize_t r = recv(fd, buf + n, cap - n - 1, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        n += (size_t)r;
    }
    buf[n] = '\0';
    if (len)
        *len = n;
    return buf;
}

void mt_resp_free(struct resp *r)
{
    free(r->raw);
    r->raw = NULL;
}

int mt_raw(const char *sock, const char *data, size_t n, struct resp *out)
{
    memset(out, 0, sizeof(*out));
    int fd = mt_connect(sock);
    if (fd < 0)
        return -1;
    mt_write_all(fd, data, n);
    out->raw = mt_read_all(fd, NULL);
    close(fd);
    sscanf(out->raw, "HTTP/1.1 %d", &out->status);
    const char *b = strstr(out->raw, "\r\n\r\n");
    out->body = b ? b + 4 : out->raw;
    return 0;
}

int mt_request(const struct moed_t *m, const char *method, const char *url, const char *body,
               struct resp *out)
{
    const size_t bl = body ? strlen(body) : 0;
    char *req = malloc(bl + 512);
    int n = sprintf(req, "%s %s HTTP/1.1\r\nHost: moed\r\nConnection: close\r\n"
                    "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
                    method, url, bl, body ? body : "");
    int rc = mt_raw(m->sock, req, (size_t)n, out);
    free(req);
    return rc;
}

char *mt_dechunk(const char *in)
{
    char *out = malloc(strlen(in) + 1);
    size_t o = 0;
    for (;;) {
        char *end;
        unsigned long n = strtoul(in, &end, 16);
        if (end == in || strncmp(end, "\r\n", 2) != 0 || n == 0 || strlen(end + 2) < n)
            break;
        memcpy(out + o, end + 2, n);
        o += n;
        in = end + 2 + n + 2;
    }
    out[o] = '\0';
    return out;
}

const char *mt_choice_text(json_t *j)
{
    json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
    json_t *t = json_object_get(c0, "text");
    if (t == NULL)
        t = json_object_get(json_object_get(c0, "delta"), "content");
    if (t == NULL)
        t = json_object_get(json_object_get(c0, "message"), "content");
    return json_string_value(t);
}

void mt_sse_text(const char *sse, char *text, size_t cap, char *err, size_t errcap, bool *done)
{
    char *copy = strdup(sse);
    text[0] = '\0';
    if (err && errcap)
        err[0] = '\0';
    *done = false;
    size_t tl = 0;
    char *save = NULL;
    for (char *line = strtok_r(copy, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (strcmp(line, "data: [DONE]") == 0) {
            *done = true;
            continue;
        }
        json_t *j = strncmp(line, "data: {", 7) == 0 ? json_loads(line + 6, 0, NULL) : NULL;
        const char *t = j ? mt_choice_text(j) : NULL;
        if (t && tl + strlen(t) < cap) {
            memcpy(text + tl, t, strlen(t) + 1);
            tl += strlen(t);
        }
        json_t *e = json_object_get(json_object_get(j, "error"), "message");
        if (e && err)
            snprintf(err, errcap, "%s", json_string_value(e));
        json_decref(j);
    }
    free(copy);
}

bool mt_up(struct moed_t *m, const char *const *extra, const char *env)
{
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);   /* a failed case leaves no daemon behind */
        const char *argv[64];
        int a = 0;
        argv[a++] = getenv("MOED");
        argv[a++] = "--model";
        argv[a++] = m->model;
        argv[a++] = "--socket";
        argv[a++] = m->sock;
        argv[a++] = "--threads";
        argv[a++] = "2";
        for (int i = 0; extra && extra[i] && a < 62; i++)
            argv[a++] = extra[i];
        argv[a] = NULL;
        if (env)
            putenv((char *)env);
        int fd = open(m->log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        dup2(fd, 2);
        dup2(fd, 1);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    m->pid = pid;
    for (int i = 0; i < 600; i++) {
        struct resp r;
        if (mt_request(m, "GET", "/health", NULL, &r) == 0) {
            bool ok = r.status == 200;
            mt_resp_free(&r);
            if (ok)
                return true;
        }
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid) {
            m->pid = -1;
            return false;
        }
        usleep(50000);
    }
    return false;
}

int mt_wait_exit(pid_t pid, double timeout)
{
    double t0 = mt_now();
    while (mt_now() - t0 < timeout) {
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid)
            return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        usleep(20000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    return -1;
}

int mt_down(struct moed_t *m)
{
    if (m->pid <= 0)
        return -1;
    kill(m->pid, SIGTERM);
    int st = mt_wait_exit(m->pid, 60);
    m->pid = -1;
    return st;
}

char *mt_log(const struct moed_t *m)
{
    size_t n;
    char *t = moe_test_read_file(m->log, &n);
    return t ? t : strdup("");
}

json_t *mt_stats(const struct moed_t *m)
{
    struct resp r;
    if (mt_request(m, "GET", "/v1/moed/stats", NULL, &r) != 0)
        return NULL;
    json_t *j = json_loads(r.body, 0, NULL);
    mt_resp_free(&r);
    return j;
}

long long mt_stat(const struct moed_t *m, const char *k1, const char *k2, const char *k3)
{
    json_t *j = mt_stats(m);
    json_t *v = json_object_get(j, k1);
    if (k2)
        v = json_object_get(v, k2);
    if (k3)
        v = json_object_get(v, k3);
    long long x = json_is_integer(v) ? json_integer_value(v) : -1;
    json_decref(j);
    return x;
}

bool mt_wait_idle(const struct moed_t *m)
{
    for (int i = 0; i < 400; i++) {
        if (mt_stat(m, "engine", "running", NULL) == 0 && mt_stat(m, "engine", "queue_depth", NULL) == 0)
            return true;
        usleep(50000);
    }
    return false;
}

void mt_moectl_greedy(const char *model, const char *prompt, int n, char *out, size_t cap)
{
    char cmd[8192];
    snprintf(cmd, sizeof(cmd), "%s run --model %s --prompt '%s' -n %d --threads 2 2>/dev/null",
             getenv("MOECTL"), model, prompt, n);
    out[0] = '\0';
    moe_test_run_cmd(cmd, out, cap);
    size_t l = strlen(out);
    if (l && out[l - 1] == '\n')
        out[--l] = '\0';
    /* JSON carries only UTF-8: the daemon sends U+FFFD for each byte of an
     * invalid sequence (a tiny random model makes them); do the same */
    char *fixed = malloc(l * 3 + 1);
    size_t o = 0;
    for (size_t i = 0; i < l;) {
        const unsigned char b = (unsigned char)out[i];
        size_t len = b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 0;
        bool ok = len > 0 && i + len <= l;
        for (size_t k = 1; ok && k < len; k++)
            ok = ((unsigned char)out[i + k] >> 6) == 2;
        if (ok && len > 1) {
            json_t *t = json_stringn(out + i, len);
            ok = t != NULL;
            json_decref(t);
        }
        if (ok) {
            memcpy(fixed + o, out + i, len);
            o += len;
            i += len;
        } else {
            memcpy(fixed + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        }
    }
    fixed[o] = '\0';
    snprintf(out, cap, "%s", fixed);
    free(fixed);
}
