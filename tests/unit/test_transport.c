/* The daemon's transport (daemon/server.c) with a fake handler table
 * instead of moed's API: the real server on a real Unix socket, HTTP over
 * a plain client socket. Keep-alive, pipelining (answers in order, bytes
 * waiting behind an answer in progress), a streamed answer completed from
 * another thread's wake-up, a disconnect that abandons the answer, output
 * back-pressure (pause, then resume), the connection cap, the transport's
 * own refusals (408, 413, 431, 400), and a shutdown whose grace period
 * ends the answers still open. */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "daemon/server.h"
#include "tests/harness.h"

/* ---- the fake API ----------------------------------------------------- */

struct fake {
    struct moed_server *srv;
    atomic_int dispatched, abandoned, paused, resumed, grace, stopped;
    atomic_int to_send;                 /* chunks the next wake-up writes */
    struct moed_conn *stream;           /* loop thread: the /stream answer in progress */
    struct moed_conn *hanging;          /* loop thread: the /hang answer in progress */
    struct moed_conn *flood;            /* loop thread: the /flood answer in progress */
};

static int marker;   /* the data fake answers keep on their connection */

static void fake_dispatch(void *ud, struct moed_conn *c, const struct moed_http_request *rq)
{
    struct fake *f = ud;
    const int n = atomic_fetch_add(&f->dispatched, 1) + 1;
    char body[256];
    if (strcmp(rq->path, "/hello") == 0) {
        int len = snprintf(body, sizeof(body), "hello %d", n);
        moed_conn_send(c, 200, "text/plain", body, (size_t)len, NULL);
    } else if (strcmp(rq->path, "/echo") == 0) {
        moed_conn_send(c, 200, "text/plain", rq->body, rq->body_len, NULL);
    } else if (strcmp(rq->path, "/stream") == 0) {
        moed_conn_set_data(c, &marker);
        moed_conn_start_stream(c);
        f->stream = c;
        return;   /* the rest comes from fake_wake */
    } else if (strcmp(rq->path, "/hang") == 0) {
        moed_conn_set_data(c, &marker);
        f->hanging = c;
        return;   /* never answered: the client leaves, or the grace period ends it */
    } else if (strcmp(rq->path, "/flood") == 0) {
        /* more than the client reads: until the transport says pause */
        moed_conn_set_data(c, &marker);
        moed_conn_start_stream(c);
        f->flood = c;
        static char chunk[16384];
        memset(chunk, 'x', sizeof(chunk));
        for (int i = 0; i < 64 && atomic_load(&f->paused) == 0; i++)
            moed_conn_chunk(c, chunk, sizeof(chunk));
        return;   /* ended when it resumes */
    } else if (strcmp(rq->path, "/quit") == 0) {
        moed_server_shutdown(f->srv, "test quit", 0);
        moed_conn_send(c, 200, "text/plain", "bye", 3, NULL);
    } else if (strcmp(rq->path, "/fail") == 0) {
        moed_server_shutdown(f->srv, "injected failure", -EIO);
        moed_conn_send(c, 200, "text/plain", "bye", 3, NULL);
    } else {
        moed_conn_send_error(c, 404, "invalid_request_error", NULL, "no %s", rq->path);
    }
    moed_conn_done(c);
}

static void fake_wake(void *ud)
{
    struct fake *f = ud;
    struct moed_conn *c = f->stream;
    if (c == NULL)
        return;
    for (int n = atomic_exchange(&f->to_send, 0), k = 0; k < n; k++) {
        char ev[64];
        int len = snprintf(ev, sizeof(ev), "data: %d\n\n", k);
        moed_conn_chunk(c, ev, (size_t)len);
    }
    f->stream = NULL;
    moed_conn_end_stream(c);
    moed_conn_set_data(c, NULL);
    moed_conn_done(c);
}

static void fake_abandon(void *ud, struct moed_conn *c)
{
    struct fake *f = ud;
    if (moed_conn_data(c) == &marker)
        atomic_fetch_add(&f->abandoned, 1);
    if (c == f->hanging)
        f->hanging = NULL;
    if (c == f->stream)
        f->stream = NULL;
    if (c == f->flood)
        f->flood = NULL;
    moed_conn_set_data(c, NULL);
}

static void fake_backpressure(void *ud, struct moed_conn *c, bool paused)
{
    struct fake *f = ud;
    atomic_fetch_add(paused ? &f->paused : &f->resumed, 1);
    if (!paused && c == f->flood) {
        f->flood = NULL;
        moed_conn_chunk(c, "end", 3);
        moed_conn_end_stream(c);
        moed_conn_set_data(c, NULL);
        moed_conn_done(c);
    }
}

static void fake_grace_over(void *ud)
{
    struct fake *f = ud;
    atomic_fetch_add(&f->grace, 1);
    if (f->hanging) {
        struct moed_conn *c = f->hanging;
        f->hanging = NULL;
        moed_conn_send_error(c, 503, "server_error", NULL, "shutting down");
        moed_conn_set_data(c, NULL);
        moed_conn_done(c);
    }
}

static void fake_stopped(void *ud)
{
    struct fake *f = ud;
    atomic_fetch_add(&f->stopped, 1);
}

static const struct moed_handlers fake_handlers = {
    .dispatch = fake_dispatch,
    .on_wake = fake_wake,
    .abandon = fake_abandon,
    .backpressure = fake_backpressure,
    .grace_over = fake_grace_over,
    .stopped = fake_stopped,
};

/* ---- the server in a thread --------------------------------------------- */

static struct fake fk;
static struct moed_config cfg;
static char sock_path[256];
static pthread_t loop_thread;
static int run_rc;
static struct moe_diag run_diag;

static void *loop_main(void *arg)
{
    (void)arg;
    run_rc = moed_server_run(fk.srv, "fake", &fake_handlers, &fk, &run_diag);
    return NULL;
}

static int connect_sock(void)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    snprintf(a.sun_path, sizeof(a.sun_path), "%s", sock_path);
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        close(fd);
        return -1;
    }
    struct timeval tv = { .tv_sec = 10 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    return fd;
}

/* Starts the server with cfg (as set by the case) on a fresh socket. */
static bool up(const char *name)
{
    snprintf(sock_path, sizeof(sock_path), "%s/%s.sock", moe_test_tmpdir(), name);
    snprintf(cfg.socket, sizeof(cfg.socket), "%s", sock_path);
    memset(&fk, 0, sizeof(fk));
    memset(&run_diag, 0, sizeof(run_diag));
    run_rc = 0;
    fk.srv = moed_server_new(&cfg, 0, NULL);
    if (fk.srv == NULL || pthread_create(&loop_thread, NULL, loop_main, NULL) != 0)
        return false;
    for (int i = 0; i < 200; i++) {
        int fd = connect_sock();
        if (fd >= 0) {
            close(fd);
            return true;
        }
        usleep(10000);
    }
    return false;
}

static void defaults(void)
{
    moed_config_defaults(&cfg);
    cfg.shutdown_grace_s = 0;
}

/* A client connection with what it has read but not yet consumed. */
struct client {
    int fd;
    char buf[1 << 20];
    size_t len;
};

static bool fill(struct client *cl)
{
    if (cl->len + 1 >= sizeof(cl->buf))
        return false;
    ssize_t r = recv(cl->fd, cl->buf + cl->len, sizeof(cl->buf) - 1 - cl->len, 0);
    if (r <= 0)
        return false;
    cl->len += (size_t)r;
    cl->buf[cl->len] = '\0';
    return true;
}

/* Reads one response: status, headers and body (chunked bodies decoded).
 * Returns the status, 0 when the connection closed first. */
static int read_response(struct client *cl, char *head, size_t head_cap, char *body, size_t body_cap)
{
    char *e;
    while ((e = strstr(cl->buf, "\r\n\r\n")) == NULL)
        if (!fill(cl))
            return 0;
    const size_t hl = (size_t)(e - cl->buf) + 4;
    snprintf(head, head_cap, "%.*s", (int)hl, cl->buf);
    size_t bl = 0;
    const char *cle = strstr(head, "Content-Length: ");
    size_t used = hl;
    if (cle) {
        const size_t n = strtoul(cle + 16, NULL, 10);
        while (cl->len < hl + n)
            if (!fill(cl))
                return 0;
        bl = n < body_cap - 1 ? n : body_cap - 1;
        memcpy(body, cl->buf + hl, bl);
        used = hl + n;
    } else if (strstr(head, "Transfer-Encoding: chunked")) {
        for (;;) {
            char *end;
            while (strstr(cl->buf + used, "\r\n") == NULL)
                if (!fill(cl))
                    return 0;
            const size_t n = strtoul(cl->buf + used, &end, 16);
            const size_t data = (size_t)(strstr(end, "\r\n") - cl->buf) + 2;
            while (cl->len < data + n + 2)
                if (!fill(cl))
                    return 0;
            if (bl + n < body_cap) {
                memcpy(body + bl, cl->buf + data, n);
                bl += n;
            }
            used = data + n + 2;
            if (n == 0)
                break;
        }
    }
    body[bl] = '\0';
    memmove(cl->buf, cl->buf + used, cl->len - used + 1);
    cl->len -= used;
    int status = 0;
    sscanf(head, "HTTP/1.1 %d", &status);
    return status;
}

static void send_str(struct client *cl, const char *s)
{
    size_t n = strlen(s);
    while (n > 0) {
        ssize_t w = send(cl->fd, s, n, MSG_NOSIGNAL);
        if (w <= 0)
            return;
        s += w;
        n -= (size_t)w;
    }
}

static struct client *client_open(void)
{
    struct client *cl = calloc(1, sizeof(*cl));
    cl->fd = connect_sock();
    return cl;
}

static void client_close(struct client *cl)
{
    if (cl) {
        close(cl->fd);
        free(cl);
    }
}

/* True when the peer closed (EOF within a second). */
static bool peer_closed(struct client *cl)
{
    struct pollfd p = { .fd = cl->fd, .events = POLLIN };
    for (int i = 0; i < 100; i++) {
        if (poll(&p, 1, 10) == 1) {
            char b[256];
            ssize_t r = recv(cl->fd, b, sizeof(b), 0);
            if (r == 0)
                return true;
            if (r < 0)
                return errno == ECONNRESET;
        }
    }
    return false;
}

static bool wait_for(atomic_int *v, int want)
{
    for (int i = 0; i < 500 && atomic_load(v) < want; i++)
        usleep(10000);
    return atomic_load(v) >= want;
}

/* Stops the server through the fake's /quit and checks how run ended. */
static bool down(void)
{
    int st = 0;
    for (int i = 0; i < 100 && st != 200; i++) {   /* a 503 while a closed client still counts */
        if (i)
            usleep(20000);
        struct client *cl = client_open();
        send_str(cl, "POST /quit HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        char head[1024], body[64];
        st = read_response(cl, head, sizeof(head), body, sizeof(body));
        client_close(cl);
    }
    if (st != 200)
        return false;
    pthread_join(loop_thread, NULL);
    moed_server_free(fk.srv);
    fk.srv = NULL;
    return st == 200 && run_rc == 0 && atomic_load(&fk.stopped) == 1 &&
           access(sock_path, F_OK) != 0;   /* the socket is gone */
}

#define UP(name) CHECK_MSG(up(name), "the server did not start")
#define DOWN() CHECK_MSG(down(), "the server did not stop cleanly: %d %s", run_rc, run_diag.msg)

/* ---- cases --------------------------------------------------------------- */

static void test_keepalive_and_pipelining(void)
{
    defaults();
    UP("keepalive");
    struct client *cl = client_open();
    char head[1024], body[4096];
    send_str(cl, "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n");
    CHECK_INT(read_response(cl, head, sizeof(head), body, sizeof(body)), ==, 200);
    CHECK_STR(body, "hello 1");
    CHECK(strstr(head, "Connection: keep-alive") != NULL);
    /* the same connection again, then three requests in one write: answered
     * in order, the later ones waiting behind the first */
    send_str(cl, "GET /hello HTTP/1.1\r\n\r\n");
    CHECK_INT(read_response(cl, head, sizeof(head), body, sizeof(body)), ==, 200);
    CHECK_STR(body, "hello 2");
    send_str(cl, "GET /hello HTTP/1.1\r\n\r\nPOST /echo HTTP/1.1\r\nContent-Length: 5\r\n\r\n"
                 "abcdeGET /hello?q=1 HTTP/1.1\r\nConnection: close\r\n\r\n");
    CHECK_INT(read_response(cl, head, sizeof(head), body, sizeof(body)), ==, 200);
    CHECK_STR(body, "hello 3");
    CHECK_INT(read_response(cl, head, sizeof(head), body, sizeof(body)), ==, 200);
    CHECK_STR(body, "abcde");
    CHECK_INT(read_response(cl, head, sizeof(head), body, sizeof(body)), ==, 200);
    CHECK_STR(body, "hello 5");   /* the query string is not part of the path */
    CHECK(strstr(head, "Connection: close") != NULL);
    CHECK(peer_closed(cl));
    client_close(cl);
    CHECK_INT(atomic_load(&fk.abandoned), ==, 0);
    DOWN();
}

static void test_stream_from_wake(void)
{
    defaults();
    UP("stream");
    struct client *cl = client_open();
    send_str(cl, "GET /stream HTTP/1.1\r\n\r\nGET /hello HTTP/1.1\r\n\r\n");
    /* the head goes out at once; the events when another thread wakes the loop */
    while (strstr(cl->buf, "\r\n\r\n") == NULL)
        CHECK(fill(cl));
    CHECK(strstr(cl->buf, "Content-Type: text/event-stream") != NULL);
    usleep(50000);
    CHECK_INT(atomic_load(&fk.dispatched), ==, 1);   /* the pipelined request waits */
    atomic_store(&fk.to_send, 3);
    moed_server_wake(fk.srv);
    char head[1024], body[4096];
    CHECK_INT(read_response(cl, head, sizeof(head), body, sizeof(body)), ==, 200);
    CHECK(strstr(head, "Transfer-Encoding: chunked") != NULL);
    CHECK_STR(body, "data: 0\n\ndata: 1\n\ndata: 2\n\n");
    CHECK_INT(read_response(cl, head, sizeof(head), body, sizeof(body)), ==, 200);
    CHECK_STR(body, "hello 2");
    client_close(cl);
    DOWN();
}

static void test_disconnect_abandons(void)
{
    defaults();
    UP("abandon");
    struct client *cl = client_open();
    send_str(cl, "GET /hang HTTP/1.1\r\n\r\n");
    CHECK(wait_for(&fk.dispatched, 1));
    client_close(cl);
    CHECK(wait_for(&fk.abandoned, 1));
    /* a mid-stream disconnect too */
    cl = client_open();
    send_str(cl, "GET /stream HTTP/1.1\r\n\r\n");
    CHECK(wait_for(&fk.dispatched, 2));
    client_close(cl);
    CHECK(wait_for(&fk.abandoned, 2));
    /* an answered connection going away abandons nothing */
    cl = client_open();
    char head[1024], body[64];
    send_str(cl, "GET /hello HTTP/1.1\r\n\r\n");
    CHECK_INT(read_response(cl, head, sizeof(head), body, sizeof(body)), ==, 200);
    client_close(cl);
    usleep(50000);
    CHECK_INT(atomic_load(&fk.abandoned), ==, 2);
    DOWN();
}

static void test_backpressure(void)
{
    defaults();
    cfg.max_output_bytes = 65536;
    UP("backpressure");
    struct client *cl = client_open();
    int rcvbuf = 4096;
    setsockopt(cl->fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
    send_str(cl, "GET /flood HTTP/1.1\r\n\r\n");
    /* the client reads nothing: the answer is paused, not dropped */
    CHECK(wait_for(&fk.paused, 1));
    CHECK_INT(atomic_load(&fk.resumed), ==, 0);
    char head[1024];
    static char body[1 << 20];
    CHECK_INT(read_response(cl, head, sizeof(head), body, sizeof(body)), ==, 200);
    CHECK_INT(atomic_load(&fk.resumed), ==, 1);
    const size_t n = strlen(body);
    CHECK(n > 65536 && n % 16384 == 3 && strcmp(body + n - 3, "end") == 0);
    client_close(cl);
    DOWN();
}

static void test_connection_cap(void)
{
    defaults();
    cfg.max_connections = 2;
    UP("cap");
    usleep(100000);   /* up()'s probe connection is closed and freed */
    struct client *a = client_open(), *b = client_open();
    char head[1024], body[1024];
    send_str(a, "GET /hello HTTP/1.1\r\n\r\n");
    CHECK_INT(read_response(a, head, sizeof(head), body, sizeof(body)), ==, 200);
    send_str(b, "GET /hello HTTP/1.1\r\n\r\n");
    CHECK_INT(read_response(b, head, sizeof(head), body, sizeof(body)), ==, 200);
    struct client *c = client_open();
    CHECK_INT(read_response(c, head, sizeof(head), body, sizeof(body)), ==, 503);
    CHECK(strstr(head, "Retry-After: 1") != NULL);
    CHECK(strstr(body, "max_connections 2") != NULL);
    CHECK(peer_closed(c));
    client_close(c);
    /* a slot frees when a client leaves */
    client_close(a);
    int st = 0;
    for (int i = 0; i < 50 && st != 200; i++) {
        usleep(20000);
        c = client_open();
        send_str(c, "GET /hello HTTP/1.1\r\n\r\n");
        st = read_response(c, head, sizeof(head), body, sizeof(body));
        client_close(c);
    }
    CHECK_INT(st, ==, 200);
    client_close(b);
    DOWN();
}

static void test_transport_refusals(void)
{
    defaults();
    cfg.read_timeout_ms = 200;
    cfg.max_body_bytes = 1024;
    cfg.max_header_bytes = 1024;
    UP("refusals");
    char head[1024], body[2048];
    struct client *cl = client_open();
    send_str(cl, "POST /echo HTTP/1.1\r\nContent-Length: 2000\r\n\r\n");
    CHECK_INT(read_response(cl, head, sizeof(head), body, sizeof(body)), ==, 413);
    CHECK(strstr(body, "max_body_bytes") != NULL);
    client_close(cl);
    cl = client_open();
    char big[1500];
    memset(big, 'a', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    send_str(cl, "GET /hello HTTP/1.1\r\nX-Big: ");
    send_str(cl, big);
    send_str(cl, "\r\n\r\n");
    CHECK_INT(read_response(cl, head, sizeof(head), body, sizeof(body)), ==, 431);
    client_close(cl);
    cl = client_open();
    send_str(cl, "GET /hello HTTP/1.1\r\nHost");   /* and nothing more */
    CHECK_INT(read_response(cl, head, sizeof(head), body, sizeof(body)), ==, 408);
    CHECK(strstr(body, "read_timeout_ms") != NULL);
    client_close(cl);
    cl = client_open();
    send_str(cl, "NOT HTTP AT ALL\r\n\r\n");
    CHECK_INT(read_response(cl, head, sizeof(head), body, sizeof(body)), ==, 400);
    CHECK(strstr(body, "malformed HTTP") != NULL);
    client_close(cl);
    CHECK_INT(atomic_load(&fk.dispatched), ==, 0);   /* none of them reached the handler */
    DOWN();
}

static void test_shutdown_grace(void)
{
    defaults();
    UP("grace");
    struct client *h = client_open();
    send_str(h, "GET /hang HTTP/1.1\r\n\r\n");
    CHECK(wait_for(&fk.dispatched, 1));
    /* the shutdown waits for the open answer until the grace period ends it */
    struct client *q = client_open();
    char head[1024], body[1024];
    send_str(q, "POST /quit HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    CHECK_INT(read_response(q, head, sizeof(head), body, sizeof(body)), ==, 200);
    CHECK(strstr(head, "Connection: close") != NULL);
    CHECK_INT(read_response(h, head, sizeof(head), body, sizeof(body)), ==, 503);
    CHECK(strstr(body, "shutting down") != NULL);
    pthread_join(loop_thread, NULL);
    CHECK_INT(run_rc, ==, 0);
    CHECK_INT(atomic_load(&fk.grace), ==, 1);
    CHECK_INT(atomic_load(&fk.stopped), ==, 1);
    CHECK_INT(atomic_load(&fk.abandoned), ==, 0);
    client_close(h);
    client_close(q);
    moed_server_free(fk.srv);
    /* a shutdown with a status makes run fail with it */
    defaults();
    UP("grace2");
    q = client_open();
    send_str(q, "POST /fail HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    CHECK_INT(read_response(q, head, sizeof(head), body, sizeof(body)), ==, 200);
    client_close(q);
    pthread_join(loop_thread, NULL);
    CHECK_INT(run_rc, ==, -EIO);
    CHECK_STR(run_diag.msg, "stopped after a injected failure");
    moed_server_free(fk.srv);
}

int main(void)
{
    MOE_TEST_RUN(test_keepalive_and_pipelining);
    MOE_TEST_RUN(test_stream_from_wake);
    MOE_TEST_RUN(test_disconnect_abandons);
    MOE_TEST_RUN(test_backpressure);
    MOE_TEST_RUN(test_connection_cap);
    MOE_TEST_RUN(test_transport_refusals);
    MOE_TEST_RUN(test_shutdown_grace);
    return moe_test_exit_code();
}
