/* client/moe_client.c against a fake server that sends canned bytes:
 * Content-Length, chunked and read-to-close bodies, server-sent events split
 * at every possible chunk boundary, error objects, Retry-After, and malformed
 * or oversized responses (each a clear error, never an over-read), and a
 * missing socket. */
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "client/moe_client.h"
#include "tests/harness.h"

static char sock_path[256];

/* Serves one connection: reads the request head, sends resp (len bytes) in
 * pieces of `piece` bytes, then closes. Returns the child's pid. */
static pid_t serve_once(const char *resp, size_t len, size_t piece)
{
    snprintf(sock_path, sizeof(sock_path), "%s/fake.sock", moe_test_tmpdir());
    unlink(sock_path);
    int ls = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    snprintf(a.sun_path, sizeof(a.sun_path), "%s", sock_path);
    if (bind(ls, (struct sockaddr *)&a, sizeof(a)) != 0 || listen(ls, 1) != 0)
        return -1;
    pid_t pid = fork();
    if (pid == 0) {
        int fd = accept(ls, NULL, NULL);
        char buf[4096];
        size_t got = 0;
        while (got < sizeof(buf) - 1) {   /* the head, and a small body */
            ssize_t r = recv(fd, buf + got, sizeof(buf) - 1 - got, 0);
            if (r <= 0)
                break;
            got += (size_t)r;
            buf[got] = '\0';
            char *e = strstr(buf, "\r\n\r\n");
            if (e) {
                const char *cl = strstr(buf, "Content-Length: ");
                size_t want = cl ? (size_t)atol(cl + 16) : 0;
                if (got - (size_t)(e + 4 - buf) >= want)
                    break;
            }
        }
        for (size_t o = 0; o < len; o += piece) {
            size_t n = len - o < piece ? len - o : piece;
            if (send(fd, resp + o, n, MSG_NOSIGNAL) < 0)
                break;
            usleep(200);
        }
        close(fd);
        _exit(0);
    }
    close(ls);
    return pid;
}

static int request(const char *resp, size_t piece, struct moe_client_resp *out, struct moe_diag *d)
{
    pid_t pid = serve_once(resp, strlen(resp), piece);
    struct moe_client c;
    moe_client_init(&c, sock_path, NULL);
    c.timeout_ms = 5000;
    int rc = moe_client_request(&c, "POST", "/v1/completions", "{}", 2, out, d);
    waitpid(pid, NULL, 0);
    return rc;
}

static void test_bodies(void)
{
    struct moe_client_resp r;
    struct moe_diag d = { 0 };
    CHECK(request("HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"a\": true}", 1000, &r, &d) == 0);
    CHECK_INT(r.status, ==, 200);
    CHECK_STR(r.body, "{\"a\": true}");
    moe_client_resp_free(&r);
    /* chunked, delivered one byte at a time */
    CHECK(request("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n3;ext=1\r\nefg\r\n"
                  "0\r\nX-Trailer: 1\r\n\r\n", 1, &r, &d) == 0);
    CHECK_STR(r.body, "abcdefg");
    moe_client_resp_free(&r);
    /* read to close */
    CHECK(request("HTTP/1.0 200 OK\r\n\r\nuntil the end", 3, &r, &d) == 0);
    CHECK_STR(r.body, "until the end");
    moe_client_resp_free(&r);
    /* an error object and Retry-After */
    CHECK(request("HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\nContent-Length: 64\r\n\r\n"
                  "{\"error\":{\"message\":\"queue full\",\"type\":\"x\",\"param\":null,\"c\":1}}", 1000, &r,
                  &d) == 0);
    CHECK_INT(r.status, ==, 503);
    CHECK_INT(r.retry_after, ==, 7);
    char buf[128];
    CHECK_STR(moe_client_error_message(r.body, buf, sizeof(buf)), "queue full");
    moe_client_resp_free(&r);
}

static void expect_error(const char *resp, int code, const char *needle)
{
    struct moe_client_resp r;
    struct moe_diag d = { 0 };
    int rc = request(resp, 7, &r, &d);
    CHECK_MSG(rc == code, "'%.40s...': rc %d (%s), expected %d", resp, rc, d.msg, code);
    CHECK_MSG(strstr(d.msg, needle) != NULL, "message '%s' lacks '%s'", d.msg, needle);
}

static void test_malformed(void)
{
    expect_error("HTTP/2 200 OK\r\n\r\n", MOE_EFORMAT, "not an HTTP/1.x status line");
    expect_error("garbage\r\n\r\n", MOE_EFORMAT, "not an HTTP/1.x status line");
    expect_error("HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\nshort", MOE_EFORMAT,
                 "bytes before the end of the body");
    expect_error("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", MOE_EFORMAT, "bad Content-Length");
    expect_error("HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n", MOE_ELIMIT, "over");
    expect_error("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
                 MOE_EFORMAT, "bad chunk size");
    expect_error("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n123456789\r\n", MOE_EFORMAT,
                 "bad chunk size");
    expect_error("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd\r\n0\r\n\r\n",
                 MOE_EFORMAT, "chunk longer than its size");
    expect_error("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", MOE_EFORMAT,
                 "connection closed");
    expect_error("HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n", MOE_EFORMAT, "malformed header");
    expect_error("HTTP/1.1 200 OK\r\nContent-Le", MOE_EFORMAT, "connection closed in the response"
                 " headers");
    /* headers over 64 KiB */
    size_t n = 70000;
    char *big = malloc(n + 64);
    int o = sprintf(big, "HTTP/1.1 200 OK\r\n");
    for (int i = 0; o < (int)n - 40; i++)
        o += sprintf(big + o, "X-H%d: %s\r\n", i, "vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv");
    strcpy(big + o, "\r\n");
    expect_error(big, MOE_ELIMIT, "exceed");
    free(big);
}

struct events {
    char all[4096];
    int n;
};

static int on_ev(void *ud, const char *data, size_t len)
{
    struct events *e = ud;
    strncat(e->all, data, len);
    strcat(e->all, "|");
    e->n++;
    return 0;
}

static void test_sse_every_split(void)
{
    /* the same event stream, its chunks delivered in pieces of 1..40 bytes */
    /* events split across chunks at awkward places */
    static const char *payloads[] = { "data: {\"a\":1}\n", "\ndata: {\"b\":2}\n", "\n", "data:[DON",
                                      "E]\n", "\n" };
    char stream[1024];
    int o = sprintf(stream, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    "Transfer-Encoding: chunked\r\n\r\n");
    for (size_t i = 0; i < sizeof(payloads) / sizeof(payloads[0]); i++)
        o += sprintf(stream + o, "%zx\r\n%s\r\n", strlen(payloads[i]), payloads[i]);
    sprintf(stream + o, "0\r\n\r\n");
    for (size_t piece = 1; piece <= 40; piece++) {
        pid_t pid = serve_once(stream, strlen(stream), piece);
        struct moe_client c;
        moe_client_init(&c, sock_path, NULL);
        c.timeout_ms = 5000;
        struct events e = { .n = 0 };
        struct moe_client_resp r;
        struct moe_diag d = { 0 };
        int rc = moe_client_stream(&c, "/v1/completions", "{}", 2, on_ev, &e, &r, &d);
        waitpid(pid, NULL, 0);
        CHECK_MSG(rc == 0, "piece %zu: %s", piece, d.msg);
        CHECK_INT(r.status, ==, 200);
        CHECK_MSG(strcmp(e.all, "{\"a\":1}|{\"b\":2}|[DONE]|") == 0, "piece %zu: events '%s'", piece,
                  e.all);
    }
    /* an error status instead of a stream: the body is kept */
    const char *err = "HTTP/1.1 400 Bad Request\r\nContent-Length: 14\r\n\r\n{\"error\":\"x\"}\n";
    pid_t pid = serve_once(err, strlen(err), 5);
    struct moe_client c;
    moe_client_init(&c, sock_path, NULL);
    struct events e = { .n = 0 };
    struct moe_client_resp r;
    struct moe_diag d = { 0 };
    CHECK(moe_client_stream(&c, "/v1/completions", "{}", 2, on_ev, &e, &r, &d) == 0);
    waitpid(pid, NULL, 0);
    CHECK_INT(r.status, ==, 400);
    CHECK(e.n == 0 && r.body && strstr(r.body, "error"));
    moe_client_resp_free(&r);
}

static void test_connect_failure(void)
{
    struct moe_client c;
    struct moe_diag d = { 0 };
    char path[300];
    snprintf(path, sizeof(path), "%s/nobody-here.sock", moe_test_tmpdir());
    CHECK(moe_client_init(&c, path, &d) == 0);
    struct moe_client_resp r;
    CHECK_INT(moe_client_request(&c, "GET", "/health", NULL, 0, &r, &d), ==, -ENOENT);
    CHECK(strstr(d.msg, path) != NULL && strstr(d.msg, "is moed running?") != NULL);
    char longp[200];
    memset(longp, 'a', sizeof(longp) - 1);
    longp[sizeof(longp) - 1] = '\0';
    CHECK_INT(moe_client_init(&c, longp, &d), ==, -ENAMETOOLONG);
    setenv("MOED_SOCKET", "/x/y.sock", 1);
    char buf[256];
    CHECK_STR(moe_client_default_socket(buf, sizeof(buf)), "/x/y.sock");
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    moe_test_run("bodies", test_bodies);
    moe_test_run("malformed responses", test_malformed);
    moe_test_run("SSE at every split", test_sse_every_split);
    moe_test_run("connect failure", test_connect_failure);
    return moe_test_exit_code();
}
