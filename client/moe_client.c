#include "client/moe_client.h"

#include <errno.h>
#include <jansson.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

const char *moe_client_default_socket(char *buf, size_t cap)
{
    const char *env = getenv("MOED_SOCKET"), *xdg = getenv("XDG_RUNTIME_DIR");
    if (env && env[0])
        snprintf(buf, cap, "%s", env);
    else if (xdg && xdg[0])
        snprintf(buf, cap, "%s/moed.sock", xdg);
    else
        snprintf(buf, cap, "./moed.sock");
    return buf;
}

int moe_client_init(struct moe_client *c, const char *path, struct moe_diag *d)
{
    char def[4096];
    if (path == NULL)
        path = moe_client_default_socket(def, sizeof(def));
    memset(c, 0, sizeof(*c));
    if (strlen(path) >= sizeof(c->path))
        return moe_diag_set(d, -ENAMETOOLONG, "socket path '%s' is longer than %zu bytes", path,
                            sizeof(c->path) - 1);
    strcpy(c->path, path);
    c->timeout_ms = 600000;
    return 0;
}

void moe_client_resp_free(struct moe_client_resp *r)
{
    free(r->body);
    r->body = NULL;
    r->len = 0;
}

const char *moe_client_error_message(const char *body, char *buf, size_t cap)
{
    if (body == NULL)
        return NULL;
    json_t *j = json_loads(body, 0, NULL);
    const char *m = json_string_value(json_object_get(json_object_get(j, "error"), "message"));
    const char *ret = NULL;
    if (m) {
        snprintf(buf, cap, "%s", m);
        ret = buf;
    }
    json_decref(j);
    return ret;
}

/* ---- buffered reading with a timeout --------------------------------- */

struct rd {
    int fd, timeout_ms;
    const char *path;
    char buf[16384];
    size_t pos, len;
};

static int rd_fill(struct rd *r, struct moe_diag *d)
{
    struct pollfd p = { .fd = r->fd, .events = POLLIN };
    int n = poll(&p, 1, r->timeout_ms);
    if (n == 0)
        return moe_diag_set(d, -ETIMEDOUT, "%s: no answer within %d ms", r->path, r->timeout_ms);
    if (n < 0)
        return moe_diag_set(d, -errno, "%s: %s", r->path, strerror(errno));
    ssize_t got;
    do
        got = recv(r->fd, r->buf, sizeof(r->buf), 0);
    while (got < 0 && errno == EINTR);
    if (got < 0)
        return moe_diag_set(d, -errno, "%s: read: %s", r->path, strerror(errno));
    r->pos = 0;
    r->len = (size_t)got;
    return (int)(got > 0);
}

/* One CRLF- (or LF-) terminated line, without the terminator. *budget is
 * the header bytes still allowed. */
static int rd_line(struct rd *r, char *out, size_t cap, size_t *budget, const char *what,
                   struct moe_diag *d)
{
    size_t n = 0;
    for (;;) {
        if (r->pos == r->len) {
            int rc = rd_fill(r, d);
            if (rc < 0)
                return rc;
            if (rc == 0)
                return moe_diag_set(d, MOE_EFORMAT, "%s: connection closed in the %s", r->path, what);
        }
        char ch = r->buf[r->pos++];
        if (*budget == 0)
            return moe_diag_set(d, MOE_ELIMIT, "%s: the %s exceed %u bytes", r->path, what,
                                MOE_CLIENT_MAX_HEADER);
        (*budget)--;
        if (ch == '\n') {
            if (n > 0 && out[n - 1] == '\r')
                n--;
            out[n] = '\0';
            return 0;
        }
        if (n + 1 >= cap)
            return moe_diag_set(d, MOE_ELIMIT, "%s: a line of the %s is longer than %zu bytes",
                                r->path, what, cap - 1);
        out[n++] = ch;
    }
}

/* Where body bytes go: a bounded buffer, or the event parser. */
struct sink {
    char *buf;
    size_t len, cap;
    bool events;
    moe_client_event_fn fn;
    void *ud;
    int stop;              /* the callback's non-zero return */
    const char *path;
};

static int sink_put(struct sink *s, const char *p, size_t n, struct moe_diag *d)
{
    if (s->len + n > MOE_CLIENT_MAX_BODY)
        return moe_diag_set(d, MOE_ELIMIT, "%s: response body over %u bytes", s->path,
                            MOE_CLIENT_MAX_BODY);
    if (s->len + n + 1 > s->cap) {
        size_t cap = s->cap ? s->cap : 4096;
        while (cap < s->len + n + 1)
            cap *= 2;
        char *b = realloc(s->buf, cap);
        if (b == NULL)
            return moe_diag_set(d, -ENOMEM, "out of memory");
        s->buf = b;
        s->cap = cap;
    }
    memcpy(s->buf + s->len, p, n);
    s->len += n;
    s->buf[s->len] = '\0';
    if (!s->events)
        return 0;
    /* hand over every complete event (blank-line terminated) */
    for (;;) {
        char *end = strstr(s->buf, "\n\n");
        if (end == NULL)
            return 0;
        *end = '\0';
        for (char *line = s->buf; line && *line && !s->stop;) {
            char *nl = strchr(line, '\n');
            if (nl)
                *nl = '\0';
            if (strncmp(line, "data:", 5) == 0) {
                const char *data = line + 5 + (line[5] == ' ');
                s->stop = s->fn(s->ud, data, strlen(data));
            }
            line = nl ? nl + 1 : NULL;
        }
        const size_t used = (size_t)(end - s->buf) + 2;
        memmove(s->buf, s->buf + used, s->len - used + 1);
        s->len -= used;
        if (s->stop)
            return 0;
    }
}

static int rd_body(struct rd *r, size_t n, struct sink *s, struct moe_diag *d)
{
    while (n > 0 && !s->stop) {
        if (r->pos == r->len) {
            int rc = rd_fill(r, d);
            if (rc < 0)
                return rc;
            if (rc == 0)
                return moe_diag_set(d, MOE_EFORMAT, "%s: connection closed %zu bytes before the end"
                                    " of the body", r->path, n);
        }
        size_t k = r->len - r->pos < n ? r->len - r->pos : n;
        int rc = sink_put(s, r->buf + r->pos, k, d);
        if (rc)
            return rc;
        r->pos += k;
        n -= k;
    }
    return 0;
}

/* ---- one exchange ---------------------------------------------------- */

static int connect_to(const struct moe_client *c, struct moe_diag *d)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return moe_diag_set(d, -errno, "socket: %s", strerror(errno));
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    memcpy(a.sun_path, c->path, strlen(c->path) + 1);
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        int e = errno;
        close(fd);
        return moe_diag_set(d, -e, "cannot connect to %s: %s (is moed running?)", c->path,
                            strerror(e));
    }
    return fd;
}

static int send_all(int fd, const char *p, size_t n, const char *path, struct moe_diag *d)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return moe_diag_set(d, -errno, "%s: write: %s", path, strerror(errno));
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int exchange(const struct moe_client *c, const char *method, const char *target,
                    const char *body, size_t len, struct sink *s, struct moe_client_resp *out,
                    struct moe_diag *d)
{
    memset(out, 0, sizeof(*out));
    out->retry_after = -1;
    int fd = connect_to(c, d);
    if (fd < 0)
        return fd;
    char head[1024];
    int hn = snprintf(head, sizeof(head), "%s %s HTTP/1.1\r\nHost: moed\r\nConnection: close\r\n"
                      "Accept: %s\r\n%s%zu\r\n\r\n", method, target,
                      s->events ? "text/event-stream" : "application/json",
                      body ? "Content-Type: application/json\r\nContent-Length: " : "Content-Length: ",
                      body ? len : 0);
    int rc = hn > 0 && (size_t)hn < sizeof(head) ? 0 : moe_diag_set(d, -EINVAL, "request target"
                                                                    " too long");
    if (rc == 0)
        rc = send_all(fd, head, (size_t)hn, c->path, d);
    if (rc == 0 && body && len)
        rc = send_all(fd, body, len, c->path, d);
    struct rd *r = rc == 0 ? malloc(sizeof(*r)) : NULL;
    if (rc == 0 && r == NULL)
        rc = moe_diag_set(d, -ENOMEM, "out of memory");
    if (rc) {
        close(fd);
        free(r);
        return rc;
    }
    r->fd = fd;
    r->timeout_ms = c->timeout_ms;
    r->path = c->path;
    r->pos = r->len = 0;
    size_t budget = MOE_CLIENT_MAX_HEADER;
    char line[8192];
    long long clen = -1;
    bool chunked = false;
    rc = rd_line(r, line, sizeof(line), &budget, "response headers", d);
    int major = 0, minor = 0, status = 0;
    char sp = 0;
    if (rc == 0 && (sscanf(line, "HTTP/%d.%d %3d%c", &major, &minor, &status, &sp) < 3 ||
                    major != 1 || status < 100 || status > 599))
        rc = moe_diag_set(d, MOE_EFORMAT, "%s: not an HTTP/1.x status line: '%.80s'", c->path, line);
    while (rc == 0) {
        rc = rd_line(r, line, sizeof(line), &budget, "response headers", d);
        if (rc || line[0] == '\0')
            break;
        char *colon = strchr(line, ':');
        if (colon == NULL) {
            rc = moe_diag_set(d, MOE_EFORMAT, "%s: malformed header line '%.80s'", c->path, line);
            break;
        }
        *colon = '\0';
        const char *v = colon + 1;
        while (*v == ' ' || *v == '\t')
            v++;
        if (strcasecmp(line, "content-length") == 0) {
            char *end;
            errno = 0;
            long long x = strtoll(v, &end, 10);
            if (end == v || *end != '\0' || errno || x < 0)
                rc = moe_diag_set(d, MOE_EFORMAT, "%s: bad Content-Length '%.40s'", c->path, v);
            else if (x > (long long)MOE_CLIENT_MAX_BODY)
                rc = moe_diag_set(d, MOE_ELIMIT, "%s: Content-Length %lld over %u bytes", c->path,
                                  x, MOE_CLIENT_MAX_BODY);
            clen = x;
        } else if (strcasecmp(line, "transfer-encoding") == 0) {
            chunked = strcasestr(v, "chunked") != NULL;
        } else if (strcasecmp(line, "retry-after") == 0) {
            out->retry_after = atoi(v);
        }
    }
    out->status = status;
    /* an error answer to a stream request is a plain body */
    if (rc == 0 && s->events && status != 200)
        s->events = false;
    if (rc == 0 && chunked) {
        for (;;) {
            rc = rd_line(r, line, sizeof(line), &budget, "chunk sizes", d);
            if (rc)
                break;
            char *end;
            size_t hex = strspn(line, "0123456789abcdefABCDEF");
            unsigned long long n = strtoull(line, &end, 16);
            if (hex == 0 || hex > 8 || (*end != '\0' && *end != ';' && *end != ' ')) {
                rc = moe_diag_set(d, MOE_EFORMAT, "%s: bad chunk size line '%.40s'", c->path, line);
                break;
            }
            if (n == 0) {
                /* trailers, up to the blank line */
                do
                    rc = rd_line(r, line, sizeof(line), &budget, "trailers", d);
                while (rc == 0 && line[0] != '\0');
                break;
            }
            if ((rc = rd_body(r, (size_t)n, s, d)) != 0 || s->stop)
                break;
            budget = budget > 2 ? budget : 2;
            if ((rc = rd_line(r, line, sizeof(line), &budget, "chunk ends", d)) != 0)
                break;
            if (line[0] != '\0') {
                rc = moe_diag_set(d, MOE_EFORMAT, "%s: chunk longer than its size", c->path);
                break;
            }
            budget = MOE_CLIENT_MAX_HEADER;
        }
    } else if (rc == 0 && clen >= 0) {
        rc = rd_body(r, (size_t)clen, s, d);
    } else if (rc == 0) {
        for (;;) {   /* read to close */
            if (r->pos == r->len) {
                int f = rd_fill(r, d);
                if (f <= 0) {
                    rc = f;
                    break;
                }
            }
            if ((rc = sink_put(s, r->buf + r->pos, r->len - r->pos, d)) != 0 || s->stop)
                break;
            r->pos = r->len;
        }
    }
    close(fd);
    free(r);
    if (rc == 0 && s->stop)
        rc = s->stop;
    return rc;
}

int moe_client_request(const struct moe_client *c, const char *method, const char *target,
                       const char *body, size_t len, struct moe_client_resp *out, struct moe_diag *d)
{
    struct sink s = { .path = c->path };
    int rc = exchange(c, method, target, body, len, &s, out, d);
    if (rc) {
        free(s.buf);
        return rc;
    }
    if (s.buf == NULL)
        s.buf = calloc(1, 1);
    out->body = s.buf;
    out->len = s.len;
    return out->body ? 0 : moe_diag_set(d, -ENOMEM, "out of memory");
}

int moe_client_stream(const struct moe_client *c, const char *target, const char *body, size_t len,
                      moe_client_event_fn fn, void *ud, struct moe_client_resp *out,
                      struct moe_diag *d)
{
    struct sink s = { .path = c->path, .events = true, .fn = fn, .ud = ud };
    int rc = exchange(c, "POST", target, body, len, &s, out, d);
    if (rc == 0 && out->status != 200) {
        out->body = s.buf ? s.buf : calloc(1, 1);
        out->len = s.len;
        return 0;
    }
    free(s.buf);
    return rc;
}
