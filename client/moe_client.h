/* A small C client for moed: HTTP/1.1 over its Unix socket, one connection
 * per request. Responses are read with bounds (64 KiB of headers, 64 MiB of
 * body); Content-Length, chunked and read-to-close bodies are understood, and
 * server-sent events are handed to a callback one `data:` payload at a time
 * as they arrive. A malformed response is an error naming what was wrong,
 * never an over-read. Errors: -errno of connect/read/write (the socket path
 * in the message), MOE_EFORMAT for a malformed response, MOE_ELIMIT for one
 * over the bounds; an HTTP error status is not an error of these calls (see
 * status and moe_client_error_message). */
#ifndef MOE_CLIENT_MOE_CLIENT_H
#define MOE_CLIENT_MOE_CLIENT_H

#include <stddef.h>

#include "common/error.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_CLIENT_MAX_HEADER (64u << 10)
#define MOE_CLIENT_MAX_BODY (64u << 20)

struct moe_client {
    char path[108];
    int timeout_ms;            /* connect and each read; default 600000 */
};

struct moe_client_resp {
    int status;
    char *body;                /* NUL-terminated (malloc), NULL for streams */
    size_t len;
    int retry_after;           /* seconds from Retry-After, -1 if absent */
};

/* The default socket: $MOED_SOCKET, else $XDG_RUNTIME_DIR/moed.sock, else
 * ./moed.sock. */
const char *moe_client_default_socket(char *buf, size_t cap);

/* path NULL: the default socket. -ENAMETOOLONG when the path does not fit. */
int moe_client_init(struct moe_client *c, const char *path, struct moe_diag *d);

/* One request; the body (if any) is sent as application/json. */
int moe_client_request(const struct moe_client *c, const char *method, const char *target,
                       const char *body, size_t len, struct moe_client_resp *out, struct moe_diag *d);

/* Called for each server-sent event's data (without "data: "); a non-zero
 * return stops reading (and is returned by moe_client_stream). */
typedef int (*moe_client_event_fn)(void *ud, const char *data, size_t len);

/* POSTs body and reads an event stream. When the server answers with an
 * error status instead of a stream, out->body holds its error object. */
int moe_client_stream(const struct moe_client *c, const char *target, const char *body, size_t len,
                      moe_client_event_fn fn, void *ud, struct moe_client_resp *out,
                      struct moe_diag *d);

void moe_client_resp_free(struct moe_client_resp *r);

/* The message of an OpenAI error object in body, or NULL. Borrowed from buf
 * (cap bytes). */
const char *moe_client_error_message(const char *body, char *buf, size_t cap);

#ifdef __cplusplus
}
#endif

#endif
