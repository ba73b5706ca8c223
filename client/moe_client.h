/* moe_client: a small C client for moed's HTTP API (doc/client.md).
 *
 * Transport: HTTP/1.1 over moed's Unix socket, one connection per request
 * (`Connection: close`). Responses are read with bounds: 64 KiB for the
 * status line and headers (and again for chunk-size lines and trailers),
 * 64 MiB for a body or for one server-sent event. Content-Length, chunked and
 * read-to-close bodies are understood; a malformed response is an error that
 * names what was wrong, never an over-read.
 *
 * Two layers:
 *  - moe_client_request / moe_client_stream: one exchange; an HTTP error
 *    status is NOT an error of the call (look at resp.status). Errors:
 *    -errno of connect/read/write (the socket path in the message),
 *    -ETIMEDOUT, MOE_EFORMAT (malformed response), MOE_ELIMIT (over a bound),
 *    MOE_EUNSUPPORTED (a transfer coding other than chunked), via moe_diag.
 *  - the convenience calls (moe_client_call, _health, _stats, _models,
 *    _complete, _chat, _tokenize, _detokenize): an HTTP error status, an
 *    error event inside a stream or an answer of the wrong shape is an error
 *    too, reported in struct moe_client_err with the HTTP status and the
 *    OpenAI error object's fields.
 *
 * Ownership: every char * and array handed out is malloc'ed and belongs to
 * the caller (free it, or the _free function named beside it); bodies and
 * texts come from common/buf.h, whose moe_malloc is malloc underneath. On failure
 * out-params are NULL/zero. Callbacks run on the caller's thread, inside the
 * call. A struct moe_client holds no connection and no resources: it may be
 * copied and used from several threads at once.
 */
#ifndef MOE_CLIENT_MOE_CLIENT_H
#define MOE_CLIENT_MOE_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_CLIENT_MAX_HEADER (64u << 10)
#define MOE_CLIENT_MAX_BODY (64u << 20)

/* Convenience calls only: moed answered with an HTTP error status, or with an
 * error event inside a stream (moe_client_err.status and .api_* say more). */
#define MOE_CLIENT_ESERVER (-4100)

/* moed's address: a Unix socket path, or "http://HOST:PORT" for its TCP
 * listener (an IPv6 host in brackets). With no address given: $MOED_HOST
 * (a URL or HOST:PORT), else $MOED_SOCKET, else $XDG_RUNTIME_DIR/moed.sock,
 * else ./moed.sock. The API key (sent as "Authorization: Bearer KEY") is
 * $MOED_API_KEY unless set in api_key after init. */
struct moe_client {
    char path[108];            /* sun_path; for TCP the URL (for messages) */
    char host[256];            /* TCP: the host name or address, "" for a Unix socket */
    char port[8];              /* TCP: the port */
    char api_key[256];         /* "" = none */
    int connect_timeout_ms;    /* default 5000; <= 0: no limit */
    int timeout_ms;            /* each read or write; default 600000 (a long generation
                                  streams, but a long prompt may be silent for a while);
                                  <= 0: no limit */
};

struct moe_client_resp {
    int status;                /* HTTP status */
    char *body;                /* NUL-terminated (malloc); NULL for a stream that was one */
    size_t len;
    int retry_after;           /* seconds from Retry-After, -1 if absent or not a number */
    char content_type[64];     /* "" when absent; truncated */
};

/* What went wrong in a convenience call. */
struct moe_client_err {
    int code;                  /* the call's return value */
    bool connect;              /* moed could not be reached (connect failed or timed out) */
    int status;                /* HTTP status of the answer; 0 when none was read */
    int retry_after;           /* seconds, -1 */
    char msg[MOE_DIAG_MSG_MAX];          /* one line for a person */
    char api_message[MOE_DIAG_MSG_MAX];  /* the OpenAI error object: message, */
    char api_type[64];                   /* type, */
    char api_param[64];                  /* param and code ("" when null or absent) */
    char api_code[64];
};

/* ---- the transport ------------------------------------------------------ */

/* The default socket: $MOED_SOCKET, else $XDG_RUNTIME_DIR/moed.sock, else
 * ./moed.sock (truncated to cap). Returns buf. */
const char *moe_client_default_socket(char *buf, size_t cap);

/* path NULL: the default socket. -ENAMETOOLONG when the path does not fit
 * sun_path, -EINVAL when empty. */
int moe_client_init(struct moe_client *c, const char *path, struct moe_diag *d);
/* The address as given ("http://h:p" or the socket path), for messages. */
const char *moe_client_addr(const struct moe_client *c, char *buf, size_t cap);

/* One request; a body (when not NULL) is sent as application/json. On
 * success *out holds the response (free with moe_client_resp_free). */
int moe_client_request(const struct moe_client *c, const char *method, const char *target,
                       const char *body, size_t len, struct moe_client_resp *out,
                       struct moe_diag *d);

/* Called for each server-sent event with its data (the `data:` lines of one
 * event joined by "\n", NUL-terminated, borrowed for the call), including the
 * final "[DONE]". A non-zero return stops reading and is returned. */
typedef int (*moe_client_event_fn)(void *ud, const char *data, size_t len);

/* POSTs body and reads an event stream. When the server answers with an error
 * status, or 200 with a Content-Type other than text/event-stream, no event is
 * delivered and out->body holds the answer. */
int moe_client_stream(const struct moe_client *c, const char *target, const char *body,
                      size_t len, moe_client_event_fn fn, void *ud, struct moe_client_resp *out,
                      struct moe_diag *d);

/* Frees r->body; accepts a zeroed or already freed resp. */
void moe_client_resp_free(struct moe_client_resp *r);

/* The message of an OpenAI error object in body, copied to buf (cap bytes),
 * or NULL when body is not one. */
const char *moe_client_error_message(const char *body, char *buf, size_t cap);

/* ---- convenience calls: 0, or the error in *e (e may be NULL) ------------ */

/* One request whose answer must be 2xx; *out_body (may be NULL) receives the
 * body, NUL-terminated. */
int moe_client_call(const struct moe_client *c, const char *method, const char *target,
                    const char *body, size_t len, char **out_body, struct moe_client_err *e);

/* POSTs body and hands every event's data to fn, except the final [DONE]; a
 * stream that ends without [DONE] is MOE_EFORMAT, an event carrying an
 * "error" object is MOE_CLIENT_ESERVER. */
int moe_client_call_stream(const struct moe_client *c, const char *target, const char *body,
                           size_t len, moe_client_event_fn fn, void *ud,
                           struct moe_client_err *e);

/* GET /health: 0 when moed answers {"status":"ok"}; 503 while it loads is
 * MOE_CLIENT_ESERVER with e->status 503. */
int moe_client_health(const struct moe_client *c, struct moe_client_err *e);

/* GET /v1/moed/stats: the JSON text as moed sent it. */
int moe_client_stats(const struct moe_client *c, char **json, struct moe_client_err *e);

/* GET /v1/models: the model ids, a NULL-terminated array (free with
 * moe_client_strv_free); *n (may be NULL) their count. */
int moe_client_models(const struct moe_client *c, char ***ids, size_t *n,
                      struct moe_client_err *e);
void moe_client_strv_free(char **v);

/* Sampling and length; the zero value means "the daemon's defaults". */
struct moe_client_params {
    int max_tokens;                    /* 0: the daemon's default */
    bool has_temperature, has_top_p, has_min_p, has_top_k, has_seed;
    double temperature, top_p, min_p;
    int top_k;
    int64_t seed;
    const char *const *stop;           /* n_stop strings */
    size_t n_stop;
    int logprobs;                      /* 0: none (completions only) */
};

struct moe_client_message {
    const char *role;                  /* "system", "user", "assistant" */
    const char *content;
};

struct moe_client_result {
    char *text;                        /* the whole generated text (malloc, NUL-terminated) */
    size_t len;
    char finish_reason[16];            /* "stop", "length", ... "" if absent */
    int64_t prompt_tokens, completion_tokens;   /* usage; -1 if absent */
    char *raw;                         /* one-shot: the response JSON; streams: NULL */
};
void moe_client_result_free(struct moe_client_result *r);

/* A delta of generated text, borrowed for the call; a non-zero return stops
 * the stream and is returned by moe_client_complete/_chat. */
typedef int (*moe_client_delta_fn)(void *ud, const char *text, size_t len);

/* The JSON request bodies (malloc'ed, compact). -EINVAL when a string is not
 * valid UTF-8, -ENOMEM. */
int moe_client_completion_body(const char *prompt, const struct moe_client_params *p,
                               bool stream, char **out, struct moe_diag *d);
int moe_client_chat_body(const struct moe_client_message *msgs, size_t n,
                         const struct moe_client_params *p, bool stream, char **out,
                         struct moe_diag *d);

/* POST /v1/completions, /v1/chat/completions. fn NULL: one request and one
 * answer (res->raw holds it); fn set: "stream": true, fn gets each delta as it
 * arrives, and res still receives the whole text, the finish reason and the
 * usage. p may be NULL; res may be NULL. */
int moe_client_complete(const struct moe_client *c, const char *prompt,
                        const struct moe_client_params *p, moe_client_delta_fn fn, void *ud,
                        struct moe_client_result *res, struct moe_client_err *e);
int moe_client_chat(const struct moe_client *c, const struct moe_client_message *msgs, size_t n,
                    const struct moe_client_params *p, moe_client_delta_fn fn, void *ud,
                    struct moe_client_result *res, struct moe_client_err *e);

/* POST /tokenize and /detokenize. */
int moe_client_tokenize(const struct moe_client *c, const char *text, bool add_special,
                        int32_t **ids, size_t *n, struct moe_client_err *e);
int moe_client_detokenize(const struct moe_client *c, const int32_t *ids, size_t n, char **text,
                          struct moe_client_err *e);

#ifdef __cplusplus
}
#endif

#endif
