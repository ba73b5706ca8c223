/* moed's HTTP API (api.h): OpenAI-compatible completions and chat
 * completions (with server-sent-event streaming), models,
 * tokenize/detokenize, health, Prometheus metrics and moed's own stats, as
 * one table of routes behind the transport's handler table (server.h).
 * Request bodies are checked field by field (request.c); every error is
 * OpenAI's error object naming the field.
 *
 * A generation request lives across calls: the route submits it to the
 * engine and keeps it as the connection's data (the reference from
 * moed_req_new); the engine's news arrive through on_wake; the answer ends
 * in answer_done(), or in abandon when the client goes first. */
#include "daemon/api.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "common/alloc.h"
#include "common/buf.h"
#include "daemon/anthropic.h"
#include "daemon/log.h"
#include "daemon/output.h"
#include "daemon/request.h"
#include "model/model.h"
#include "model/tokenizer.h"

struct moed_api {
    struct moed_server *srv;      /* borrowed: the transport */
    struct moed_engine *eng;      /* borrowed */
    char model_id[128];           /* what /v1/models reports */
    uint64_t next_req_id;
    char boot[17];                /* random per start: response ids never repeat across runs */
};

/* ---- JSON helpers ---------------------------------------------------- */

/* A JSON string of bytes that may not be valid UTF-8 (a token piece can be
 * half a character): invalid bytes become U+FFFD. */
static json_t *json_bytes(const char *p, size_t n)
{
    json_t *j = json_stringn(p, n);
    if (j)
        return j;
    char *out = moe_malloc(n * 3 + 1);
    if (out == NULL)
        return NULL;
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        const unsigned char b = (unsigned char)p[i];
        size_t len = b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 0;
        bool ok = len > 0 && i + len <= n;
        for (size_t k = 1; ok && k < len; k++)
            ok = ((unsigned char)p[i + k] >> 6) == 2;
        if (ok && len > 1) {
            json_t *t = json_stringn(p + i, len);   /* rejects overlongs and surrogates */
            ok = t != NULL;
            json_decref(t);
        }
        if (ok) {
            memcpy(out + o, p + i, len);
            o += len;
            i += len;
        } else {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        }
    }
    j = json_stringn(out, o);
    moe_free(out);
    return j;
}

/* json_dump_callback's sink: appends to a moe_buf. */
static int buf_sink(const char *p, size_t n, void *ud)
{
    return moe_buf_append(ud, p, n) == 0 ? 0 : -1;
}

/* Sends j (consumed) as the whole response. */
static void send_json(struct moed_conn *c, int status, json_t *j)
{
    struct moe_buf b;
    moe_buf_init(&b, 0);
    if (j == NULL || json_dump_callback(j, buf_sink, &b, JSON_COMPACT) != 0 || b.data == NULL)
        moed_conn_send_error(c, 500, "server_error", NULL, "out of memory building the response");
    else
        moed_conn_send(c, status, "application/json", b.data, b.len, NULL);
    moe_buf_free(&b);
    json_decref(j);
}

/* The request body as JSON; NULL after answering 400 when it is not. */
static json_t *load_body(struct moed_conn *c, const struct moed_http_request *rq)
{
    json_error_t jerr;
    const long failed0 = moe_alloc_failed();
    json_t *root = json_loadb(rq->body, rq->body_len, JSON_REJECT_DUPLICATES, &jerr);
    /* jansson reports some allocation failures as syntax errors (a string
     * it could not store): an allocation that failed meanwhile is the cause */
    if (root == NULL && (json_error_code(&jerr) == json_error_out_of_memory ||
                         moe_alloc_failed() != failed0))
        moed_conn_send_error(c, 500, "server_error", NULL, "out of memory reading the request body");
    else if (root == NULL)
        moed_conn_send_error(c, 400, "invalid_request_error", NULL, "invalid JSON at line %d"
                             " column %d: %s", jerr.line, jerr.column, jerr.text);
    return root;
}

/* ---- generation: answers ----------------------------------------------- */

static const char *finish_name(enum moed_finish f)
{
    return f == MOED_STOP ? "stop" : f == MOED_LENGTH ? "length" : NULL;
}

/* A chat answer that ended with tool calls says so. */
static const char *chat_finish_name(const struct moed_req *r, enum moed_finish f)
{
    return f == MOED_STOP && r->n_calls > 0 ? "tool_calls" : finish_name(f);
}

/* OpenAI's usage, with prompt_tokens_details.cached_tokens: the prompt
 * tokens served from the KV pool's prefix cache (not prefilled). */
static json_t *usage_obj(const struct moed_req *r)
{
    return json_pack("{s:i, s:i, s:i, s:{s:i}}", "prompt_tokens", r->n_prompt, "completion_tokens",
                     r->n_gen, "total_tokens", r->n_prompt + r->n_gen, "prompt_tokens_details",
                     "cached_tokens", r->cached_tokens);
}

static json_t *piece_json(struct moed_engine *e, int32_t id, json_t **bytes_out)
{
    char buf[512];
    size_t len = 0;
    int rc = moe_token_to_piece(moed_engine_tokenizer(e), id, buf, sizeof(buf), 0, false, &len);
    if (rc != 0 || len > sizeof(buf))
        len = 0;
    if (bytes_out) {
        *bytes_out = json_array();
        for (size_t i = 0; i < len; i++)
            json_array_append_new(*bytes_out, json_integer((unsigned char)buf[i]));
    }
    return json_bytes(buf, len);
}

/* Logprobs of tokens [from, to) in chat's shape. */
static json_t *chat_logprobs_json(struct moed_engine *e, const struct moed_req *r, int from, int to)
{
    json_t *content = json_array();
    for (int i = from; i < to; i++) {
        const struct moed_logprob *lp = &r->lps[i];
        json_t *bytes, *top = json_array();
        json_t *tokj = piece_json(e, lp->id, &bytes);
        for (int k = 0; k < lp->n_top; k++) {
            json_t *tb;
            json_t *tt = piece_json(e, lp->top_id[k], &tb);
            json_array_append_new(top, json_pack("{s:o, s:f, s:o}", "token", tt, "logprob",
                                                 (double)lp->top_lp[k], "bytes", tb));
        }
        json_array_append_new(content, json_pack("{s:o, s:f, s:o, s:o}", "token", tokj,
                                                 "logprob", (double)lp->lp, "bytes", bytes,
                                                 "top_logprobs", top));
    }
    return json_pack("{s:o}", "content", content);
}

/* Logprobs of tokens [from, to) in OpenAI's shape for the endpoint. */
static json_t *logprobs_json(struct moed_api *a, const struct moed_req *r, int from, int to,
                             size_t text_offset)
{
    struct moed_engine *e = a->eng;
    if (r->logprobs < 0)
        return json_null();
    if (r->chat)
        return chat_logprobs_json(e, r, from, to);
    json_t *toks = json_array(), *tlp = json_array(), *top = json_array(), *off = json_array();
    size_t o = text_offset;
    for (int i = from; i < to; i++) {
        const struct moed_logprob *lp = &r->lps[i];
        json_t *t = piece_json(e, lp->id, NULL);
        json_array_append_new(off, json_integer((json_int_t)o));
        o += t ? json_string_length(t) : 0;
        json_array_append_new(toks, t);
        json_array_append_new(tlp, json_real(lp->lp));
        json_t *alt = json_object();
        for (int k = 0; k < lp->n_top; k++) {
            json_t *at = piece_json(e, lp->top_id[k], NULL);
            if (at)
                json_object_set_new(alt, json_string_value(at), json_real(lp->top_lp[k]));
            json_decref(at);
        }
        json_array_append_new(top, alt);
    }
    return json_pack("{s:o, s:o, s:o, s:o}", "tokens", toks, "token_logprobs", tlp, "top_logprobs",
                     top, "text_offset", off);
}

static json_t *base_obj(struct moed_api *a, const struct moed_req *r, const char *object)
{
    char id[64];
    snprintf(id, sizeof(id), "%s-%s%" PRIx64, r->chat ? "chatcmpl" : "cmpl", a->boot, r->id);
    return json_pack("{s:s, s:s, s:I, s:s}", "id", id, "object", object, "created",
                     (json_int_t)time(NULL), "model", a->model_id);
}

/* One server-sent event, "data: JSON\n\n", as one chunk. */
static void send_sse(struct moed_conn *c, json_t *obj)
{
    struct moe_buf ev;
    moe_buf_init(&ev, 0);
    if (obj && moe_buf_puts(&ev, "data: ") == 0 &&
        json_dump_callback(obj, buf_sink, &ev, JSON_COMPACT) == 0 &&
        moe_buf_puts(&ev, "\n\n") == 0)
        moed_conn_chunk(c, ev.data, ev.len);
    json_decref(obj);
    moe_buf_free(&ev);
}

static void log_request(const struct moed_req *r, const char *how)
{
    const double now = moed_now();
    LOG_I("req=%" PRIu64 " %s tokens_in=%d cached=%d tokens_out=%d ttft_ms=%.1f total_ms=%.1f"
          " finish=%s expert_hits=%" PRIu64 " expert_misses=%" PRIu64, r->id,
          r->chat ? "chat" : "completion", r->n_prompt, r->cached_tokens, r->n_gen,
          r->t_first > 0 ? (r->t_first - r->t_submit) * 1e3 : 0.0, (now - r->t_submit) * 1e3, how,
          r->hits, r->misses);
}

/* Text bytes from `from` on, generated so far ("" when there are none). */
static const char *text_at(const struct moed_req *r, size_t from)
{
    return r->text.data ? r->text.data + from : "";
}

/* A chat answer's text [0, upto) split into what is new of its reasoning,
 * content and tool calls (daemon/output.h); final: nothing held back. */
static int chat_split(struct moed_api *a, struct moed_req *r, size_t upto, bool final,
                      struct moe_buf *rs, struct moe_buf *cs, json_t *calls)
{
    if (r->out == NULL) {
        r->out = moe_malloc(sizeof(struct moed_out));
        if (r->out == NULL)
            return -ENOMEM;
        moed_out_init(r->out, r->split_reasoning, r->think_open, (enum moed_tool_fmt)r->tool_fmt,
                      strtoull(a->boot, NULL, 16) ^ r->id);
    }
    const int rc = moed_out_feed(r->out, r->text.data, upto, final, rs, cs, calls);
    r->n_calls += (int)json_array_size(calls);
    return rc;
}

/* The delta of a chat chunk: the text [from, to) as split; NULL when it
 * says nothing. */
static json_t *chat_delta(struct moed_api *a, struct moed_req *r, size_t to, bool final)
{
    struct moe_buf rs = { 0 }, cs = { 0 };
    json_t *calls = json_array();
    json_t *delta = json_object();
    if (calls && delta && chat_split(a, r, to, final, &rs, &cs, calls) == 0) {
        if (rs.len)
            json_object_set_new(delta, "reasoning_content", json_bytes(rs.data, rs.len));
        if (cs.len)
            json_object_set_new(delta, "content", json_bytes(cs.data, cs.len));
        if (json_array_size(calls))
            json_object_set(delta, "tool_calls", calls);
    }
    json_decref(calls);
    moe_buf_free(&rs);
    moe_buf_free(&cs);
    return delta;
}

/* ---- Anthropic's shape (/v1/messages) ------------------------------------ */

static void send_named_event(struct moed_conn *c, const char *type, json_t *obj)
{
    struct moe_buf ev;
    moe_buf_init(&ev, 0);
    if (obj && moe_buf_printf(&ev, "event: %s\ndata: ", type) == 0 &&
        json_dump_callback(obj, buf_sink, &ev, JSON_COMPACT) == 0 && moe_buf_puts(&ev, "\n\n") == 0)
        moed_conn_chunk(c, ev.data, ev.len);
    json_decref(obj);
    moe_buf_free(&ev);
}

static const char *anthropic_error_type(int status)
{
    return status == 400 ? "invalid_request_error" : status == 401 ? "authentication_error"
           : status == 404 ? "not_found_error" : status == 413 ? "request_too_large"
           : status == 503 ? "overloaded_error" : "api_error";
}

static void anthropic_error(struct moed_conn *c, int status, const char *msg)
{
    json_t *j = json_pack("{s:s, s:{s:s, s:s}}", "type", "error", "error", "type",
                          anthropic_error_type(status), "message", msg);
    struct moe_buf b;
    moe_buf_init(&b, 0);
    if (j && json_dump_callback(j, buf_sink, &b, JSON_COMPACT) == 0 && b.data)
        moed_conn_send(c, status, "application/json", b.data, b.len,
                       status == 503 ? "Retry-After: 1\r\n" : NULL);
    else
        moed_conn_send(c, 500, "text/plain", "out of memory\n", 14, NULL);
    moe_buf_free(&b);
    json_decref(j);
}

/* Anthropic counts prompt tokens read from the prefix cache apart:
 * input_tokens + cache_read_input_tokens is the whole prompt. */
static json_t *anthropic_usage(const struct moed_req *r)
{
    return json_pack("{s:i, s:i, s:i, s:i}", "input_tokens", r->n_prompt - r->cached_tokens,
                     "cache_read_input_tokens", r->cached_tokens, "cache_creation_input_tokens", 0,
                     "output_tokens", r->n_gen);
}

static const char *anthropic_stop(const struct moed_req *r, enum moed_finish f)
{
    return f == MOED_LENGTH ? "max_tokens" : r->n_calls > 0 ? "tool_use"
           : r->stop_hit >= 0 ? "stop_sequence" : "end_turn";
}

static json_t *anthropic_tool_use(json_t *call)
{
    json_t *fn = json_object_get(call, "function");
    json_t *input = json_loads(json_string_value(json_object_get(fn, "arguments")), 0, NULL);
    return json_pack("{s:s, s:O, s:O, s:o}", "type", "tool_use", "id", json_object_get(call, "id"),
                     "name", json_object_get(fn, "name"), "input", input ? input : json_object());
}

static json_t *anthropic_message(struct moed_api *a, const struct moed_req *r, json_t *content)
{
    char id[64];
    snprintf(id, sizeof(id), "msg_%s%" PRIx64, a->boot, r->id);
    return json_pack("{s:s, s:s, s:s, s:s, s:o, s:n, s:n, s:o}", "id", id, "type", "message", "role",
                     "assistant", "model", a->model_id, "content", content, "stop_reason",
                     "stop_sequence", "usage", anthropic_usage(r));
}

/* Closes the open block of an Anthropic stream, opens one of kind (1
 * thinking, 2 text) unless 0. */
static void anthropic_block(struct moed_conn *c, struct moed_req *r, int kind)
{
    if (r->a_block == kind)
        return;
    if (r->a_block)
        send_named_event(c, "content_block_stop", json_pack("{s:s, s:i}", "type",
                         "content_block_stop", "index", r->a_index++));
    r->a_block = kind;
    if (kind == 1)
        send_named_event(c, "content_block_start", json_pack("{s:s, s:i, s:{s:s, s:s, s:s}}", "type",
                         "content_block_start", "index", r->a_index, "content_block", "type",
                         "thinking", "thinking", "", "signature", ""));
    else if (kind == 2)
        send_named_event(c, "content_block_start", json_pack("{s:s, s:i, s:{s:s, s:s}}", "type",
                         "content_block_start", "index", r->a_index, "content_block", "type",
                         "text", "text", ""));
}

static void anthropic_delta(struct moed_conn *c, struct moed_req *r, int kind, json_t *text)
{
    anthropic_block(c, r, kind);
    send_named_event(c, "content_block_delta", json_pack("{s:s, s:i, s:{s:s, s:O}}", "type",
                     "content_block_delta", "index", r->a_index, "delta", "type",
                     kind == 1 ? "thinking_delta" : "text_delta", kind == 1 ? "thinking" : "text",
                     text));
}

/* One chat delta (reasoning_content, content, tool_calls) as Anthropic
 * events. */
static void anthropic_stream_delta(struct moed_conn *c, struct moed_req *r, json_t *delta)
{
    json_t *v;
    if ((v = json_object_get(delta, "reasoning_content")) && !r->thinking_off)
        anthropic_delta(c, r, 1, v);
    if ((v = json_object_get(delta, "content")) && json_string_length(v) > 0)
        anthropic_delta(c, r, 2, v);
    json_t *calls = json_object_get(delta, "tool_calls");
    for (size_t i = 0; i < json_array_size(calls); i++) {
        json_t *call = json_array_get(calls, i), *fn = json_object_get(call, "function");
        anthropic_block(c, r, 0);
        send_named_event(c, "content_block_start", json_pack("{s:s, s:i, s:{s:s, s:O, s:O, s:{}}}",
                         "type", "content_block_start", "index", r->a_index, "content_block",
                         "type", "tool_use", "id", json_object_get(call, "id"), "name",
                         json_object_get(fn, "name"), "input"));
        send_named_event(c, "content_block_delta", json_pack("{s:s, s:i, s:{s:s, s:O}}", "type",
                         "content_block_delta", "index", r->a_index, "delta", "type",
                         "input_json_delta", "partial_json", json_object_get(fn, "arguments")));
        send_named_event(c, "content_block_stop", json_pack("{s:s, s:i}", "type",
                         "content_block_stop", "index", r->a_index++));
    }
}

/* The request is in the engine already, which may be starting it (writing
 * cached_tokens, n_gen): the usage is read under its lock. */
static void anthropic_stream_start(struct moed_api *a, struct moed_conn *c, struct moed_req *r)
{
    pthread_mutex_lock(&r->mu);
    json_t *m = anthropic_message(a, r, json_array());
    pthread_mutex_unlock(&r->mu);
    send_named_event(c, "message_start", json_pack("{s:s, s:o}", "type", "message_start", "message", m));
}

static void anthropic_stream_end(struct moed_conn *c, struct moed_req *r, enum moed_finish fin)
{
    if (fin == MOED_STOP || fin == MOED_LENGTH) {
        anthropic_block(c, r, 0);
        json_t *d = json_pack("{s:s, s:{s:s, s:o}, s:{s:i}}", "type", "message_delta", "delta",
                              "stop_reason", anthropic_stop(r, fin), "stop_sequence",
                              r->stop_hit >= 0 && fin == MOED_STOP ? json_string(r->stop[r->stop_hit])
                                                                   : json_null(),
                              "usage", "output_tokens", r->n_gen);
        send_named_event(c, "message_delta", d);
        send_named_event(c, "message_stop", json_pack("{s:s}", "type", "message_stop"));
    } else {
        send_named_event(c, "error", json_pack("{s:s, s:{s:s, s:s}}", "type", "error", "error", "type",
                         "api_error", "message", fin == MOED_CANCELLED ? "request cancelled (moed is"
                         " shutting down)" : r->err));
    }
    moed_conn_end_stream(c);
}

static void anthropic_whole(struct moed_api *a, struct moed_conn *c, struct moed_req *r,
                            enum moed_finish fin)
{
    struct moe_buf rs = { 0 }, cs = { 0 };
    json_t *calls = json_array(), *content = json_array();
    if (calls && content && chat_split(a, r, r->text.len, true, &rs, &cs, calls) == 0) {
        if (rs.len && !r->thinking_off)
            json_array_append_new(content, json_pack("{s:s, s:o, s:s}", "type", "thinking",
                                  "thinking", json_bytes(rs.data, rs.len), "signature", ""));
        if (cs.len)
            json_array_append_new(content, json_pack("{s:s, s:o}", "type", "text", "text",
                                                     json_bytes(cs.data, cs.len)));
        for (size_t i = 0; i < json_array_size(calls); i++)
            json_array_append_new(content, anthropic_tool_use(json_array_get(calls, i)));
    }
    json_t *m = anthropic_message(a, r, content);
    json_object_set_new(m, "stop_reason", json_string(anthropic_stop(r, fin)));
    if (r->stop_hit >= 0 && fin == MOED_STOP)
        json_object_set_new(m, "stop_sequence", json_string(r->stop[r->stop_hit]));
    send_json(c, 200, m);
    json_decref(calls);
    moe_buf_free(&rs);
    moe_buf_free(&cs);
}

/* One SSE event: text delta and the logprobs of tokens [t0, t1). final:
 * the answer's last event (a chat answer's held-back text goes out). */
static void stream_event(struct moed_api *a, struct moed_conn *c, struct moed_req *r, size_t from,
                         size_t to, int t0, int t1, bool final)
{
    const bool lp = t1 > t0 && r->logprobs >= 0 && t1 <= r->n_lps;
    json_t *ch;
    if (r->anthropic) {
        json_t *delta = chat_delta(a, r, to, final);
        anthropic_stream_delta(c, r, delta);
        json_decref(delta);
        return;
    }
    if (r->chat) {
        json_t *delta = chat_delta(a, r, to, final);
        if (delta == NULL || (json_object_size(delta) == 0 && !lp)) {
            json_decref(delta);
            return;
        }
        /* OpenAI names the role in the first chunk only */
        if (!r->sent_role) {
            json_object_set_new(delta, "role", json_string("assistant"));
            r->sent_role = true;
        }
        ch = json_pack("{s:i, s:o, s:o, s:n}", "index", 0, "delta", delta, "logprobs",
                       lp ? logprobs_json(a, r, t0, t1, from) : json_null(), "finish_reason");
    } else {
        ch = json_pack("{s:i, s:o, s:o, s:n}", "index", 0, "text", json_bytes(text_at(r, from),
                       to - from), "logprobs", lp ? logprobs_json(a, r, t0, t1, from) : json_null(),
                       "finish_reason");
    }
    json_t *o = base_obj(a, r, r->chat ? "chat.completion.chunk" : "text_completion");
    json_object_set_new(o, "choices", json_pack("[o]", ch));
    send_sse(c, o);
}

/* The events of a stream that are ready: one per token (text that could
 * begin a stop string waits), and the rest of the text once it finished.
 * The engine may grow (move) text, lps and tok_end while it runs: read
 * them under the lock. After it finishes it writes nothing. */
static enum moed_finish stream_ready(struct moed_api *a, struct moed_conn *c, struct moed_req *r)
{
    pthread_mutex_lock(&r->mu);
    const enum moed_finish fin = r->finish;
    if (r->stream) {
        while (r->sent_tok < r->n_tok && r->tok_end[r->sent_tok] <= r->ready) {
            const size_t end = r->tok_end[r->sent_tok];
            if (end > r->sent || r->logprobs >= 0)
                stream_event(a, c, r, r->sent, end > r->sent ? end : r->sent, r->sent_tok,
                             r->sent_tok + 1, false);
            if (end > r->sent)
                r->sent = end;
            r->sent_tok++;
        }
        if (fin != MOED_RUNNING && (r->ready > r->sent || r->chat)) {
            stream_event(a, c, r, r->sent, r->ready, 0, 0, true);
            r->sent = r->ready;
        }
    }
    pthread_mutex_unlock(&r->mu);
    return fin;
}

/* The end of a stream: finish_reason and usage (or OpenAI's error object),
 * then [DONE]. */
static void stream_end(struct moed_api *a, struct moed_conn *c, struct moed_req *r,
                       enum moed_finish fin)
{
    const bool chat = r->chat;
    if (fin == MOED_STOP || fin == MOED_LENGTH) {
        json_t *o = base_obj(a, r, chat ? "chat.completion.chunk" : "text_completion");
        json_t *ch = chat ? json_pack("{s:i, s:{}, s:n, s:s}", "index", 0, "delta", "logprobs",
                                      "finish_reason", chat_finish_name(r, fin))
                          : json_pack("{s:i, s:s, s:n, s:s}", "index", 0, "text", "", "logprobs",
                                      "finish_reason", finish_name(fin));
        json_object_set_new(o, "choices", json_pack("[o]", ch));
        if (chat && !r->sent_role) {   /* nothing was generated: the role still comes once */
            json_object_set_new(json_object_get(ch, "delta"), "role", json_string("assistant"));
            r->sent_role = true;
        }
        send_sse(c, o);
        if (r->include_usage) {
            /* stream_options.include_usage: one more chunk, no choices */
            o = base_obj(a, r, chat ? "chat.completion.chunk" : "text_completion");
            json_object_set_new(o, "choices", json_array());
            json_object_set_new(o, "usage", usage_obj(r));
            send_sse(c, o);
        }
    } else {
        json_t *o = json_pack("{s:{s:s, s:s, s:n, s:n}}", "error", "message",
                              fin == MOED_CANCELLED ? "request cancelled (moed is shutting"
                              " down)" : r->err, "type", "server_error", "param", "code");
        send_sse(c, o);
    }
    moed_conn_chunk(c, "data: [DONE]\n\n", 14);
    moed_conn_end_stream(c);
}

/* A whole chat answer's message: content (null when the answer is only
 * tool calls), reasoning_content and tool_calls when there are some. */
static json_t *chat_message(struct moed_api *a, struct moed_req *r)
{
    struct moe_buf rs = { 0 }, cs = { 0 };
    json_t *calls = json_array();
    json_t *msg = json_pack("{s:s}", "role", "assistant");
    if (msg && calls && chat_split(a, r, r->text.len, true, &rs, &cs, calls) == 0) {
        json_object_set_new(msg, "content", cs.len || json_array_size(calls) == 0
                                                ? json_bytes(cs.data ? cs.data : "", cs.len)
                                                : json_null());
        if (rs.len)
            json_object_set_new(msg, "reasoning_content", json_bytes(rs.data, rs.len));
        if (json_array_size(calls))
            json_object_set(msg, "tool_calls", calls);
    }
    json_decref(calls);
    moe_buf_free(&rs);
    moe_buf_free(&cs);
    return msg;
}

/* The whole answer of a request that did not stream. */
static void answer_whole(struct moed_api *a, struct moed_conn *c, struct moed_req *r,
                         enum moed_finish fin)
{
    const bool chat = r->chat;
    if (fin == MOED_CANCELLED || fin == MOED_ERROR) {
        char msg[400];
        snprintf(msg, sizeof(msg), fin == MOED_CANCELLED ? "request cancelled (moed is shutting"
                 " down)" : "generation failed: %s", r->err);
        if (r->anthropic)
            anthropic_error(c, fin == MOED_CANCELLED ? 503 : 500, msg);
        else
            moed_conn_send_error(c, fin == MOED_CANCELLED ? 503 : 500, "server_error", NULL, "%s", msg);
        return;
    }
    if (r->anthropic) {
        anthropic_whole(a, c, r, fin);
        return;
    }
    const int n_lps = r->n_lps;
    json_t *o = base_obj(a, r, chat ? "chat.completion" : "text_completion");
    json_t *ch;
    if (chat) {
        json_t *msg = chat_message(a, r);
        ch = json_pack("{s:i, s:o, s:o, s:s}", "index", 0, "message", msg, "logprobs",
                       logprobs_json(a, r, 0, n_lps, 0), "finish_reason", chat_finish_name(r, fin));
    } else {
        ch = json_pack("{s:i, s:o, s:o, s:s}", "index", 0, "text",
                       json_bytes(text_at(r, 0), r->text.len), "logprobs",
                       logprobs_json(a, r, 0, n_lps, 0), "finish_reason", finish_name(fin));
    }
    json_object_set_new(o, "choices", json_pack("[o]", ch));
    json_object_set_new(o, "usage", usage_obj(r));
    send_json(c, 200, o);
}

/* The answer on c is complete: its request (if any) is released. */
static void answer_done(struct moed_conn *c)
{
    struct moed_req *r = moed_conn_data(c);
    if (r) {
        r->conn = NULL;
        moed_conn_set_data(c, NULL);
        moed_req_unref(r);
    }
    moed_conn_done(c);
}

/* Engine output for the request of c. */
static void on_engine(struct moed_api *a, struct moed_conn *c, struct moed_req *r)
{
    const enum moed_finish fin = stream_ready(a, c, r);
    if (fin == MOED_RUNNING)
        return;
    if (r->stream && r->anthropic)
        anthropic_stream_end(c, r, fin);
    else if (r->stream)
        stream_end(a, c, r, fin);
    else
        answer_whole(a, c, r, fin);
    log_request(r, fin == MOED_STOP ? "stop" : fin == MOED_LENGTH ? "length"
                   : fin == MOED_CANCELLED ? "cancelled" : "error");
    answer_done(c);
}

/* ---- generation: requests ---------------------------------------------- */

/* Checks and submits a generation request; false when it was answered at
 * once (an error), true when the engine has it. */
/* A 4xx/5xx in the shape of the request's API. */
static void gen_error(struct moed_conn *c, bool anthropic, int status, const char *param,
                      const char *msg)
{
    if (anthropic)
        anthropic_error(c, status, msg);
    else
        moed_conn_send_error(c, status, status < 500 ? "invalid_request_error" : "server_error",
                             param, "%s", msg);
}

static bool submit_generate(struct moed_api *a, struct moed_conn *c, json_t *root, bool chat,
                            bool anthropic)
{
    const struct moed_config *cfg = moed_server_config(a->srv);
    struct moed_req *r = moed_req_new();
    if (r == NULL) {
        gen_error(c, anthropic, 500, NULL, "out of memory");
        return false;
    }
    r->id = ++a->next_req_id;
    r->chat = chat;
    r->anthropic = anthropic;
    struct moed_parse_error pe;
    if (!moed_parse_generate(a->eng, cfg, root, chat, r, &pe)) {
        gen_error(c, anthropic, pe.status, pe.param, pe.msg);
        moed_req_unref(r);
        return false;
    }
    r->t_submit = moed_now();
    if (cfg->request_timeout_s > 0)
        r->deadline = r->t_submit + cfg->request_timeout_s;
    r->conn = c;
    int rc = moed_engine_submit(a->eng, r);
    if (rc) {
        char msg[128];
        snprintf(msg, sizeof(msg), rc == -EBUSY ? "queue full (%d waiting, queue_size); retry later"
                 : "moed is shutting down", cfg->queue_size);
        gen_error(c, anthropic, 503, NULL, msg);
        moed_req_unref(r);
        return false;
    }
    moed_conn_set_data(c, r);   /* the reference from moed_req_new */
    if (r->stream)
        moed_conn_start_stream(c);
    if (r->stream && anthropic)
        anthropic_stream_start(a, c, r);
    return true;
}

static bool generate(struct moed_api *a, struct moed_conn *c, const struct moed_http_request *rq,
                     bool chat)
{
    json_t *root = load_body(c, rq);
    if (root == NULL)
        return true;
    bool pending = false;
    if (!json_is_object(root))
        moed_conn_send_error(c, 400, "invalid_request_error", NULL, "%s",
                             "request body must be a JSON object");
    else
        pending = submit_generate(a, c, root, chat, false);
    json_decref(root);
    return !pending;
}

/* POST /v1/messages: the Anthropic request translated into chat. */
static bool route_messages(struct moed_api *a, struct moed_conn *c, const struct moed_http_request *rq)
{
    json_error_t jerr;
    json_t *root = json_loadb(rq->body, rq->body_len, JSON_REJECT_DUPLICATES, &jerr);
    if (root == NULL) {
        char msg[300];
        snprintf(msg, sizeof(msg), "invalid JSON at line %d column %d: %s", jerr.line, jerr.column,
                 jerr.text);
        anthropic_error(c, 400, msg);
        return true;
    }
    char msg[512];
    const char *param = NULL;
    json_t *chat = moed_anthropic_to_chat(root, msg, sizeof(msg), &param);
    bool pending = false;
    if (chat == NULL) {
        anthropic_error(c, 400, msg);
    } else {
        pending = submit_generate(a, c, chat, true, true);
        json_t *th = json_object_get(json_object_get(root, "thinking"), "type");
        struct moed_req *r = pending ? moed_conn_data(c) : NULL;
        if (r && json_is_string(th) && strcmp(json_string_value(th), "disabled") == 0)
            r->thinking_off = true;
    }
    json_decref(chat);
    json_decref(root);
    return !pending;
}

static bool route_completions(struct moed_api *a, struct moed_conn *c,
                              const struct moed_http_request *rq)
{
    return generate(a, c, rq, false);
}

static bool route_chat(struct moed_api *a, struct moed_conn *c, const struct moed_http_request *rq)
{
    return generate(a, c, rq, true);
}

/* ---- other endpoints ------------------------------------------------- */

static bool route_health(struct moed_api *a, struct moed_conn *c, const struct moed_http_request *rq)
{
    (void)a;
    (void)rq;
    send_json(c, 200, json_pack("{s:s}", "status", "ok"));
    return true;
}

static bool route_models(struct moed_api *a, struct moed_conn *c, const struct moed_http_request *rq)
{
    (void)rq;
    const struct moe_model_cfg *mc = moe_model_cfg(moed_engine_model(a->eng));
    send_json(c, 200, json_pack("{s:s, s:[{s:s, s:s, s:I, s:s, s:s, s:i, s:i}]}", "object", "list",
                                "data", "id", a->model_id, "object", "model", "created",
                                (json_int_t)time(NULL), "owned_by", "moed", "architecture",
                                mc->arch_name, "context_length", moed_engine_n_ctx(a->eng),
                                "n_vocab", mc->n_vocab));
    return true;
}

static void tokenize_answer(struct moed_api *a, struct moed_conn *c, json_t *root)
{
    json_t *content = json_object_get(root, "content");
    if (!json_is_string(content)) {
        moed_conn_send_error(c, 400, "invalid_request_error", "content", "'content' must be a string");
        return;
    }
    bool add_special = false, parse_special = false;
    struct moed_parse_error pe;
    if (!moed_get_bool(root, "add_special", &add_special, &pe) ||
        !moed_get_bool(root, "parse_special", &parse_special, &pe)) {
        moed_conn_send_error(c, 400, "invalid_request_error", pe.param, "%s", pe.msg);
        return;
    }
    const struct moe_tokenizer *tok = moed_engine_tokenizer(a->eng);
    size_t need = 0;
    int32_t *ids = NULL;
    const char *t = json_string_value(content);
    size_t tl = json_string_length(content);
    int rc = moe_tokenize(tok, t, tl, add_special, parse_special, NULL, 0, &need);
    if (rc == 0 || rc == -ENOSPC) {
        ids = moe_malloc((need ? need : 1) * sizeof(int32_t));
        rc = ids ? moe_tokenize(tok, t, tl, add_special, parse_special, ids, need, &need) : -ENOMEM;
    }
    if (rc == -ENOMEM) {
        moed_conn_send_error(c, 500, "server_error", NULL, "out of memory tokenizing 'content'");
    } else if (rc) {
        moed_conn_send_error(c, 400, "invalid_request_error", "content", "cannot tokenize: %s",
                             moe_strerror(rc));
    } else {
        json_t *arr = json_array();
        for (size_t i = 0; i < need; i++)
            json_array_append_new(arr, json_integer(ids[i]));
        send_json(c, 200, json_pack("{s:o}", "tokens", arr));
    }
    moe_free(ids);
}

static bool route_tokenize(struct moed_api *a, struct moed_conn *c, const struct moed_http_request *rq)
{
    json_t *root = load_body(c, rq);
    if (root) {
        tokenize_answer(a, c, root);
        json_decref(root);
    }
    return true;
}

/* 'tokens' as ids into *ids (moe_malloc); false after answering. */
static bool token_ids(struct moed_api *a, struct moed_conn *c, json_t *toks, int32_t **ids)
{
    const int V = moed_engine_n_vocab(a->eng);
    const size_t n = json_array_size(toks);
    *ids = moe_malloc((n ? n : 1) * sizeof(int32_t));
    if (*ids == NULL) {
        moed_conn_send_error(c, 500, "server_error", NULL, "out of memory");
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *t = json_array_get(toks, i);
        if (!json_is_integer(t) || json_integer_value(t) < 0 || json_integer_value(t) >= V) {
            moed_conn_send_error(c, 400, "invalid_request_error", "tokens", "'tokens'[%zu]: expected"
                                 " a token id 0..%d", i, V - 1);
            return false;
        }
        (*ids)[i] = (int32_t)json_integer_value(t);
    }
    return true;
}

static void detokenize_answer(struct moed_api *a, struct moed_conn *c, json_t *root)
{
    json_t *toks = json_object_get(root, "tokens");
    if (!json_is_array(toks)) {
        moed_conn_send_error(c, 400, "invalid_request_error", "tokens", "'tokens' must be an array"
                             " of token ids");
        return;
    }
    int32_t *ids = NULL;
    if (token_ids(a, c, toks, &ids)) {
        const size_t n = json_array_size(toks);
        const struct moe_tokenizer *tok = moed_engine_tokenizer(a->eng);
        size_t need = 0;
        char *txt = NULL;
        int rc = moe_detokenize(tok, ids, n, NULL, 0, false, false, &need);
        if (rc == 0 || rc == -ENOSPC) {
            txt = moe_malloc(need + 1);
            rc = txt ? moe_detokenize(tok, ids, n, txt, need, false, false, &need) : -ENOMEM;
        }
        if (rc == -ENOMEM)
            moed_conn_send_error(c, 500, "server_error", NULL, "out of memory detokenizing");
        else if (rc)
            moed_conn_send_error(c, 400, "invalid_request_error", "tokens", "cannot detokenize: %s",
                                 moe_strerror(rc));
        else
            send_json(c, 200, json_pack("{s:o}", "content", json_bytes(txt, need)));
        moe_free(txt);
    }
    moe_free(ids);
}

static bool route_detokenize(struct moed_api *a, struct moed_conn *c,
                             const struct moed_http_request *rq)
{
    json_t *root = load_body(c, rq);
    if (root) {
        detokenize_answer(a, c, root);
        json_decref(root);
    }
    return true;
}

/* ---- stats and metrics ----------------------------------------------- */

/* One reading of every counter, taken once per request so that /metrics
 * and /v1/moed/stats render the same numbers from the same structs. */
struct stats_snapshot {
    struct moed_server_stats srv;
    struct moed_engine_stats es;
    double tokens_per_s;
    bool cached;                  /* an expert cache exists (else experts are resident) */
    struct moe_cache_stats cs;
    int n_layers;
    const struct moe_cache_layer_stats *ls;
    int pinned;
};

static void stats_take(struct moed_api *a, struct stats_snapshot *st)
{
    static struct moe_cache_layer_stats ls[1024];   /* loop thread only */
    memset(st, 0, sizeof(*st));
    moed_server_stats(a->srv, &st->srv);
    moed_engine_stats(a->eng, &st->es);
    st->tokens_per_s = st->es.busy_s > 0 ? (double)st->es.tokens_out / st->es.busy_s : 0.0;
    struct moe_model *m = moed_engine_model(a->eng);
    st->cached = moe_model_cache_stats(m, &st->cs);
    if (st->cached) {
        const int nl = moe_model_cache_layer_stats(m, ls, 1024);
        st->n_layers = nl < 1024 ? nl : 1024;
        st->ls = ls;
        st->pinned = moe_model_cache_pinned(m);
    }
}

static json_t *cache_json(const struct stats_snapshot *st)
{
    const struct moe_cache_stats *cs = &st->cs;
    json_t *c = json_pack("{s:i, s:I, s:{s:I, s:I}, s:{s:I, s:I}, s:I, s:I, s:f,"
                          " s:{s:I, s:I, s:I, s:I, s:I}}",
                          "slots", cs->n_slots, "slot_bytes", (json_int_t)cs->slot_bytes,
                          "device", "hits", (json_int_t)cs->hits, "misses", (json_int_t)cs->misses,
                          "host", "hits", (json_int_t)cs->host_hits,
                          "misses", (json_int_t)(cs->misses - cs->host_hits),
                          "bytes_loaded", (json_int_t)cs->bytes_loaded,
                          "evictions", (json_int_t)cs->evictions, "stall_s", cs->stall_s,
                          "prefetch", "issued", (json_int_t)cs->prefetch_issued,
                          "used", (json_int_t)cs->prefetch_used,
                          "wasted", (json_int_t)cs->prefetch_wasted,
                          "cancelled", (json_int_t)cs->prefetch_cancelled,
                          "dropped", (json_int_t)cs->prefetch_dropped);
    json_t *layers = json_array();
    for (int l = 0; l < st->n_layers; l++)
        json_array_append_new(layers, json_pack("{s:I, s:I, s:I, s:f}",
                                                "hits", (json_int_t)st->ls[l].hits,
                                                "misses", (json_int_t)st->ls[l].misses,
                                                "bytes_loaded", (json_int_t)st->ls[l].bytes_loaded,
                                                "stall_s", st->ls[l].stall_s));
    json_object_set_new(c, "layers", layers);
    json_object_set_new(c, "pinned", json_integer(st->pinned));
    /* loads and why they failed (RELIABILITY.md rows 4, 5) */
    json_object_set_new(c, "loads", json_pack("{s:I, s:I, s:I, s:I, s:I, s:I}",
                                              "ok", (json_int_t)cs->loads_ok,
                                              "failed", (json_int_t)cs->loads_failed,
                                              "checksum_errors", (json_int_t)cs->checksum_errors,
                                              "format_errors", (json_int_t)cs->format_errors,
                                              "io_errors", (json_int_t)cs->io_errors,
                                              "read_retries", (json_int_t)cs->read_retries));
    /* the hybrid lanes (doc/cache.md): misses by where they were computed */
    json_object_set_new(c, "lanes", json_pack("{s:{s:I, s:I, s:f}, s:{s:I, s:I, s:f}, s:{s:I, s:I},"
                                              " s:{s:I, s:I, s:I}}",
                                              "cpu", "experts", (json_int_t)cs->lane_cpu,
                                              "bytes", (json_int_t)cs->lane_cpu_bytes,
                                              "seconds", cs->lane_cpu_s,
                                              "copy", "experts", (json_int_t)cs->lane_copy,
                                              "bytes", (json_int_t)cs->lane_copy_bytes,
                                              "wait_seconds", cs->lane_copy_wait_s,
                                              "both", "experts", (json_int_t)cs->lane_both,
                                              "bytes", (json_int_t)cs->lane_both_bytes,
                                              "governor_steps", "auto", (json_int_t)cs->lane_steps_auto,
                                              "copy", (json_int_t)cs->lane_steps_copy,
                                              "cpu", (json_int_t)cs->lane_steps_cpu));
    return c;
}

/* The paged KV pool and its prefix cache: hit rate = prompt tokens served
 * from cached blocks / prompt tokens of the requests that looked. */
static double prefix_hit_rate(const struct moe_kv_stats *kv)
{
    return kv->prompt_tokens ? (double)kv->cached_tokens / (double)kv->prompt_tokens : 0.0;
}

static json_t *kv_json(const struct moed_engine_stats *es)
{
    const struct moe_kv_stats *kv = &es->kv;
    return json_pack("{s:i, s:i, s:i, s:i, s:i, s:i, s:I, s:I, s:I, s:I, s:I, s:f}",
                     "blocks", kv->n_blocks, "block_tokens", kv->block_tokens, "used", kv->used,
                     "cached", kv->cached, "free", kv->free, "reserved", kv->reserved,
                     "evictions", (json_int_t)kv->evictions, "lookups", (json_int_t)kv->lookups,
                     "prefix_hits", (json_int_t)kv->hits, "prompt_tokens", (json_int_t)kv->prompt_tokens,
                     "cached_tokens", (json_int_t)kv->cached_tokens,
                     "prefix_hit_rate", prefix_hit_rate(kv));
}

/* /v1/moed/stats */
static json_t *stats_json(struct moed_api *a)
{
    struct stats_snapshot st;
    stats_take(a, &st);
    const struct moed_engine_stats *es = &st.es;
    json_t *o = json_pack("{s:s, s:f, s:{s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I},"
                          " s:{s:I, s:I, s:f, s:I, s:i, s:i, s:i, s:f}}",
                          "model", a->model_id, "uptime_s", st.srv.uptime_s,
                          "http", "requests", (json_int_t)st.srv.http_requests,
                          "1xx", (json_int_t)st.srv.http_by_class[1],
                          "2xx", (json_int_t)st.srv.http_by_class[2],
                          "3xx", (json_int_t)st.srv.http_by_class[3],
                          "4xx", (json_int_t)st.srv.http_by_class[4],
                          "5xx", (json_int_t)st.srv.http_by_class[5],
                          "completed", (json_int_t)es->requests_done,
                          "cancelled", (json_int_t)es->requests_cancelled,
                          "failed", (json_int_t)es->requests_failed,
                          "rejected", (json_int_t)es->requests_rejected,
                          "engine", "tokens_in", (json_int_t)es->tokens_in,
                          "tokens_out", (json_int_t)es->tokens_out,
                          "busy_s", es->busy_s, "steps", (json_int_t)es->steps,
                          "queue_depth", es->queue_depth, "running", es->running,
                          "max_seqs", moed_server_config(a->srv)->max_seqs,
                          "tokens_per_s", st.tokens_per_s);
    if (o)
        json_object_set_new(o, "expert_cache", st.cached ? cache_json(&st) : json_null());
    if (o)
        json_object_set_new(o, "kv_cache", kv_json(es));
    return o;
}

/* Prometheus text (exposition format 0.0.4), appended with a sticky error
 * so that the writer checks once at the end. */
struct prom {
    struct moe_buf b;
    int rc;
};

static void prom_printf(struct prom *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void prom_printf(struct prom *p, const char *fmt, ...)
{
    if (p->rc)
        return;
    va_list ap;
    va_start(ap, fmt);
    p->rc = moe_buf_vprintf(&p->b, fmt, ap);
    va_end(ap);
}

static void prom_family(struct prom *p, const char *name, const char *type, const char *help)
{
    prom_printf(p, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* The per-layer families: one row per metric, read from moe_cache_layer_stats. */
static const struct {
    const char *name, *help;
    size_t off;
    bool seconds;                 /* a double in seconds, else a uint64_t count */
} layer_metrics[] = {
    { "moed_expert_layer_hits_total", "Device-tier expert hits per layer.",
      offsetof(struct moe_cache_layer_stats, hits), false },
    { "moed_expert_layer_misses_total", "Device-tier expert misses per layer.",
      offsetof(struct moe_cache_layer_stats, misses), false },
    { "moed_expert_layer_bytes_loaded_total", "Expert bytes loaded per layer.",
      offsetof(struct moe_cache_layer_stats, bytes_loaded), false },
    { "moed_expert_layer_stall_seconds_total", "Engine time waiting for a layer's experts.",
      offsetof(struct moe_cache_layer_stats, stall_s), true },
};

static void prom_cache(struct prom *p, const struct stats_snapshot *st)
{
    const struct moe_cache_stats *cs = &st->cs;
    prom_family(p, "moed_expert_cache_hits_total", "counter", "Expert lookups served by a tier.");
    prom_printf(p, "moed_expert_cache_hits_total{tier=\"device\"} %llu\n"
                "moed_expert_cache_hits_total{tier=\"host\"} %llu\n",
                (unsigned long long)cs->hits, (unsigned long long)cs->host_hits);
    prom_family(p, "moed_expert_cache_misses_total", "counter",
                "Expert lookups a tier did not hold.");
    prom_printf(p, "moed_expert_cache_misses_total{tier=\"device\"} %llu\n"
                "moed_expert_cache_misses_total{tier=\"host\"} %llu\n",
                (unsigned long long)cs->misses, (unsigned long long)(cs->misses - cs->host_hits));
    prom_family(p, "moed_expert_bytes_loaded_total", "counter",
                "Expert bytes loaded into the cache.");
    prom_printf(p, "moed_expert_bytes_loaded_total %llu\n", (unsigned long long)cs->bytes_loaded);
    prom_family(p, "moed_expert_stall_seconds_total", "counter",
                "Engine time spent waiting for expert loads.");
    prom_printf(p, "moed_expert_stall_seconds_total %.6f\n", cs->stall_s);
    prom_family(p, "moed_expert_prefetch_total", "counter", "Prefetches by outcome.");
    const struct { const char *outcome; uint64_t v; } pf[] = {
        { "issued", cs->prefetch_issued }, { "used", cs->prefetch_used },
        { "wasted", cs->prefetch_wasted }, { "cancelled", cs->prefetch_cancelled },
        { "dropped", cs->prefetch_dropped },
    };
    for (size_t k = 0; k < sizeof(pf) / sizeof(pf[0]); k++)
        prom_printf(p, "moed_expert_prefetch_total{outcome=\"%s\"} %llu\n", pf[k].outcome,
                    (unsigned long long)pf[k].v);
    prom_family(p, "moed_expert_loads_total", "counter", "Expert loads by outcome.");
    prom_printf(p, "moed_expert_loads_total{outcome=\"ok\"} %llu\n"
                "moed_expert_loads_total{outcome=\"failed\"} %llu\n",
                (unsigned long long)cs->loads_ok, (unsigned long long)cs->loads_failed);
    prom_family(p, "moed_expert_load_errors_total", "counter",
                "Failed expert loads by cause: checksum mismatch, malformed or truncated blob,"
                " read error.");
    prom_printf(p, "moed_expert_load_errors_total{kind=\"checksum\"} %llu\n"
                "moed_expert_load_errors_total{kind=\"format\"} %llu\n"
                "moed_expert_load_errors_total{kind=\"io\"} %llu\n",
                (unsigned long long)cs->checksum_errors, (unsigned long long)cs->format_errors,
                (unsigned long long)cs->io_errors);
    prom_family(p, "moed_expert_read_retries_total", "counter",
                "Expert reads requeued after a transient error or a short count (bounded).");
    prom_printf(p, "moed_expert_read_retries_total %llu\n", (unsigned long long)cs->read_retries);
    prom_family(p, "moed_expert_lane_experts_total", "counter",
                "Missed experts by lane: computed on the CPU, copied to the device, or both.");
    prom_family(p, "moed_expert_lane_bytes_total", "counter", "Expert bytes each lane read.");
    const struct { const char *lane; uint64_t n, b; } lanes[] = {
        { "cpu", cs->lane_cpu, cs->lane_cpu_bytes }, { "copy", cs->lane_copy, cs->lane_copy_bytes },
        { "both", cs->lane_both, cs->lane_both_bytes },
    };
    for (size_t k = 0; k < sizeof(lanes) / sizeof(lanes[0]); k++)
        prom_printf(p, "moed_expert_lane_experts_total{lane=\"%s\"} %llu\n", lanes[k].lane,
                    (unsigned long long)lanes[k].n);
    for (size_t k = 0; k < sizeof(lanes) / sizeof(lanes[0]); k++)
        prom_printf(p, "moed_expert_lane_bytes_total{lane=\"%s\"} %llu\n", lanes[k].lane,
                    (unsigned long long)lanes[k].b);
    prom_family(p, "moed_expert_lane_seconds_total", "counter",
                "Engine time per lane: computing the CPU lane, waiting for copied experts.");
    prom_printf(p, "moed_expert_lane_seconds_total{lane=\"cpu\"} %.6f\n"
                "moed_expert_lane_seconds_total{lane=\"copy\"} %.6f\n", cs->lane_cpu_s,
                cs->lane_copy_wait_s);
    prom_family(p, "moed_expert_lane_governor_steps_total", "counter",
                "miss_lane auto: decode steps its governor ran in each arm.");
    prom_printf(p, "moed_expert_lane_governor_steps_total{arm=\"auto\"} %llu\n"
                "moed_expert_lane_governor_steps_total{arm=\"copy\"} %llu\n"
                "moed_expert_lane_governor_steps_total{arm=\"cpu\"} %llu\n",
                (unsigned long long)cs->lane_steps_auto, (unsigned long long)cs->lane_steps_copy,
                (unsigned long long)cs->lane_steps_cpu);
    for (size_t k = 0; k < sizeof(layer_metrics) / sizeof(layer_metrics[0]); k++) {
        prom_family(p, layer_metrics[k].name, "counter", layer_metrics[k].help);
        for (int l = 0; l < st->n_layers; l++) {
            const char *field = (const char *)&st->ls[l] + layer_metrics[k].off;
            if (layer_metrics[k].seconds)
                prom_printf(p, "%s{layer=\"%d\"} %.6f\n", layer_metrics[k].name, l,
                            *(const double *)field);
            else
                prom_printf(p, "%s{layer=\"%d\"} %llu\n", layer_metrics[k].name, l,
                            (unsigned long long)*(const uint64_t *)field);
        }
    }
}

static int prom_write(struct prom *p, const struct stats_snapshot *st)
{
    const struct moed_engine_stats *es = &st->es;
    prom_family(p, "moed_http_responses_total", "counter", "HTTP responses by status class.");
    for (int k = 1; k <= 5; k++)
        prom_printf(p, "moed_http_responses_total{code=\"%dxx\"} %llu\n", k,
                    (unsigned long long)st->srv.http_by_class[k]);
    prom_family(p, "moed_requests_total", "counter", "Generation requests by outcome.");
    prom_printf(p, "moed_requests_total{outcome=\"completed\"} %llu\n"
                "moed_requests_total{outcome=\"cancelled\"} %llu\n"
                "moed_requests_total{outcome=\"failed\"} %llu\n"
                "moed_requests_total{outcome=\"rejected\"} %llu\n",
                (unsigned long long)es->requests_done, (unsigned long long)es->requests_cancelled,
                (unsigned long long)es->requests_failed, (unsigned long long)es->requests_rejected);
    prom_family(p, "moed_tokens_in_total", "counter", "Prompt tokens run.");
    prom_printf(p, "moed_tokens_in_total %llu\n", (unsigned long long)es->tokens_in);
    prom_family(p, "moed_prompt_tokens_cached_total", "counter",
                "Prompt tokens served from the KV pool's prefix cache (not run).");
    prom_printf(p, "moed_prompt_tokens_cached_total %llu\n", (unsigned long long)es->kv.cached_tokens);
    prom_family(p, "moed_prefix_lookups_total", "counter",
                "Requests that looked for a cached prompt prefix, and those that found one.");
    prom_printf(p, "moed_prefix_lookups_total{result=\"any\"} %llu\n"
                "moed_prefix_lookups_total{result=\"hit\"} %llu\n",
                (unsigned long long)es->kv.lookups, (unsigned long long)es->kv.hits);
    prom_family(p, "moed_prefix_hit_rate", "gauge",
                "Prompt tokens served from cached blocks / prompt tokens looked up.");
    prom_printf(p, "moed_prefix_hit_rate %.6f\n", prefix_hit_rate(&es->kv));
    prom_family(p, "moed_kv_blocks", "gauge", "KV pool blocks by state.");
    prom_printf(p, "moed_kv_blocks{state=\"used\"} %d\nmoed_kv_blocks{state=\"cached\"} %d\n"
                "moed_kv_blocks{state=\"free\"} %d\nmoed_kv_blocks{state=\"reserved\"} %d\n",
                es->kv.used, es->kv.cached, es->kv.free, es->kv.reserved);
    prom_family(p, "moed_kv_evictions_total", "counter", "Cached KV blocks reused for new contents.");
    prom_printf(p, "moed_kv_evictions_total %llu\n", (unsigned long long)es->kv.evictions);
    prom_family(p, "moed_tokens_out_total", "counter", "Tokens generated.");
    prom_printf(p, "moed_tokens_out_total %llu\n", (unsigned long long)es->tokens_out);
    prom_family(p, "moed_tokens_per_second", "gauge",
                "Generated tokens per second of engine busy time.");
    prom_printf(p, "moed_tokens_per_second %.3f\n", st->tokens_per_s);
    prom_family(p, "moed_engine_busy_seconds_total", "counter", "Time in forward passes.");
    prom_printf(p, "moed_engine_busy_seconds_total %.6f\n", es->busy_s);
    prom_family(p, "moed_queue_depth", "gauge", "Requests waiting for a sequence.");
    prom_printf(p, "moed_queue_depth %llu\n", (unsigned long long)es->queue_depth);
    prom_family(p, "moed_running_sequences", "gauge", "Sequences being decoded.");
    prom_printf(p, "moed_running_sequences %llu\n", (unsigned long long)es->running);
    if (st->cached)
        prom_cache(p, st);
    return p->rc;
}

static bool route_metrics(struct moed_api *a, struct moed_conn *c, const struct moed_http_request *rq)
{
    (void)rq;
    struct stats_snapshot st;
    stats_take(a, &st);
    struct prom p = { .rc = 0 };
    moe_buf_init(&p.b, 0);
    if (prom_write(&p, &st) != 0)
        moed_conn_send_error(c, 500, "server_error", NULL, "out of memory");
    else
        moed_conn_send(c, 200, "text/plain; version=0.0.4; charset=utf-8", p.b.data, p.b.len, NULL);
    moe_buf_free(&p.b);
    return true;
}

static bool route_stats(struct moed_api *a, struct moed_conn *c, const struct moed_http_request *rq)
{
    (void)rq;
    send_json(c, 200, stats_json(a));
    return true;
}

/* ---- routing --------------------------------------------------------- */

/* A route answers its request and returns true, or returns false when the
 * answer is still to come (a generation: the engine has it). */
typedef bool (*route_fn)(struct moed_api *a, struct moed_conn *c, const struct moed_http_request *rq);

/* Every endpoint, one row each (redis's command table): a path with
 * another method gets 405 with Allow, an unknown path 404. */
static const struct route {
    const char *method;
    const char *path;
    route_fn handler;
} routes[] = {
    { "POST", "/v1/completions", route_completions },
    { "POST", "/v1/chat/completions", route_chat },
    { "POST", "/v1/messages", route_messages },
    { "GET", "/v1/models", route_models },
    { "POST", "/tokenize", route_tokenize },
    { "POST", "/detokenize", route_detokenize },
    { "GET", "/health", route_health },
    { "GET", "/metrics", route_metrics },
    { "GET", "/v1/moed/stats", route_stats },
};

static void dispatch(void *ud, struct moed_conn *c, const struct moed_http_request *rq)
{
    struct moed_api *a = ud;
    const struct route *rt = NULL;
    for (size_t i = 0; i < sizeof(routes) / sizeof(routes[0]) && rt == NULL; i++)
        if (strcmp(routes[i].path, rq->path) == 0)
            rt = &routes[i];
    if (rt == NULL) {
        moed_conn_send_error(c, 404, "invalid_request_error", NULL, "no endpoint %.200s", rq->path);
    } else if (strcmp(rt->method, rq->method) != 0) {
        char allow[64];
        snprintf(allow, sizeof(allow), "Allow: %s\r\n", rt->method);
        char msg[512];
        snprintf(msg, sizeof(msg), "{\"error\":{\"message\":\"%s takes %s, not %s\",\"type\":"
                 "\"invalid_request_error\",\"param\":null,\"code\":null}}", rt->path, rt->method,
                 rq->method);
        moed_conn_send(c, 405, "application/json", msg, strlen(msg), allow);
    } else if (!rt->handler(a, c, rq)) {
        return;   /* answered later, from on_wake */
    }
    answer_done(c);
}

/* ---- the transport's events ------------------------------------------ */

/* Drains the engine's news: each request's connection gets what is new. */
static void on_wake(void *ud)
{
    struct moed_api *a = ud;
    struct moe_queue batch;
    moed_engine_take_notified(a->eng, &batch);
    for (struct moed_req *r; (r = moed_req_pop_notified(&batch)) != NULL;) {
        struct moed_conn *c = r->conn;
        if (c && moed_conn_data(c) == r)
            on_engine(a, c, r);
        moed_req_unref(r);
    }
    /* the device is gone for good: stop, and tell the supervisor */
    if (moed_engine_fatal(a->eng) && moed_server_shutdown(a->srv, "fatal backend error",
                                                          MOE_EGPU_FATAL))
        moed_engine_cancel_all(a->eng);
}

/* The client went away: the engine frees the sequence at its next step. */
static void abandon(void *ud, struct moed_conn *c)
{
    struct moed_api *a = ud;
    struct moed_req *r = moed_conn_data(c);
    if (r == NULL)
        return;
    moed_engine_cancel(a->eng, r);
    r->conn = NULL;
    LOG_I("req=%" PRIu64 " cancelled: client disconnected", r->id);
    moed_conn_set_data(c, NULL);
    moed_req_unref(r);
}

/* The client stopped reading its stream: the scheduler skips the request
 * while paused (its KV cache is kept). */
static void backpressure(void *ud, struct moed_conn *c, bool paused)
{
    struct moed_api *a = ud;
    struct moed_req *r = moed_conn_data(c);
    if (r == NULL)
        return;
    atomic_store(&r->paused, paused);
    if (!paused)
        moed_engine_kick(a->eng);
}

static void grace_over(void *ud)
{
    struct moed_api *a = ud;
    /* each request ends as cancelled at the engine's next step; the answers
     * (a final error event for streams) go out from on_wake */
    moed_engine_cancel_all(a->eng);
}

static void reloaded(void *ud, const struct moed_config *cfg)
{
    struct moed_api *a = ud;
    moed_engine_reconfigure(a->eng, cfg);
}

static void stopped(void *ud)
{
    struct moed_api *a = ud;
    moed_engine_stop(a->eng);   /* it may still wake the loop until then */
}

const struct moed_handlers moed_api_handlers = {
    .dispatch = dispatch,
    .on_wake = on_wake,
    .abandon = abandon,
    .backpressure = backpressure,
    .grace_over = grace_over,
    .reloaded = reloaded,
    .stopped = stopped,
};

struct moed_api *moed_api_new(struct moed_server *srv, struct moed_engine *eng)
{
    struct moed_api *a = moe_calloc(1, sizeof(*a));
    if (a == NULL)
        return NULL;
    a->srv = srv;
    a->eng = eng;
    const struct moed_config *cfg = moed_server_config(srv);
    const char *base = strrchr(cfg->model, '/');
    const char *id = cfg->model_name[0] ? cfg->model_name : base ? base + 1 : cfg->model;
    const size_t n = strlen(id) < sizeof(a->model_id) - 1 ? strlen(id) : sizeof(a->model_id) - 1;
    memcpy(a->model_id, id, n);   /* a longer name is cut, as it always was */
    a->model_id[n] = '\0';
    uint64_t nonce = 0;
    if (getrandom(&nonce, sizeof(nonce), 0) != (ssize_t)sizeof(nonce))
        nonce = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(moed_now() * 1e9);
    snprintf(a->boot, sizeof(a->boot), "%016" PRIx64, nonce);
    return a;
}

void moed_api_free(struct moed_api *a)
{
    moe_free(a);
}

const char *moed_api_model_id(const struct moed_api *a)
{
    return a->model_id;
}
