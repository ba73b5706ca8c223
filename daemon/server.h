/* moed's transport: one libuv loop, the Unix socket (and optional loopback
 * TCP) with its lock, HTTP/1.1 connections parsed with http-parser,
 * deadlines, output back-pressure, signals and shutdown. It knows nothing
 * of the API: a table of handlers (struct moed_handlers, given to
 * moed_server_run) receives each parsed request and the loop's events, and
 * answers through the moed_conn_* functions; connections are opaque.
 *
 * Threads: everything here runs on the loop thread, except
 * moed_server_wake(), which any thread may call.
 *
 * Ownership: the server owns its connections. A struct moed_conn handed to
 * a handler stays valid until its answer is done (moed_conn_done) or the
 * abandon handler has returned, whichever comes first; after that the
 * handler must not keep it. Errors are OpenAI's error object, the one shape
 * in which every part of moed answers a failure. */
#ifndef MOE_DAEMON_SERVER_H
#define MOE_DAEMON_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "daemon/config.h"

struct moed_server;
struct moed_conn;

/* A complete request; borrowed for the duration of the dispatch call. */
struct moed_http_request {
    const char *method;           /* "GET", "POST", ... */
    const char *path;             /* without the query string */
    const char *body;             /* NUL-terminated ("" when there is none) */
    size_t body_len;
};

/* What the server calls, all on the loop thread, each with the ud given to
 * moed_server_run. Only dispatch is required; a NULL entry is skipped. */
struct moed_handlers {
    /* A complete request on c. Answer it at once (moed_conn_send... then
     * moed_conn_done) or later, e.g. from on_wake; until moed_conn_done, c
     * reads no further request (pipelined bytes wait) and the shutdown
     * waits for it. */
    void (*dispatch)(void *ud, struct moed_conn *c, const struct moed_http_request *req);
    /* moed_server_wake() was called (from any thread): drain what woke it. */
    void (*on_wake)(void *ud);
    /* c is closing before its answer was done (the client went away, a
     * deadline or a write failed): forget it. Writes to c are no-ops now,
     * and moed_conn_done is not needed. */
    void (*abandon)(void *ud, struct moed_conn *c);
    /* A streamed answer outruns its client: paused is true once
     * max_output_bytes are queued for c (stop producing; c is dropped if it
     * reads nothing for read_timeout_ms), false once it has read half. */
    void (*backpressure)(void *ud, struct moed_conn *c, bool paused);
    /* The shutdown's grace period (shutdown_grace_s) is over: end every
     * answer still in progress (they are still written). */
    void (*grace_over)(void *ud);
    /* SIGHUP applied the run-time keys; cfg is the configuration now. */
    void (*reloaded)(void *ud, const struct moed_config *cfg);
    /* The loop has stopped: stop whatever could still call
     * moed_server_wake(), before the server closes its handles. */
    void (*stopped)(void *ud);
};

/* Lifecycle: new; then whatever will call moed_server_wake (the engine) is
 * created with the server as its argument; run until the shutdown ends;
 * free. */
struct moed_server *moed_server_new(const struct moed_config *cfg, int argc, char **argv);
/* Takes the lock beside the socket (doc/daemon.md) and checks that the
 * path is free or a socket: moed calls it before loading the model, so
 * that a second daemon on the same socket is refused at once. 0, or
 * -EADDRINUSE (another moed holds the lock), -EEXIST (the path is not a
 * socket) or an -errno of the lock file, with a message in d. Idempotent. */
int moed_server_lock(struct moed_server *s, struct moe_diag *d);
/* Binds the socket (doc/daemon.md: lock, mode, stale socket) and serves
 * with the handlers h (borrowed until it returns; ud is passed to each)
 * until a signal or moed_server_shutdown() stops it and every handle is
 * closed. name says what is served in the log. 0, or an error in d: the
 * socket, handles left open, or the status given to moed_server_shutdown(). */
int moed_server_run(struct moed_server *s, const char *name, const struct moed_handlers *h,
                    void *ud, struct moe_diag *d);
void moed_server_free(struct moed_server *s);
/* Thread-safe: the loop calls the on_wake handler soon (wake-ups coalesce). */
void moed_server_wake(void *server);
/* Starts the shutdown, as SIGTERM does: the listeners close at once, open
 * answers get the grace period. status < 0 makes moed_server_run fail with
 * "stopped after a <why>". False when a shutdown was already under way
 * (nothing changes then). */
bool moed_server_shutdown(struct moed_server *s, const char *why, int status);
/* The configuration in force (it changes on SIGHUP); borrowed. */
const struct moed_config *moed_server_config(const struct moed_server *s);

struct moed_server_stats {
    uint64_t http_requests;       /* requests parsed */
    uint64_t http_by_class[6];    /* responses by status class, [1] = 1xx .. [5] = 5xx */
    double uptime_s;              /* since moed_server_new */
};
void moed_server_stats(const struct moed_server *s, struct moed_server_stats *out);

/* ---- answering on a connection --------------------------------------- */

/* One whole response. extra_headers: "Name: value\r\n" lines, or NULL. */
void moed_conn_send(struct moed_conn *c, int status, const char *ctype, const char *body,
                    size_t len, const char *extra_headers);
/* OpenAI's error object; param names the field at fault (or NULL). 503
 * adds Retry-After. */
void moed_conn_send_error(struct moed_conn *c, int status, const char *type, const char *param,
                          const char *fmt, ...) __attribute__((format(printf, 5, 6)));
/* A chunked text/event-stream response: the head, then chunks, then the end. */
void moed_conn_start_stream(struct moed_conn *c);
void moed_conn_chunk(struct moed_conn *c, const char *data, size_t len);
void moed_conn_end_stream(struct moed_conn *c);
/* The answer to the current request is complete: the connection goes on
 * with the next request (or closes). Also fine on a closing connection. */
void moed_conn_done(struct moed_conn *c);

/* The handler's pointer for the current answer (NULL until set). */
void *moed_conn_data(const struct moed_conn *c);
void moed_conn_set_data(struct moed_conn *c, void *data);
/* A number that names the connection in logs. */
uint64_t moed_conn_id(const struct moed_conn *c);

#endif
