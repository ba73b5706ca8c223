#include "daemon/output.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

enum { S_START, S_THINK, S_AFTER_THINK, S_CONTENT, S_TOOL };

struct tags {
    const char *open, *close;
};

static const struct tags think = { "<think>", "</think>" };

static struct tags tool_tags(enum moed_tool_fmt f)
{
    if (f == MOED_TOOLS_MINIMAX)
        return (struct tags){ "<minimax:tool_call>", "</minimax:tool_call>" };
    return (struct tags){ "<tool_call>", "</tool_call>" };
}

void moed_out_init(struct moed_out *o, bool reasoning, bool think_open, enum moed_tool_fmt tools,
                   unsigned long long id_base)
{
    memset(o, 0, sizeof(*o));
    o->reasoning = reasoning;
    o->think_open = think_open;
    o->tools = tools;
    o->id_base = id_base;
    o->state = reasoning && think_open ? S_THINK : reasoning ? S_START : S_CONTENT;
}

enum moed_tool_fmt moed_tool_fmt_of_template(const char *tpl)
{
    if (tpl == NULL)
        return MOED_TOOLS_NONE;
    if (strstr(tpl, "minimax:tool_call"))
        return MOED_TOOLS_MINIMAX;
    if (strstr(tpl, "<tool_call>"))
        return MOED_TOOLS_TAG;
    return MOED_TOOLS_NONE;
}

static const char *find(const char *p, size_t n, const char *needle)
{
    return memmem(p, n, needle, strlen(needle));
}

/* Bytes at the end of p[0, n) that could begin tag: held back. */
static size_t partial_tail(const char *p, size_t n, const char *tag)
{
    const size_t t = strlen(tag);
    for (size_t k = t - 1 < n ? t - 1 : n; k > 0; k--)
        if (memcmp(p + n - k, tag, k) == 0)
            return k;
    return 0;
}

static int put(struct moe_buf *b, const char *p, size_t n)
{
    return n == 0 || moe_buf_append(b, p, n) == 0 ? 0 : -ENOMEM;
}

static bool is_space(char c)
{
    return c == ' ' || c == '\n' || c == '\r' || c == '\t';
}

static void trim(const char **p, size_t *n)
{
    while (*n > 0 && is_space(**p)) {
        (*p)++;
        (*n)--;
    }
    while (*n > 0 && is_space((*p)[*n - 1]))
        (*n)--;
}

/* A parameter value: JSON when it parses as JSON, else the text. */
static json_t *value_of(const char *p, size_t n)
{
    trim(&p, &n);
    json_t *v = json_loadb(p, n, JSON_DECODE_ANY, NULL);
    return v ? v : json_stringn(p, n);
}

static int add_call(struct moed_out *o, json_t *calls, const char *name, size_t name_len,
                    json_t *args)
{
    char *text = json_dumps(args, JSON_COMPACT | JSON_ENCODE_ANY);
    char id[48];
    snprintf(id, sizeof(id), "call_%llx_%d", o->id_base, o->n_calls);
    json_t *c = text ? json_pack("{s:i, s:s, s:s, s:{s:s%, s:s}}", "index", o->n_calls, "id", id,
                                 "type", "function", "function", "name", name, name_len,
                                 "arguments", text)
                     : NULL;
    free(text);
    json_decref(args);
    if (c == NULL || json_array_append_new(calls, c) != 0)
        return -ENOMEM;
    o->n_calls++;
    return 0;
}

/* Hermes / Qwen: {"name": ..., "arguments": {...} or "..."}. */
static int parse_json_call(struct moed_out *o, const char *p, size_t n, json_t *calls)
{
    json_t *j = json_loadb(p, n, 0, NULL);
    json_t *name = json_object_get(j, "name");
    json_t *args = json_object_get(j, "arguments");
    if (args == NULL)
        args = json_object_get(j, "parameters");
    int rc = 1;
    if (json_is_string(name) && (args == NULL || json_is_object(args) || json_is_string(args))) {
        json_t *a = args == NULL ? json_object()
                    : json_is_string(args) ? json_loads(json_string_value(args), 0, NULL)
                                           : json_incref(args);
        if (json_is_object(a))
            rc = add_call(o, calls, json_string_value(name), json_string_length(name), a);
        else
            json_decref(a);
    }
    json_decref(j);
    return rc;
}

/* Repeated OPEN KEY MID VALUE CLOSE pairs (XML-like parameters) into args. */
static bool parse_params(const char *p, size_t n, const char *open, const char *mid,
                         const char *close, json_t *args)
{
    for (;;) {
        trim(&p, &n);
        if (n == 0)
            return true;
        if (n < strlen(open) || memcmp(p, open, strlen(open)) != 0)
            return false;
        p += strlen(open);
        n -= strlen(open);
        const char *m = find(p, n, mid);
        if (m == NULL)
            return false;
        const char *key = p;
        const size_t key_len = (size_t)(m - p);
        p = m + strlen(mid);
        n -= key_len + strlen(mid);
        const char *e = find(p, n, close);
        if (e == NULL)
            return false;
        char k[256];
        const char *kp = key;
        size_t kn = key_len;
        trim(&kp, &kn);
        if (kn >= 2 && kp[0] == '"' && kp[kn - 1] == '"') {
            kp++;
            kn -= 2;
        }
        if (kn == 0 || kn >= sizeof(k))
            return false;
        memcpy(k, kp, kn);
        k[kn] = '\0';
        json_object_set_new(args, k, value_of(p, (size_t)(e - p)));
        n -= (size_t)(e - p) + strlen(close);
        p = e + strlen(close);
    }
}

/* Qwen3-Coder: <function=NAME> <parameter=K>V</parameter>... </function> */
static int parse_function_call(struct moed_out *o, const char *p, size_t n, json_t *calls)
{
    const char *gt = memchr(p, '>', n);
    const char *end = find(p, n, "</function>");
    if (gt == NULL || end == NULL || end < gt)
        return 1;
    const char *name = p + 10;
    const size_t name_len = (size_t)(gt - name);
    json_t *args = json_object();
    if (args == NULL || !parse_params(gt + 1, (size_t)(end - gt - 1), "<parameter=", ">",
                                      "</parameter>", args)) {
        json_decref(args);
        return 1;
    }
    return add_call(o, calls, name, name_len, args);
}

/* GLM-4.5: NAME <arg_key>K</arg_key> <arg_value>V</arg_value> ... */
static int parse_glm_call(struct moed_out *o, const char *p, size_t n, json_t *calls)
{
    const char *lt = memchr(p, '<', n);
    const char *name = p;
    size_t name_len = lt ? (size_t)(lt - p) : n;
    trim(&name, &name_len);
    if (name_len == 0 || name_len > 128)
        return 1;
    for (size_t i = 0; i < name_len; i++)   /* a function name, not prose */
        if (!(isalnum((unsigned char)name[i]) || strchr("_-.:", name[i])))
            return 1;
    json_t *args = json_object();
    const size_t rest = lt ? n - (size_t)(lt - p) : 0;
    /* pairs: <arg_key>K</arg_key><arg_value>V</arg_value> */
    const char *q = lt;
    size_t m = rest;
    bool ok = args != NULL;
    while (ok && q && m > 0) {
        trim(&q, &m);
        if (m == 0)
            break;
        const char *ke = find(q, m, "</arg_key>");
        const char *vs = ke ? find(ke, m - (size_t)(ke - q), "<arg_value>") : NULL;
        const char *ve = vs ? find(vs, m - (size_t)(vs - q), "</arg_value>") : NULL;
        if (m < 9 || memcmp(q, "<arg_key>", 9) != 0 || ve == NULL) {
            ok = false;
            break;
        }
        const char *kp = q + 9;
        size_t kn = (size_t)(ke - kp);
        trim(&kp, &kn);
        char k[256];
        if (kn >= sizeof(k)) {
            ok = false;
            break;
        }
        memcpy(k, kp, kn);
        k[kn] = '\0';
        json_object_set_new(args, k, value_of(vs + 11, (size_t)(ve - vs - 11)));
        m -= (size_t)(ve + 12 - q);
        q = ve + 12;
    }
    if (!ok) {
        json_decref(args);
        return 1;
    }
    return add_call(o, calls, name, name_len, args);
}

/* MiniMax-M2: one or more <invoke name="NAME"> <parameter name="K">V</parameter> </invoke> */
static int parse_minimax(struct moed_out *o, const char *p, size_t n, json_t *calls)
{
    int made = 0;
    for (;;) {
        trim(&p, &n);
        if (n == 0)
            return made ? 0 : 1;
        if (n < 13 || memcmp(p, "<invoke name=", 13) != 0)
            return 1;
        const char *gt = memchr(p, '>', n), *end = find(p, n, "</invoke>");
        if (gt == NULL || end == NULL || end < gt)
            return 1;
        const char *name = p + 13;
        size_t name_len = (size_t)(gt - name);
        if (name_len >= 2 && name[0] == '"' && name[name_len - 1] == '"') {
            name++;
            name_len -= 2;
        }
        json_t *args = json_object();
        if (args == NULL || !parse_params(gt + 1, (size_t)(end - gt - 1), "<parameter name=", ">",
                                          "</parameter>", args)) {
            json_decref(args);
            return 1;
        }
        int rc = add_call(o, calls, name, name_len, args);
        if (rc)
            return rc;
        made++;
        n -= (size_t)(end + 9 - p);
        p = end + 9;
    }
}

/* One block's body; 1 when it is not a tool call (kept as text). */
static int parse_block(struct moed_out *o, const char *p, size_t n, json_t *calls)
{
    trim(&p, &n);
    if (o->tools == MOED_TOOLS_MINIMAX)
        return parse_minimax(o, p, n, calls);
    if (n > 0 && p[0] == '{')
        return parse_json_call(o, p, n, calls);
    if (n > 10 && memcmp(p, "<function=", 10) == 0)
        return parse_function_call(o, p, n, calls);
    return parse_glm_call(o, p, n, calls);
}

static int feed_tool(struct moed_out *o, const char *text, size_t len, bool final,
                     struct moe_buf *content, json_t *calls)
{
    const struct tags t = tool_tags(o->tools);
    const char *e = find(text + o->pos, len - o->pos, t.close);
    if (e == NULL && !final)
        return 1;                               /* wait for the closing tag */
    const size_t body_end = e ? (size_t)(e - text) : len;
    const int before = o->n_calls;
    int rc = parse_block(o, text + o->tool_start, body_end - o->tool_start, calls);
    if (rc < 0)
        return rc;
    if (rc > 0 || o->n_calls == before) {       /* not a call: the text stays content */
        const size_t from = o->tool_start - strlen(t.open);
        const size_t to = e ? body_end + strlen(t.close) : len;
        if (put(content, text + from, to - from))
            return -ENOMEM;
    }
    o->pos = e ? body_end + strlen(t.close) : len;
    o->state = S_CONTENT;
    return 0;
}

static int feed_content(struct moed_out *o, const char *text, size_t len, bool final,
                        struct moe_buf *content)
{
    const char *p = text + o->pos;
    const size_t n = len - o->pos;
    if (o->tools == MOED_TOOLS_NONE)
        return put(content, p, n) ? -ENOMEM : (o->pos = len, 1);
    const struct tags t = tool_tags(o->tools);
    const char *s = find(p, n, t.open);
    if (s) {
        if (put(content, p, (size_t)(s - p)))
            return -ENOMEM;
        o->pos = (size_t)(s - text) + strlen(t.open);
        o->tool_start = o->pos;
        o->state = S_TOOL;
        return 0;
    }
    const size_t keep = final ? 0 : partial_tail(p, n, t.open);
    if (put(content, p, n - keep))
        return -ENOMEM;
    o->pos += n - keep;
    return 1;
}

/* One step of the state machine: 0 to go on, 1 to wait for more text. */
static int step(struct moed_out *o, const char *text, size_t len, bool final,
                struct moe_buf *reasoning, struct moe_buf *content, json_t *calls)
{
    const char *p = text + o->pos;
    const size_t n = len - o->pos;
    const size_t ol = strlen(think.open), cl = strlen(think.close);
    switch (o->state) {
    case S_START:
        if (n >= ol && memcmp(p, think.open, ol) == 0) {
            o->pos += ol;
            o->state = S_THINK;
            return 0;
        }
        if (n < ol && memcmp(p, think.open, n) == 0 && !final)
            return 1;
        o->state = S_CONTENT;
        return 0;
    case S_THINK: {
        const char *e = find(p, n, think.close);
        if (e) {
            if (put(reasoning, p, (size_t)(e - p)))
                return -ENOMEM;
            o->pos = (size_t)(e - text) + cl;
            o->state = S_AFTER_THINK;
            return 0;
        }
        const size_t keep = final ? 0 : partial_tail(p, n, think.close);
        if (put(reasoning, p, n - keep))
            return -ENOMEM;
        o->pos += n - keep;
        return 1;
    }
    case S_AFTER_THINK:
        while (o->pos < len && is_space(text[o->pos]))
            o->pos++;
        if (o->pos == len && !final)
            return 1;
        o->state = S_CONTENT;
        return 0;
    case S_TOOL:
        return feed_tool(o, text, len, final, content, calls);
    default:
        return feed_content(o, text, len, final, content);
    }
}

int moed_out_feed(struct moed_out *o, const char *text, size_t len, bool final,
                  struct moe_buf *reasoning, struct moe_buf *content, json_t *calls)
{
    if (text == NULL)
        text = "";
    for (int guard = 0; guard < 1 << 20; guard++) {
        if (o->pos >= len && !(final && (o->state == S_TOOL || o->state == S_START)))
            return 0;
        const int rc = step(o, text, len, final, reasoning, content, calls);
        if (rc < 0)
            return rc;
        if (rc > 0)
            return 0;
    }
    return 0;
}
