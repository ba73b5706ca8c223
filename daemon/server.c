/* The transport (server.h): connections, HTTP/1.1, the listening sockets,
 * deadlines, back-pressure, signals and shutdown. What a request means is
 * the handlers' business; this file only calls them through the table. */
#include "daemon/server.h"

#include <errno.h>
#include <fcntl.h>
#include <http_parser.h>
#include <jansson.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "common/alloc.h"
#include "common/buf.h"
#include "daemon/log.h"
#include "daemon/notify.h"

struct moed_conn {
    union {
        uv_handle_t h;
        uv_stream_t s;
        uv_pipe_t pipe;
        uv_tcp_t tcp;
    } io;
    uv_timer_t timer;             /* one deadline at a time: idle, read or stalled */
    int open_handles;
    struct moed_server *srv;
    struct moed_conn *prev, *next;
    uint64_t id;

    http_parser parser;
    /* the request being read */
    bool in_message;
    char url[2048];
    size_t url_len;
    size_t header_bytes;
    char hname[64];
    size_t hname_len;
    bool hname_done;
    bool expect_continue;
    bool too_large_headers, too_large_body;
    bool is_tcp;                  /* accepted on the TCP listener: api_key applies */
    char auth[264];               /* the client's key (Authorization: Bearer, x-api-key) */
    size_t auth_len;
    bool auth_overlong;
    bool oom;                     /* an allocation for the request failed */
    struct moe_buf body;          /* limit: max_body_bytes */
    /* bytes that arrived while a response was in progress (pipelining) */
    struct moe_buf pending;       /* limit: one maximal request */

    bool busy;                    /* a request is being answered */
    bool answering;               /* dispatched, moed_conn_done not yet called */
    bool out_paused;              /* the backpressure handler was told to pause */
    bool keep_alive;
    bool closing;
    bool streaming;               /* chunked SSE response under way */
    void *data;                   /* the handler's, for the current answer */
};

struct moed_server {
    uv_loop_t *loop;
    struct moed_config cfg;
    int argc;
    char **argv;
    const struct moed_handlers *h;
    void *ud;
    uv_pipe_t pipe;
    uv_tcp_t tcp;
    bool pipe_open, tcp_open;
    uv_async_t async;
    uv_signal_t sig_term, sig_int, sig_hup;
    uv_timer_t grace;
    int lock_fd;
    char lock_path[PATH_MAX + 8];
    bool socket_bound;
    bool shutting_down;
    int exit_status;              /* moed_server_shutdown's status */
    char exit_why[64];
    struct moed_conn *conns;
    int n_conns;
    uint64_t next_conn_id;
    uint64_t t_start;             /* uv_hrtime() at moed_server_new */
    /* counters (loop thread) */
    uint64_t http_by_class[6];    /* 1xx..5xx */
    uint64_t http_requests;
    uint64_t answering;           /* connections with an answer in progress */
    /* One connection object kept in reserve: when allocating one fails, the
     * pending connection is still accepted (into this) and closed, since
     * libuv stops accepting until the callback accepts. */
    struct moed_conn *spare;
};


static const char *status_text(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 413: return "Payload Too Large";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
    default: return "Status";
    }
}

/* ---- connection lifetime --------------------------------------------- */

static void conn_free(struct moed_conn *c)
{
    struct moed_server *s = c->srv;
    if (c->prev)
        c->prev->next = c->next;
    else
        s->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    s->n_conns--;
    moe_buf_free(&c->body);
    moe_buf_free(&c->pending);
    if (s->spare == NULL && !s->shutting_down) {
        s->spare = c;   /* the reserve was used: this one takes its place */
        return;
    }
    moe_free(c);
}

static void server_maybe_exit(struct moed_server *s);

static void on_handle_closed(uv_handle_t *h)
{
    struct moed_conn *c = h->data;
    if (--c->open_handles == 0) {
        struct moed_server *s = c->srv;
        conn_free(c);
        server_maybe_exit(s);
    }
}

static void conn_close(struct moed_conn *c)
{
    if (c->closing)
        return;
    c->closing = true;
    if (c->answering) {
        struct moed_server *s = c->srv;
        c->answering = false;
        s->answering--;
        if (s->h->abandon)
            s->h->abandon(s->ud, c);
    }
    uv_timer_stop(&c->timer);
    uv_close((uv_handle_t *)&c->timer, on_handle_closed);
    uv_close(&c->io.h, on_handle_closed);
    server_maybe_exit(c->srv);
}

struct wreq {
    uv_write_t w;
    struct moed_conn *c;
    bool close_after;
    char data[];
};

static void on_written(uv_write_t *w, int status)
{
    struct wreq *wr = (struct wreq *)w;
    struct moed_conn *c = wr->c;
    if ((status < 0 || wr->close_after) && !c->closing)
        conn_close(c);
    moe_free(wr);
    /* a paused answer resumes once the client has read half the backlog */
    if (!c->closing && c->answering && c->out_paused &&
        uv_stream_get_write_queue_size(&c->io.s) <= (size_t)c->srv->cfg.max_output_bytes / 2) {
        c->out_paused = false;
        uv_timer_stop(&c->timer);
        if (c->srv->h->backpressure)
            c->srv->h->backpressure(c->srv->ud, c, false);
    }
}

static void on_stalled(uv_timer_t *t)
{
    struct moed_conn *c = t->data;
    LOG_I("conn %llu: client read nothing of %zu queued bytes for %d ms; dropping it",
          (unsigned long long)c->id, uv_stream_get_write_queue_size(&c->io.s),
          c->srv->cfg.read_timeout_ms);
    conn_close(c);
}

/* Queues the parts as one write (one allocation: the request and a copy of
 * the bytes, freed when written). */
static void conn_writev(struct moed_conn *c, const uv_buf_t *parts, int n, bool close_after)
{
    if (c->closing)
        return;
    size_t total = 0;
    for (int i = 0; i < n; i++)
        total += parts[i].len;
    struct wreq *wr = moe_malloc(sizeof(*wr) + total);
    if (wr == NULL) {
        conn_close(c);
        return;
    }
    wr->c = c;
    wr->close_after = close_after;
    size_t o = 0;
    for (int i = 0; i < n; i++) {
        if (parts[i].len)
            memcpy(wr->data + o, parts[i].base, parts[i].len);
        o += parts[i].len;
    }
    uv_buf_t buf = uv_buf_init(wr->data, (unsigned)total);
    if (uv_write(&wr->w, &c->io.s, &buf, 1, on_written) != 0) {
        moe_free(wr);
        conn_close(c);
        return;
    }
    const size_t queued = uv_stream_get_write_queue_size(&c->io.s);
    const size_t cap = (size_t)c->srv->cfg.max_output_bytes;
    if (queued > 4 * cap) {
        LOG_W("conn %llu: client is not reading (%zu bytes queued); closing",
              (unsigned long long)c->id, queued);
        conn_close(c);
    } else if (queued > cap && c->answering && c->streaming && !c->out_paused) {
        /* stop producing for it; drop it if it stays stuck */
        c->out_paused = true;
        if (c->srv->h->backpressure)
            c->srv->h->backpressure(c->srv->ud, c, true);
        LOG_D("conn %llu: %zu bytes queued (max_output_bytes %zu): generation paused",
              (unsigned long long)c->id, queued, cap);
        uv_timer_start(&c->timer, on_stalled, (uint64_t)c->srv->cfg.read_timeout_ms, 0);
    }
}

static void conn_write_ex(struct moed_conn *c, const char *a, size_t al, const char *b, size_t bl,
                          bool close_after)
{
    const uv_buf_t parts[2] = { uv_buf_init((char *)a, (unsigned)al),
                                uv_buf_init((char *)b, (unsigned)bl) };
    conn_writev(c, parts, 2, close_after);
}

/* ---- responses ------------------------------------------------------- */

static void count_status(struct moed_server *s, int status)
{
    if (status >= 100 && status < 600)
        s->http_by_class[status / 100]++;
}

void moed_conn_send(struct moed_conn *c, int status, const char *ctype, const char *body,
                    size_t len, const char *extra_headers)
{
    char head[1024];
    const bool close_after = !c->keep_alive || c->srv->shutting_down;
    if (close_after)
        c->keep_alive = false;
    int n = snprintf(head, sizeof(head),
                     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                     "Connection: %s\r\n%s\r\n",
                     status, status_text(status), ctype, len, close_after ? "close" : "keep-alive",
                     extra_headers ? extra_headers : "");
    count_status(c->srv, status);
    conn_write_ex(c, head, (size_t)n, body, len, close_after);
}

/* json_dump_callback's sink: appends to a moe_buf. */
static int buf_sink(const char *p, size_t n, void *ud)
{
    return moe_buf_append(ud, p, n) == 0 ? 0 : -1;
}

void moed_conn_send_error(struct moed_conn *c, int status, const char *type, const char *param,
                          const char *fmt, ...)
{
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    json_t *jm = json_string(msg);
    if (jm == NULL) {
        /* the message quotes client bytes that are not UTF-8 */
        for (char *p = msg; *p; p++)
            if ((unsigned char)*p >= 0x80)
                *p = '?';
        jm = json_string(msg);
    }
    json_t *j = json_pack("{s:{s:o, s:s, s:s?, s:n}}", "error", "message", jm, "type", type,
                          "param", param, "code");
    struct moe_buf b;
    moe_buf_init(&b, 0);
    const char *extra = status == 503   ? "Retry-After: 1\r\n"
                        : status == 401 ? "WWW-Authenticate: Bearer\r\n"
                                        : NULL;
    if (j && json_dump_callback(j, buf_sink, &b, JSON_COMPACT) == 0 && b.data)
        moed_conn_send(c, status, "application/json", b.data, b.len, extra);
    else
        moed_conn_send(c, 500, "text/plain", "out of memory\n", 14, NULL);
    moe_buf_free(&b);
    json_decref(j);
    LOG_D("conn %llu: %d %s", (unsigned long long)c->id, status, msg);
}

void moed_conn_start_stream(struct moed_conn *c)
{
    static const char head[] = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                               "Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n";
    char buf[256];
    if (c->srv->shutting_down)
        c->keep_alive = false;
    int n = snprintf(buf, sizeof(buf), "%sConnection: %s\r\n\r\n", head,
                     c->keep_alive ? "keep-alive" : "close");
    count_status(c->srv, 200);
    c->streaming = true;
    conn_write_ex(c, buf, (size_t)n, NULL, 0, false);
}

void moed_conn_chunk(struct moed_conn *c, const char *data, size_t len)
{
    if (len == 0)
        return;
    char head[32];
    int n = snprintf(head, sizeof(head), "%zx\r\n", len);
    /* size line, data, CRLF in one write */
    const uv_buf_t parts[3] = { uv_buf_init(head, (unsigned)n), uv_buf_init((char *)data, (unsigned)len),
                                uv_buf_init((char *)"\r\n", 2) };
    conn_writev(c, parts, 3, false);
}

void moed_conn_end_stream(struct moed_conn *c)
{
    c->streaming = false;
    conn_write_ex(c, "0\r\n\r\n", 5, NULL, 0, !c->keep_alive);
}

static void conn_feed(struct moed_conn *c, const char *data, size_t len);
static void arm_idle(struct moed_conn *c);

void moed_conn_done(struct moed_conn *c)
{
    struct moed_server *s = c->srv;
    c->busy = false;
    c->out_paused = false;
    if (c->answering) {
        c->answering = false;
        s->answering--;
    }
    if (c->closing || !c->keep_alive) {
        server_maybe_exit(s);
        return;
    }
    arm_idle(c);
    if (c->pending.len > 0) {
        /* feeding may stash again: into a fresh buffer */
        struct moe_buf p = c->pending;
        moe_buf_init(&c->pending, 0);
        conn_feed(c, p.data, p.len);
        moe_buf_free(&p);
    }
    server_maybe_exit(s);
}

void *moed_conn_data(const struct moed_conn *c) { return c->data; }
void moed_conn_set_data(struct moed_conn *c, void *data) { c->data = data; }
uint64_t moed_conn_id(const struct moed_conn *c) { return c->id; }

/* ---- deadlines ------------------------------------------------------- */

static void on_idle_timeout(uv_timer_t *t)
{
    struct moed_conn *c = t->data;
    LOG_D("conn %llu: idle for %d ms; closing", (unsigned long long)c->id, c->srv->cfg.idle_timeout_ms);
    conn_close(c);
}

static void on_read_timeout(uv_timer_t *t)
{
    struct moed_conn *c = t->data;
    LOG_I("conn %llu: request not received within %d ms; 408", (unsigned long long)c->id,
          c->srv->cfg.read_timeout_ms);
    c->keep_alive = false;
    c->busy = true;
    moed_conn_send_error(c, 408, "invalid_request_error", NULL,
                    "request not received within %d ms (read_timeout_ms)", c->srv->cfg.read_timeout_ms);
}

static void arm_idle(struct moed_conn *c)
{
    uv_timer_start(&c->timer, on_idle_timeout, (uint64_t)c->srv->cfg.idle_timeout_ms, 0);
}

static void arm_read(struct moed_conn *c)
{
    uv_timer_start(&c->timer, on_read_timeout, (uint64_t)c->srv->cfg.read_timeout_ms, 0);
}

/* ---- HTTP parsing ---------------------------------------------------- */

static int on_message_begin(http_parser *p)
{
    struct moed_conn *c = p->data;
    c->in_message = true;
    c->url_len = 0;
    c->url[0] = '\0';
    c->header_bytes = 0;
    c->hname_len = 0;
    c->hname_done = false;
    c->expect_continue = false;
    c->too_large_headers = c->too_large_body = c->oom = false;
    c->auth_len = 0;
    c->auth_overlong = false;
    moe_buf_clear(&c->body);   /* keeps its memory for the next request */
    c->body.limit = (size_t)c->srv->cfg.max_body_bytes;
    arm_read(c);
    return 0;
}

static int count_header(struct moed_conn *c, size_t n)
{
    c->header_bytes += n;
    if (c->header_bytes > (size_t)c->srv->cfg.max_header_bytes) {
        c->too_large_headers = true;
        return 1;
    }
    return 0;
}

static int on_url(http_parser *p, const char *at, size_t n)
{
    struct moed_conn *c = p->data;
    if (count_header(c, n))
        return 1;
    if (c->url_len + n >= sizeof(c->url)) {
        c->too_large_headers = true;
        return 1;
    }
    memcpy(c->url + c->url_len, at, n);
    c->url_len += n;
    c->url[c->url_len] = '\0';
    return 0;
}

static int on_header_field(http_parser *p, const char *at, size_t n)
{
    struct moed_conn *c = p->data;
    if (count_header(c, n))
        return 1;
    if (c->hname_done) {
        c->hname_len = 0;
        c->hname_done = false;
    }
    size_t room = sizeof(c->hname) - 1 - c->hname_len;
    size_t k = n < room ? n : room;
    memcpy(c->hname + c->hname_len, at, k);
    c->hname_len += k;
    c->hname[c->hname_len] = '\0';
    return 0;
}

/* Collects an auth header's value (http-parser may split it); the last such
 * header of the request wins. */
static void keep_auth(struct moed_conn *c, const char *at, size_t n, bool first)
{
    if (first) {
        c->auth_len = 0;
        c->auth_overlong = false;
    }
    if (c->auth_len + n >= sizeof(c->auth)) {
        c->auth_overlong = true;
        return;
    }
    memcpy(c->auth + c->auth_len, at, n);
    c->auth_len += n;
    c->auth[c->auth_len] = '\0';
}

/* api_key: TCP clients must present it, except for /health (load balancers'
 * checks). "Authorization: Bearer KEY" or "x-api-key: KEY". */
static bool authorized(const struct moed_conn *c, const char *path)
{
    const char *key = c->srv->cfg.auth_key;
    if (!c->is_tcp || key[0] == '\0' || strcmp(path, "/health") == 0)
        return true;
    if (c->auth_overlong)
        return false;
    const char *v = c->auth;
    size_t n = c->auth_len;
    if (n > 7 && strncasecmp(v, "Bearer ", 7) == 0) {
        v += 7;
        n -= 7;
    }
    while (n > 0 && (*v == ' ' || *v == '\t')) {
        v++;
        n--;
    }
    while (n > 0 && (v[n - 1] == ' ' || v[n - 1] == '\t'))
        n--;
    return moed_key_equal(key, v, n);
}

static int on_header_value(http_parser *p, const char *at, size_t n)
{
    struct moed_conn *c = p->data;
    if (count_header(c, n))
        return 1;
    const bool first = !c->hname_done;
    c->hname_done = true;
    if (strcasecmp(c->hname, "expect") == 0 && n >= 12 && strncasecmp(at, "100-continue", 12) == 0)
        c->expect_continue = true;
    if (strcasecmp(c->hname, "authorization") == 0 || strcasecmp(c->hname, "x-api-key") == 0)
        keep_auth(c, at, n, first);
    return 0;
}

static int on_headers_complete(http_parser *p)
{
    struct moed_conn *c = p->data;
    if ((p->flags & F_CONTENTLENGTH) && p->content_length > (uint64_t)c->srv->cfg.max_body_bytes) {
        c->too_large_body = true;
        return -1;
    }
    if (c->expect_continue)
        conn_write_ex(c, "HTTP/1.1 100 Continue\r\n\r\n", 25, NULL, 0, false);
    return 0;
}

static int on_body(http_parser *p, const char *at, size_t n)
{
    struct moed_conn *c = p->data;
    int rc = moe_buf_append(&c->body, at, n);   /* limit: max_body_bytes */
    if (rc == MOE_ELIMIT)
        c->too_large_body = true;
    else if (rc != 0)
        c->oom = true;
    return rc != 0;
}

static int on_message_complete(http_parser *p)
{
    struct moed_conn *c = p->data;
    struct moed_server *s = c->srv;
    c->in_message = false;
    uv_timer_stop(&c->timer);
    c->keep_alive = http_should_keep_alive(p) != 0;
    c->busy = true;
    s->http_requests++;
    /* stop here: bytes after this message wait until the response is done */
    http_parser_pause(p, 1);
    char path[sizeof(c->url)];
    memcpy(path, c->url, c->url_len + 1);
    char *q = strchr(path, '?');
    if (q)
        *q = '\0';
    if (s->shutting_down) {
        c->keep_alive = false;
        moed_conn_send_error(c, 503, "server_error", NULL, "moed is shutting down");
        moed_conn_done(c);
        return 0;
    }
    if (!authorized(c, path)) {
        LOG_W("conn %llu: %s %s: 401 (%s)", (unsigned long long)c->id,
              http_method_str((enum http_method)p->method), path,
              c->auth_len ? "wrong api key" : "no api key");
        moed_conn_send_error(c, 401, "authentication_error", NULL, "%s: this daemon requires an API"
                             " key on TCP (Authorization: Bearer KEY or x-api-key: KEY)",
                             c->auth_len ? "invalid API key" : "missing API key");
        moed_conn_done(c);
        return 0;
    }
    const struct moed_http_request rq = {
        .method = http_method_str((enum http_method)p->method), .path = path,
        .body = c->body.data ? c->body.data : "", .body_len = c->body.len,
    };
    c->answering = true;
    s->answering++;
    s->h->dispatch(s->ud, c, &rq);
    return 0;
}

static const http_parser_settings settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

static void stash(struct moed_conn *c, const char *data, size_t len)
{
    /* at most one maximal request waits */
    c->pending.limit = (size_t)c->srv->cfg.max_body_bytes + (size_t)c->srv->cfg.max_header_bytes;
    int rc = moe_buf_append(&c->pending, data, len);
    if (rc == MOE_ELIMIT)
        LOG_I("conn %llu: %zu bytes pipelined behind a request; closing", (unsigned long long)c->id,
              c->pending.len + len);
    if (rc)
        conn_close(c);
}

static void conn_feed(struct moed_conn *c, const char *data, size_t len)
{
    while (len > 0 && !c->closing) {
        if (c->busy) {
            stash(c, data, len);
            return;
        }
        http_parser_pause(&c->parser, 0);
        size_t used = http_parser_execute(&c->parser, &settings, data, len);
        enum http_errno err = HTTP_PARSER_ERRNO(&c->parser);
        if (err == HPE_PAUSED) {
            data += used;
            len -= used;
            continue;   /* the next loop iteration stashes what is left */
        }
        if (err != HPE_OK) {
            uv_timer_stop(&c->timer);
            c->keep_alive = false;
            c->busy = true;
            if (c->too_large_headers)
                moed_conn_send_error(c, 431, "invalid_request_error", NULL,
                                "request line and headers exceed %d bytes (max_header_bytes)",
                                c->srv->cfg.max_header_bytes);
            else if (c->oom)
                moed_conn_send_error(c, 500, "server_error", NULL, "out of memory reading the request");
            else if (c->too_large_body)
                moed_conn_send_error(c, 413, "invalid_request_error", NULL,
                                "request body exceeds %lld bytes (max_body_bytes)",
                                (long long)c->srv->cfg.max_body_bytes);
            else
                moed_conn_send_error(c, 400, "invalid_request_error", NULL, "malformed HTTP: %s",
                                http_errno_description(err));
            return;
        }
        if (used < len) {
            /* an upgrade request; we do not speak anything else */
            c->keep_alive = false;
            c->busy = true;
            moed_conn_send_error(c, 400, "invalid_request_error", NULL, "protocol upgrade not supported");
            return;
        }
        return;
    }
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)h;
    (void)suggested;
    static char slab[65536];   /* the loop is single-threaded: one read at a time */
    *buf = uv_buf_init(slab, sizeof(slab));
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    struct moed_conn *c = st->data;
    if (nread < 0) {
        if (c->answering)
            LOG_I("conn %llu: client went away before its answer was complete",
                  (unsigned long long)c->id);
        conn_close(c);
        return;
    }
    if (nread == 0 || c->closing)
        return;
    if (!c->busy && !c->in_message)
        arm_read(c);
    conn_feed(c, buf->base, (size_t)nread);
}

static void on_connection(uv_stream_t *server, int status)
{
    struct moed_server *s = server->data;
    if (status < 0) {
        LOG_W("accept: %s", uv_strerror(status));
        return;
    }
    struct moed_conn *c = moe_calloc(1, sizeof(*c));
    const bool reserve = c == NULL;
    if (reserve) {
        /* out of memory: accept into the reserve and close at once, or
         * libuv would accept nothing more */
        c = s->spare;
        s->spare = NULL;
        if (c == NULL) {
            LOG_E("accept: out of memory, and the reserve connection is in use");
            return;
        }
        memset(c, 0, sizeof(*c));
    }
    c->srv = s;
    c->id = ++s->next_conn_id;
    int rc = server == (uv_stream_t *)&s->pipe ? uv_pipe_init(s->loop, &c->io.pipe, 0)
                                                : uv_tcp_init(s->loop, &c->io.tcp);
    if (rc) {
        if (reserve)
            s->spare = c;
        else
            moe_free(c);
        return;
    }
    c->io.h.data = c;
    uv_timer_init(s->loop, &c->timer);
    c->timer.data = c;
    c->open_handles = 2;
    c->next = s->conns;
    if (s->conns)
        s->conns->prev = c;
    s->conns = c;
    s->n_conns++;
    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;
    c->keep_alive = true;
    c->is_tcp = server == (uv_stream_t *)&s->tcp;
    if (uv_accept(server, &c->io.s) != 0 || s->shutting_down) {
        conn_close(c);
        return;
    }
    if (reserve) {
        LOG_W("conn %llu: out of memory for the connection; closing it", (unsigned long long)c->id);
        conn_close(c);
        return;
    }
    if (s->n_conns > s->cfg.max_connections) {
        LOG_W("conn %llu: %d connections open (max_connections %d): 503", (unsigned long long)c->id,
              s->n_conns - 1, s->cfg.max_connections);
        c->keep_alive = false;
        c->busy = true;
        moed_conn_send_error(c, 503, "server_error", NULL, "too many connections (max_connections %d);"
                        " retry later", s->cfg.max_connections);
        return;
    }
    arm_idle(c);
    uv_read_start(&c->io.s, on_alloc, on_read);
}

/* ---- wake-ups from other threads -------------------------------------- */

static void on_async(uv_async_t *a)
{
    struct moed_server *s = a->data;
    if (s->h && s->h->on_wake)
        s->h->on_wake(s->ud);
    server_maybe_exit(s);
}

/* ---- socket ---------------------------------------------------------- */

static void unlink_socket(struct moed_server *s)
{
    if (s->socket_bound) {
        struct stat st;
        if (lstat(s->cfg.socket, &st) == 0 && S_ISSOCK(st.st_mode))
            unlink(s->cfg.socket);
        s->socket_bound = false;
    }
    if (s->lock_fd >= 0) {
        unlink(s->lock_path);
        close(s->lock_fd);
        s->lock_fd = -1;
    }
}

/* tcp_host:tcp_port (validated: an IP literal; beyond loopback only with an
 * api_key). */
static int open_tcp(struct moed_server *s, struct moe_diag *d)
{
    struct sockaddr_storage addr;
    const char *host = s->cfg.tcp_host;
    int rc = uv_ip4_addr(host, s->cfg.tcp_port, (struct sockaddr_in *)&addr);
    if (rc)
        rc = uv_ip6_addr(host, s->cfg.tcp_port, (struct sockaddr_in6 *)&addr);
    if (rc)
        return moe_diag_set(d, rc, "tcp_host: '%s' is not an IP address", host);
    uv_tcp_init(s->loop, &s->tcp);
    s->tcp.data = s;
    s->tcp_open = true;
    rc = uv_tcp_bind(&s->tcp, (const struct sockaddr *)&addr, 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&s->tcp, 128, on_connection);
    if (rc)
        return moe_diag_set(d, rc, "tcp_port: cannot listen on %s%s%s:%d: %s",
                            strchr(host, ':') ? "[" : "", host, strchr(host, ':') ? "]" : "",
                            s->cfg.tcp_port, uv_strerror(rc));
    if (!moed_host_is_loopback(host))
        LOG_I("tcp_host %s is beyond loopback: clients must send the api_key", host);
    return 0;
}

int moed_server_lock(struct moed_server *s, struct moe_diag *d)
{
    if (s->lock_fd >= 0)
        return 0;
    const char *path = s->cfg.socket;
    snprintf(s->lock_path, sizeof(s->lock_path), "%s.lock", path);
    s->lock_fd = open(s->lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (s->lock_fd < 0)
        return moe_diag_set(d, -errno, "socket: cannot open lock %s: %s", s->lock_path, strerror(errno));
    if (flock(s->lock_fd, LOCK_EX | LOCK_NB) != 0) {
        int e = errno;
        close(s->lock_fd);
        s->lock_fd = -1;
        if (e == EWOULDBLOCK)
            return moe_diag_set(d, -EADDRINUSE, "socket: another moed is serving on %s (it holds"
                                " %s)", path, s->lock_path);
        return moe_diag_set(d, -e, "socket: cannot lock %s: %s", s->lock_path, strerror(e));
    }
    struct stat st;
    if (lstat(path, &st) == 0 && !S_ISSOCK(st.st_mode)) {
        close(s->lock_fd);
        s->lock_fd = -1;
        unlink(s->lock_path);
        return moe_diag_set(d, -EEXIST, "socket: %s exists and is not a socket; not removing"
                            " it", path);
    }
    return 0;
}

/* Takes the lock (unless moed_server_lock did), removes a stale socket,
 * binds with the configured mode from the start (umask), and listens. */
static int open_socket(struct moed_server *s, struct moe_diag *d)
{
    const char *path = s->cfg.socket;
    int rc = moed_server_lock(s, d);
    if (rc)
        return rc;
    struct stat st;
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            close(s->lock_fd);
            s->lock_fd = -1;
            unlink(s->lock_path);
            return moe_diag_set(d, -EEXIST, "socket: %s exists and is not a socket; not removing"
                                " it", path);
        }
        LOG_I("removing stale socket %s (no daemon holds its lock)", path);
        unlink(path);
    }
    rc = uv_pipe_init(s->loop, &s->pipe, 0);
    if (rc)
        return moe_diag_set(d, rc, "socket: %s", uv_strerror(rc));
    s->pipe.data = s;
    s->pipe_open = true;
    mode_t old = umask(0777 & ~s->cfg.socket_mode);
    rc = uv_pipe_bind(&s->pipe, path);
    umask(old);
    if (rc)
        return moe_diag_set(d, rc, "socket: cannot bind %s: %s", path, uv_strerror(rc));
    s->socket_bound = true;
    if (chmod(path, s->cfg.socket_mode) != 0)
        return moe_diag_set(d, -errno, "socket: chmod %s: %s", path, strerror(errno));
    rc = uv_listen((uv_stream_t *)&s->pipe, 128, on_connection);
    if (rc)
        return moe_diag_set(d, rc, "socket: cannot listen on %s: %s", path, uv_strerror(rc));
    return s->cfg.tcp_port > 0 ? open_tcp(s, d) : 0;
}

/* ---- signals and shutdown -------------------------------------------- */

static void close_listeners(struct moed_server *s)
{
    if (s->pipe_open) {
        uv_close((uv_handle_t *)&s->pipe, NULL);
        s->pipe_open = false;
    }
    if (s->tcp_open) {
        uv_close((uv_handle_t *)&s->tcp, NULL);
        s->tcp_open = false;
    }
    unlink_socket(s);
}

static void close_all(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

/* During shutdown: once no request is in flight, close the idle
 * connections and stop the loop. */
static void server_maybe_exit(struct moed_server *s)
{
    if (!s->shutting_down || s->answering > 0)
        return;
    for (struct moed_conn *c = s->conns, *n; c; c = n) {
        n = c->next;
        if (!c->busy && !c->closing)
            conn_close(c);
    }
    if (s->n_conns == 0)
        uv_stop(s->loop);
}

static void on_grace(uv_timer_t *t)
{
    struct moed_server *s = t->data;
    if (s->answering > 0)
        LOG_W("shutdown: grace period over; cancelling %llu request(s)",
              (unsigned long long)s->answering);
    /* the handlers end what is in progress; the answers (for moed's API a
     * final error event on streams) still go out */
    if (s->h->grace_over)
        s->h->grace_over(s->ud);
}

static void begin_shutdown(struct moed_server *s, const char *why)
{
    LOG_I("%s: no new connections; %llu request(s) in flight get %d s", why,
          (unsigned long long)s->answering, s->cfg.shutdown_grace_s);
    s->shutting_down = true;
    moed_notify_stopping();
    close_listeners(s);
    uv_timer_start(&s->grace, on_grace, (uint64_t)s->cfg.shutdown_grace_s * 1000, 0);
}

bool moed_server_shutdown(struct moed_server *s, const char *why, int status)
{
    if (s->shutting_down)
        return false;
    s->exit_status = status < 0 ? status : 0;
    snprintf(s->exit_why, sizeof(s->exit_why), "%s", why);
    begin_shutdown(s, why);
    server_maybe_exit(s);
    return true;
}

static void on_stop_signal(uv_signal_t *h, int signum)
{
    struct moed_server *s = h->data;
    if (s->shutting_down) {
        LOG_W("second %s: exiting now", signum == SIGINT ? "SIGINT" : "SIGTERM");
        unlink_socket(s);
        _exit(1);
    }
    begin_shutdown(s, signum == SIGINT ? "SIGINT" : "SIGTERM");
    server_maybe_exit(s);
}

static void log_restart_key(void *ud, const char *key)
{
    (void)ud;
    LOG_W("reload: '%s' changed, but it takes effect only after a restart; keeping the old value",
          key);
}

static void on_hup(uv_signal_t *h, int signum)
{
    (void)signum;
    struct moed_server *s = h->data;
    struct moed_config next;
    struct moed_args a;
    struct moe_diag d = { 0 };
    moed_notify_reloading();
    moed_config_defaults(&next);
    if (moed_config_from_args(&next, s->argc, s->argv, &a, &d) != 0 ||
        moed_config_validate(&next, &d) != 0) {
        LOG_E("reload: %s; keeping the running configuration", d.msg);
        moed_notify_ready("serving (the last reload failed: see the log)");
        return;
    }
    moed_config_apply_reload(&s->cfg, &next, log_restart_key, NULL);
    if (s->h->reloaded)
        s->h->reloaded(s->ud, &s->cfg);
    moed_log_set_level(s->cfg.log_level);
    LOG_I("reload: configuration%s%s applied", a.config_path ? " from " : "",
          a.config_path ? a.config_path : "");
    moed_notify_ready("serving");
}

/* ---- entry ----------------------------------------------------------- */

struct moed_server *moed_server_new(const struct moed_config *cfg, int argc, char **argv)
{
    struct moed_server *s = moe_calloc(1, sizeof(*s));
    if (s == NULL)
        return NULL;
    s->loop = uv_default_loop();
    s->cfg = *cfg;
    s->argc = argc;
    s->argv = argv;
    s->lock_fd = -1;
    s->t_start = uv_hrtime();
    s->spare = moe_calloc(1, sizeof(*s->spare));
    if (s->spare == NULL) {
        moe_free(s);
        return NULL;
    }
    uv_async_init(s->loop, &s->async, on_async);
    s->async.data = s;
    return s;
}

void moed_server_wake(void *server)
{
    struct moed_server *s = server;
    uv_async_send(&s->async);
}

const struct moed_config *moed_server_config(const struct moed_server *s)
{
    return &s->cfg;
}

void moed_server_stats(const struct moed_server *s, struct moed_server_stats *out)
{
    out->http_requests = s->http_requests;
    memcpy(out->http_by_class, s->http_by_class, sizeof(out->http_by_class));
    out->uptime_s = (double)(uv_hrtime() - s->t_start) * 1e-9;
}

int moed_server_run(struct moed_server *s, const char *name, const struct moed_handlers *h,
                    void *ud, struct moe_diag *d)
{
    MOE_ASSERT(h != NULL && h->dispatch != NULL);
    s->h = h;
    s->ud = ud;
    int rc = open_socket(s, d);
    if (rc) {
        close_listeners(s);
        /* the loop's own handles too (moed counts its fds at exit), once
         * nothing can wake it any more */
        if (h->stopped)
            h->stopped(ud);
        uv_walk(s->loop, close_all, NULL);
        uv_run(s->loop, UV_RUN_DEFAULT);
        uv_loop_close(s->loop);
        return rc;
    }
    uv_signal_init(s->loop, &s->sig_term);
    uv_signal_init(s->loop, &s->sig_int);
    uv_signal_init(s->loop, &s->sig_hup);
    s->sig_term.data = s->sig_int.data = s->sig_hup.data = s;
    uv_signal_start(&s->sig_term, on_stop_signal, SIGTERM);
    uv_signal_start(&s->sig_int, on_stop_signal, SIGINT);
    uv_signal_start(&s->sig_hup, on_hup, SIGHUP);
    uv_timer_init(s->loop, &s->grace);
    s->grace.data = s;
    LOG_I("serving %s on %s (mode 0%03o)%s", name, s->cfg.socket, s->cfg.socket_mode,
          s->cfg.tcp_port ? " and TCP" : "");
    if (s->cfg.tcp_port) {
        const bool v6 = strchr(s->cfg.tcp_host, ':') != NULL;
        LOG_I("also on http://%s%s%s:%d%s", v6 ? "[" : "", s->cfg.tcp_host, v6 ? "]" : "",
              s->cfg.tcp_port, s->cfg.auth_key[0] ? " (api key required)" : "");
    }
    char status[256];
    snprintf(status, sizeof(status), "serving %.64s on %.160s", name, s->cfg.socket);
    moed_notify_ready(status);
    uv_run(s->loop, UV_RUN_DEFAULT);
    /* stopped: the producers first (they may still wake us), then every handle */
    if (h->stopped)
        h->stopped(ud);
    close_listeners(s);
    uv_walk(s->loop, close_all, NULL);
    uv_run(s->loop, UV_RUN_DEFAULT);
    int lc = uv_loop_close(s->loop);
    if (lc != 0) {
        LOG_E("shutdown: the event loop still has open handles (%s)", uv_strerror(lc));
        return moe_diag_set(d, MOE_ELIMIT, "shutdown: event loop handles left open");
    }
    LOG_I("stopped");
    if (s->exit_status)
        return moe_diag_set(d, s->exit_status, "stopped after a %s", s->exit_why);
    return 0;
}

void moed_server_free(struct moed_server *s)
{
    if (s == NULL)
        return;
    unlink_socket(s);
    moe_free(s->spare);
    moe_free(s);
}
