#include "daemon/anthropic.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct tr {
    char *msg;
    size_t cap;
    const char **param;
};

static json_t *fail(struct tr *t, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static json_t *fail(struct tr *t, const char *param, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->msg, t->cap, fmt, ap);
    va_end(ap);
    *t->param = param;
    return NULL;
}

/* system: a string or an array of text blocks. */
static bool add_system(struct tr *t, json_t *sys, json_t *out)
{
    if (sys == NULL || json_is_null(sys))
        return true;
    json_t *text = NULL;
    if (json_is_string(sys)) {
        text = json_incref(sys);
    } else if (json_is_array(sys)) {
        size_t n = 0;
        for (size_t i = 0; i < json_array_size(sys); i++) {
            json_t *b = json_array_get(sys, i);
            if (!json_is_string(json_object_get(b, "text"))) {
                fail(t, "system", "'system'[%zu] must be a text block {\"type\": \"text\","
                     " \"text\": ...}", i);
                return false;
            }
            n += json_string_length(json_object_get(b, "text")) + 1;
        }
        char *buf = calloc(1, n + 1);
        for (size_t i = 0; buf && i < json_array_size(sys); i++) {
            if (i)
                strcat(buf, "\n");
            strcat(buf, json_string_value(json_object_get(json_array_get(sys, i), "text")));
        }
        text = buf ? json_string(buf) : NULL;
        free(buf);
    } else {
        fail(t, "system", "'system' must be a string or an array of text blocks");
        return false;
    }
    return text && json_array_append_new(out, json_pack("{s:s, s:o}", "role", "system", "content",
                                                        text)) == 0;
}

/* A tool_result's content: a string or text blocks. */
static json_t *result_text(struct tr *t, json_t *c, size_t mi, size_t bi)
{
    if (c == NULL || json_is_null(c))
        return json_string("");
    if (json_is_string(c))
        return json_incref(c);
    if (!json_is_array(c))
        return fail(t, "messages", "'messages'[%zu].content[%zu].content must be a string or text"
                    " blocks", mi, bi);
    json_t *s = json_string("");
    for (size_t i = 0; s && i < json_array_size(c); i++) {
        json_t *tx = json_object_get(json_array_get(c, i), "text");
        if (!json_is_string(tx)) {
            json_decref(s);
            return fail(t, "messages", "'messages'[%zu].content[%zu].content[%zu]: only text blocks"
                        " are supported", mi, bi, i);
        }
        char *joined = NULL;
        if (asprintf(&joined, "%s%s", json_string_value(s), json_string_value(tx)) < 0)
            joined = NULL;
        json_decref(s);
        s = joined ? json_string(joined) : NULL;
        free(joined);
    }
    return s;
}

/* One message's blocks: text joins the turn's content, tool_use becomes a
 * tool call, tool_result a tool turn (before the user's text), thinking is
 * dropped (moed does not sign thinking). */
static bool add_blocks(struct tr *t, size_t mi, const char *role, json_t *blocks, json_t *out)
{
    json_t *calls = json_array(), *text = json_string("");
    bool ok = calls && text;
    for (size_t i = 0; ok && i < json_array_size(blocks); i++) {
        json_t *b = json_array_get(blocks, i);
        const char *ty = json_string_value(json_object_get(b, "type"));
        if (ty && strcmp(ty, "text") == 0 && json_is_string(json_object_get(b, "text"))) {
            char *joined = NULL;
            ok = asprintf(&joined, "%s%s", json_string_value(text),
                          json_string_value(json_object_get(b, "text"))) >= 0;
            json_decref(text);
            text = ok ? json_string(joined) : NULL;
            free(joined);
            ok = text != NULL;
        } else if (ty && strcmp(ty, "tool_use") == 0 && strcmp(role, "assistant") == 0) {
            json_t *id = json_object_get(b, "id"), *name = json_object_get(b, "name");
            json_t *input = json_object_get(b, "input");
            char *args = json_is_object(input) ? json_dumps(input, JSON_COMPACT) : NULL;
            if (!json_is_string(id) || !json_is_string(name) || args == NULL) {
                free(args);
                fail(t, "messages", "'messages'[%zu].content[%zu]: a tool_use block needs id, name"
                     " and an input object", mi, i);
                ok = false;
                break;
            }
            json_array_append_new(calls, json_pack("{s:O, s:s, s:{s:O, s:s}}", "id", id, "type",
                                                   "function", "function", "name", name,
                                                   "arguments", args));
            free(args);
        } else if (ty && strcmp(ty, "tool_result") == 0 && strcmp(role, "user") == 0) {
            json_t *id = json_object_get(b, "tool_use_id");
            json_t *c = result_text(t, json_object_get(b, "content"), mi, i);
            if (!json_is_string(id) || c == NULL) {
                json_decref(c);
                if (c != NULL || !json_is_string(id))
                    fail(t, "messages", "'messages'[%zu].content[%zu]: a tool_result block needs"
                         " tool_use_id", mi, i);
                ok = false;
                break;
            }
            json_array_append_new(out, json_pack("{s:s, s:O, s:o}", "role", "tool", "tool_call_id",
                                                 id, "content", c));
        } else if (ty && (strcmp(ty, "thinking") == 0 || strcmp(ty, "redacted_thinking") == 0) &&
                   strcmp(role, "assistant") == 0) {
            continue;
        } else {
            fail(t, "messages", "'messages'[%zu].content[%zu]: block type '%.32s' is not supported"
                 " in a %s message (text, tool_use in assistant, tool_result in user)", mi, i,
                 ty ? ty : "(none)", role);
            ok = false;
        }
    }
    if (ok && (json_string_length(text) > 0 || json_array_size(calls) > 0 ||
               json_array_size(blocks) == 0)) {
        json_t *m = json_pack("{s:s, s:O}", "role", role, "content", text);
        if (json_array_size(calls) > 0)
            json_object_set(m, "tool_calls", calls);
        ok = m && json_array_append_new(out, m) == 0;
    }
    json_decref(calls);
    json_decref(text);
    return ok;
}

static bool add_messages(struct tr *t, json_t *msgs, json_t *out)
{
    if (!json_is_array(msgs) || json_array_size(msgs) == 0) {
        fail(t, "messages", "'messages' must be a non-empty array");
        return false;
    }
    for (size_t i = 0; i < json_array_size(msgs); i++) {
        json_t *m = json_array_get(msgs, i);
        const char *role = json_string_value(json_object_get(m, "role"));
        json_t *c = json_object_get(m, "content");
        if (role == NULL || (strcmp(role, "user") && strcmp(role, "assistant"))) {
            fail(t, "messages", "'messages'[%zu].role must be \"user\" or \"assistant\"", i);
            return false;
        }
        if (json_is_string(c)) {
            json_array_append_new(out, json_pack("{s:s, s:O}", "role", role, "content", c));
        } else if (json_is_array(c)) {
            if (!add_blocks(t, i, role, c, out))
                return false;
        } else {
            fail(t, "messages", "'messages'[%zu].content must be a string or an array of blocks", i);
            return false;
        }
    }
    return true;
}

/* tools: [{name, description, input_schema}] -> OpenAI function tools. */
static bool add_tools(struct tr *t, json_t *tools, json_t *tc, json_t *out)
{
    if (tools && !json_is_null(tools)) {
        if (!json_is_array(tools)) {
            fail(t, "tools", "'tools' must be an array");
            return false;
        }
        json_t *fns = json_array();
        for (size_t i = 0; i < json_array_size(tools); i++) {
            json_t *x = json_array_get(tools, i), *fn = json_object();
            json_t *name = json_object_get(x, "name"), *desc = json_object_get(x, "description");
            json_t *schema = json_object_get(x, "input_schema");
            const char *type = json_string_value(json_object_get(x, "type"));
            if (!json_is_string(name) || (type && strcmp(type, "custom") != 0)) {
                json_decref(fn);
                json_decref(fns);
                fail(t, "tools", "'tools'[%zu] must be a custom tool {\"name\", \"description\","
                     " \"input_schema\"} (server tools are not supported)", i);
                return false;
            }
            json_object_set(fn, "name", name);
            if (json_is_string(desc))
                json_object_set(fn, "description", desc);
            if (schema)
                json_object_set(fn, "parameters", schema);
            json_array_append_new(fns, json_pack("{s:s, s:o}", "type", "function", "function", fn));
        }
        json_object_set_new(out, "tools", fns);
    }
    if (tc == NULL || json_is_null(tc))
        return true;
    const char *ty = json_string_value(json_object_get(tc, "type"));
    json_t *dp = json_object_get(tc, "disable_parallel_tool_use");
    if (json_is_true(dp))
        json_object_set_new(out, "parallel_tool_calls", json_false());
    if (ty && strcmp(ty, "auto") == 0)
        return json_object_set_new(out, "tool_choice", json_string("auto")) == 0;
    if (ty && strcmp(ty, "none") == 0)
        return json_object_set_new(out, "tool_choice", json_string("none")) == 0;
    if (ty && strcmp(ty, "any") == 0)
        return json_object_set_new(out, "tool_choice", json_string("required")) == 0;
    if (ty && strcmp(ty, "tool") == 0 && json_is_string(json_object_get(tc, "name")))
        return json_object_set_new(out, "tool_choice",
                                   json_pack("{s:s, s:{s:O}}", "type", "function", "function",
                                             "name", json_object_get(tc, "name"))) == 0;
    fail(t, "tool_choice", "'tool_choice' must be {\"type\": \"auto\" | \"any\" | \"none\"} or"
         " {\"type\": \"tool\", \"name\": ...}");
    return false;
}

static const char *const copied[] = { "max_tokens", "temperature", "top_p", "top_k", "stream", NULL };

json_t *moed_anthropic_to_chat(json_t *body, char *msg, size_t cap, const char **param)
{
    struct tr t = { msg, cap, param };
    if (!json_is_object(body))
        return fail(&t, NULL, "request body must be a JSON object");
    const char *k;
    json_t *v;
    json_object_foreach(body, k, v) {
        bool known = strcmp(k, "model") == 0 || strcmp(k, "messages") == 0 ||
                     strcmp(k, "system") == 0 || strcmp(k, "stop_sequences") == 0 ||
                     strcmp(k, "tools") == 0 || strcmp(k, "tool_choice") == 0 ||
                     strcmp(k, "metadata") == 0 || strcmp(k, "thinking") == 0;
        for (int i = 0; copied[i]; i++)
            known |= strcmp(k, copied[i]) == 0;
        if (!known)
            return fail(&t, k, "unknown field '%.64s' for /v1/messages (doc/daemon.md lists the"
                        " fields moed reads)", k);
    }
    if (!json_is_integer(json_object_get(body, "max_tokens")))
        return fail(&t, "max_tokens", "'max_tokens' is required (an integer)");
    json_t *th = json_object_get(body, "thinking");
    const char *tht = json_string_value(json_object_get(th, "type"));
    if (th && !json_is_null(th) && (tht == NULL || (strcmp(tht, "enabled") && strcmp(tht, "disabled"))))
        return fail(&t, "thinking", "'thinking' must be {\"type\": \"enabled\", \"budget_tokens\": N}"
                    " or {\"type\": \"disabled\"}");
    json_t *out = json_object(), *msgs = json_array();
    if (out == NULL || msgs == NULL) {
        json_decref(out);
        json_decref(msgs);
        return fail(&t, NULL, "out of memory");
    }
    json_object_set_new(out, "messages", msgs);
    for (int i = 0; copied[i]; i++)
        if ((v = json_object_get(body, copied[i])))
            json_object_set(out, copied[i], v);
    if ((v = json_object_get(body, "stop_sequences")) && !json_is_null(v))
        json_object_set(out, "stop", v);
    if (!add_system(&t, json_object_get(body, "system"), msgs) ||
        !add_messages(&t, json_object_get(body, "messages"), msgs) ||
        !add_tools(&t, json_object_get(body, "tools"), json_object_get(body, "tool_choice"), out)) {
        json_decref(out);
        return NULL;
    }
    return out;
}
