#include "daemon/request.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/alloc.h"
#include "common/buf.h"
#include "daemon/output.h"
#include "daemon/schema.h"
#include "daemon/tools.h"
#include "model/chat_jinja.h"
#include "model/tokenizer.h"

#define MAX_STOP_LEN 256
#define MAX_MESSAGES 4096

/* ---- request fields -------------------------------------------------- */

struct fields {
    struct moed_req *r;
    char err[512];
    const char *err_param;
    bool oom;                 /* the error is ours (out of memory): 500, not 400 */
};

static bool get_number(struct fields *f, json_t *root, const char *key, double lo, double hi,
                       double *out)
{
    json_t *v = json_object_get(root, key);
    if (v == NULL || json_is_null(v))
        return true;
    if (!json_is_number(v)) {
        snprintf(f->err, sizeof(f->err), "'%s' must be a number", key);
        f->err_param = key;
        return false;
    }
    double x = json_number_value(v);
    if (!(x >= lo && x <= hi)) {
        snprintf(f->err, sizeof(f->err), "'%s' is %g, expected %g..%g", key, x, lo, hi);
        f->err_param = key;
        return false;
    }
    *out = x;
    return true;
}

static bool get_int(struct fields *f, json_t *root, const char *key, long long lo, long long hi,
                    long long *out)
{
    json_t *v = json_object_get(root, key);
    if (v == NULL || json_is_null(v))
        return true;
    if (!json_is_integer(v)) {
        snprintf(f->err, sizeof(f->err), "'%s' must be an integer", key);
        f->err_param = key;
        return false;
    }
    long long x = json_integer_value(v);
    if (x < lo || x > hi) {
        snprintf(f->err, sizeof(f->err), "'%s' is %lld, expected %lld..%lld", key, x, lo, hi);
        f->err_param = key;
        return false;
    }
    *out = x;
    return true;
}

static bool get_bool(struct fields *f, json_t *root, const char *key, bool *out)
{
    json_t *v = json_object_get(root, key);
    if (v == NULL || json_is_null(v))
        return true;
    if (!json_is_boolean(v)) {
        snprintf(f->err, sizeof(f->err), "'%s' must be true or false", key);
        f->err_param = key;
        return false;
    }
    *out = json_is_true(v);
    return true;
}

static bool fail(struct fields *f, const char *param, const char *msg)
{
    snprintf(f->err, sizeof(f->err), "%s", msg);
    f->err_param = param;
    return false;
}

static bool failf(struct fields *f, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static bool failf(struct fields *f, const char *param, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(f->err, sizeof(f->err), fmt, ap);
    va_end(ap);
    f->err_param = param;
    return false;
}

/* An allocation failed: the request was fine, the server answers 500. */
static bool fail_oom(struct fields *f, const char *param)
{
    f->oom = true;
    return failf(f, param, "out of memory reading '%s'", param);
}

/* logit_bias: {"token id": bias, ...}, ids checked against the vocabulary
 * by the engine's sampler too. */
#define MAX_LOGIT_BIAS 1024
static bool parse_logit_bias(struct fields *f, json_t *root, int n_vocab)
{
    struct moed_req *r = f->r;
    json_t *lb = json_object_get(root, "logit_bias");
    if (lb == NULL || json_is_null(lb))
        return true;
    if (!json_is_object(lb))
        return fail(f, "logit_bias", "'logit_bias' must be an object mapping token ids to -100..100");
    const size_t n = json_object_size(lb);
    if (n > MAX_LOGIT_BIAS)
        return failf(f, "logit_bias", "'logit_bias' has %zu entries; at most %d", n, MAX_LOGIT_BIAS);
    if (n == 0)
        return true;
    r->bias_id = moe_calloc(n, sizeof(int32_t));
    r->bias = moe_calloc(n, sizeof(float));
    if (r->bias_id == NULL || r->bias == NULL)
        return fail_oom(f, "logit_bias");
    const char *key;
    json_t *v;
    int k = 0;
    json_object_foreach(lb, key, v) {
        char *end = NULL;
        errno = 0;
        const long id = strtol(key, &end, 10);
        if (key[0] < '0' || key[0] > '9' || *end != '\0' || errno || id >= n_vocab)
            return failf(f, "logit_bias", "'logit_bias': key '%.32s' is not a token id 0..%d", key,
                         n_vocab - 1);
        if (!json_is_number(v) || !(json_number_value(v) >= -100 && json_number_value(v) <= 100))
            return failf(f, "logit_bias", "'logit_bias'[\"%s\"] must be a number -100..100", key);
        r->bias_id[k] = (int32_t)id;
        r->bias[k] = (float)json_number_value(v);
        k++;
    }
    r->sp.n_bias = k;
    r->sp.bias_id = r->bias_id;
    r->sp.bias = r->bias;
    return true;
}

/* OpenAI's presence and frequency penalties, logit_bias, stream_options. */
static bool parse_openai_extras(struct fields *f, json_t *root, int n_vocab)
{
    struct moed_req *r = f->r;
    double x = 0;
    if (!get_number(f, root, "presence_penalty", -2, 2, &x))
        return false;
    r->sp.presence_penalty = (float)x;
    x = 0;
    if (!get_number(f, root, "frequency_penalty", -2, 2, &x))
        return false;
    r->sp.frequency_penalty = (float)x;
    if (!parse_logit_bias(f, root, n_vocab))
        return false;
    json_t *so = json_object_get(root, "stream_options");
    if (so == NULL || json_is_null(so))
        return true;
    if (!json_is_object(so))
        return fail(f, "stream_options", "'stream_options' must be an object");
    if (!r->stream)
        return fail(f, "stream_options", "'stream_options' is only allowed with \"stream\": true");
    const char *key;
    json_t *v;
    json_object_foreach(so, key, v) {
        if (strcmp(key, "include_usage") != 0)
            return failf(f, "stream_options", "'stream_options.%.64s' is not supported (only"
                         " include_usage)", key);
    }
    return get_bool(f, so, "include_usage", &r->include_usage);
}

/* response_format: text (nothing to do), json_object, or json_schema with
 * {name, schema, strict, description}: compiled into r->grammar. */
static bool parse_response_format(struct fields *f, json_t *root)
{
    json_t *rf = json_object_get(root, "response_format");
    if (rf == NULL || json_is_null(rf))
        return true;
    json_t *ty = json_object_get(rf, "type");
    if (!json_is_object(rf) || !json_is_string(ty))
        return fail(f, "response_format", "'response_format' must be an object with a 'type'");
    const char *t = json_string_value(ty);
    struct moe_diag d = { 0 };
    const char *k;
    json_t *v;
    json_object_foreach(rf, k, v) {
        if (strcmp(k, "type") != 0 && !(strcmp(t, "json_schema") == 0 && strcmp(k, "json_schema") == 0))
            return failf(f, "response_format", "'response_format.%.64s' is not a field of type"
                         " '%.32s'", k, t);
    }
    if (strcmp(t, "text") == 0)
        return true;
    if (strcmp(t, "json_object") == 0) {
        if (moed_json_object_grammar(&f->r->grammar, &d) != 0)
            return fail(f, "response_format", d.msg);
        return true;
    }
    if (strcmp(t, "json_schema") != 0)
        return failf(f, "response_format", "'response_format.type' '%.32s' is not text, json_object"
                     " or json_schema", t);
    json_t *js = json_object_get(rf, "json_schema");
    json_t *schema = json_object_get(js, "schema");
    if (!json_is_object(js) || !json_is_string(json_object_get(js, "name")))
        return fail(f, "response_format", "'response_format.json_schema' must be an object with a"
                    " 'name' and a 'schema'");
    json_object_foreach(js, k, v) {
        if (strcmp(k, "name") && strcmp(k, "schema") && strcmp(k, "strict") && strcmp(k, "description"))
            return failf(f, "response_format", "'response_format.json_schema.%.64s' is not a field"
                         " (name, schema, strict, description)", k);
    }
    if (schema == NULL)
        schema = json_true();   /* OpenAI: no schema means any JSON */
    else
        json_incref(schema);
    const int rc = moed_schema_grammar(schema, "response_format.json_schema.schema", &f->r->grammar, &d);
    json_decref(schema);
    return rc == 0 || fail(f, "response_format", d.msg);
}

/* Fields of the OpenAI APIs that moed does not implement, and the value each
 * may still take (the one that asks for nothing): anything else is a 400
 * naming the field, never silently ignored. */
struct unsupported {
    const char *key;
    const char *allowed;      /* JSON of the accepted no-op value, or NULL: none */
    const char *why;
};

static const struct unsupported unsupported_common[] = {
    { "echo", "false", "'echo' is not supported" },
    { "suffix", "null", "'suffix' (insertion) is not supported" },
    { "best_of", "1", "'best_of' above 1 is not supported" },
    { "tools", "null", "'tools': tool calls are made in chat (/v1/chat/completions)" },
    { "tool_choice", "\"none\"", "'tool_choice': tool calls are made in chat" },
    { "parallel_tool_calls", NULL, "'parallel_tool_calls': tool calls are made in chat" },
    { "functions", "null", "'functions' (deprecated): use 'tools'" },
    { "function_call", "\"none\"", "'function_call' (deprecated): use 'tools' and 'tool_choice'" },
    { "modalities", "[\"text\"]", "'modalities': only [\"text\"] is supported" },
    { "audio", "null", "'audio' output is not supported" },
    { "prediction", "null", "'prediction' (predicted outputs) is not supported" },
    { "store", "false", "'store': moed does not store completions" },
    { "web_search_options", "null", "'web_search_options' is not supported" },
    { "reasoning_effort", "null", "'reasoning_effort' is not supported" },
    { "service_tier", "\"auto\"", "'service_tier': moed has one tier (\"auto\")" },
};

/* Fields moed reads (or that only label a request, like user). */
static const char *const known_completion[] = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty",
    "seed", "n", "stream", "stream_options", "stop", "logprobs", "presence_penalty",
    "frequency_penalty", "logit_bias", "user", "response_format", NULL,
};
static const char *const known_chat[] = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "min_p", "repeat_penalty", "seed", "n", "stream", "stream_options", "stop", "logprobs",
    "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "user", "metadata",
    "response_format", "tools", "tool_choice", "parallel_tool_calls", "reasoning_format",
    "chat_template_kwargs", NULL,
};

static bool listed(const char *const *list, const char *key)
{
    for (; *list; list++)
        if (strcmp(*list, key) == 0)
            return true;
    return false;
}

/* An unsupported field is accepted only with its no-op value. */
static bool check_unsupported(struct fields *f, const struct unsupported *u, json_t *v)
{
    if (json_is_null(v) || u->allowed == NULL)
        return json_is_null(v) || fail(f, u->key, u->why);
    json_t *ok = json_loads(u->allowed, JSON_DECODE_ANY, NULL);
    const bool same = ok && json_equal(ok, v);
    json_decref(ok);
    return same || fail(f, u->key, u->why);
}

static bool check_fields(struct fields *f, json_t *root, bool chat)
{
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (listed(chat ? known_chat : known_completion, key))
            continue;
        const struct unsupported *u = NULL;
        for (size_t i = 0; i < sizeof(unsupported_common) / sizeof(unsupported_common[0]); i++)
            if (strcmp(unsupported_common[i].key, key) == 0)
                u = &unsupported_common[i];
        if (u) {
            if (!check_unsupported(f, u, v))
                return false;
            continue;
        }
        snprintf(f->err, sizeof(f->err), "unknown field '%.64s' for %s (doc/daemon.md lists the"
                 " fields moed reads)", key, chat ? "/v1/chat/completions" : "/v1/completions");
        f->err_param = key;   /* points into root, which outlives the error */
        return false;
    }
    return true;
}

/* Sampling and output fields shared by completions and chat. */
static bool parse_common(struct fields *f, json_t *root, bool chat, const struct moed_config *cfg,
                         int n_ctx)
{
    struct moed_req *r = f->r;
    moe_sampler_defaults(&r->sp);
    r->sp.temperature = 1.0f;     /* OpenAI's default */
    r->sp.top_k = 0;
    r->sp.top_p = 1.0f;
    r->sp.min_p = 0.0f;
    double x;
    long long n;
    bool b = false;
    x = r->sp.temperature;
    if (!get_number(f, root, "temperature", 0, 2, &x))
        return false;
    r->sp.temperature = (float)x;
    x = r->sp.top_p;
    if (!get_number(f, root, "top_p", 0, 1, &x))
        return false;
    r->sp.top_p = x <= 0 ? 1e-9f : (float)x;
    x = r->sp.min_p;
    if (!get_number(f, root, "min_p", 0, 1, &x))
        return false;
    r->sp.min_p = (float)x;
    n = r->sp.top_k;
    if (!get_int(f, root, "top_k", -1, 1 << 20, &n))
        return false;
    r->sp.top_k = n < 0 ? 0 : (int)n;
    x = r->sp.repeat_penalty;
    if (!get_number(f, root, "repeat_penalty", 0.01, 10, &x))
        return false;
    r->sp.repeat_penalty = (float)x;
    n = (long long)(time(NULL) ^ (long long)r->id * 0x9E3779B97F4A7C15ull);
    if (!get_int(f, root, "seed", INT64_MIN, INT64_MAX, &n))
        return false;
    r->sp.seed = (uint64_t)n;
    n = 1;
    if (!get_int(f, root, "n", 1, 1, &n))
        return fail(f, "n", "'n': only 1 choice per request is supported");
    r->max_tokens = cfg->max_tokens_default;
    n = r->max_tokens;
    if (!get_int(f, root, "max_tokens", 1, n_ctx, &n))
        return false;
    if (chat && !get_int(f, root, "max_completion_tokens", 1, n_ctx, &n))
        return false;
    r->max_tokens = (int)n;
    if (!get_bool(f, root, "stream", &b))
        return false;
    r->stream = b;
    json_t *st = json_object_get(root, "stop");
    if (st && !json_is_null(st)) {
        json_t *one = json_is_string(st) ? st : NULL;
        size_t cnt = one ? 1 : json_is_array(st) ? json_array_size(st) : (size_t)-1;
        if (cnt == (size_t)-1)
            return fail(f, "stop", "'stop' must be a string or an array of strings");
        if (cnt > MOED_MAX_STOP)
            return fail(f, "stop", "'stop': at most 8 strings");
        for (size_t i = 0; i < cnt; i++) {
            json_t *s = one ? one : json_array_get(st, i);
            if (!json_is_string(s))
                return fail(f, "stop", "'stop' must be a string or an array of strings");
            size_t len = json_string_length(s);
            if (len == 0 || len > MAX_STOP_LEN)
                return fail(f, "stop", "'stop': each string must be 1..256 bytes");
            if (memchr(json_string_value(s), '\0', len))
                return fail(f, "stop", "'stop': strings must not contain NUL");
            r->stop[r->n_stop] = moe_strndup(json_string_value(s), len);
            if (r->stop[r->n_stop] == NULL)
                return fail_oom(f, "stop");
            r->n_stop++;
        }
    }
    if (chat) {
        bool lp = false;
        if (!get_bool(f, root, "logprobs", &lp))
            return false;
        n = 0;
        if (!get_int(f, root, "top_logprobs", 0, 20, &n))
            return false;
        if (n > 0 && !lp)
            return fail(f, "top_logprobs", "'top_logprobs' needs 'logprobs': true");
        r->logprobs = lp ? (int)n : -1;
    } else {
        n = -1;
        json_t *v = json_object_get(root, "logprobs");
        if (v && json_is_boolean(v))
            return fail(f, "logprobs", "'logprobs' must be an integer 0..5 (completions)");
        if (!get_int(f, root, "logprobs", 0, 5, &n))
            return false;
        r->logprobs = (int)n;
    }
    struct moe_diag d = { 0 };
    if (moe_sampler_params_check(&r->sp, &d) != 0)
        return fail(f, NULL, d.msg);
    return true;
}

static bool tokenize_into(struct fields *f, const struct moe_tokenizer *tok, const char *text,
                          size_t len, bool parse_special, const char *param)
{
    struct moed_req *r = f->r;
    size_t need = 0;
    int rc = moe_tokenize(tok, text, len, true, parse_special, NULL, 0, &need);
    if (rc == 0 || rc == -ENOSPC) {
        r->prompt = moe_malloc((need ? need : 1) * sizeof(int32_t));
        rc = r->prompt ? moe_tokenize(tok, text, len, true, parse_special, r->prompt, need, &need)
                       : -ENOMEM;
    }
    if (rc == -ENOMEM)
        return fail_oom(f, param);
    if (rc) {
        snprintf(f->err, sizeof(f->err), "'%s': cannot tokenize: %s", param, moe_strerror(rc));
        f->err_param = param;
        return false;
    }
    r->n_prompt = (int)need;
    return true;
}

static bool parse_prompt(struct fields *f, json_t *root, struct moed_engine *e)
{
    json_t *p = json_object_get(root, "prompt");
    if (p == NULL)
        return fail(f, "prompt", "'prompt' is required");
    if (json_is_array(p) && json_array_size(p) == 1 && json_is_string(json_array_get(p, 0)))
        p = json_array_get(p, 0);
    if (json_is_string(p))
        return tokenize_into(f, moed_engine_tokenizer(e), json_string_value(p), json_string_length(p),
                             false, "prompt");
    if (!json_is_array(p) || json_array_size(p) == 0)
        return fail(f, "prompt", "'prompt' must be a string or a non-empty array of token ids");
    const size_t n = json_array_size(p);
    if (n > (size_t)moed_engine_n_ctx(e))
        return fail(f, "prompt", "'prompt' has more tokens than the context");
    f->r->prompt = moe_malloc(n * sizeof(int32_t));
    if (f->r->prompt == NULL)
        return fail_oom(f, "prompt");
    const int V = moed_engine_n_vocab(e);
    for (size_t i = 0; i < n; i++) {
        json_t *t = json_array_get(p, i);
        if (!json_is_integer(t) || json_integer_value(t) < 0 || json_integer_value(t) >= V) {
            snprintf(f->err, sizeof(f->err), "'prompt'[%zu]: expected a token id 0..%d (one prompt"
                     " per request)", i, V - 1);
            f->err_param = "prompt";
            return false;
        }
        f->r->prompt[i] = (int32_t)json_integer_value(t);
    }
    f->r->n_prompt = (int)n;
    return true;
}

/* The text parts of one message's content, concatenated into *owned. */
static bool text_parts(struct fields *f, size_t i, json_t *content, char **owned)
{
    struct moe_buf b;
    moe_buf_init(&b, 0);
    for (size_t k = 0; k < json_array_size(content); k++) {
        json_t *part = json_array_get(content, k);
        json_t *ty = json_object_get(part, "type"), *tx = json_object_get(part, "text");
        if (!json_is_string(ty) || strcmp(json_string_value(ty), "text") != 0 ||
            !json_is_string(tx)) {
            moe_buf_free(&b);
            return failf(f, "messages", "'messages'[%zu].content[%zu]: only {\"type\": \"text\","
                         " \"text\": ...} parts are supported", i, k);
        }
        if (moe_buf_append(&b, json_string_value(tx), json_string_length(tx)) != 0) {
            moe_buf_free(&b);
            return fail_oom(f, "messages");
        }
    }
    size_t len = 0;
    *owned = moe_buf_take(&b, &len);
    if (*owned == NULL)
        return fail_oom(f, "messages");
    if (strlen(*owned) != len)
        return failf(f, "messages", "'messages'[%zu].content contains NUL", i);
    return true;
}

/* Hermes (tools with the built-in chatml): an assistant turn's calls become
 * <tool_call> blocks after its text, a tool result a <tool_response> in a
 * user turn (Qwen2.5's layout). */
static bool hermes_message(struct fields *f, size_t i, json_t *m, struct moe_chat_msg *msg,
                           char **owned)
{
    json_t *calls = json_object_get(m, "tool_calls");
    char *text = NULL;
    if (strcmp(msg->role, "assistant") == 0 && json_array_size(calls) > 0) {
        char err[256] = "";
        text = moed_tools_hermes_calls(msg->content, calls, err, sizeof(err));
        if (text == NULL)
            return failf(f, "messages", "'messages'[%zu]: %s", i, err);
    } else if (strcmp(msg->role, "tool") == 0) {
        text = moed_tools_hermes_result(msg->content);
        msg->role = "user";
    } else {
        return true;
    }
    if (text == NULL)
        return fail_oom(f, "messages");
    moe_free(*owned);
    *owned = text;
    msg->content = text;
    return true;
}

/* One element of 'messages': its role and content into *msg (content either
 * borrowed from the JSON or built in *owned). */
static bool parse_message(struct fields *f, size_t i, json_t *m, struct moe_chat_msg *msg,
                          char **owned, bool hermes)
{
    json_t *role = json_object_get(m, "role"), *content = json_object_get(m, "content");
    if (!json_is_object(m) || !json_is_string(role))
        return failf(f, "messages", "'messages'[%zu]: expected an object with a string 'role'", i);
    const char *rv = json_string_value(role);
    if (strcmp(rv, "system") && strcmp(rv, "user") && strcmp(rv, "assistant") &&
        strcmp(rv, "developer") && strcmp(rv, "tool"))
        return failf(f, "messages", "'messages'[%zu].role: '%.32s' is not system, user,"
                     " assistant, developer or tool", i, rv);
    msg->role = strcmp(rv, "developer") == 0 ? "system" : rv;
    if (json_is_string(content)) {
        if (memchr(json_string_value(content), '\0', json_string_length(content)))
            return failf(f, "messages", "'messages'[%zu].content contains NUL", i);
        msg->content = json_string_value(content);
    } else if (content == NULL || json_is_null(content)) {
        msg->content = "";
    } else if (json_is_array(content)) {
        if (!text_parts(f, i, content, owned))
            return false;
        msg->content = *owned;
    } else {
        return failf(f, "messages", "'messages'[%zu].content must be a string or an array of text"
                     " parts", i);
    }
    if (hermes)
        return hermes_message(f, i, m, msg, owned);
    if (json_array_size(json_object_get(m, "tool_calls")) > 0)
        return failf(f, "messages", "'messages'[%zu].tool_calls: this model's chat template cannot"
                     " render tool calls (use a template with a tool format: doc/daemon.md)", i);
    return true;
}

/* tools + chatml: the tool section joins the system turn (one is made first
 * when there is none). msgs has room for one more at the front. */
static bool hermes_system(struct fields *f, const struct moed_tools *t, struct moe_chat_msg *msgs,
                          char **owned, size_t *n)
{
    if (*n == 0 || strcmp(msgs[0].role, "system") != 0) {
        memmove(msgs + 1, msgs, *n * sizeof(*msgs));
        memmove(owned + 1, owned, *n * sizeof(*owned));
        msgs[0] = (struct moe_chat_msg){ "system", "" };
        owned[0] = NULL;
        (*n)++;
    }
    char *text = moed_tools_hermes_system(t, msgs[0].content);
    if (text == NULL)
        return fail_oom(f, "tools");
    moe_free(owned[0]);
    owned[0] = text;
    msgs[0].content = text;
    return true;
}

/* The rendered prompt ends inside an opened <think> (Qwen3, DeepSeek-R1). */
static bool ends_in_think(const char *text, size_t len)
{
    while (len > 0 && (text[len - 1] == '\n' || text[len - 1] == ' '))
        len--;
    return len >= 7 && memcmp(text + len - 7, "<think>", 7) == 0;
}

/* tools, tool_choice, reasoning_format: how the answer is rendered, forced
 * and split. */
static bool parse_chat_modes(struct fields *f, json_t *root, enum moed_tool_fmt fmt,
                             struct moed_tools *t)
{
    struct moed_req *r = f->r;
    const char *param = NULL;
    if (!moed_tools_parse(root, t, f->err, sizeof(f->err), &param)) {
        f->err_param = param;
        return false;
    }
    json_t *rfmt = json_object_get(root, "reasoning_format");
    r->split_reasoning = true;
    if (rfmt && !json_is_null(rfmt)) {
        const char *v = json_is_string(rfmt) ? json_string_value(rfmt) : "";
        if (strcmp(v, "none") && strcmp(v, "auto") && strcmp(v, "deepseek"))
            return fail(f, "reasoning_format", "'reasoning_format' must be \"none\" (reasoning"
                        " stays in the content), \"auto\" or \"deepseek\" (reasoning_content)");
        r->split_reasoning = strcmp(v, "none") != 0;
    }
    if (t->tools == NULL || t->choice == MOED_TC_NONE) {
        t->tools = NULL;
        return true;
    }
    if (fmt == MOED_TOOLS_NONE)
        return fail(f, "tools", "'tools': this model's chat template has no tool format moed can"
                    " render and parse (the model's own Jinja template with <tool_call> or MiniMax"
                    " tags, or the built-in chatml, Hermes style: doc/daemon.md)");
    r->tool_fmt = fmt;
    if (t->choice >= MOED_TC_REQUIRED && fmt != MOED_TOOLS_TAG)
        return fail(f, "tool_choice", "'tool_choice' that forces a call needs a template whose calls"
                    " are <tool_call> blocks");
    if (t->choice >= MOED_TC_REQUIRED) {
        if (r->grammar)
            return fail(f, "tool_choice", "'tool_choice' that forces a call cannot be combined with"
                        " 'response_format'");
        struct moe_diag d = { 0 };
        if (moed_tools_grammar(t, &r->grammar, &d) != 0)
            return fail(f, "tools", d.msg);
    }
    return true;
}

/* One message for the model's own template: checked for shape only (the
 * template reads what it knows); developer is passed as system. */
static bool check_jinja_message(struct fields *f, size_t i, json_t *m)
{
    json_t *role = json_object_get(m, "role"), *content = json_object_get(m, "content");
    if (!json_is_object(m) || !json_is_string(role))
        return failf(f, "messages", "'messages'[%zu]: expected an object with a string 'role'", i);
    if (content && !json_is_string(content) && !json_is_null(content) && !json_is_array(content))
        return failf(f, "messages", "'messages'[%zu].content must be a string, null or an array of"
                     " parts", i);
    json_t *calls = json_object_get(m, "tool_calls");
    if (calls && !json_is_array(calls) && !json_is_null(calls))
        return failf(f, "messages", "'messages'[%zu].tool_calls must be an array", i);
    if (strcmp(json_string_value(role), "developer") == 0)
        json_object_set_new(m, "role", json_string("system"));
    return true;
}

/* The rendered text less a leading BOS the tokenizer adds itself (as
 * llama.cpp does: templates that write bos_token would double it). */
static size_t bos_skip(const struct moe_tokenizer *tok, const char *text, size_t len)
{
    size_t bl = 0;
    const char *bos = moe_tokenizer_add_bos(tok) && moe_tokenizer_bos(tok) >= 0
                      ? moe_tokenizer_token_text(tok, moe_tokenizer_bos(tok), &bl) : NULL;
    return bos && bl > 0 && bl <= len && memcmp(text, bos, bl) == 0 ? bl : 0;
}

static bool jinja_failed(struct fields *f, const struct moe_jinja_err *err)
{
    if (err->kind == MOE_JINJA_RAISE)
        return failf(f, "messages", "the model's chat template refused the conversation: %s", err->msg);
    if (err->line)
        return failf(f, "messages", "the model's chat template failed (line %d): %s", err->line, err->msg);
    return failf(f, "messages", "the model's chat template failed: %s", err->msg);
}

/* Renders with the model's own Jinja template: the messages as sent, the
 * tools, chat_template_kwargs as extra variables. */
static bool render_jinja(struct fields *f, json_t *root, const struct moe_chat_jinja *cj,
                         const struct moed_tools *tools, char **text, size_t *len)
{
    json_t *ms = json_deep_copy(json_object_get(root, "messages"));
    json_t *kw = json_object_get(root, "chat_template_kwargs");
    char *msgs = NULL, *tl = NULL, *extra = NULL;
    bool ok = ms != NULL || fail(f, "messages", "out of memory");
    for (size_t i = 0; ok && i < json_array_size(ms); i++)
        ok = check_jinja_message(f, i, json_array_get(ms, i));
    if (ok && kw && !json_is_null(kw) && !json_is_object(kw))
        ok = fail(f, "chat_template_kwargs", "'chat_template_kwargs' must be an object");
    if (ok) {
        msgs = json_dumps(ms, JSON_COMPACT);
        tl = tools->tools ? json_dumps(tools->tools, JSON_COMPACT) : NULL;
        extra = json_is_object(kw) ? json_dumps(kw, JSON_COMPACT) : NULL;
        if (msgs == NULL || (tools->tools && tl == NULL) || (json_is_object(kw) && extra == NULL))
            ok = fail(f, "messages", "out of memory");
    }
    struct moe_jinja_err err;
    if (ok && moe_chat_jinja_apply(cj, msgs, tl, true, extra, text, len, &err) != 0)
        ok = jinja_failed(f, &err);
    json_free_t jfree;
    json_malloc_t jmalloc;
    json_get_alloc_funcs(&jmalloc, &jfree);   /* json_dumps's memory: moe_malloc's in moed, malloc's in tests */
    jfree(msgs);
    jfree(tl);
    jfree(extra);
    json_decref(ms);
    return ok;
}

static bool parse_messages_jinja(struct fields *f, json_t *root, struct moed_engine *e,
                                 const struct moe_chat_jinja *cj, const char *src)
{
    struct moed_tools tools;
    if (!parse_chat_modes(f, root, moed_tool_fmt_of_template(src), &tools))
        return false;
    char *text = NULL;
    size_t len = 0;
    bool ok = render_jinja(f, root, cj, &tools, &text, &len);
    if (ok) {
        const struct moe_tokenizer *tok = moed_engine_tokenizer(e);
        size_t skip = bos_skip(tok, text, len);
        f->r->think_open = ends_in_think(text, len);
        ok = tokenize_into(f, tok, text + skip, len - skip, true, "messages");
    }
    moe_free(text);
    return ok;
}

static bool parse_messages(struct fields *f, json_t *root, struct moed_engine *e)
{
    json_t *ms = json_object_get(root, "messages");
    if (!json_is_array(ms) || json_array_size(ms) == 0)
        return fail(f, "messages", "'messages' must be a non-empty array");
    const size_t n = json_array_size(ms);
    if (n > MAX_MESSAGES)
        return fail(f, "messages", "'messages': too many messages");
    const char *src = NULL;
    const struct moe_chat_jinja *cj = moed_engine_chat_jinja(e, &src);
    if (cj != NULL)
        return parse_messages_jinja(f, root, e, cj, src);
    enum moe_chat_template tpl;
    const char *eos = NULL;
    if (!moed_engine_chat_template(e, &tpl, &eos))
        return fail(f, "messages", "this model has no chat template moed knows: start moed with"
                    " --chat-template NAME (config key chat_template), or use /v1/completions");
    json_t *kw = json_object_get(root, "chat_template_kwargs");
    if (json_object_size(kw) > 0)
        return fail(f, "chat_template_kwargs", "'chat_template_kwargs': the chat template in use is a"
                    " built-in renderer, not Jinja; it takes no variables");
    struct moed_tools tools;
    if (!parse_chat_modes(f, root, tpl == MOE_CHAT_TMPL_CHATML ? MOED_TOOLS_TAG : MOED_TOOLS_NONE, &tools))
        return false;
    const bool hermes = tools.tools != NULL;
    struct moe_chat_msg *msgs = moe_calloc(n + 1, sizeof(*msgs));
    char **owned = moe_calloc(n + 1, sizeof(char *));
    bool ok = msgs && owned;
    if (!ok)
        fail_oom(f, "messages");
    for (size_t i = 0; ok && i < n; i++)
        ok = parse_message(f, i, json_array_get(ms, i), &msgs[i], &owned[i], hermes);
    size_t nm = n;
    if (ok && hermes)
        ok = hermes_system(f, &tools, msgs, owned, &nm);
    char *text = NULL;
    size_t len = 0;
    if (ok) {
        struct moe_diag d = { 0 };
        const int arc = moe_chat_template_apply(tpl, msgs, nm, true, eos, &text, &len, &d);
        if (arc == -ENOMEM)
            ok = fail_oom(f, "messages");
        else if (arc != 0)
            ok = fail(f, "messages", d.msg);
    }
    if (ok) {
        f->r->think_open = ends_in_think(text, len);
        ok = tokenize_into(f, moed_engine_tokenizer(e), text, len, true, "messages");
    }
    moe_free(text);
    for (size_t i = 0; owned && i < n + 1; i++)
        moe_free(owned[i]);
    moe_free(owned);
    moe_free(msgs);
    return ok;
}

bool moed_get_bool(json_t *root, const char *key, bool *out, struct moed_parse_error *pe)
{
    struct fields f = { 0 };
    if (get_bool(&f, root, key, out))
        return true;
    snprintf(pe->msg, sizeof(pe->msg), "%s", f.err);
    pe->param = f.err_param;
    pe->status = 400;
    return false;
}

bool moed_parse_generate(struct moed_engine *e, const struct moed_config *cfg, json_t *root,
                         bool chat, struct moed_req *r, struct moed_parse_error *pe)
{
    pe->status = 400;   /* unless an allocation fails (500) */
    struct fields f = { .r = r };
    const int n_ctx = moed_engine_n_ctx(e);
    bool ok = json_is_object(root) || fail(&f, NULL, "request body must be a JSON object");
    ok = ok && check_fields(&f, root, chat) && parse_common(&f, root, chat, cfg, n_ctx) &&
         parse_openai_extras(&f, root, moed_engine_n_vocab(e)) && parse_response_format(&f, root) &&
         (chat ? parse_messages(&f, root, e) : parse_prompt(&f, root, e));
    if (ok && r->n_prompt == 0)
        ok = fail(&f, chat ? "messages" : "prompt", "the prompt gives no tokens");
    if (ok && r->n_prompt >= n_ctx) {
        snprintf(f.err, sizeof(f.err), "the prompt is %d tokens; the context is %d (ctx_size)",
                 r->n_prompt, n_ctx);
        f.err_param = chat ? "messages" : "prompt";
        ok = false;
    }
    if (!ok) {
        snprintf(pe->msg, sizeof(pe->msg), "%s", f.err);
        pe->param = f.err_param;
        pe->status = f.oom ? 500 : 400;
        return false;
    }
    if (r->max_tokens > n_ctx - r->n_prompt)
        r->max_tokens = n_ctx - r->n_prompt;
    /* the KV pool (kv_size) may hold less than a context: a request whose
     * prompt and max_tokens need more blocks than it has can never run */
    int n_blocks = 0, bt = 1;
    moed_engine_kv_geometry(e, &n_blocks, &bt);
    const int need = (r->n_prompt + r->max_tokens + bt - 1) / bt;
    if (need > n_blocks) {
        snprintf(pe->msg, sizeof(pe->msg), "the prompt (%d tokens) and max_tokens %d need %d KV"
                 " blocks of %d tokens; the KV pool holds %d blocks (%d tokens, kv_size): lower"
                 " max_tokens or shorten the prompt", r->n_prompt, r->max_tokens, need, bt, n_blocks,
                 n_blocks * bt);
        pe->param = r->n_prompt > n_blocks * bt - 1 ? (chat ? "messages" : "prompt") : "max_tokens";
        return false;
    }
    return true;
}
