/* The server: a libuv loop, the Unix socket (and optional loopback TCP),
 * HTTP/1.1 connections parsed with http-parser, and the API handlers
 * (api.c) that turn requests into engine work and engine output into
 * responses. Everything here runs on the loop thread. */
#ifndef MOE_DAEMON_SERVER_H
#define MOE_DAEMON_SERVER_H

#include <http_parser.h>
#include <stdbool.h>
#include <stdint.h>
#include <jansson.h>
#include <uv.h>

#include "common/buf.h"
#include "daemon/config.h"
#include "daemon/engine.h"

struct server;

struct conn {
    union {
        uv_handle_t h;
        uv_stream_t s;
        uv_pipe_t pipe;
        uv_tcp_t tcp;
    } io;
    uv_timer_t timer;
    int open_handles;
    struct server *srv;
    struct conn *prev, *next;
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
    struct moe_buf body;          /* limit: max_body_bytes */
    /* bytes that arrived while a response was in progress (pipelining) */
    struct moe_buf pending;       /* limit: one maximal request */

    bool busy;                 /* a request is being answered */
    bool keep_alive;
    bool closing;
    bool streaming;            /* chunked SSE response under way */
    struct moed_req *req;      /* engine request of the current response */
    int endpoint;              /* api.c's endpoint of the current request */
    double t_start;
};

struct server {
    uv_loop_t *loop;
    struct moed_config cfg;
    int argc;
    char **argv;
    struct moed_engine *eng;
    char model_id[128];
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
    bool grace_expired;
    int exit_code;
    struct conn *conns;
    int n_conns;
    uint64_t next_conn_id, next_req_id;
    double t_start;
    /* counters (loop thread) */
    uint64_t http_by_class[6];     /* 1xx..5xx */
    uint64_t http_requests;
    uint64_t active_requests;      /* engine requests with a client waiting */
};

/* Lifecycle (server.c): new, then the engine is created with
 * moed_server_notify(server) as its notify function, then run until a
 * signal stops it. */
struct server *moed_server_new(const struct moed_config *cfg, int argc, char **argv);
void moed_server_notify(void *server);
int moed_server_run(struct server *s, struct moed_engine *eng, struct moe_diag *d);
void moed_server_free(struct server *s);

/* Responses (server.c). */
void conn_send(struct conn *c, int status, const char *ctype, const char *body, size_t len,
               const char *extra_headers);
void conn_send_error(struct conn *c, int status, const char *type, const char *param,
                     const char *fmt, ...) __attribute__((format(printf, 5, 6)));
/* Starts a chunked text/event-stream response; conn_chunk writes one chunk;
 * conn_end_chunks ends the response. */
void conn_start_stream(struct conn *c);
void conn_chunk(struct conn *c, const char *data, size_t len);
void conn_end_chunks(struct conn *c);
/* The response of the current request is complete. */
void conn_response_done(struct conn *c);

/* API (api.c). */
void api_dispatch(struct conn *c, const char *method, const char *path, const char *body, size_t len);
/* Engine output for the request of c (loop thread). */
void api_on_engine(struct conn *c, struct moed_req *r);
/* The client of c went away; cancels its engine request. */
void api_abandon(struct conn *c);

#endif
