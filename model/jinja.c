/* Jinja templates: compile and render entry points (model/jinja.h), and the
 * bridge from JSON (jansson) to template values. */
#include <errno.h>
#include <jansson.h>
#include <string.h>

#include "common/alloc.h"
#include "common/error.h"
#include "model/jinja-impl.h"
#include "model/jinja-lex.h"

#define MAX_SOURCE (4u << 20)

struct moe_jinja {
    struct jarena ar;
    struct jnode *root;
    char *src;
    size_t len;
};

void moe_jinja_opts_default(struct moe_jinja_opts *o)
{
    memset(o, 0, sizeof(*o));
    o->max_output = 8u << 20;
    o->max_memory = 256u << 20;
    o->max_iterations = 1000000;
    o->max_depth = 64;
}

static void set_err(struct moe_jinja_err *err, enum moe_jinja_err_kind kind, const char *msg)
{
    if (err) {
        err->kind = kind;
        err->line = 0;
        snprintf(err->msg, sizeof(err->msg), "%s", msg);
    }
}

static int code_of(enum moe_jinja_err_kind k)
{
    switch (k) {
    case MOE_JINJA_SYNTAX: case MOE_JINJA_INPUT: return MOE_EFORMAT;
    case MOE_JINJA_LIMIT: return MOE_ELIMIT;
    default: return -EINVAL;
    }
}

static int compile_into(struct jctx *c, struct moe_jinja *t, const char *src, size_t len)
{
    if (setjmp(c->jb) != 0)
        return code_of(c->err->kind);
    t->src = ja_alloc(c, len + 1);
    memcpy(t->src, src, len);
    t->src[len] = '\0';
    t->len = len;
    size_t n = 0;
    struct jtok *toks = jlex(c, src, len, &n);
    t->root = jparse(c, toks, n);
    /* the source's copy stays for moe_jinja_mentions; tokens are garbage now */
    return 0;
}

int moe_jinja_compile(const char *src, size_t len, struct moe_jinja **out, struct moe_jinja_err *err)
{
    *out = NULL;
    if (err)
        memset(err, 0, sizeof(*err));
    if (len > MAX_SOURCE) {
        set_err(err, MOE_JINJA_LIMIT, "template larger than 4 MiB");
        return MOE_ELIMIT;
    }
    struct moe_jinja *t = moe_calloc(1, sizeof(*t));
    if (t == NULL) {
        set_err(err, MOE_JINJA_LIMIT, "out of memory");
        return -ENOMEM;
    }
    t->ar.limit = 64u * MAX_SOURCE;
    struct moe_jinja_opts o;
    moe_jinja_opts_default(&o);
    struct moe_jinja_err local;
    struct jctx c = { .ar = &t->ar, .err = err ? err : &local, .opts = &o, .line = 1 };
    int rc = compile_into(&c, t, src, len);
    if (rc != 0) {
        moe_jinja_free(t);
        return rc;
    }
    *out = t;
    return 0;
}

void moe_jinja_free(struct moe_jinja *t)
{
    if (t == NULL)
        return;
    ja_free_all(&t->ar);
    moe_free(t);
}

bool moe_jinja_mentions(const struct moe_jinja *t, const char *name)
{
    size_t n = strlen(name);
    for (const char *p = t->src; (p = memmem(p, t->len - (size_t)(p - t->src), name, n)) != NULL; p += n) {
        bool left = p == t->src || !(p[-1] == '_' || (p[-1] >= 'a' && p[-1] <= 'z') || (p[-1] >= 'A' &&
                                     p[-1] <= 'Z') || (p[-1] >= '0' && p[-1] <= '9'));
        char r = p[n];
        bool right = !(r == '_' || (r >= 'a' && r <= 'z') || (r >= 'A' && r <= 'Z') || (r >= '0' && r <= '9'));
        if (left && right)
            return true;
    }
    return false;
}

/* ---- JSON to values ---- */

static struct jv from_json(struct jctx *c, json_t *j, int depth)
{
    if (depth > 200)
        jfail(c, MOE_JINJA_LIMIT, "JSON value nested deeper than 200 levels");
    switch (json_typeof(j)) {
    case JSON_NULL: return jv_none();
    case JSON_TRUE: return jv_bool(true);
    case JSON_FALSE: return jv_bool(false);
    case JSON_INTEGER: return jv_int((int64_t)json_integer_value(j));
    case JSON_REAL: return jv_float(json_real_value(j));
    case JSON_STRING: return jv_str(c, json_string_value(j), json_string_length(j));
    case JSON_ARRAY: {
        struct jv l = jv_list(c, json_array_size(j));
        for (size_t i = 0; i < json_array_size(j); i++)
            jl_push(c, l.u.l, from_json(c, json_array_get(j, i), depth + 1));
        return l;
    }
    case JSON_OBJECT: {
        struct jv d = jv_dict(c, json_object_size(j));
        const char *k;
        json_t *v;
        json_object_foreach(j, k, v) {
            jd_set(c, d.u.d, jv_cstr(c, k), from_json(c, v, depth + 1));
        }
        return d;
    }
    }
    return jv_none();
}

/* Parses JSON text into a value; the jansson tree is freed before any
 * error can unwind past it. */
static bool parse_json(struct jctx *c, const char *s, size_t n, struct jv *out, char *why, size_t why_len)
{
    json_error_t je;
    json_t *j = json_loadb(s, n, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &je);
    if (j == NULL) {
        snprintf(why, why_len, "line %d column %d: %s", je.line, je.column, je.text);
        return false;
    }
    jmp_buf saved;
    memcpy(saved, c->jb, sizeof(saved));
    if (setjmp(c->jb) != 0) {
        json_decref(j);
        memcpy(c->jb, saved, sizeof(saved));
        longjmp(c->jb, 1);
    }
    *out = from_json(c, j, 0);
    memcpy(c->jb, saved, sizeof(saved));
    json_decref(j);
    return true;
}

struct jv jv_from_json_text(struct jctx *c, const char *s, size_t n)
{
    struct jv v;
    char why[200];
    if (!parse_json(c, s, n, &v, why, sizeof(why)))
        jfail(c, MOE_JINJA_RENDER, "from_json: %s", why);
    return v;
}

static void input_json(struct jctx *c, const char *what, const char *s, struct jv *out, int want)
{
    char why[200];
    if (!parse_json(c, s, strlen(s), out, why, sizeof(why)))
        jfail(c, MOE_JINJA_INPUT, "%s: not valid JSON (%s)", what, why);
    if (want >= 0 && out->k != want)
        jfail(c, MOE_JINJA_INPUT, "%s: expected a JSON %s", what, want == JK_LIST ? "array" : "object");
}

/* ---- rendering ---- */

/* Runs the template with bind's variables; every resource it needs is
 * reachable from c so that the longjmp of an error frees it here. */
static int run(struct jctx *c, const struct moe_jinja *t, void (*bind)(struct jctx *c, const void *arg),
               const void *arg)
{
    if (setjmp(c->jb) != 0) {
        /* c->out may be a temporary buffer now: the caller frees its own */
        jtmp_free_all(c);
        ja_free_all(c->ar);
        return code_of(c->err->kind);
    }
    c->root = c->scope = ja_alloc(c, sizeof(struct jscope));
    memset(c->root, 0, sizeof(*c->root));
    bind(c, arg);
    jexec_body(c, t->root);
    ja_free_all(c->ar);
    return 0;
}

static int render(const struct moe_jinja *t, const struct moe_jinja_opts *opts, char **out, size_t *len,
                  struct moe_jinja_err *err,
                  void (*bind)(struct jctx *c, const void *arg), const void *arg)
{
    *out = NULL;
    *len = 0;
    struct moe_jinja_opts o;
    if (opts == NULL) {
        moe_jinja_opts_default(&o);
        opts = &o;
    }
    struct moe_jinja_err local;
    if (err == NULL)
        err = &local;
    memset(err, 0, sizeof(*err));
    struct jarena ar = { .limit = opts->max_memory };
    struct moe_buf buf;
    moe_buf_init(&buf, opts->max_output);
    struct jctx c = { .ar = &ar, .err = err, .opts = opts, .out = &buf };
    int rc = run(&c, t, bind, arg);
    if (rc != 0) {
        moe_buf_free(&buf);
        return rc;
    }
    if (buf.data == NULL && moe_buf_append(&buf, "", 0) != 0) {
        set_err(err, MOE_JINJA_LIMIT, "out of memory");
        return -ENOMEM;
    }
    *out = moe_buf_take(&buf, len);
    if (*out == NULL) {
        moe_buf_free(&buf);
        set_err(err, MOE_JINJA_LIMIT, "out of memory");
        return -ENOMEM;
    }
    return 0;
}

struct chat_args {
    const char *messages, *tools, *bos, *eos, *extra;
    bool add_gen;
};

static void bind_object(struct jctx *c, struct jv d)
{
    for (size_t i = 0; i < d.u.d->n; i++)
        jscope_set(c, c->root, d.u.d->k[i].u.s->s, d.u.d->v[i]);
}

static void bind_chat(struct jctx *c, const void *arg)
{
    const struct chat_args *a = arg;
    struct jv v;
    input_json(c, "messages", a->messages ? a->messages : "[]", &v, JK_LIST);
    jscope_set(c, c->root, "messages", v);
    if (a->tools && a->tools[0]) {
        input_json(c, "tools", a->tools, &v, -1);
        if (v.k != JK_LIST && v.k != JK_NONE)
            jfail(c, MOE_JINJA_INPUT, "tools: expected a JSON array");
    } else {
        v = jv_none();
    }
    jscope_set(c, c->root, "tools", v);
    jscope_set(c, c->root, "documents", jv_none());
    jscope_set(c, c->root, "add_generation_prompt", jv_bool(a->add_gen));
    jscope_set(c, c->root, "bos_token", jv_cstr(c, a->bos ? a->bos : ""));
    jscope_set(c, c->root, "eos_token", jv_cstr(c, a->eos ? a->eos : ""));
    if (a->extra && a->extra[0]) {
        input_json(c, "extra template variables", a->extra, &v, JK_DICT);
        bind_object(c, v);
    }
}

int moe_jinja_render_chat(const struct moe_jinja *t, const char *messages_json, const char *tools_json,
                          bool add_generation_prompt, const char *bos, const char *eos,
                          const char *extra_json, const struct moe_jinja_opts *opts,
                          char **out, size_t *len, struct moe_jinja_err *err)
{
    struct chat_args a = { messages_json, tools_json, bos, eos, extra_json, add_generation_prompt };
    return render(t, opts, out, len, err, bind_chat, &a);
}

static void bind_vars(struct jctx *c, const void *arg)
{
    const char *vars = arg;
    if (vars == NULL || vars[0] == '\0')
        return;
    struct jv v;
    input_json(c, "template variables", vars, &v, JK_DICT);
    bind_object(c, v);
}

int moe_jinja_render(const struct moe_jinja *t, const char *vars_json, const struct moe_jinja_opts *opts,
                     char **out, size_t *len, struct moe_jinja_err *err)
{
    return render(t, opts, out, len, err, bind_vars, vars_json);
}
