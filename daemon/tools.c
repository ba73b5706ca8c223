#include "daemon/tools.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/alloc.h"
#include "common/buf.h"
#include "daemon/schema.h"

static bool fail(char *msg, size_t cap, const char **param, const char *p, const char *text)
{
    snprintf(msg, cap, "%s", text);
    *param = p;
    return false;
}

static bool good_name(const char *s)
{
    const size_t n = strlen(s);
    if (n == 0 || n > 64)
        return false;
    for (const char *c = s; *c; c++)
        if (!(isalnum((unsigned char)*c) || *c == '_' || *c == '-' || *c == '.'))
            return false;
    return true;
}

/* tools[i]: {"type": "function", "function": {"name", "description"?,
 * "parameters"?, "strict"?}} */
static bool check_tool(json_t *tool, size_t i, char *msg, size_t cap)
{
    json_t *fn = json_object_get(tool, "function");
    json_t *name = json_object_get(fn, "name"), *params = json_object_get(fn, "parameters");
    json_t *desc = json_object_get(fn, "description");
    if (!json_is_object(tool) || !json_is_string(json_object_get(tool, "type")) ||
        strcmp(json_string_value(json_object_get(tool, "type")), "function") != 0 ||
        !json_is_object(fn)) {
        snprintf(msg, cap, "'tools'[%zu] must be {\"type\": \"function\", \"function\": {...}}", i);
        return false;
    }
    if (!json_is_string(name) || !good_name(json_string_value(name))) {
        snprintf(msg, cap, "'tools'[%zu].function.name must be 1..64 of a-z, A-Z, 0-9, _, - and .", i);
        return false;
    }
    if ((params && !json_is_object(params) && !json_is_null(params)) ||
        (desc && !json_is_string(desc) && !json_is_null(desc))) {
        snprintf(msg, cap, "'tools'[%zu].function: 'parameters' must be an object (a JSON Schema)"
                 " and 'description' a string", i);
        return false;
    }
    const char *k;
    json_t *v;
    json_object_foreach(fn, k, v) {
        if (strcmp(k, "name") && strcmp(k, "description") && strcmp(k, "parameters") &&
            strcmp(k, "strict")) {
            snprintf(msg, cap, "'tools'[%zu].function.%.64s is not a field (name, description,"
                     " parameters, strict)", i, k);
            return false;
        }
    }
    return true;
}

static bool has_tool(const struct moed_tools *t, const char *name)
{
    for (size_t i = 0; i < json_array_size(t->tools); i++) {
        json_t *fn = json_object_get(json_array_get(t->tools, i), "function");
        if (strcmp(json_string_value(json_object_get(fn, "name")), name) == 0)
            return true;
    }
    return false;
}

static bool parse_choice(json_t *tc, struct moed_tools *t, char *msg, size_t cap, const char **param)
{
    if (tc == NULL || json_is_null(tc))
        return true;
    if (json_is_string(tc)) {
        const char *v = json_string_value(tc);
        t->choice = strcmp(v, "auto") == 0 ? MOED_TC_AUTO : strcmp(v, "none") == 0 ? MOED_TC_NONE
                    : strcmp(v, "required") == 0 ? MOED_TC_REQUIRED : -1;
        if ((int)t->choice < 0)
            return fail(msg, cap, param, "tool_choice", "'tool_choice' must be \"auto\", \"none\","
                        " \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}");
    } else {
        json_t *name = json_object_get(json_object_get(tc, "function"), "name");
        if (!json_is_string(name))
            return fail(msg, cap, param, "tool_choice", "'tool_choice' must be \"auto\", \"none\","
                        " \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}");
        t->choice = MOED_TC_NAMED;
        t->named = json_string_value(name);
    }
    if (t->choice >= MOED_TC_REQUIRED && t->tools == NULL)
        return fail(msg, cap, param, "tool_choice", "'tool_choice' asks for a call but 'tools' is"
                    " empty");
    if (t->choice == MOED_TC_NAMED && !has_tool(t, t->named)) {
        snprintf(msg, cap, "'tool_choice' names '%.64s', which is not in 'tools'", t->named);
        *param = "tool_choice";
        return false;
    }
    return true;
}

bool moed_tools_parse(json_t *root, struct moed_tools *t, char *msg, size_t cap,
                      const char **param)
{
    memset(t, 0, sizeof(*t));
    t->parallel = true;
    json_t *tools = json_object_get(root, "tools");
    if (tools && !json_is_null(tools)) {
        if (!json_is_array(tools) || json_array_size(tools) > MOED_MAX_TOOLS)
            return fail(msg, cap, param, "tools", "'tools' must be an array of at most 128 tools");
        for (size_t i = 0; i < json_array_size(tools); i++)
            if (!check_tool(json_array_get(tools, i), i, msg, cap))
                return (*param = "tools"), false;
        if (json_array_size(tools) > 0)
            t->tools = tools;
    }
    json_t *par = json_object_get(root, "parallel_tool_calls");
    if (par && !json_is_null(par)) {
        if (!json_is_boolean(par))
            return fail(msg, cap, param, "parallel_tool_calls", "'parallel_tool_calls' must be"
                        " true or false");
        t->parallel = json_is_true(par);
    }
    return parse_choice(json_object_get(root, "tool_choice"), t, msg, cap, param);
}

/* ---- Hermes rendering (Qwen2.5's layout) ---------------------------------- */

char *moed_tools_hermes_system(const struct moed_tools *t, const char *system)
{
    struct moe_buf b;
    moe_buf_init(&b, 0);
    int bad = 0;
    if (system && system[0])
        bad |= moe_buf_printf(&b, "%s\n\n", system);
    bad |= moe_buf_puts(&b, "# Tools\n\nYou may call one or more functions to assist with the user"
                            " query.\n\nYou are provided with function signatures within"
                            " <tools></tools> XML tags:\n<tools>");
    for (size_t i = 0; i < json_array_size(t->tools); i++) {
        char *j = json_dumps(json_array_get(t->tools, i), JSON_COMPACT);
        bad |= j == NULL || moe_buf_printf(&b, "\n%s", j) != 0;
        free(j);
    }
    bad |= moe_buf_puts(&b, "\n</tools>\n\nFor each function call, return a json object with"
                            " function name and arguments within <tool_call></tool_call> XML"
                            " tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\":"
                            " <args-json-object>}\n</tool_call>");
    size_t n;
    char *out = bad ? NULL : moe_buf_take(&b, &n);
    moe_buf_free(&b);
    return out;
}

char *moed_tools_hermes_calls(const char *content, json_t *tool_calls, char *msg, size_t cap)
{
    struct moe_buf b;
    moe_buf_init(&b, 0);
    int bad = content && content[0] ? moe_buf_puts(&b, content) : 0;
    for (size_t i = 0; i < json_array_size(tool_calls) && !bad; i++) {
        json_t *fn = json_object_get(json_array_get(tool_calls, i), "function");
        json_t *name = json_object_get(fn, "name"), *args = json_object_get(fn, "arguments");
        json_t *a = json_is_string(args) ? json_loads(json_string_value(args), 0, NULL)
                                         : json_incref(args);
        if (!json_is_string(name) || !json_is_object(a)) {
            snprintf(msg, cap, "an assistant message's tool_calls[%zu] needs function.name and"
                     " function.arguments (a JSON object, or a string holding one)", i);
            json_decref(a);
            moe_buf_free(&b);
            return NULL;
        }
        json_t *call = json_pack("{s:O, s:o}", "name", name, "arguments", a);
        char *j = call ? json_dumps(call, 0) : NULL;
        json_decref(call);
        bad = j == NULL || moe_buf_printf(&b, "%s<tool_call>\n%s\n</tool_call>",
                                          b.len ? "\n" : "", j) != 0;
        free(j);
    }
    size_t n;
    char *out = bad ? NULL : moe_buf_take(&b, &n);
    if (out == NULL && !bad)
        out = moe_calloc(1, 1);
    if (bad)
        snprintf(msg, cap, "out of memory");
    moe_buf_free(&b);
    return out;
}

char *moed_tools_hermes_result(const char *content)
{
    struct moe_buf b;
    moe_buf_init(&b, 0);
    size_t n;
    char *out = moe_buf_printf(&b, "<tool_response>\n%s\n</tool_response>", content ? content : "") == 0
                    ? moe_buf_take(&b, &n) : NULL;
    moe_buf_free(&b);
    return out;
}

/* ---- forcing a call --------------------------------------------------------- */

/* Each function's $defs go to the root, where the compiler resolves $ref. */
static void lift_defs(json_t *params, json_t *root)
{
    static const char *const keys[] = { "$defs", "definitions" };
    for (int k = 0; k < 2; k++) {
        json_t *defs = json_object_get(params, keys[k]), *dst = json_object_get(root, keys[k]);
        const char *name;
        json_t *v;
        json_object_foreach(defs, name, v) {
            if (json_object_get(dst, name) == NULL)
                json_object_set(dst, name, v);
        }
    }
}

int moed_tools_grammar(const struct moed_tools *t, struct moe_grammar **out, struct moe_diag *d)
{
    json_t *any = json_array();
    json_t *root = json_pack("{s:o, s:{}, s:{}}", "anyOf", any, "$defs", "definitions");
    if (root == NULL)
        return moe_diag_set(d, -ENOMEM, "out of memory");
    for (size_t i = 0; i < json_array_size(t->tools); i++) {
        json_t *fn = json_object_get(json_array_get(t->tools, i), "function");
        const char *name = json_string_value(json_object_get(fn, "name"));
        if (t->choice == MOED_TC_NAMED && strcmp(name, t->named) != 0)
            continue;
        json_t *params = json_object_get(fn, "parameters");
        json_t *args = json_copy(json_is_object(params) ? params : NULL);
        if (args == NULL)
            args = json_pack("{s:s}", "type", "object");
        lift_defs(args, root);
        json_object_del(args, "$defs");
        json_object_del(args, "definitions");
        json_array_append_new(any, json_pack("{s:s, s:{s:{s:s}, s:o}, s:[s, s], s:b}", "type",
                                             "object", "properties", "name", "const", name,
                                             "arguments", args, "required", "name", "arguments",
                                             "additionalProperties", 0));
    }
    const int rc = moed_schema_grammar_wrap(root, "tools.function.parameters", "<tool_call>\n",
                                            "\n</tool_call>", out, d);
    json_decref(root);
    return rc;
}
