/* client/moe_client.c against a fake moed: a forked child listening on a
 * temporary Unix socket that reads one request, records it, and answers
 * canned bytes in pieces of a chosen size. Covered: Content-Length, chunked
 * and read-to-close bodies, interim 1xx answers, server-sent events split at
 * every chunk and read boundary (completions and chat deltas), OpenAI error
 * objects (400, 503 with Retry-After, an error event inside a stream),
 * malformed and oversized answers (each a clear error naming what was
 * wrong), the convenience calls and the JSON they send, and failures to
 * connect (a missing socket, a file that is not one, a full backlog) or to
 * get an answer in time. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <jansson.h>

#include "client/moe_client.h"
#include "tests/harness.h"

static char sock_path[256];
static char req_path[256];

static int listen_at(const char *path, int backlog)
{
    unlink(path);
    int ls = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    snprintf(a.sun_path, sizeof(a.sun_path), "%s", path);
    if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof(a)) != 0 || listen(ls, backlog) != 0) {
        if (ls >= 0)
            close(ls);
        return -1;
    }
    return ls;
}

/* Serves one connection: reads the request (head and Content-Length body)
 * into req_path, sends resp (len bytes) in pieces of `piece` bytes, closes.
 * Returns the child's pid, or -1. */
static pid_t serve_once(const char *resp, size_t len, size_t piece)
{
    snprintf(sock_path, sizeof(sock_path), "%s/fake.sock", moe_test_tmpdir());
    snprintf(req_path, sizeof(req_path), "%s/request.txt", moe_test_tmpdir());
    unlink(req_path);
    int ls = listen_at(sock_path, 1);
    if (ls < 0)
        return -1;
    pid_t pid = fork();
    if (pid == 0) {
        int fd = accept(ls, NULL, NULL);
        static char buf[1 << 16];
        size_t got = 0;
        while (got < sizeof(buf) - 1) {
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
        FILE *f = fopen(req_path, "w");
        if (f) {
            fwrite(buf, 1, got, f);
            fclose(f);
        }
        for (size_t o = 0; o < len; o += piece) {
            size_t n = len - o < piece ? len - o : piece;
            if (send(fd, resp + o, n, MSG_NOSIGNAL) < 0)
                break;
            usleep(100);
        }
        close(fd);
        _exit(0);
    }
    close(ls);
    return pid;
}

static void client(struct moe_client *c)
{
    moe_client_init(c, sock_path, NULL);
    c->timeout_ms = 5000;
}

/* The body of the last request the fake server read (malloc), or NULL. */
static char *last_request_body(void)
{
    size_t n;
    char *r = moe_test_read_file(req_path, &n);
    if (r == NULL)
        return NULL;
    char *b = realloc(r, n + 1);
    if (b == NULL) {
        free(r);
        return NULL;
    }
    b[n] = '\0';
    char *e = strstr(b, "\r\n\r\n");
    if (e == NULL) {
        free(b);
        return NULL;
    }
    memmove(b, e + 4, strlen(e + 4) + 1);
    return b;
}

static int request(const char *resp, size_t piece, struct moe_client_resp *out, struct moe_diag *d)
{
    pid_t pid = serve_once(resp, strlen(resp), piece);
    if (pid < 0)
        return -9999;
    struct moe_client c;
    client(&c);
    int rc = moe_client_request(&c, "POST", "/v1/completions", "{}", 2, out, d);
    waitpid(pid, NULL, 0);
    return rc;
}

/* Text of a chunked body whose chunks are parts[0..n). */
static size_t chunked(const char *const *parts, size_t n, char *out, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++)
        o += (size_t)snprintf(out + o, cap - o, "%zx\r\n%s\r\n", strlen(parts[i]), parts[i]);
    o += (size_t)snprintf(out + o, cap - o, "0\r\n\r\n");
    return o;
}

/* An answer with a correct Content-Length (a static buffer, one at a time). */
static const char *answer(const char *status_and_headers, const char *body)
{
    static char buf[8192];
    snprintf(buf, sizeof(buf), "HTTP/1.1 %s\r\nContent-Length: %zu\r\n\r\n%s", status_and_headers,
             strlen(body), body);
    return buf;
}

static void test_bodies(void)
{
    struct moe_client_resp r;
    struct moe_diag d = { 0 };
    CHECK(request("HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Type: application/json\r\n\r\n"
                  "{\"a\": true}", 1000, &r, &d) == 0);
    CHECK_INT(r.status, ==, 200);
    CHECK_INT(r.len, ==, 11);
    CHECK_STR(r.body, "{\"a\": true}");
    CHECK_STR(r.content_type, "application/json");
    moe_client_resp_free(&r);
    /* the request the client sent */
    char *req = moe_test_read_file(req_path, &(size_t){ 0 });
    CHECK(req != NULL);
    const bool ok = strncmp(req, "POST /v1/completions HTTP/1.1\r\n", 31) == 0 &&
                    strstr(req, "Content-Length: 2\r\n") && strstr(req, "Content-Type: application/json");
    free(req);
    CHECK(ok);
    /* chunked, delivered one byte at a time, with extensions and trailers */
    CHECK(request("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n03;ext=1\r\nefg\r\n"
                  "0\r\nX-Trailer: 1\r\n\r\n", 1, &r, &d) == 0);
    CHECK_STR(r.body, "abcdefg");
    moe_client_resp_free(&r);
    /* read to close, no reason phrase, bare LF line ends */
    CHECK(request("HTTP/1.0 200\nX: y\n\nuntil the end", 3, &r, &d) == 0);
    CHECK_STR(r.body, "until the end");
    moe_client_resp_free(&r);
    /* an interim 100 Continue is skipped */
    CHECK(request("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
                  5, &r, &d) == 0);
    CHECK_INT(r.status, ==, 201);
    CHECK_STR(r.body, "ok");
    moe_client_resp_free(&r);
    /* 204: no body even without a length */
    CHECK(request("HTTP/1.1 204 No Content\r\n\r\n", 100, &r, &d) == 0);
    CHECK_INT(r.status, ==, 204);
    CHECK_STR(r.body, "");
    moe_client_resp_free(&r);
    /* the low layer does not treat an error status as an error of the call */
    CHECK(request("HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\nContent-Length: 64\r\n\r\n"
                  "{\"error\":{\"message\":\"queue full\",\"type\":\"x\",\"param\":null,\"c\":1}}", 1000, &r,
                  &d) == 0);
    CHECK_INT(r.status, ==, 503);
    CHECK_INT(r.retry_after, ==, 7);
    char buf[128];
    CHECK_STR(moe_client_error_message(r.body, buf, sizeof(buf)), "queue full");
    CHECK(moe_client_error_message("{\"x\":1}", buf, sizeof(buf)) == NULL);
    CHECK(moe_client_error_message("not json", buf, sizeof(buf)) == NULL);
    moe_client_resp_free(&r);
}

static void expect_error(const char *resp, int code, const char *needle)
{
    struct moe_client_resp r;
    struct moe_diag d = { 0 };
    int rc = request(resp, 7, &r, &d);
    CHECK_MSG(rc == code, "'%.50s...': rc %d (%s), expected %d", resp, rc, d.msg, code);
    CHECK_MSG(strstr(d.msg, needle) != NULL, "message '%s' lacks '%s'", d.msg, needle);
    CHECK_MSG(strstr(d.msg, sock_path) != NULL, "message '%s' does not name the socket", d.msg);
}

static void test_malformed(void)
{
    expect_error("", MOE_EFORMAT, "closed the connection without answering");
    expect_error("HTTP/2 200 OK\r\n\r\n", MOE_EFORMAT, "not an HTTP/1.x status line");
    expect_error("garbage\r\n\r\n", MOE_EFORMAT, "not an HTTP/1.x status line");
    expect_error("HTTP/1.1 2000 OK\r\n\r\n", MOE_EFORMAT, "not an HTTP/1.x status line");
    expect_error("HTTP/1.1 20 OK\r\n\r\n", MOE_EFORMAT, "not an HTTP/1.x status line");
    expect_error("HTTP/1.1 200 OK", MOE_EFORMAT, "connection closed in the status line");
    expect_error("HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\nshort", MOE_EFORMAT,
                 "15 bytes before the end of the body");
    expect_error("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", MOE_EFORMAT, "bad Content-Length");
    expect_error("HTTP/1.1 200 OK\r\nContent-Length: 12abc\r\n\r\n", MOE_EFORMAT, "bad Content-Length");
    expect_error("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc", MOE_EFORMAT,
                 "two different Content-Length");
    expect_error("HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n", MOE_ELIMIT,
                 "is over 67108864 bytes");
    expect_error("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", MOE_EUNSUPPORTED,
                 "not supported");
    expect_error("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
                 MOE_EFORMAT, "bad chunk size");
    expect_error("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nab\r\n0\r\n\r\n",
                 MOE_EFORMAT, "bad chunk size");
    expect_error("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n123456789\r\n", MOE_EFORMAT,
                 "bad chunk size");
    expect_error("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n", MOE_EFORMAT,
                 "bad chunk size");
    expect_error("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd\r\n0\r\n\r\n",
                 MOE_EFORMAT, "chunk longer than its size");
    /* truncated chunks: in the data, in the size line, before the last chunk */
    expect_error("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", MOE_EFORMAT,
                 "3 bytes before the end of the body");
    expect_error("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5", MOE_EFORMAT,
                 "connection closed in the chunk size line");
    expect_error("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n", MOE_EFORMAT,
                 "connection closed in the chunk size line");
    expect_error("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n", MOE_EFORMAT,
                 "connection closed in the trailers");
    expect_error("HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n", MOE_EFORMAT, "malformed header");
    expect_error("HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", MOE_EFORMAT, "malformed header");
    expect_error("HTTP/1.1 200 OK\r\nA: b\r\n  folded\r\n\r\n", MOE_EFORMAT, "folded header");
    expect_error("HTTP/1.1 200 OK\r\nContent-Le", MOE_EFORMAT,
                 "connection closed in the response headers");
    expect_error("HTTP/1.1 101 Switching Protocols\r\n\r\n", MOE_EUNSUPPORTED, "interim answer 101");
    /* headers over 64 KiB in total, and one line over 8 KiB */
    size_t n = 70000;
    char *big = malloc(n + 64);
    int o = sprintf(big, "HTTP/1.1 200 OK\r\n");
    for (int i = 0; o < (int)n - 60; i++)
        o += sprintf(big + o, "X-H%d: %s\r\n", i, "vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv");
    strcpy(big + o, "\r\n");
    expect_error(big, MOE_ELIMIT, "the response headers exceed 65536 bytes");
    o = sprintf(big, "HTTP/1.1 200 OK\r\nX: ");
    memset(big + o, 'v', 9000);
    strcpy(big + o + 9000, "\r\n\r\n");
    expect_error(big, MOE_ELIMIT, "longer than 8191 bytes");
    free(big);
}

struct events {
    char all[4096];
    int n;
    int stop_at;           /* return 5 at this event (1-based), 0: never */
};

static int on_ev(void *ud, const char *data, size_t len)
{
    struct events *e = ud;
    if (strlen(data) != len)   /* NUL-terminated, no NUL inside */
        return -1;
    strncat(e->all, data, len);
    strcat(e->all, "|");
    e->n++;
    return e->n == e->stop_at ? 5 : 0;
}

static int stream_events(const char *resp, size_t piece, struct events *e, struct moe_client_resp *r,
                         struct moe_diag *d)
{
    pid_t pid = serve_once(resp, strlen(resp), piece);
    struct moe_client c;
    client(&c);
    int rc = moe_client_stream(&c, "/v1/completions", "{}", 2, on_ev, e, r, d);
    waitpid(pid, NULL, 0);
    return rc;
}

static const char sse_head[] = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                               "Transfer-Encoding: chunked\r\n\r\n";

static void test_sse_every_split(void)
{
    /* events split across chunks at awkward places, delivered in reads of
     * 1..40 bytes: every boundary falls everywhere */
    static const char *parts[] = { "data: {\"a\":1}\n", "\ndata: {\"b\":2}\n", "\n", "data:[DON",
                                   "E]\n", "\n" };
    char stream[1024];
    size_t o = (size_t)sprintf(stream, "%s", sse_head);
    chunked(parts, sizeof(parts) / sizeof(parts[0]), stream + o, sizeof(stream) - o);
    for (size_t piece = 1; piece <= 40; piece++) {
        struct events e = { .n = 0 };
        struct moe_client_resp r;
        struct moe_diag d = { 0 };
        int rc = stream_events(stream, piece, &e, &r, &d);
        CHECK_MSG(rc == 0, "piece %zu: %s", piece, d.msg);
        CHECK_INT(r.status, ==, 200);
        CHECK(r.body == NULL);
        CHECK_MSG(strcmp(e.all, "{\"a\":1}|{\"b\":2}|[DONE]|") == 0, "piece %zu: events '%s'", piece,
                  e.all);
    }
}

static void test_sse_syntax(void)
{
    /* CRLF line ends, comments, other fields, data lines joined by LF, a
     * field without a colon, an event at the end without its blank line
     * (dropped, as the spec says) */
    static const char *parts[] = { ": keep-alive\r\n\r\nevent: x\r\nid: 3\r\ndata: one\r\ndata:two\r\n\r\n",
                                   "data\n\nretry: 10\ndata: {\"c\":3}\n\n", "data: unterminated\n" };
    char stream[1024];
    size_t o = (size_t)sprintf(stream, "%s", sse_head);
    chunked(parts, 3, stream + o, sizeof(stream) - o);
    struct events e = { .n = 0 };
    struct moe_client_resp r;
    struct moe_diag d = { 0 };
    CHECK_MSG(stream_events(stream, 11, &e, &r, &d) == 0, "%s", d.msg);
    CHECK_STR(e.all, "one\ntwo||{\"c\":3}|");
    /* a callback's non-zero return stops the stream and is returned */
    struct events e2 = { .stop_at = 2 };
    CHECK_INT(stream_events(stream, 11, &e2, &r, &d), ==, 5);
    CHECK_INT(e2.n, ==, 2);
    /* an error status instead of a stream: no events, the body is kept */
    const char *err = "HTTP/1.1 400 Bad Request\r\nContent-Length: 14\r\n\r\n{\"error\":\"x\"}\n";
    struct events e3 = { .n = 0 };
    CHECK(stream_events(err, 5, &e3, &r, &d) == 0);
    CHECK_INT(r.status, ==, 400);
    CHECK(e3.n == 0 && r.body && strstr(r.body, "error"));
    moe_client_resp_free(&r);
    /* 200 but JSON, not events: kept as a body */
    const char *js = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
    CHECK(stream_events(js, 5, &e3, &r, &d) == 0);
    CHECK(e3.n == 0 && r.body && strcmp(r.body, "{}") == 0);
    moe_client_resp_free(&r);
}

/* ---- the convenience calls -------------------------------------------------- */

struct deltas {
    char text[1024];
    int n;
};

static int on_delta(void *ud, const char *t, size_t len)
{
    struct deltas *x = ud;
    strncat(x->text, t, len);
    x->n++;
    return 0;
}

static void test_complete(void)
{
    const char *ans = answer("200 OK\r\nContent-Type: application/json",
        "{\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":1,\"model\":\"m\",\"choices\":"
        "[{\"index\":0,\"text\":\" there\\nwas\",\"finish_reason\":\"length\",\"logprobs\":null}],"
        "\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":3,\"total_tokens\":7}}");
    pid_t pid = serve_once(ans, strlen(ans), 50);
    struct moe_client c;
    client(&c);
    const char *stop[] = { "\n\n", "END" };
    struct moe_client_params p = { .max_tokens = 3, .has_temperature = true, .temperature = 0,
                                   .has_top_k = true, .top_k = 40, .has_seed = true,
                                   .seed = 1234567890123LL, .stop = stop, .n_stop = 2 };
    struct moe_client_result res;
    struct moe_client_err e;
    int rc = moe_client_complete(&c, "Once upon a time", &p, NULL, NULL, &res, &e);
    waitpid(pid, NULL, 0);
    CHECK_MSG(rc == 0, "%s", e.msg);
    CHECK_STR(res.text, " there\nwas");
    CHECK_INT(res.len, ==, 10);
    CHECK_STR(res.finish_reason, "length");
    CHECK_INT(res.prompt_tokens, ==, 4);
    CHECK_INT(res.completion_tokens, ==, 3);
    CHECK(res.raw && strstr(res.raw, "\"text_completion\""));
    moe_client_result_free(&res);
    /* what was sent */
    char *body = last_request_body();
    json_t *j = body ? json_loads(body, 0, NULL) : NULL;
    free(body);
    CHECK(j != NULL);
    json_t *st = json_object_get(j, "stop");
    const bool ok = strcmp(json_string_value(json_object_get(j, "prompt")), "Once upon a time") == 0 &&
                    json_integer_value(json_object_get(j, "max_tokens")) == 3 &&
                    json_real_value(json_object_get(j, "temperature")) == 0.0 &&
                    json_integer_value(json_object_get(j, "top_k")) == 40 &&
                    json_integer_value(json_object_get(j, "seed")) == 1234567890123LL &&
                    json_is_false(json_object_get(j, "stream")) && json_array_size(st) == 2 &&
                    strcmp(json_string_value(json_array_get(st, 1)), "END") == 0 &&
                    json_object_get(j, "top_p") == NULL && json_object_get(j, "logprobs") == NULL;
    json_decref(j);
    CHECK(ok);
    /* invalid UTF-8 is refused before anything is sent */
    CHECK_INT(moe_client_complete(&c, "\xff\xfe", NULL, NULL, NULL, NULL, &e), ==, -EINVAL);
    CHECK(strstr(e.msg, "UTF-8") != NULL);
}

/* A completion stream whose JSON events are cut in the middle by chunk
 * boundaries, at every read size in a list. */
static void test_complete_stream(void)
{
    static const char *parts[] = {
        "data: {\"id\":\"c\",\"object\":\"text_completion\",\"choices\":[{\"index\":0,\"text\":\"Hel",
        "lo\",\"finish_reason\":null}]}\n\ndata: {\"choices\":[{\"index\":0,\"text\":\", w\\u00f6rld\"",
        ",\"finish_reason\":null}]}\n",
        ("\ndata: {\"choices\":[{\"index\":0,\"text\":\"!\",\"finish_reason\":\"stop\"}],\"usage\":"
         "{\"prompt_tokens\":2,\"completion_tokens\":3,\"total_tokens\":5}}\n\nda"),
        "ta: [DONE]\n\n" };
    char stream[2048];
    size_t o = (size_t)sprintf(stream, "%s", sse_head);
    chunked(parts, sizeof(parts) / sizeof(parts[0]), stream + o, sizeof(stream) - o);
    static const size_t pieces[] = { 1, 2, 3, 7, 13, 64, 4096 };
    for (size_t i = 0; i < sizeof(pieces) / sizeof(pieces[0]); i++) {
        pid_t pid = serve_once(stream, strlen(stream), pieces[i]);
        struct moe_client c;
        client(&c);
        struct deltas x = { .n = 0 };
        struct moe_client_result res;
        struct moe_client_err e;
        struct moe_client_params p = { .max_tokens = 8 };
        int rc = moe_client_complete(&c, "hi", &p, on_delta, &x, &res, &e);
        waitpid(pid, NULL, 0);
        CHECK_MSG(rc == 0, "piece %zu: %s", pieces[i], e.msg);
        CHECK_INT(x.n, ==, 3);
        CHECK_STR(x.text, "Hello, w\xc3\xb6rld!");
        CHECK_STR(res.text, "Hello, w\xc3\xb6rld!");
        CHECK_STR(res.finish_reason, "stop");
        CHECK_INT(res.completion_tokens, ==, 3);
        CHECK(res.raw == NULL);
        moe_client_result_free(&res);
    }
    char *body = last_request_body();
    const bool sent_stream = body && strstr(body, "\"stream\":true");
    free(body);
    CHECK(sent_stream);
    /* a sampled token may decode to U+0000: valid JSON, kept with its length */
    static const char *nul[] = { "data: {\"choices\":[{\"index\":0,\"text\":\"a\\u0000b\"}]}\n\n",
                                 "data: [DONE]\n\n" };
    size_t o2 = (size_t)sprintf(stream, "%s", sse_head);
    chunked(nul, 2, stream + o2, sizeof(stream) - o2);
    pid_t pid = serve_once(stream, strlen(stream), 4096);
    struct moe_client c;
    client(&c);
    struct deltas x = { .n = 0 };
    struct moe_client_result res;
    struct moe_client_err e;
    int rc = moe_client_complete(&c, "hi", NULL, on_delta, &x, &res, &e);
    waitpid(pid, NULL, 0);
    CHECK_MSG(rc == 0, "%s", e.msg);
    CHECK_INT(res.len, ==, 3);
    CHECK(memcmp(res.text, "a\0b", 4) == 0);
    moe_client_result_free(&res);
}

static void test_chat_stream(void)
{
    /* OpenAI's chat chunks: a first delta with only the role, content deltas,
     * a last one with finish_reason, a usage-only chunk with no choices */
    static const char *parts[] = {
        ("data: {\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":"
         "\"assistant\"},\"finish_reason\":null}]}\n\n"),
        ("data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n"
         "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" you\"},\"finish_"),
        ("reason\":null}]}\n\ndata: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n"
         "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\n"),
        "data: [DONE]\n\n" };
    char stream[2048];
    size_t o = (size_t)sprintf(stream, "%s", sse_head);
    chunked(parts, sizeof(parts) / sizeof(parts[0]), stream + o, sizeof(stream) - o);
    pid_t pid = serve_once(stream, strlen(stream), 9);
    struct moe_client c;
    client(&c);
    const struct moe_client_message msgs[] = { { "system", "Be brief." }, { "user", "hello" } };
    struct deltas x = { .n = 0 };
    struct moe_client_result res;
    struct moe_client_err e;
    int rc = moe_client_chat(&c, msgs, 2, NULL, on_delta, &x, &res, &e);
    waitpid(pid, NULL, 0);
    CHECK_MSG(rc == 0, "%s", e.msg);
    CHECK_STR(x.text, "Hi you");
    CHECK_INT(x.n, ==, 2);
    CHECK_STR(res.finish_reason, "stop");
    CHECK_INT(res.prompt_tokens, ==, 9);
    moe_client_result_free(&res);
    char *body = last_request_body();
    json_t *j = body ? json_loads(body, 0, NULL) : NULL;
    free(body);
    json_t *m1 = json_array_get(json_object_get(j, "messages"), 1);
    const bool ok = j && json_array_size(json_object_get(j, "messages")) == 2 &&
                    strcmp(json_string_value(json_object_get(m1, "role")), "user") == 0 &&
                    strcmp(json_string_value(json_object_get(m1, "content")), "hello") == 0 &&
                    json_is_true(json_object_get(j, "stream")) &&
                    json_object_get(j, "max_tokens") == NULL;
    json_decref(j);
    CHECK(ok);
    /* one-shot chat */
    const char *ans = answer("200 OK", "{\"object\":\"chat.completion\",\"choices\":[{\"index\":0,"
                             "\"message\":{\"role\":\"assistant\",\"content\":\"Yes.\"}}]}");
    pid = serve_once(ans, strlen(ans), 4096);
    rc = moe_client_chat(&c, msgs, 2, NULL, NULL, NULL, &res, &e);
    waitpid(pid, NULL, 0);
    CHECK_MSG(rc == 0, "%s", e.msg);
    CHECK_STR(res.text, "Yes.");
    CHECK_STR(res.finish_reason, "");
    CHECK_INT(res.prompt_tokens, ==, -1);
    moe_client_result_free(&res);
}

/* A convenience call against a canned answer: its return value and e. */
static int conv(const char *resp, int (*call)(const struct moe_client *, struct moe_client_err *),
                struct moe_client_err *e)
{
    pid_t pid = serve_once(resp, strlen(resp), 16);
    struct moe_client c;
    client(&c);
    int rc = call(&c, e);
    waitpid(pid, NULL, 0);
    return rc;
}

static int call_complete(const struct moe_client *c, struct moe_client_err *e)
{
    struct moe_client_result res;
    int rc = moe_client_complete(c, "x", NULL, NULL, NULL, &res, e);
    if (rc == 0)
        moe_client_result_free(&res);
    return rc;
}

static int call_complete_stream(const struct moe_client *c, struct moe_client_err *e)
{
    struct deltas x = { .n = 0 };
    return moe_client_complete(c, "x", NULL, on_delta, &x, NULL, e);
}

static int call_health(const struct moe_client *c, struct moe_client_err *e)
{
    return moe_client_health(c, e);
}

static int call_stats(const struct moe_client *c, struct moe_client_err *e)
{
    char *j;
    int rc = moe_client_stats(c, &j, e);
    free(j);
    return rc;
}

static void test_errors(void)
{
    struct moe_client_err e;
    /* 400 with an OpenAI error object */
    const char *bad = answer("400 Bad Request\r\nContent-Type: application/json",
                             "{\"error\":{\"message\":\"'max_tokens' is 100000, expected 1..512\",\"type\":"
                      "\"invalid_request_error\",\"param\":\"max_tokens\",\"code\":null}}");
    CHECK_INT(conv(bad, call_complete, &e), ==, MOE_CLIENT_ESERVER);
    CHECK_INT(e.code, ==, MOE_CLIENT_ESERVER);
    CHECK_INT(e.status, ==, 400);
    CHECK(!e.connect);
    CHECK_STR(e.msg, "moed answered 400: 'max_tokens' is 100000, expected 1..512");
    CHECK_STR(e.api_message, "'max_tokens' is 100000, expected 1..512");
    CHECK_STR(e.api_type, "invalid_request_error");
    CHECK_STR(e.api_param, "max_tokens");
    CHECK_STR(e.api_code, "");
    /* the same answer to a stream request */
    CHECK_INT(conv(bad, call_complete_stream, &e), ==, MOE_CLIENT_ESERVER);
    CHECK_INT(e.status, ==, 400);
    CHECK_STR(e.api_param, "max_tokens");
    /* 503 while loading, with Retry-After */
    const char *loading = answer("503 Service Unavailable\r\nRetry-After: 3", "{\"status\":\"loading\"}");
    CHECK_INT(conv(loading, call_health, &e), ==, MOE_CLIENT_ESERVER);
    CHECK_INT(e.status, ==, 503);
    CHECK_INT(e.retry_after, ==, 3);
    CHECK_STR(e.msg, "moed answered 503: loading (retry after 3 s)");
    /* 503 with an error object (a full queue) */
    const char *full = answer("503 Service Unavailable\r\nRetry-After: 1",
                              "{\"error\":{\"message\":\"server busy\",\"type\":\"server_error\",\"param\":null}}");
    CHECK_INT(conv(full, call_complete, &e), ==, MOE_CLIENT_ESERVER);
    CHECK_STR(e.msg, "moed answered 503: server busy (retry after 1 s)");
    CHECK_STR(e.api_type, "server_error");
    /* not JSON at all */
    CHECK_INT(conv("HTTP/1.1 500 Oops\r\nContent-Length: 14\r\n\r\ninternal\x01\nmore", call_stats, &e),
              ==, MOE_CLIENT_ESERVER);
    CHECK_STR(e.msg, "moed answered 500: internal?");
    CHECK_INT(conv("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", call_stats, &e), ==,
              MOE_CLIENT_ESERVER);
    CHECK_STR(e.msg, "moed answered 404: (no error message)");
    /* 200, wrong shapes */
    CHECK_INT(conv("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", call_stats, &e), ==, MOE_EFORMAT);
    CHECK(strstr(e.msg, "not a JSON object") != NULL);
    CHECK_INT(conv("HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n{\"status\":\"unknown\"}", call_health,
                   &e), ==, MOE_EFORMAT);
    CHECK(strstr(e.msg, "unknown") != NULL);
    CHECK_INT(conv("HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n{\"choices\":[]}", call_complete, &e),
              ==, MOE_EFORMAT);
    CHECK(strstr(e.msg, "choices[0].text") != NULL);
    /* transport errors come through with the reader's message */
    CHECK_INT(conv("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{\"st", call_health, &e), ==,
              MOE_EFORMAT);
    CHECK(strstr(e.msg, "bytes before the end of the body") != NULL && !e.connect);
}

static void test_stream_errors(void)
{
    struct moe_client_err e;
    char stream[2048];
    /* an error event in the middle of a stream: the text before it was delivered */
    static const char *mid[] = {
        "data: {\"choices\":[{\"index\":0,\"text\":\"ab\"}]}\n\n",
        ("data: {\"error\":{\"message\":\"the engine failed\",\"type\":\"server_error\",\"param\":null,"
         "\"code\":\"engine\"}}\n\n"), "data: [DONE]\n\n" };
    size_t o = (size_t)sprintf(stream, "%s", sse_head);
    chunked(mid, 3, stream + o, sizeof(stream) - o);
    CHECK_INT(conv(stream, call_complete_stream, &e), ==, MOE_CLIENT_ESERVER);
    CHECK_INT(e.status, ==, 200);
    CHECK_STR(e.msg, "moed reported an error in the stream: the engine failed");
    CHECK_STR(e.api_code, "engine");
    /* a stream that ends (properly chunked) without [DONE] */
    static const char *nodone[] = { "data: {\"choices\":[{\"index\":0,\"text\":\"ab\"}]}\n\n" };
    o = (size_t)sprintf(stream, "%s", sse_head);
    chunked(nodone, 1, stream + o, sizeof(stream) - o);
    CHECK_INT(conv(stream, call_complete_stream, &e), ==, MOE_EFORMAT);
    CHECK(strstr(e.msg, "ended without 'data: [DONE]'") != NULL);
    /* a stream cut in the middle of a chunk (moed died) */
    o = (size_t)sprintf(stream, "%s", sse_head);
    sprintf(stream + o, "40\r\ndata: {\"choices\":[{\"ind");
    CHECK_INT(conv(stream, call_complete_stream, &e), ==, MOE_EFORMAT);
    CHECK(strstr(e.msg, "bytes before the end of the body") != NULL);
    /* an event that is not JSON */
    static const char *garbage[] = { "data: {nope\n\n", "data: [DONE]\n\n" };
    o = (size_t)sprintf(stream, "%s", sse_head);
    chunked(garbage, 2, stream + o, sizeof(stream) - o);
    CHECK_INT(conv(stream, call_complete_stream, &e), ==, MOE_EFORMAT);
    CHECK(strstr(e.msg, "a stream event is not valid JSON") != NULL);
    /* JSON where a stream was asked for */
    CHECK_INT(conv("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
                   call_complete_stream, &e), ==, MOE_EFORMAT);
    CHECK(strstr(e.msg, "expected an event stream, got Content-Type 'application/json'") != NULL);
}

static void test_models_tokenize(void)
{
    struct moe_client c;
    struct moe_client_err e;
    const char *models = answer("200 OK", "{\"object\":\"list\",\"data\":"
                         "[{\"id\":\"tiny-qwen3moe\",\"object\":\"model\"},{\"id\":\"b\",\"object\":\"model\"}]}");
    pid_t pid = serve_once(models, strlen(models), 4096);
    client(&c);
    char **ids;
    size_t n;
    int rc = moe_client_models(&c, &ids, &n, &e);
    waitpid(pid, NULL, 0);
    CHECK_MSG(rc == 0, "%s", e.msg);
    CHECK_INT(n, ==, 2);
    CHECK_STR(ids[0], "tiny-qwen3moe");
    CHECK_STR(ids[1], "b");
    CHECK(ids[2] == NULL);
    moe_client_strv_free(ids);

    const char *tok = answer("200 OK", "{\"tokens\":[1,15043,3186]}");
    pid = serve_once(tok, strlen(tok), 4096);
    int32_t *t;
    rc = moe_client_tokenize(&c, "Hello world", true, &t, &n, &e);
    waitpid(pid, NULL, 0);
    CHECK_MSG(rc == 0, "%s", e.msg);
    CHECK_INT(n, ==, 3);
    CHECK_INT(t[1], ==, 15043);
    char *body = last_request_body();
    const bool ok = body && strstr(body, "\"content\":\"Hello world\"") && strstr(body, "\"add_special\":true");
    free(body);
    CHECK(ok);

    const char *detok = answer("200 OK", "{\"content\":\"Hello world\"}");
    pid = serve_once(detok, strlen(detok), 4096);
    char *text;
    rc = moe_client_detokenize(&c, t, n, &text, &e);
    waitpid(pid, NULL, 0);
    free(t);
    CHECK_MSG(rc == 0, "%s", e.msg);
    CHECK_STR(text, "Hello world");
    free(text);
    body = last_request_body();
    const bool ok2 = body && strcmp(body, "{\"tokens\":[1,15043,3186]}") == 0;
    free(body);
    CHECK(ok2);

    const char *badtok = answer("200 OK", "{\"tokens\":[1,-2,\"x\"]}");
    pid = serve_once(badtok, strlen(badtok), 4096);
    rc = moe_client_tokenize(&c, "a", false, &t, &n, &e);
    waitpid(pid, NULL, 0);
    CHECK_INT(rc, ==, MOE_EFORMAT);
    CHECK(t == NULL && n == 0 && strstr(e.msg, "tokens[1] is not a token id"));
}

/* moed refuses a huge request and closes before reading it all: the client's
 * write fails, but the answer is still read and returned. */
static void test_answer_before_request_read(void)
{
    const char *big413 = answer("413 Payload Too Large", "{\"error\":{\"message\":\"request body over"
                                " 1 MiB\",\"type\":\"invalid_request_error\",\"param\":null}}");
    pid_t pid = serve_once(big413, strlen(big413), 4096);
    struct moe_client c;
    client(&c);
    const size_t n = 8u << 20;
    char *body = malloc(n);
    CHECK(body != NULL);
    memset(body, ' ', n);
    struct moe_client_err e;
    int rc = moe_client_call(&c, "POST", "/v1/completions", body, n, NULL, &e);
    waitpid(pid, NULL, 0);
    free(body);
    CHECK_MSG(rc == MOE_CLIENT_ESERVER, "rc %d: %s", rc, e.msg);
    CHECK_INT(e.status, ==, 413);
    CHECK_STR(e.msg, "moed answered 413: request body over 1 MiB");
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
    struct moe_client_err e;
    CHECK_INT(moe_client_health(&c, &e), ==, -ENOENT);
    CHECK(e.connect && e.status == 0 && strstr(e.msg, path) && strstr(e.msg, "No such file"));
    /* a file that is not a socket */
    snprintf(path, sizeof(path), "%s/plain-file", moe_test_tmpdir());
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    fclose(f);
    moe_client_init(&c, path, NULL);
    CHECK_INT(moe_client_health(&c, &e), ==, -ECONNREFUSED);
    CHECK(e.connect);
    /* a path too long for sun_path, an empty one, the defaults */
    char longp[200];
    memset(longp, 'a', sizeof(longp) - 1);
    longp[sizeof(longp) - 1] = '\0';
    CHECK_INT(moe_client_init(&c, longp, &d), ==, -ENAMETOOLONG);
    CHECK_INT(moe_client_init(&c, "", &d), ==, -EINVAL);
    char buf[256];
    setenv("MOED_SOCKET", "/x/y.sock", 1);
    CHECK_STR(moe_client_default_socket(buf, sizeof(buf)), "/x/y.sock");
    unsetenv("MOED_SOCKET");
    setenv("XDG_RUNTIME_DIR", "/run/user/7", 1);
    CHECK_STR(moe_client_default_socket(buf, sizeof(buf)), "/run/user/7/moed.sock");
    unsetenv("XDG_RUNTIME_DIR");
    CHECK_STR(moe_client_default_socket(buf, sizeof(buf)), "./moed.sock");
    CHECK(moe_client_init(&c, NULL, &d) == 0);
    CHECK_STR(c.path, "./moed.sock");
}

static void test_timeouts(void)
{
    /* a server that takes the connection and never answers */
    char path[300];
    snprintf(path, sizeof(path), "%s/mute.sock", moe_test_tmpdir());
    int ls = listen_at(path, 4);
    CHECK(ls >= 0);
    struct moe_client c;
    moe_client_init(&c, path, NULL);
    c.timeout_ms = 200;
    struct moe_client_err e;
    CHECK_INT(moe_client_health(&c, &e), ==, -ETIMEDOUT);
    CHECK(!e.connect && strstr(e.msg, "no answer within 200 ms"));
    close(ls);
    /* a server that accepts nothing: fill its backlog, then connect */
    ls = listen_at(path, 0);
    CHECK(ls >= 0);
    int fds[64], nfd = 0;
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    snprintf(a.sun_path, sizeof(a.sun_path), "%s", path);
    for (; nfd < 64; nfd++) {
        fds[nfd] = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0);
        if (connect(fds[nfd], (struct sockaddr *)&a, sizeof(a)) != 0) {
            close(fds[nfd]);
            break;
        }
    }
    c.connect_timeout_ms = 150;
    int rc = moe_client_health(&c, &e);
    for (int i = 0; i < nfd; i++)
        close(fds[i]);
    close(ls);
    if (nfd == 64)
        MOE_SKIP("the listen backlog never filled");
    CHECK_INT(rc, ==, -ETIMEDOUT);
    CHECK(e.connect && strstr(e.msg, "no connection within 150 ms"));
}

/* Addresses: a socket path, http://HOST:PORT (and [v6]:PORT), MOED_HOST;
 * bad URLs refused naming them; the API key from MOED_API_KEY goes out as
 * a Bearer header, and no header without it. */
static void test_addresses_and_key(void)
{
    struct moe_client c;
    struct moe_diag d = { 0 };
    char buf[320];
    unsetenv("MOED_HOST");
    unsetenv("MOED_API_KEY");
    CHECK(moe_client_init(&c, "/run/moed/moed.sock", &d) == 0 && c.host[0] == '\0');
    CHECK_STR(c.path, "/run/moed/moed.sock");
    CHECK(moe_client_init(&c, "http://10.1.2.3:18080", &d) == 0);
    CHECK_STR(c.host, "10.1.2.3");
    CHECK_STR(c.port, "18080");
    CHECK_STR(moe_client_addr(&c, buf, sizeof(buf)), "http://10.1.2.3:18080");
    CHECK(moe_client_init(&c, "http://[::1]:8080/", &d) == 0);
    CHECK_STR(c.host, "::1");
    CHECK_STR(moe_client_addr(&c, buf, sizeof(buf)), "http://[::1]:8080");
    const char *bad[] = { "http://host", "http://host:", "http://:80", "http://h:99999", "http://h:8x",
                          "http://h:80/v1" };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        memset(&d, 0, sizeof(d));
        CHECK_MSG(moe_client_init(&c, bad[i], &d) == -EINVAL && strstr(d.msg, bad[i]), "%s: %s",
                  bad[i], d.msg);
    }
    setenv("MOED_HOST", "gw.example:9000", 1);
    CHECK(moe_client_init(&c, NULL, &d) == 0);
    CHECK_STR(c.host, "gw.example");
    CHECK(moe_client_init(&c, "/tmp/x.sock", &d) == 0 && c.host[0] == '\0');   /* --socket wins */
    unsetenv("MOED_HOST");

    const char *ans = answer("200 OK\r\nContent-Type: application/json", "{\"status\":\"ok\"}");
    for (int with_key = 0; with_key < 2; with_key++) {
        if (with_key)
            setenv("MOED_API_KEY", "s3cret-key", 1);
        pid_t pid = serve_once(ans, strlen(ans), 64);
        client(&c);
        struct moe_client_err e;
        const int rc = moe_client_health(&c, &e);
        waitpid(pid, NULL, 0);
        CHECK_MSG(rc == 0, "%s", e.msg);
        size_t n;
        char *req = moe_test_read_file(req_path, &n);
        CHECK(req != NULL);
        const bool has = strstr(req, "\r\nAuthorization: Bearer s3cret-key\r\n") != NULL;
        free(req);
        CHECK_MSG(has == (with_key == 1), "Authorization header %s", has ? "sent without a key" : "missing");
    }
    unsetenv("MOED_API_KEY");
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    moe_test_run("bodies", test_bodies);
    moe_test_run("malformed responses", test_malformed);
    moe_test_run("SSE at every split", test_sse_every_split);
    moe_test_run("SSE syntax, stop, error status", test_sse_syntax);
    moe_test_run("complete one-shot", test_complete);
    moe_test_run("complete streamed", test_complete_stream);
    moe_test_run("chat streamed and one-shot", test_chat_stream);
    moe_test_run("error objects and wrong shapes", test_errors);
    moe_test_run("errors in streams", test_stream_errors);
    moe_test_run("models, tokenize, detokenize", test_models_tokenize);
    moe_test_run("answer before the request was read", test_answer_before_request_read);
    moe_test_run("connect failure", test_connect_failure);
    moe_test_run("timeouts", test_timeouts);
    MOE_TEST_RUN(test_addresses_and_key);
    return moe_test_exit_code();
}
