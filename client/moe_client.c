/* The moed client library (client/moe_client.h). The HTTP/1.1 reader is
 * written for a peer that may be broken or not moed at all: every line and
 * body is bounded before it is stored, every length is checked before it is
 * used, and a connection closed early is an error, not a short answer. */
#include "client/moe_client.h"

#include <errno.h>
#include <jansson.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <netdb.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "common/buf.h"

/* A chunk-size line or one header line; longer ones are refused. */
#define LINE_MAX_BYTES 8192
/* 1xx interim answers skipped before the final one */
#define MAX_INTERIM 4
/* "\u0000" is valid JSON, and a sampled token can decode to it: accept it
 * (texts carry their length, so a NUL inside does not cut them) */
#define JSON_FLAGS JSON_ALLOW_NUL

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

/* "http://HOST:PORT[/]", "HOST:PORT" or "[v6]:PORT" into host and port. */
static int parse_http(struct moe_client *c, const char *url, bool need_scheme, struct moe_diag *d)
{
    const char *p = url;
    if (strncmp(p, "http://", 7) == 0)
        p += 7;
    else if (need_scheme)
        return 1;   /* not a URL: a socket path */
    const char *hs = p, *he, *colon;
    if (*p == '[') {
        hs = p + 1;
        he = strchr(hs, ']');
        colon = he ? he + 1 : NULL;
    } else {
        colon = strrchr(p, ':');
        he = colon;
    }
    if (he == NULL || colon == NULL || *colon != ':' || he == hs || (size_t)(he - hs) >= sizeof(c->host))
        return moe_diag_set(d, -EINVAL, "'%s': expected http://HOST:PORT", url);
    const char *ps = colon + 1;
    size_t pl = strcspn(ps, "/");
    if (pl == 0 || pl >= sizeof(c->port) || strspn(ps, "0123456789") < pl || (ps[pl] && strcmp(ps + pl, "/")))
        return moe_diag_set(d, -EINVAL, "'%s': expected a port number after the host (http://HOST:PORT)",
                            url);
    memcpy(c->host, hs, (size_t)(he - hs));
    c->host[he - hs] = '\0';
    memcpy(c->port, ps, pl);
    c->port[pl] = '\0';
    const long port = strtol(c->port, NULL, 10);
    if (port < 1 || port > 65535)
        return moe_diag_set(d, -EINVAL, "'%s': port %ld, expected 1..65535", url, port);
    /* path names the daemon in messages: the URL here */
    char addr[320];
    snprintf(c->path, sizeof(c->path), "%.100s", moe_client_addr(c, addr, sizeof(addr)));
    return 0;
}

int moe_client_init(struct moe_client *c, const char *path, struct moe_diag *d)
{
    char def[4096];
    memset(c, 0, sizeof(*c));
    c->connect_timeout_ms = 5000;
    c->timeout_ms = 600000;
    const char *key = getenv("MOED_API_KEY");
    if (key && strlen(key) < sizeof(c->api_key))
        memcpy(c->api_key, key, strlen(key) + 1);
    const char *host = getenv("MOED_HOST");
    if (path == NULL && host && host[0])
        return parse_http(c, host, false, d) ? moe_diag_set(d, -EINVAL, "MOED_HOST: %s", d ? d->msg : "")
                                              : 0;
    if (path == NULL)
        path = moe_client_default_socket(def, sizeof(def));
    if (path[0] == '\0')
        return moe_diag_set(d, -EINVAL, "the socket path is empty");
    const int r = parse_http(c, path, true, d);
    if (r <= 0)
        return r;
    if (strlen(path) >= sizeof(c->path))
        return moe_diag_set(d, -ENAMETOOLONG, "socket path '%s' is longer than %zu bytes", path,
                            sizeof(c->path) - 1);
    memcpy(c->path, path, strlen(path) + 1);
    return 0;
}

const char *moe_client_addr(const struct moe_client *c, char *buf, size_t cap)
{
    if (c->host[0])
        snprintf(buf, cap, strchr(c->host, ':') ? "http://[%s]:%s" : "http://%s:%s", c->host, c->port);
    else
        snprintf(buf, cap, "%s", c->path);
    return buf;
}

void moe_client_resp_free(struct moe_client_resp *r)
{
    if (r == NULL)
        return;
    free(r->body);
    r->body = NULL;
    r->len = 0;
}

const char *moe_client_error_message(const char *body, char *buf, size_t cap)
{
    if (body == NULL || cap == 0)
        return NULL;
    json_t *j = json_loads(body, JSON_FLAGS, NULL);
    const char *m = json_string_value(json_object_get(json_object_get(j, "error"), "message"));
    const char *ret = NULL;
    if (m) {
        snprintf(buf, cap, "%s", m);
        ret = buf;
    }
    json_decref(j);
    return ret;
}

/* ---- the connection -------------------------------------------------------- */

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* 0 when fd is ready for events, -ETIMEDOUT, or -errno. timeout_ms <= 0:
 * no limit. */
static int wait_fd(int fd, short events, int timeout_ms)
{
    struct pollfd p = { .fd = fd, .events = events };
    const long long deadline = now_ms() + timeout_ms;
    for (;;) {
        long long left = deadline - now_ms();
        int n = poll(&p, 1, timeout_ms <= 0 ? -1 : left > 0 ? (int)left : 0);
        if (n > 0)
            return 0;
        if (n == 0)
            return -ETIMEDOUT;
        if (errno != EINTR)
            return -errno;
    }
}

/* The socket is non-blocking so that connect, send and recv all obey a
 * timeout: a moed that is wedged (accepting nothing, answering nothing) must
 * not hang a script forever. */
/* connect() on a non-blocking fd within the client's deadline: the fd,
 * or -errno (ETIMEDOUT at the deadline). */
static int connect_fd(int fd, const struct sockaddr *a, socklen_t alen, int timeout_ms)
{
    /* connect_timeout_ms <= 0: no limit */
    const bool forever = timeout_ms <= 0;
    const long long deadline = now_ms() + timeout_ms;
    int e;
    for (;;) {
        if (connect(fd, a, alen) == 0)
            return fd;
        e = errno;
        if (e == EINTR)
            continue;
        long long left = forever ? 10 : deadline - now_ms();
        if (e == EINPROGRESS) {
            int w = wait_fd(fd, POLLOUT, forever ? 0 : left > 0 ? (int)left : 1);
            socklen_t sl = sizeof(e);
            if (w == 0 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &sl) == 0 && e == 0)
                return fd;
            if (w)
                e = -w;
            break;
        }
        /* A Unix socket whose listen backlog is full answers EAGAIN at once:
         * moed is up but not accepting. Retry until the deadline. */
        if (e == EAGAIN && left > 0) {
            struct timespec ts = { 0, (left < 10 ? left : 10) * 1000000L };
            nanosleep(&ts, NULL);
            continue;
        }
        if (e == EAGAIN)
            e = ETIMEDOUT;
        break;
    }
    return -e;
}

/* The socket is non-blocking so that connect, send and recv all obey a
 * timeout: a moed that is wedged (accepting nothing, answering nothing) must
 * not hang a script forever. */
static int connect_to(const struct moe_client *c, bool *connect_failed, struct moe_diag *d)
{
    char addr[320];
    moe_client_addr(c, addr, sizeof(addr));
    int rc = -EINVAL;
    if (c->host[0]) {
        struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM }, *res = NULL;
        int g = getaddrinfo(c->host, c->port, &hints, &res);
        if (g != 0) {
            *connect_failed = true;
            return moe_diag_set(d, -EHOSTUNREACH, "cannot connect to %s: %s", addr, gai_strerror(g));
        }
        for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
            int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
            if (fd < 0)
                continue;
            rc = connect_fd(fd, ai->ai_addr, ai->ai_addrlen, c->connect_timeout_ms);
            if (rc >= 0)
                break;
            close(fd);
        }
        freeaddrinfo(res);
    } else {
        struct sockaddr_un a = { .sun_family = AF_UNIX };
        const size_t plen = strnlen(c->path, sizeof(c->path));
        if (plen == 0 || plen >= sizeof(a.sun_path)) {
            *connect_failed = true;
            return moe_diag_set(d, -EINVAL, "bad socket path (empty or over %zu bytes)",
                                sizeof(a.sun_path) - 1);
        }
        memcpy(a.sun_path, c->path, plen);
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
            return moe_diag_set(d, -errno, "socket: %s", strerror(errno));
        rc = connect_fd(fd, (const struct sockaddr *)&a, sizeof(a), c->connect_timeout_ms);
        if (rc < 0)
            close(fd);
    }
    if (rc >= 0)
        return rc;
    *connect_failed = true;
    if (rc == -ETIMEDOUT)
        return moe_diag_set(d, -ETIMEDOUT, "cannot connect to %s: no connection within %d ms (moed"
                            " is not accepting connections)", addr, c->connect_timeout_ms);
    return moe_diag_set(d, rc, "cannot connect to %s: %s (is moed running?)", addr, strerror(-rc));
}

struct conn {
    int fd;
    int timeout_ms;
    const char *path;
    size_t budget;          /* bytes of header-like lines still allowed */
    size_t pos, len;        /* unread bytes: rbuf[pos..len) */
    char rbuf[16384];
};

/* 1 when bytes arrived, 0 at the end of the stream, < 0 an error. */
static int conn_fill(struct conn *k, struct moe_diag *d)
{
    for (;;) {
        int w = wait_fd(k->fd, POLLIN, k->timeout_ms);
        if (w == -ETIMEDOUT)
            return moe_diag_set(d, -ETIMEDOUT, "%s: no answer within %d ms", k->path,
                                k->timeout_ms);
        if (w)
            return moe_diag_set(d, w, "%s: poll: %s", k->path, strerror(-w));
        ssize_t got = recv(k->fd, k->rbuf, sizeof(k->rbuf), 0);
        if (got < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (got < 0)
            return moe_diag_set(d, -errno, "%s: read: %s", k->path, strerror(errno));
        k->pos = 0;
        k->len = (size_t)got;
        return got > 0;
    }
}

/* One line ending in LF (a CR before it dropped), without the terminator,
 * NUL-terminated in out. Lines count against k->budget. */
static int conn_line(struct conn *k, char *out, size_t cap, const char *what, struct moe_diag *d)
{
    size_t n = 0;
    for (;;) {
        if (k->pos == k->len) {
            int rc = conn_fill(k, d);
            if (rc < 0)
                return rc;
            if (rc == 0)
                return moe_diag_set(d, MOE_EFORMAT, "%s: connection closed in the %s%s", k->path,
                                    what, n ? " (in the middle of a line)" : "");
        }
        if (k->budget == 0)
            return moe_diag_set(d, MOE_ELIMIT, "%s: the %s exceed %u bytes", k->path, what,
                                MOE_CLIENT_MAX_HEADER);
        k->budget--;
        const char ch = k->rbuf[k->pos++];
        if (ch == '\n') {
            if (n > 0 && out[n - 1] == '\r')
                n--;
            out[n] = '\0';
            return 0;
        }
        if (ch == '\0')
            return moe_diag_set(d, MOE_EFORMAT, "%s: a NUL byte in the %s", k->path, what);
        if (n + 1 >= cap)
            return moe_diag_set(d, MOE_ELIMIT, "%s: a line of the %s is longer than %zu bytes",
                                k->path, what, cap - 1);
        out[n++] = ch;
    }
}

static int send_all(int fd, const char *p, size_t n, int timeout_ms, const char *path,
                    struct moe_diag *d)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno == EAGAIN) {
            int rc = wait_fd(fd, POLLOUT, timeout_ms);
            if (rc == -ETIMEDOUT)
                return moe_diag_set(d, rc, "%s: the request was not taken within %d ms", path,
                                    timeout_ms);
            if (rc)
                return moe_diag_set(d, rc, "%s: poll: %s", path, strerror(-rc));
            continue;
        }
        if (w < 0)
            return moe_diag_set(d, -errno, "%s: write: %s", path, strerror(errno));
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* ---- where body bytes go: a buffer, or the event-stream parser ----------- */

struct sink {
    bool events;
    /* each bounded by MOE_CLIENT_MAX_BODY (sink_for); an append past it is
     * MOE_ELIMIT, which limit_error words */
    struct moe_buf body;    /* plain body */
    struct moe_buf line;    /* events: the line being read */
    struct moe_buf data;    /* events: the data lines of the current event */
    bool have_data;
    moe_client_event_fn fn;
    void *ud;
    int stop;               /* fn's non-zero return */
    const char *path;
};

static struct sink sink_for(const char *path)
{
    struct sink s = { .path = path };
    moe_buf_init(&s.body, MOE_CLIENT_MAX_BODY);
    moe_buf_init(&s.line, MOE_CLIENT_MAX_BODY);
    moe_buf_init(&s.data, MOE_CLIENT_MAX_BODY);
    return s;
}

static int limit_error(int rc, const char *path, const char *what, struct moe_diag *d)
{
    if (rc == -ENOMEM)
        return moe_diag_set(d, -ENOMEM, "%s: out of memory reading the %s", path, what);
    return moe_diag_set(d, rc, "%s: the %s is over %u bytes", path, what, MOE_CLIENT_MAX_BODY);
}

/* One complete line of a server-sent event stream (WHATWG HTML, "Parsing an
 * event stream"): a blank line dispatches the event, `:` starts a comment, a
 * field's value loses one leading space, data lines join with LF. Fields
 * other than data (event, id, retry) carry nothing moed uses. */
static int sse_line(struct sink *s, struct moe_diag *d)
{
    const char *l = s->line.data ? s->line.data : "";
    size_t n = s->line.len;
    if (n > 0 && l[n - 1] == '\r')
        n--;
    if (n == 0) {
        if (s->have_data) {
            s->stop = s->fn(s->ud, s->data.data ? s->data.data : "", s->data.len);
            moe_buf_clear(&s->data);
            s->have_data = false;
        }
        return 0;
    }
    if (l[0] == ':')
        return 0;
    const char *colon = memchr(l, ':', n);
    const size_t name = colon ? (size_t)(colon - l) : n;
    if (name != 4 || memcmp(l, "data", 4) != 0)
        return 0;
    const char *v = colon ? colon + 1 : l + n;
    if (v < l + n && *v == ' ')
        v++;
    int rc = 0;
    if (s->have_data)
        rc = moe_buf_append(&s->data, "\n", 1);
    if (rc == 0)
        rc = moe_buf_append(&s->data, v, (size_t)(l + n - v));
    if (rc)
        return limit_error(rc, s->path, "event", d);
    s->have_data = true;
    return 0;
}

static int sink_put(struct sink *s, const char *p, size_t n, struct moe_diag *d)
{
    if (!s->events) {
        int rc = moe_buf_append(&s->body, p, n);
        return rc ? limit_error(rc, s->path, "response body", d) : 0;
    }
    /* events are text: a NUL byte would cut what the callback sees */
    if (memchr(p, '\0', n) != NULL)
        return moe_diag_set(d, MOE_EFORMAT, "%s: a NUL byte in the event stream", s->path);
    while (n > 0 && !s->stop) {
        const char *nl = memchr(p, '\n', n);
        const size_t k = nl ? (size_t)(nl - p) : n;
        int rc = moe_buf_append(&s->line, p, k);
        if (rc)
            return limit_error(rc, s->path, "event line", d);
        if (nl == NULL)
            break;
        p += k + 1;
        n -= k + 1;
        rc = sse_line(s, d);
        moe_buf_clear(&s->line);
        if (rc)
            return rc;
    }
    return 0;
}

static void sink_free(struct sink *s)
{
    moe_buf_free(&s->body);
    moe_buf_free(&s->line);
    moe_buf_free(&s->data);
}

/* n bytes of body into the sink (fewer when the sink's callback stops). */
static int conn_body(struct conn *k, uint64_t n, struct sink *s, struct moe_diag *d)
{
    while (n > 0 && !s->stop) {
        if (k->pos == k->len) {
            int rc = conn_fill(k, d);
            if (rc < 0)
                return rc;
            if (rc == 0)
                return moe_diag_set(d, MOE_EFORMAT, "%s: connection closed %llu bytes before the end"
                                    " of the body", k->path, (unsigned long long)n);
        }
        const size_t avail = k->len - k->pos;
        const size_t take = (uint64_t)avail < n ? avail : (size_t)n;
        int rc = sink_put(s, k->rbuf + k->pos, take, d);
        if (rc)
            return rc;
        k->pos += take;
        n -= take;
    }
    return 0;
}

/* ---- one exchange ---------------------------------------------------------- */

/* "HTTP/1.x NNN[ reason]" (RFC 9112 section 4) */
static bool parse_status_line(const char *l, int *status)
{
    if (strncmp(l, "HTTP/1.", 7) != 0 || l[7] < '0' || l[7] > '9' || l[8] != ' ')
        return false;
    for (int i = 9; i < 12; i++)
        if (l[i] < '0' || l[i] > '9')
            return false;
    if (l[12] != '\0' && l[12] != ' ')
        return false;
    *status = (l[9] - '0') * 100 + (l[10] - '0') * 10 + (l[11] - '0');
    return *status >= 100;
}

static char *trim(char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t'))
        s[--n] = '\0';
    return s;
}

struct framing {
    bool chunked;
    int64_t clen;           /* -1: none */
};

/* The header lines up to the blank line. */
static int read_headers(struct conn *k, struct framing *f, struct moe_client_resp *out,
                        struct moe_diag *d)
{
    char line[LINE_MAX_BYTES];
    f->chunked = false;
    f->clen = -1;
    for (;;) {
        int rc = conn_line(k, line, sizeof(line), "response headers", d);
        if (rc)
            return rc;
        if (line[0] == '\0')
            return 0;
        if (line[0] == ' ' || line[0] == '\t')
            return moe_diag_set(d, MOE_EFORMAT, "%s: folded header line '%.80s' (obsolete, refused)",
                                k->path, line);
        char *colon = strchr(line, ':');
        if (colon == NULL || colon == line || strcspn(line, " \t") < (size_t)(colon - line))
            return moe_diag_set(d, MOE_EFORMAT, "%s: malformed header line '%.80s'", k->path, line);
        *colon = '\0';
        char *v = trim(colon + 1);
        if (strcasecmp(line, "content-length") == 0) {
            const size_t digits = strspn(v, "0123456789");
            if (digits == 0 || v[digits] != '\0' || digits > 18)
                return moe_diag_set(d, MOE_EFORMAT, "%s: bad Content-Length '%.40s'", k->path, v);
            const int64_t x = strtoll(v, NULL, 10);
            if (f->clen >= 0 && f->clen != x)
                return moe_diag_set(d, MOE_EFORMAT, "%s: two different Content-Length headers "
                                    "(%lld and %lld)", k->path, (long long)f->clen, (long long)x);
            f->clen = x;
        } else if (strcasecmp(line, "transfer-encoding") == 0) {
            if (strcasecmp(v, "chunked") == 0)
                f->chunked = true;
            else if (strcasecmp(v, "identity") != 0)
                return moe_diag_set(d, MOE_EUNSUPPORTED, "%s: Transfer-Encoding '%.40s' is not "
                                    "supported (only chunked)", k->path, v);
        } else if (strcasecmp(line, "retry-after") == 0) {
            const size_t digits = strspn(v, "0123456789");
            out->retry_after = digits > 0 && digits <= 9 && v[digits] == '\0' ? atoi(v) : -1;
        } else if (strcasecmp(line, "content-type") == 0) {
            snprintf(out->content_type, sizeof(out->content_type), "%s", v);
        }
    }
}

static int read_chunked(struct conn *k, struct sink *s, struct moe_diag *d)
{
    char line[LINE_MAX_BYTES];
    for (;;) {
        /* each chunk's framing gets its own budget: a long stream has many */
        k->budget = MOE_CLIENT_MAX_HEADER;
        int rc = conn_line(k, line, sizeof(line), "chunk size line", d);
        if (rc)
            return rc;
        const char *p = line;
        while (*p == '0' && p[1] != '\0' && strchr("0123456789abcdefABCDEF", p[1]))
            p++;   /* leading zeros */
        const size_t hex = strspn(p, "0123456789abcdefABCDEF");
        const char *rest = p + hex;
        while (*rest == ' ' || *rest == '\t')
            rest++;
        if (hex == 0 || hex > 8 || (*rest != '\0' && *rest != ';'))
            return moe_diag_set(d, MOE_EFORMAT, "%s: bad chunk size line '%.40s' (expected at most 8"
                                " hex digits)", k->path, line);
        const uint64_t n = strtoull(p, NULL, 16);
        if (n == 0)
            break;
        if ((rc = conn_body(k, n, s, d)) != 0 || s->stop)
            return rc;
        if ((rc = conn_line(k, line, sizeof(line), "end of a chunk", d)) != 0)
            return rc;
        if (line[0] != '\0')
            return moe_diag_set(d, MOE_EFORMAT, "%s: chunk longer than its size (%llu bytes)",
                                k->path, (unsigned long long)n);
    }
    /* trailers, up to the blank line */
    k->budget = MOE_CLIENT_MAX_HEADER;
    for (;;) {
        int rc = conn_line(k, line, sizeof(line), "trailers", d);
        if (rc || line[0] == '\0')
            return rc;
    }
}

static int read_to_close(struct conn *k, struct sink *s, struct moe_diag *d)
{
    for (;;) {
        if (k->pos == k->len) {
            int rc = conn_fill(k, d);
            if (rc <= 0)
                return rc;
        }
        int rc = sink_put(s, k->rbuf + k->pos, k->len - k->pos, d);
        k->pos = k->len;
        if (rc || s->stop)
            return rc;
    }
}

/* A request target or method must not break the request line. */
static bool token_ok(const char *s, size_t max)
{
    size_t n = 0;
    for (; s[n]; n++)
        if ((unsigned char)s[n] <= ' ' || s[n] == 0x7f)
            return false;
    return n > 0 && n <= max;
}

static int exchange(const struct moe_client *c, const char *method, const char *target,
                    const char *body, size_t len, struct sink *s, struct moe_client_resp *out,
                    bool *connect_failed, struct moe_diag *d)
{
    memset(out, 0, sizeof(*out));
    out->retry_after = -1;
    *connect_failed = false;
    if (!token_ok(method, 16) || !token_ok(target, 2048))
        return moe_diag_set(d, -EINVAL, "bad request method or target '%.80s'", target);
    char head[3000], hosthdr[300], auth[300] = "";
    if (c->host[0])
        snprintf(hosthdr, sizeof(hosthdr), strchr(c->host, ':') ? "[%s]:%s" : "%s:%s", c->host, c->port);
    else
        snprintf(hosthdr, sizeof(hosthdr), "moed");
    if (c->api_key[0] && token_ok(c->api_key, sizeof(c->api_key)))
        snprintf(auth, sizeof(auth), "Authorization: Bearer %s\r\n", c->api_key);
    int hn = snprintf(head, sizeof(head),
                      "%s %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\nAccept: %s\r\n"
                      "%s%sContent-Length: %zu\r\n\r\n", method, target, hosthdr,
                      s->events ? "text/event-stream" : "application/json", auth,
                      body ? "Content-Type: application/json\r\n" : "", body ? len : 0);
    if (hn < 0 || (size_t)hn >= sizeof(head))
        return moe_diag_set(d, -EINVAL, "request head too long");
    int fd = connect_to(c, connect_failed, d);
    if (fd < 0)
        return fd;
    struct conn *k = malloc(sizeof(*k));
    if (k == NULL) {
        close(fd);
        return moe_diag_set(d, -ENOMEM, "out of memory");
    }
    k->fd = fd;
    k->timeout_ms = c->timeout_ms;
    k->path = c->path;
    k->pos = k->len = 0;
    k->budget = MOE_CLIENT_MAX_HEADER;

    /* moed may answer (413, 400) and close before it has read the whole
     * request: a failed send is reported only if no answer can be read. */
    struct moe_diag send_diag = { 0 };
    int send_rc = send_all(fd, head, (size_t)hn, c->timeout_ms, c->path, &send_diag);
    if (send_rc == 0 && body && len)
        send_rc = send_all(fd, body, len, c->timeout_ms, c->path, &send_diag);
    if (send_rc == -ETIMEDOUT) {
        free(k);
        close(fd);
        return moe_diag_set(d, send_rc, "%s", send_diag.msg);
    }

    char line[LINE_MAX_BYTES];
    struct framing f;
    int rc, status = 0;
    for (int interim = 0;; interim++) {
        struct moe_diag line_diag = { 0 };
        rc = conn_line(k, line, sizeof(line), "status line", &line_diag);
        if (rc && send_rc) {
            rc = moe_diag_set(d, send_rc, "%s", send_diag.msg);
            goto done;
        }
        if (rc) {
            if (rc == MOE_EFORMAT && strstr(line_diag.msg, "(in the middle") == NULL)
                rc = moe_diag_set(d, rc, "%s: moed closed the connection without answering",
                                  c->path);
            else
                rc = moe_diag_set(d, rc, "%s", line_diag.msg);
            goto done;
        }
        if (!parse_status_line(line, &status)) {
            rc = moe_diag_set(d, MOE_EFORMAT, "%s: not an HTTP/1.x status line: '%.80s'", c->path,
                              line);
            goto done;
        }
        if ((rc = read_headers(k, &f, out, d)) != 0)
            goto done;
        if (status >= 200)
            break;
        if (status == 101 || interim == MAX_INTERIM) {
            rc = moe_diag_set(d, MOE_EUNSUPPORTED, "%s: unexpected interim answer %d", c->path,
                              status);
            goto done;
        }
        out->retry_after = -1;
        out->content_type[0] = '\0';
    }
    out->status = status;
    /* an error answer to a stream request, or a plain JSON one, is a body */
    if (s->events && (status != 200 || (out->content_type[0] &&
                                         strncasecmp(out->content_type, "text/event-stream", 17))))
        s->events = false;
    k->budget = MOE_CLIENT_MAX_HEADER;
    if (status == 204 || status == 304 || strcmp(method, "HEAD") == 0)
        rc = 0;
    else if (f.chunked)
        rc = read_chunked(k, s, d);
    else if (f.clen >= 0 && !s->events && f.clen > (int64_t)MOE_CLIENT_MAX_BODY)
        rc = moe_diag_set(d, MOE_ELIMIT, "%s: Content-Length %lld is over %u bytes", c->path,
                          (long long)f.clen, MOE_CLIENT_MAX_BODY);
    else if (f.clen >= 0)
        rc = conn_body(k, (uint64_t)f.clen, s, d);
    else
        rc = read_to_close(k, s, d);
    if (rc == 0 && s->stop)
        rc = s->stop;
done:
    close(fd);
    free(k);
    return rc;
}

static int take_body(struct sink *s, struct moe_client_resp *out, struct moe_diag *d)
{
    if ((out->body = moe_buf_take(&s->body, &out->len)) == NULL)
        return moe_diag_set(d, -ENOMEM, "out of memory");
    return 0;
}

int moe_client_request(const struct moe_client *c, const char *method, const char *target,
                       const char *body, size_t len, struct moe_client_resp *out,
                       struct moe_diag *d)
{
    struct sink s = sink_for(c->path);
    bool cf;
    int rc = exchange(c, method, target, body, len, &s, out, &cf, d);
    if (rc == 0)
        rc = take_body(&s, out, d);
    sink_free(&s);
    return rc;
}

static int stream_(const struct moe_client *c, const char *target, const char *body, size_t len,
                   moe_client_event_fn fn, void *ud, struct moe_client_resp *out,
                   bool *connect_failed, struct moe_diag *d)
{
    struct sink s = sink_for(c->path);
    s.events = true;
    s.fn = fn;
    s.ud = ud;
    int rc = exchange(c, "POST", target, body, len, &s, out, connect_failed, d);
    if (rc == 0 && !s.events)
        rc = take_body(&s, out, d);
    sink_free(&s);
    return rc;
}

int moe_client_stream(const struct moe_client *c, const char *target, const char *body,
                      size_t len, moe_client_event_fn fn, void *ud, struct moe_client_resp *out,
                      struct moe_diag *d)
{
    bool cf;
    return stream_(c, target, body, len, fn, ud, out, &cf, d);
}

/* ---- convenience calls ----------------------------------------------------- */

static void err_reset(struct moe_client_err *e)
{
    memset(e, 0, sizeof(*e));
    e->retry_after = -1;
}

/* The first message set wins, as with moe_diag. */
__attribute__((format(printf, 3, 4)))
static int err_set(struct moe_client_err *e, int code, const char *fmt, ...)
{
    if (e->code == 0) {
        e->code = code;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->msg, sizeof(e->msg), fmt, ap);
        va_end(ap);
    }
    return code;
}

static void copy_field(char *dst, size_t cap, json_t *v)
{
    if (json_is_string(v))
        snprintf(dst, cap, "%s", json_string_value(v));
    else if (json_is_integer(v))
        snprintf(dst, cap, "%lld", (long long)json_integer_value(v));
}

/* Fills e from an OpenAI error object ({"error": {...}}) in j; false if none. */
static bool err_api(struct moe_client_err *e, json_t *j)
{
    json_t *o = json_object_get(j, "error");
    if (json_is_string(o)) {   /* {"error": "text"}: not OpenAI's shape, but clear */
        copy_field(e->api_message, sizeof(e->api_message), o);
        return true;
    }
    if (!json_is_object(o))
        return false;
    copy_field(e->api_message, sizeof(e->api_message), json_object_get(o, "message"));
    copy_field(e->api_type, sizeof(e->api_type), json_object_get(o, "type"));
    copy_field(e->api_param, sizeof(e->api_param), json_object_get(o, "param"));
    copy_field(e->api_code, sizeof(e->api_code), json_object_get(o, "code"));
    return true;
}

/* An HTTP error status: "moed answered 400: <the error object's message>". */
static int err_status(struct moe_client_err *e, const struct moe_client_resp *r)
{
    e->status = r->status;
    e->retry_after = r->retry_after;
    json_t *j = r->body ? json_loadb(r->body, r->len, JSON_FLAGS, NULL) : NULL;
    char text[MOE_DIAG_MSG_MAX];
    if (j && err_api(e, j) && e->api_message[0]) {
        snprintf(text, sizeof(text), "%s", e->api_message);
    } else if (json_is_string(json_object_get(j, "status"))) {
        snprintf(text, sizeof(text), "%s", json_string_value(json_object_get(j, "status")));
    } else {
        /* not JSON: the first line of the body, control bytes replaced */
        size_t n = 0;
        for (; r->body && n < r->len && n < 200 && r->body[n] != '\n'; n++)
            text[n] = (unsigned char)r->body[n] < ' ' ? '?' : r->body[n];
        text[n] = '\0';
        if (n == 0)
            snprintf(text, sizeof(text), "(no error message)");
    }
    json_decref(j);
    char retry[48] = "";
    if (r->retry_after >= 0)
        snprintf(retry, sizeof(retry), " (retry after %d s)", r->retry_after);
    return err_set(e, MOE_CLIENT_ESERVER, "moed answered %d: %.400s%s", r->status, text, retry);
}

static int err_diag(struct moe_client_err *e, int rc, bool connect_failed,
                    const struct moe_diag *d)
{
    if (e->code == 0)
        e->connect = connect_failed;
    return err_set(e, rc, "%s", d->msg[0] ? d->msg : moe_strerror(rc));
}

static int call_(const struct moe_client *c, const char *method, const char *target,
                 const char *body, size_t len, struct moe_buf *out, struct moe_client_err *e)
{
    struct moe_client_resp r;
    struct moe_diag d = { 0 };
    struct sink s = sink_for(c->path);
    bool cf = false;
    int rc = exchange(c, method, target, body, len, &s, &r, &cf, &d);
    if (rc) {
        sink_free(&s);
        return err_diag(e, rc, cf, &d);
    }
    r.body = s.body.data;
    r.len = s.body.len;
    e->status = r.status;
    if (r.status < 200 || r.status > 299) {
        rc = err_status(e, &r);
        sink_free(&s);
        return rc;
    }
    /* an empty body is still a string: the append writes its NUL */
    if (moe_buf_append(&s.body, "", 0) != 0) {
        sink_free(&s);
        return err_set(e, -ENOMEM, "out of memory");
    }
    *out = s.body;
    moe_buf_free(&s.line);
    moe_buf_free(&s.data);
    return 0;
}

int moe_client_call(const struct moe_client *c, const char *method, const char *target,
                    const char *body, size_t len, char **out_body, struct moe_client_err *e)
{
    struct moe_client_err tmp;
    e = e ? e : &tmp;
    err_reset(e);
    if (out_body)
        *out_body = NULL;
    struct moe_buf b = { 0 };
    int rc = call_(c, method, target, body, len, &b, e);
    if (rc == 0 && out_body)
        *out_body = moe_buf_take(&b, NULL);   /* holds "" at least: no allocation */
    else
        moe_buf_free(&b);
    return rc;
}

struct stream_ctx {
    moe_client_event_fn fn;
    void *ud;
    struct moe_client_err *e;
    bool done;             /* [DONE] seen */
    bool errored;          /* an error event, or fn stopped */
};

static int on_stream_event(void *ud, const char *data, size_t len)
{
    struct stream_ctx *x = ud;
    if (x->done)
        return 0;          /* nothing after [DONE] is meaningful */
    if (len == 6 && memcmp(data, "[DONE]", 6) == 0) {
        x->done = true;
        return 0;
    }
    /* an error inside a stream comes as an event holding an error object */
    if (memmem(data, len, "\"error\"", 7) != NULL) {
        json_t *j = json_loadb(data, len, JSON_FLAGS, NULL);
        bool is_err = json_is_object(j) && err_api(x->e, j);
        json_decref(j);
        if (is_err) {
            x->errored = true;
            return err_set(x->e, MOE_CLIENT_ESERVER, "moed reported an error in the stream: %.400s",
                           x->e->api_message[0] ? x->e->api_message : "(no message)");
        }
    }
    int rc = x->fn(x->ud, data, len);
    if (rc) {
        x->errored = true;
        err_set(x->e, rc, "the stream was stopped (%d)", rc);
    }
    return rc;
}

static int call_stream_(const struct moe_client *c, const char *target, const char *body,
                        size_t len, moe_client_event_fn fn, void *ud, struct moe_client_err *e)
{
    struct stream_ctx x = { .fn = fn, .ud = ud, .e = e };
    struct moe_client_resp r;
    struct moe_diag d = { 0 };
    bool cf = false;
    int rc = stream_(c, target, body, len, on_stream_event, &x, &r, &cf, &d);
    e->status = r.status;
    if (rc && x.errored)
        return err_set(e, rc, "the stream was stopped (%d)", rc);   /* e is set already */
    if (rc)
        return err_diag(e, rc, cf, &d);
    if (r.status != 200)
        rc = err_status(e, &r);
    else if (r.body)
        rc = err_set(e, MOE_EFORMAT, "%s: expected an event stream, got Content-Type '%s'",
                     c->path, r.content_type);
    else if (!x.done)
        rc = err_set(e, MOE_EFORMAT, "%s: the event stream ended without 'data: [DONE]'",
                     c->path);
    moe_client_resp_free(&r);
    return rc;
}

int moe_client_call_stream(const struct moe_client *c, const char *target, const char *body,
                           size_t len, moe_client_event_fn fn, void *ud,
                           struct moe_client_err *e)
{
    struct moe_client_err tmp;
    e = e ? e : &tmp;
    err_reset(e);
    return call_stream_(c, target, body, len, fn, ud, e);
}

/* GET target, its body parsed as JSON. */
static int get_json(const struct moe_client *c, const char *target, json_t **out,
                    struct moe_client_err *e)
{
    struct moe_buf b = { 0 };
    *out = NULL;
    int rc = call_(c, "GET", target, NULL, 0, &b, e);
    if (rc)
        return rc;
    json_error_t je;
    *out = json_loadb(b.data, b.len, JSON_FLAGS, &je);
    moe_buf_free(&b);
    if (*out == NULL)
        return err_set(e, MOE_EFORMAT, "%s: %s: the answer is not JSON (%s)", c->path, target,
                       je.text);
    return 0;
}

int moe_client_health(const struct moe_client *c, struct moe_client_err *e)
{
    struct moe_client_err tmp;
    e = e ? e : &tmp;
    err_reset(e);
    json_t *j;
    int rc = get_json(c, "/health", &j, e);
    if (rc)
        return rc;
    const char *st = json_string_value(json_object_get(j, "status"));
    if (st == NULL || strcmp(st, "ok") != 0)
        rc = err_set(e, MOE_EFORMAT, "%s: /health: expected {\"status\": \"ok\"}, got status"
                     " '%.60s'", c->path, st ? st : "(none)");
    json_decref(j);
    return rc;
}

int moe_client_stats(const struct moe_client *c, char **json, struct moe_client_err *e)
{
    struct moe_client_err tmp;
    e = e ? e : &tmp;
    err_reset(e);
    *json = NULL;
    struct moe_buf b = { 0 };
    int rc = call_(c, "GET", "/v1/moed/stats", NULL, 0, &b, e);
    if (rc)
        return rc;
    json_t *j = json_loadb(b.data, b.len, JSON_FLAGS, NULL);
    if (!json_is_object(j)) {
        json_decref(j);
        moe_buf_free(&b);
        return err_set(e, MOE_EFORMAT, "%s: /v1/moed/stats: the answer is not a JSON object",
                       c->path);
    }
    json_decref(j);
    *json = moe_buf_take(&b, NULL);
    return 0;
}

void moe_client_strv_free(char **v)
{
    for (size_t i = 0; v && v[i]; i++)
        free(v[i]);
    free(v);
}

int moe_client_models(const struct moe_client *c, char ***ids, size_t *n,
                      struct moe_client_err *e)
{
    struct moe_client_err tmp;
    e = e ? e : &tmp;
    err_reset(e);
    *ids = NULL;
    if (n)
        *n = 0;
    json_t *j;
    int rc = get_json(c, "/v1/models", &j, e);
    if (rc)
        return rc;
    json_t *data = json_object_get(j, "data");
    const size_t cnt = json_array_size(data);
    char **v = json_is_array(data) ? calloc(cnt + 1, sizeof(*v)) : NULL;
    if (!json_is_array(data))
        rc = err_set(e, MOE_EFORMAT, "%s: /v1/models: no \"data\" array", c->path);
    else if (v == NULL)
        rc = err_set(e, -ENOMEM, "out of memory");
    for (size_t i = 0; rc == 0 && i < cnt; i++) {
        const char *id = json_string_value(json_object_get(json_array_get(data, i), "id"));
        if (id == NULL)
            rc = err_set(e, MOE_EFORMAT, "%s: /v1/models: data[%zu] has no \"id\" string",
                         c->path, i);
        else if ((v[i] = strdup(id)) == NULL)
            rc = err_set(e, -ENOMEM, "out of memory");
    }
    json_decref(j);
    if (rc) {
        moe_client_strv_free(v);
        return rc;
    }
    *ids = v;
    if (n)
        *n = cnt;
    return 0;
}

/* ---- completions ------------------------------------------------------------ */

void moe_client_result_free(struct moe_client_result *r)
{
    if (r == NULL)
        return;
    free(r->text);
    free(r->raw);
    r->text = r->raw = NULL;
    r->len = 0;
}

static int add_params(json_t *req, const struct moe_client_params *p, bool stream,
                      struct moe_diag *d)
{
    int bad = json_object_set_new(req, "stream", json_boolean(stream));
    if (stream)   /* the token counts arrive in a last chunk */
        bad |= json_object_set_new(req, "stream_options", json_pack("{s:b}", "include_usage", 1));
    if (p == NULL)
        return bad ? moe_diag_set(d, -ENOMEM, "out of memory") : 0;
    if (p->max_tokens > 0)
        bad |= json_object_set_new(req, "max_tokens", json_integer(p->max_tokens));
    if (p->has_temperature)
        bad |= json_object_set_new(req, "temperature", json_real(p->temperature));
    if (p->has_top_p)
        bad |= json_object_set_new(req, "top_p", json_real(p->top_p));
    if (p->has_min_p)
        bad |= json_object_set_new(req, "min_p", json_real(p->min_p));
    if (p->has_top_k)
        bad |= json_object_set_new(req, "top_k", json_integer(p->top_k));
    if (p->has_seed)
        bad |= json_object_set_new(req, "seed", json_integer(p->seed));
    if (p->logprobs > 0)
        bad |= json_object_set_new(req, "logprobs", json_integer(p->logprobs));
    if (p->n_stop > 0) {
        json_t *a = json_array();
        for (size_t i = 0; a && i < p->n_stop; i++) {
            json_t *s = p->stop[i] ? json_string(p->stop[i]) : NULL;
            if (s == NULL) {
                json_decref(a);
                return moe_diag_set(d, -EINVAL, "stop string %zu is not valid UTF-8", i);
            }
            bad |= json_array_append_new(a, s);
        }
        bad |= json_object_set_new(req, "stop", a);
    }
    return bad ? moe_diag_set(d, -ENOMEM, "out of memory") : 0;
}

static int dump(json_t *req, char **out, struct moe_diag *d)
{
    *out = json_dumps(req, JSON_COMPACT);
    json_decref(req);
    return *out ? 0 : moe_diag_set(d, -ENOMEM, "out of memory");
}

int moe_client_completion_body(const char *prompt, const struct moe_client_params *p,
                               bool stream, char **out, struct moe_diag *d)
{
    *out = NULL;
    json_t *req = json_object();
    json_t *pj = prompt ? json_string(prompt) : NULL;
    if (req == NULL || pj == NULL) {
        json_decref(req);
        return moe_diag_set(d, -EINVAL, "the prompt is missing or not valid UTF-8");
    }
    json_object_set_new(req, "prompt", pj);
    int rc = add_params(req, p, stream, d);
    if (rc) {
        json_decref(req);
        return rc;
    }
    return dump(req, out, d);
}

int moe_client_chat_body(const struct moe_client_message *msgs, size_t n,
                         const struct moe_client_params *p, bool stream, char **out,
                         struct moe_diag *d)
{
    *out = NULL;
    json_t *req = json_object(), *a = json_array();
    int rc = req && a ? 0 : moe_diag_set(d, -ENOMEM, "out of memory");
    for (size_t i = 0; rc == 0 && i < n; i++) {
        json_t *role = msgs[i].role ? json_string(msgs[i].role) : NULL;
        json_t *content = msgs[i].content ? json_string(msgs[i].content) : NULL;
        json_t *m = json_object();
        if (role == NULL || content == NULL || m == NULL) {
            json_decref(role);
            json_decref(content);
            json_decref(m);
            rc = moe_diag_set(d, -EINVAL, "message %zu: role or content missing or not valid UTF-8",
                              i);
            break;
        }
        json_object_set_new(m, "role", role);
        json_object_set_new(m, "content", content);
        json_array_append_new(a, m);
    }
    if (rc == 0) {
        json_object_set_new(req, "messages", a);
        a = NULL;
        rc = add_params(req, p, stream, d);
    }
    json_decref(a);
    if (rc) {
        json_decref(req);
        return rc;
    }
    return dump(req, out, d);
}

static void take_usage(struct moe_client_result *res, json_t *j)
{
    json_t *u = json_object_get(j, "usage");
    if (json_is_integer(json_object_get(u, "prompt_tokens")))
        res->prompt_tokens = json_integer_value(json_object_get(u, "prompt_tokens"));
    if (json_is_integer(json_object_get(u, "completion_tokens")))
        res->completion_tokens = json_integer_value(json_object_get(u, "completion_tokens"));
}

static void take_finish(struct moe_client_result *res, json_t *choice)
{
    const char *f = json_string_value(json_object_get(choice, "finish_reason"));
    if (f)
        snprintf(res->finish_reason, sizeof(res->finish_reason), "%s", f);
}

struct gen_ctx {
    bool chat;
    moe_client_delta_fn fn;
    void *ud;
    struct moe_client_result *res;
    struct moe_buf text;    /* bounded by MOE_CLIENT_MAX_BODY */
    struct moe_client_err *e;
    const char *path;
};

static int on_chunk(void *ud, const char *data, size_t len)
{
    struct gen_ctx *g = ud;
    json_error_t je;
    json_t *j = json_loadb(data, len, JSON_FLAGS, &je);
    if (j == NULL)
        return err_set(g->e, MOE_EFORMAT, "%s: a stream event is not valid JSON (%s): '%.60s'",
                       g->path, je.text, data);
    if (!json_is_object(j)) {
        json_decref(j);
        return err_set(g->e, MOE_EFORMAT, "%s: a stream event is not a JSON object: '%.60s'",
                       g->path, data);
    }
    /* a usage-only chunk has "choices": [] */
    json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
    json_t *t = g->chat ? json_object_get(json_object_get(c0, "delta"), "content")
                        : json_object_get(c0, "text");
    int rc = 0;
    if (t && !json_is_string(t) && !json_is_null(t))
        rc = err_set(g->e, MOE_EFORMAT, "%s: a stream event's %s is not a string", g->path,
                     g->chat ? "choices[0].delta.content" : "choices[0].text");
    const size_t n = json_string_length(t);
    if (rc == 0 && n > 0) {
        rc = moe_buf_append(&g->text, json_string_value(t), n);
        if (rc)
            rc = err_set(g->e, rc, "%s: the generated text is over %u bytes", g->path,
                         MOE_CLIENT_MAX_BODY);
        if (rc == 0 && g->fn)
            rc = g->fn(g->ud, json_string_value(t), n);
    }
    take_finish(g->res, c0);
    take_usage(g->res, j);
    json_decref(j);
    return rc;
}

static int generate(const struct moe_client *c, bool chat, const char *body,
                    moe_client_delta_fn fn, void *ud, struct moe_client_result *res,
                    struct moe_client_err *e)
{
    const char *target = chat ? "/v1/chat/completions" : "/v1/completions";
    int rc;
    if (fn) {
        struct gen_ctx g = { .chat = chat, .fn = fn, .ud = ud, .res = res, .e = e,
                             .path = c->path };
        moe_buf_init(&g.text, MOE_CLIENT_MAX_BODY);
        rc = call_stream_(c, target, body, strlen(body), on_chunk, &g, e);
        if (rc == 0 && (res->text = moe_buf_take(&g.text, &res->len)) == NULL)
            rc = err_set(e, -ENOMEM, "out of memory");
        moe_buf_free(&g.text);
        return rc;
    }
    struct moe_buf b = { 0 };
    rc = call_(c, "POST", target, body, strlen(body), &b, e);
    if (rc)
        return rc;
    json_error_t je;
    json_t *j = json_loadb(b.data, b.len, JSON_FLAGS, &je);
    json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
    json_t *t = chat ? json_object_get(json_object_get(c0, "message"), "content")
                     : json_object_get(c0, "text");
    if (j == NULL)
        rc = err_set(e, MOE_EFORMAT, "%s: %s: the answer is not JSON (%s)", c->path, target,
                     je.text);
    else if (!json_is_string(t))
        rc = err_set(e, MOE_EFORMAT, "%s: %s: the answer has no %s string", c->path, target,
                     chat ? "choices[0].message.content" : "choices[0].text");
    else if ((res->text = malloc(json_string_length(t) + 1)) == NULL)
        rc = err_set(e, -ENOMEM, "out of memory");
    if (rc == 0) {
        res->len = json_string_length(t);
        memcpy(res->text, json_string_value(t), res->len + 1);
        take_finish(res, c0);
        take_usage(res, j);
        res->raw = moe_buf_take(&b, NULL);
    }
    json_decref(j);
    moe_buf_free(&b);
    return rc;
}

static void result_reset(struct moe_client_result *r)
{
    memset(r, 0, sizeof(*r));
    r->prompt_tokens = r->completion_tokens = -1;
}

int moe_client_complete(const struct moe_client *c, const char *prompt,
                        const struct moe_client_params *p, moe_client_delta_fn fn, void *ud,
                        struct moe_client_result *res, struct moe_client_err *e)
{
    struct moe_client_err tmp;
    struct moe_client_result rtmp;
    e = e ? e : &tmp;
    err_reset(e);
    const bool own_res = res == NULL;
    res = res ? res : &rtmp;
    result_reset(res);
    struct moe_diag d = { 0 };
    char *body;
    int rc = moe_client_completion_body(prompt, p, fn != NULL, &body, &d);
    if (rc)
        return err_set(e, rc, "%s", d.msg);
    rc = generate(c, false, body, fn, ud, res, e);
    free(body);
    if (own_res || rc)
        moe_client_result_free(res);
    return rc;
}

int moe_client_chat(const struct moe_client *c, const struct moe_client_message *msgs, size_t n,
                    const struct moe_client_params *p, moe_client_delta_fn fn, void *ud,
                    struct moe_client_result *res, struct moe_client_err *e)
{
    struct moe_client_err tmp;
    struct moe_client_result rtmp;
    e = e ? e : &tmp;
    err_reset(e);
    const bool own_res = res == NULL;
    res = res ? res : &rtmp;
    result_reset(res);
    struct moe_diag d = { 0 };
    char *body;
    int rc = moe_client_chat_body(msgs, n, p, fn != NULL, &body, &d);
    if (rc)
        return err_set(e, rc, "%s", d.msg);
    rc = generate(c, true, body, fn, ud, res, e);
    free(body);
    if (own_res || rc)
        moe_client_result_free(res);
    return rc;
}

/* ---- tokenizer ---------------------------------------------------------------- */

static int post_json(const struct moe_client *c, const char *target, json_t *req, json_t **out,
                     struct moe_client_err *e)
{
    *out = NULL;
    char *body = req ? json_dumps(req, JSON_COMPACT) : NULL;
    json_decref(req);
    if (body == NULL)
        return err_set(e, -ENOMEM, "out of memory");
    struct moe_buf b = { 0 };
    int rc = call_(c, "POST", target, body, strlen(body), &b, e);
    free(body);
    if (rc)
        return rc;
    json_error_t je;
    *out = json_loadb(b.data, b.len, JSON_FLAGS, &je);
    moe_buf_free(&b);
    if (*out == NULL)
        return err_set(e, MOE_EFORMAT, "%s: %s: the answer is not JSON (%s)", c->path, target,
                       je.text);
    return 0;
}

int moe_client_tokenize(const struct moe_client *c, const char *text, bool add_special,
                        int32_t **ids, size_t *n, struct moe_client_err *e)
{
    struct moe_client_err tmp;
    e = e ? e : &tmp;
    err_reset(e);
    *ids = NULL;
    *n = 0;
    json_t *content = text ? json_string(text) : NULL;
    if (content == NULL)
        return err_set(e, -EINVAL, "the text to tokenize is missing or not valid UTF-8");
    json_t *j, *req = json_pack("{s:o, s:b}", "content", content, "add_special", add_special);
    int rc = post_json(c, "/tokenize", req, &j, e);
    if (rc)
        return rc;
    json_t *a = json_object_get(j, "tokens");
    const size_t cnt = json_array_size(a);
    int32_t *v = malloc((cnt ? cnt : 1) * sizeof(*v));
    if (!json_is_array(a))
        rc = err_set(e, MOE_EFORMAT, "%s: /tokenize: no \"tokens\" array", c->path);
    else if (v == NULL)
        rc = err_set(e, -ENOMEM, "out of memory");
    for (size_t i = 0; rc == 0 && i < cnt; i++) {
        json_t *t = json_array_get(a, i);
        if (!json_is_integer(t) || json_integer_value(t) < 0 || json_integer_value(t) > INT32_MAX)
            rc = err_set(e, MOE_EFORMAT, "%s: /tokenize: tokens[%zu] is not a token id",
                         c->path, i);
        else
            v[i] = (int32_t)json_integer_value(t);
    }
    json_decref(j);
    if (rc) {
        free(v);
        return rc;
    }
    *ids = v;
    *n = cnt;
    return 0;
}

int moe_client_detokenize(const struct moe_client *c, const int32_t *ids, size_t n, char **text,
                          struct moe_client_err *e)
{
    struct moe_client_err tmp;
    e = e ? e : &tmp;
    err_reset(e);
    *text = NULL;
    json_t *a = json_array();
    for (size_t i = 0; a && i < n; i++)
        if (json_array_append_new(a, json_integer(ids[i])) != 0) {
            json_decref(a);
            a = NULL;
        }
    if (a == NULL)
        return err_set(e, -ENOMEM, "out of memory");
    json_t *j;
    int rc = post_json(c, "/detokenize", json_pack("{s:o}", "tokens", a), &j, e);
    if (rc)
        return rc;
    json_t *s = json_object_get(j, "content");
    if (!json_is_string(s))
        rc = err_set(e, MOE_EFORMAT, "%s: /detokenize: no \"content\" string", c->path);
    else if ((*text = strdup(json_string_value(s))) == NULL)
        rc = err_set(e, -ENOMEM, "out of memory");
    json_decref(j);
    return rc;
}
