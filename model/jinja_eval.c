/* Jinja evaluation: expressions and statements over the syntax tree, with
 * jinja2's scoping (a fresh scope per loop iteration and per macro call,
 * macros resolving free names in the template's top level at call time),
 * its sandbox's attribute and item lookup (a missing attribute is an
 * undefined value; using an undefined value is an error) and Python's
 * operators. */
#include <math.h>
#include <string.h>

#include "common/error.h"
#include "model/jinja-impl.h"

/* ---- scopes ---- */

static struct jscope *scope_new(struct jctx *c, struct jscope *parent)
{
    struct jscope *s = ja_alloc(c, sizeof(*s));
    memset(s, 0, sizeof(*s));
    s->parent = parent;
    return s;
}

void jscope_set(struct jctx *c, struct jscope *s, const char *name, struct jv v)
{
    for (size_t i = 0; i < s->n; i++) {
        if (strcmp(s->names[i], name) == 0) {
            s->vals[i] = v;
            return;
        }
    }
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 8;
        const char **nn = ja_alloc(c, cap * sizeof(*nn));
        struct jv *nv = ja_alloc(c, cap * sizeof(*nv));
        if (s->n) {
            memcpy(nn, s->names, s->n * sizeof(*nn));
            memcpy(nv, s->vals, s->n * sizeof(*nv));
        }
        s->names = nn;
        s->vals = nv;
        s->cap = cap;
    }
    s->names[s->n] = name;
    s->vals[s->n++] = v;
}

static struct jv lookup(struct jctx *c, const char *name)
{
    for (struct jscope *s = c->scope; s; s = s->parent)
        for (size_t i = s->n; i-- > 0;)
            if (strcmp(s->names[i], name) == 0)
                return s->vals[i];
    const struct jbuiltin *g = jglobal(name);
    if (g) {
        struct jv v = { .k = JK_FUNC };
        v.u.fn = g;
        return v;
    }
    size_t n = strlen(name) + 32;
    char *why = ja_alloc(c, n);
    snprintf(why, n, "'%s' is undefined", name);
    return jv_undef(why);
}

void jcheck_iter(struct jctx *c)
{
    if (++c->iterations > c->opts->max_iterations)
        jfail(c, MOE_JINJA_LIMIT, "more than %llu loop iterations", (unsigned long long)c->opts->max_iterations);
}

/* ---- attribute and item lookup ---- */

static struct jv no_attr(struct jctx *c, struct jv obj, const char *name)
{
    size_t n = strlen(name) + 64;
    char *why = ja_alloc(c, n);
    snprintf(why, n, "'%s object' has no attribute '%s'", obj.k == JK_NONE ? "None" : jv_type_name(obj), name);
    return jv_undef(why);
}

static struct jv loop_attr(struct jctx *c, struct jloop *lp, const char *name)
{
    size_t n = lp->items->n, i = lp->i;
    if (!strcmp(name, "index"))
        return jv_int((int64_t)i + 1);
    if (!strcmp(name, "index0"))
        return jv_int((int64_t)i);
    if (!strcmp(name, "revindex"))
        return jv_int((int64_t)(n - i));
    if (!strcmp(name, "revindex0"))
        return jv_int((int64_t)(n - i - 1));
    if (!strcmp(name, "first"))
        return jv_bool(i == 0);
    if (!strcmp(name, "last"))
        return jv_bool(i + 1 == n);
    if (!strcmp(name, "length"))
        return jv_int((int64_t)n);
    if (!strcmp(name, "depth"))
        return jv_int(1);
    if (!strcmp(name, "depth0"))
        return jv_int(0);
    if (!strcmp(name, "previtem"))
        return i > 0 ? lp->items->v[i - 1] : jv_undef("there is no previous item");
    if (!strcmp(name, "nextitem"))
        return i + 1 < n ? lp->items->v[i + 1] : jv_undef("there is no next item");
    struct jv v = { .k = JK_LOOP };
    v.u.lp = lp;
    const struct jbuiltin *m = jmethod_find(v, name, false);
    if (m) {
        struct jmethod *mt = ja_alloc(c, sizeof(*mt));
        mt->self = v;
        mt->b = m;
        struct jv r = { .k = JK_METHOD };
        r.u.mt = mt;
        return r;
    }
    return no_attr(c, v, name);
}

static struct jv method_or_undef(struct jctx *c, struct jv obj, const char *name)
{
    if (name[0] == '_')
        return no_attr(c, obj, name);
    const struct jbuiltin *m = jmethod_find(obj, name, c->opts->llama_ext);
    if (m == NULL)
        return no_attr(c, obj, name);
    if (m->fn == NULL) {
        size_t n = strlen(name) + 64;
        char *why = ja_alloc(c, n);
        snprintf(why, n, "access to attribute '%s' of '%s' object is unsafe.", name, jv_type_name(obj));
        return jv_undef(why);
    }
    struct jmethod *mt = ja_alloc(c, sizeof(*mt));
    mt->self = obj;
    mt->b = m;
    struct jv r = { .k = JK_METHOD };
    r.u.mt = mt;
    return r;
}

struct jv jgetattr(struct jctx *c, struct jv obj, const char *name)
{
    switch (obj.k) {
    case JK_UNDEF: jv_undef_fail(c, obj);
    case JK_LOOP: return loop_attr(c, obj.u.lp, name);
    case JK_NS: {
        struct jv *v = jd_gets(obj.u.d, name);
        return v ? *v : no_attr(c, obj, name);
    }
    case JK_DICT: {
        if (jmethod_find(obj, name, true))
            return method_or_undef(c, obj, name);
        struct jv *v = jd_gets(obj.u.d, name);
        return v ? *v : no_attr(c, obj, name);
    }
    default: return method_or_undef(c, obj, name);
    }
}

static bool as_index(struct jv k, int64_t *i)
{
    if (k.k != JK_INT && k.k != JK_BOOL)
        return false;
    *i = k.u.i;
    return true;
}

struct jv jgetitem(struct jctx *c, struct jv obj, struct jv key)
{
    int64_t i;
    switch (obj.k) {
    case JK_UNDEF: jv_undef_fail(c, obj);
    case JK_DICT: case JK_NS: {
        struct jv *v = jd_get(obj.u.d, key);
        if (v)
            return *v;
        break;
    }
    case JK_LIST:
        if (as_index(key, &i)) {
            int64_t n = (int64_t)obj.u.l->n;
            if (i < 0)
                i += n;
            return i >= 0 && i < n ? obj.u.l->v[i] : jv_undef("list index out of range");
        }
        break;
    case JK_STR:
        if (as_index(key, &i)) {
            int64_t n = (int64_t)ju8_count(obj.u.s->s, obj.u.s->len);
            if (i < 0)
                i += n;
            if (i < 0 || i >= n)
                return jv_undef("string index out of range");
            size_t a = ju8_offset(obj.u.s->s, obj.u.s->len, (size_t)i);
            size_t b = ju8_offset(obj.u.s->s, obj.u.s->len, (size_t)i + 1);
            return jv_str(c, obj.u.s->s + a, b - a);
        }
        break;
    default:
        break;
    }
    if (key.k == JK_STR && obj.k != JK_DICT && obj.k != JK_NS)
        return jgetattr(c, obj, key.u.s->s);
    if (key.k == JK_STR && obj.k == JK_DICT && jmethod_find(obj, key.u.s->s, true))
        return method_or_undef(c, obj, key.u.s->s);
    struct moe_buf *b = jtmp_push(c);
    jbuf_put(c, b, "'", 1);
    jv_write_str(c, b, obj.k == JK_NONE ? jv_cstr(c, "None") : jv_cstr(c, jv_type_name(obj)));
    jbuf_put(c, b, " object' has no attribute ", 26);
    jv_write_repr(c, b, key);
    struct jv why = jtmp_pop(c, b);
    return jv_undef(why.u.s->s);
}

/* Python's slice indices for a sequence of n: start, stop, step. */
static int64_t slice_bound(struct jctx *c, const struct jnode *e, int64_t n, int64_t step, bool is_start)
{
    if (e == NULL)
        return step > 0 ? (is_start ? 0 : n) : (is_start ? n - 1 : -1);
    struct jv v = jeval(c, e);
    int64_t i;
    if (v.k == JK_NONE)
        return step > 0 ? (is_start ? 0 : n) : (is_start ? n - 1 : -1);
    if (!as_index(v, &i))
        jfail(c, MOE_JINJA_RENDER, "slice indices must be integers or None");
    if (i < 0) {
        i += n;
        if (i < 0)
            i = step > 0 ? 0 : -1;
    } else if (i >= n) {
        i = step > 0 ? n : n - 1;
    }
    return i;
}

static struct jv eval_slice(struct jctx *c, const struct jnode *e)
{
    struct jv obj = jeval(c, e->a);
    if (obj.k == JK_UNDEF)
        jv_undef_fail(c, obj);
    int64_t step = 1;
    if (e->d) {
        struct jv s = jeval(c, e->d);
        if (s.k != JK_NONE && !as_index(s, &step))
            jfail(c, MOE_JINJA_RENDER, "slice indices must be integers or None");
        if (step == 0)
            jfail(c, MOE_JINJA_RENDER, "slice step cannot be zero");
    }
    struct jv seq = obj;
    if (obj.k == JK_STR)
        seq = jv_iterable(c, obj);
    else if (obj.k != JK_LIST)
        return jv_undef("object is not subscriptable");
    int64_t n = (int64_t)seq.u.l->n;
    int64_t a = slice_bound(c, e->b, n, step, true), b = slice_bound(c, e->c, n, step, false);
    struct jv r = jv_list(c, 0);
    r.u.l->tuple = seq.u.l->tuple;
    for (int64_t i = a; step > 0 ? i < b : i > b; i += step)
        jl_push(c, r.u.l, seq.u.l->v[i]);
    if (obj.k != JK_STR)
        return r;
    struct moe_buf *buf = jtmp_push(c);
    for (size_t i = 0; i < r.u.l->n; i++)
        jbuf_put(c, buf, r.u.l->v[i].u.s->s, r.u.l->v[i].u.s->len);
    return jtmp_pop(c, buf);
}

/* ---- operators ---- */

static bool numeric(struct jv v) { return v.k == JK_INT || v.k == JK_BOOL || v.k == JK_FLOAT; }
static double fl(struct jv v) { return v.k == JK_FLOAT ? v.u.f : (double)v.u.i; }

static _Noreturn void bad_operands(struct jctx *c, const char *op, struct jv a, struct jv b)
{
    if (a.k == JK_UNDEF)
        jv_undef_fail(c, a);
    if (b.k == JK_UNDEF)
        jv_undef_fail(c, b);
    jfail(c, MOE_JINJA_RENDER, "unsupported operand type(s) for %s: '%s' and '%s'", op, jv_type_name(a),
          jv_type_name(b));
}

/* markupsafe.escape */
static void put_escaped(struct jctx *c, struct moe_buf *b, const struct jstr *s)
{
    for (size_t i = 0; i < s->len; i++) {
        char ch = s->s[i];
        const char *e = ch == '&' ? "&amp;" : ch == '<' ? "&lt;" : ch == '>' ? "&gt;" : ch == '"' ? "&#34;"
                        : ch == '\'' ? "&#39;" : NULL;
        if (e)
            jbuf_put(c, b, e, strlen(e));
        else
            jbuf_put(c, b, &ch, 1);
    }
}

static struct jv concat_seq(struct jctx *c, struct jv a, struct jv b)
{
    if (a.k == JK_STR) {
        /* Markup + str and str + Markup escape the plain side */
        bool safe = a.safe || b.safe;
        struct moe_buf *buf = jtmp_push(c);
        if (safe && !a.safe)
            put_escaped(c, buf, a.u.s);
        else
            jbuf_put(c, buf, a.u.s->s, a.u.s->len);
        if (safe && !b.safe)
            put_escaped(c, buf, b.u.s);
        else
            jbuf_put(c, buf, b.u.s->s, b.u.s->len);
        struct jv r = jtmp_pop(c, buf);
        r.safe = safe;
        return r;
    }
    struct jv r = jv_list(c, a.u.l->n + b.u.l->n);
    r.u.l->tuple = a.u.l->tuple;
    for (size_t i = 0; i < a.u.l->n; i++)
        jl_push(c, r.u.l, a.u.l->v[i]);
    for (size_t i = 0; i < b.u.l->n; i++)
        jl_push(c, r.u.l, b.u.l->v[i]);
    return r;
}

static struct jv repeat(struct jctx *c, struct jv s, int64_t k)
{
    if (k <= 0)
        return s.k == JK_STR ? jv_str(c, "", 0) : jv_list(c, 0);
    size_t unit = s.k == JK_STR ? s.u.s->len : s.u.l->n * sizeof(struct jv);
    if (unit && (uint64_t)k > c->opts->max_memory / unit)
        jfail(c, MOE_JINJA_LIMIT, "memory limit of the template exceeded");
    if (s.k == JK_STR) {
        struct moe_buf *buf = jtmp_push(c);
        for (int64_t i = 0; i < k; i++)
            jbuf_put(c, buf, s.u.s->s, s.u.s->len);
        return jtmp_pop(c, buf);
    }
    struct jv r = jv_list(c, 0);
    for (int64_t i = 0; i < k; i++)
        for (size_t j = 0; j < s.u.l->n; j++)
            jl_push(c, r.u.l, s.u.l->v[j]);
    return r;
}

static int64_t ipow(struct jctx *c, int64_t a, int64_t b)
{
    int64_t r = 1;
    while (b-- > 0)
        if (__builtin_mul_overflow(r, a, &r))
            jfail(c, MOE_JINJA_LIMIT, "integer overflow in **");
    return r;
}

static struct jv arith_int(struct jctx *c, int op, int64_t x, int64_t y)
{
    int64_t r;
    bool ovf = false;
    switch (op) {
    case OP_ADD: ovf = __builtin_add_overflow(x, y, &r); break;
    case OP_SUB: ovf = __builtin_sub_overflow(x, y, &r); break;
    case OP_MUL: ovf = __builtin_mul_overflow(x, y, &r); break;
    case OP_FLOORDIV: case OP_MOD:
        if (y == 0)
            jfail(c, MOE_JINJA_RENDER, "integer division or modulo by zero");
        if (x == INT64_MIN && y == -1)
            jfail(c, MOE_JINJA_LIMIT, "integer overflow");
        r = op == OP_FLOORDIV ? x / y : x % y;
        if (op == OP_FLOORDIV && (x % y != 0) && ((x < 0) != (y < 0)))
            r--;
        if (op == OP_MOD && r != 0 && ((r < 0) != (y < 0)))
            r += y;
        break;
    case OP_POW:
        if (y < 0)
            return jv_float(pow((double)x, (double)y));
        r = ipow(c, x, y);
        break;
    default: r = 0;
    }
    if (ovf)
        jfail(c, MOE_JINJA_LIMIT, "integer overflow");
    return jv_int(r);
}

static struct jv arith(struct jctx *c, int op, struct jv a, struct jv b)
{
    static const char *const sym[] = { [OP_ADD] = "+", [OP_SUB] = "-", [OP_MUL] = "*", [OP_DIV] = "/",
                                       [OP_FLOORDIV] = "//", [OP_MOD] = "%", [OP_POW] = "**" };
    if (numeric(a) && numeric(b)) {
        if (op == OP_DIV) {
            if (fl(b) == 0)
                jfail(c, MOE_JINJA_RENDER, "division by zero");
            return jv_float(fl(a) / fl(b));
        }
        if (a.k != JK_FLOAT && b.k != JK_FLOAT)
            return arith_int(c, op, a.u.i, b.u.i);
        double x = fl(a), y = fl(b);
        switch (op) {
        case OP_ADD: return jv_float(x + y);
        case OP_SUB: return jv_float(x - y);
        case OP_MUL: return jv_float(x * y);
        case OP_POW: return jv_float(pow(x, y));
        default:
            if (y == 0)
                jfail(c, MOE_JINJA_RENDER, "float division by zero");
            if (op == OP_FLOORDIV)
                return jv_float(floor(x / y));
            double m = fmod(x, y);
            if (m != 0 && ((m < 0) != (y < 0)))
                m += y;
            return jv_float(m);
        }
    }
    if (op == OP_ADD && ((a.k == JK_STR && b.k == JK_STR) ||
                         (a.k == JK_LIST && b.k == JK_LIST && a.u.l->tuple == b.u.l->tuple)))
        return concat_seq(c, a, b);
    if (op == OP_MUL && (a.k == JK_STR || a.k == JK_LIST) && (b.k == JK_INT || b.k == JK_BOOL)) {
        struct jv r = repeat(c, a, b.u.i);
        r.safe = a.safe;
        return r;
    }
    if (op == OP_MUL && (b.k == JK_STR || b.k == JK_LIST) && (a.k == JK_INT || a.k == JK_BOOL)) {
        struct jv r = repeat(c, b, a.u.i);
        r.safe = b.safe;
        return r;
    }
    if (op == OP_MOD && a.k == JK_STR)
        jfail(c, MOE_JINJA_RENDER, "printf-style '%%' formatting of strings is not supported");
    bad_operands(c, sym[op], a, b);
}

static bool contains(struct jctx *c, struct jv hay, struct jv x)
{
    switch (hay.k) {
    case JK_UNDEF: return false;
    case JK_STR:
        if (x.k != JK_STR)
            jfail(c, MOE_JINJA_RENDER, "'in <string>' requires string as left operand, not %s", jv_type_name(x));
        return memmem(hay.u.s->s, hay.u.s->len, x.u.s->s, x.u.s->len) != NULL || x.u.s->len == 0;
    case JK_LIST:
        for (size_t i = 0; i < hay.u.l->n; i++)
            if (jv_equal(hay.u.l->v[i], x))
                return true;
        return false;
    case JK_DICT: case JK_NS:
        return jd_get(hay.u.d, x) != NULL;
    default:
        jfail(c, MOE_JINJA_RENDER, "argument of type '%s' is not iterable", jv_type_name(hay));
    }
}

static bool compare(struct jctx *c, int op, struct jv a, struct jv b)
{
    switch (op) {
    case OP_EQ: return jv_equal(a, b);
    case OP_NE: return !jv_equal(a, b);
    case OP_IN: return contains(c, b, a);
    case OP_NOTIN: return !contains(c, b, a);
    default: break;
    }
    int r = jv_compare(c, a, b);
    switch (op) {
    case OP_LT: return r < 0;
    case OP_LE: return r <= 0;
    case OP_GT: return r > 0;
    default: return r >= 0;
    }
}

/* ---- calls ---- */

struct args { struct jv *v; const char **kw; size_t n; };

static void push_arg(struct jctx *c, struct args *a, size_t *cap, struct jv v, const char *kw)
{
    if (a->n == *cap) {
        size_t nc = *cap ? *cap * 2 : 4;
        struct jv *nv = ja_alloc(c, nc * sizeof(*nv));
        const char **nk = ja_alloc(c, nc * sizeof(*nk));
        if (a->n) {
            memcpy(nv, a->v, a->n * sizeof(*nv));
            memcpy(nk, a->kw, a->n * sizeof(*nk));
        }
        a->v = nv;
        a->kw = nk;
        *cap = nc;
    }
    a->v[a->n] = v;
    a->kw[a->n++] = kw;
}

/* arguments in call order; f(*seq) and f(**mapping) expanded */
static struct args eval_args(struct jctx *c, const struct jnode *e)
{
    struct args a = { NULL, NULL, 0 };
    size_t cap = 0;
    for (size_t i = 0; i < e->n; i++) {
        struct jv v = jeval(c, e->list[i]);
        const char *kw = e->names[i];
        if (kw && !strcmp(kw, "*")) {
            if (v.k == JK_UNDEF)
                jv_undef_fail(c, v);
            struct jv l = jv_iterable(c, v);
            for (size_t k = 0; k < l.u.l->n; k++)
                push_arg(c, &a, &cap, l.u.l->v[k], NULL);
        } else if (kw && !strcmp(kw, "**")) {
            if (v.k != JK_DICT)
                jfail(c, MOE_JINJA_RENDER, "argument after ** must be a mapping, not %s", jv_type_name(v));
            for (size_t k = 0; k < v.u.d->n; k++) {
                if (v.u.d->k[k].k != JK_STR)
                    jfail(c, MOE_JINJA_RENDER, "keywords must be strings");
                push_arg(c, &a, &cap, v.u.d->v[k], v.u.d->k[k].u.s->s);
            }
        } else {
            push_arg(c, &a, &cap, v, kw);
        }
    }
    return a;
}

static struct jv call_macro(struct jctx *c, const struct jnode *m, struct jv *args, size_t n,
                            const char *const *kw)
{
    if (c->depth >= c->opts->max_depth)
        jfail(c, MOE_JINJA_LIMIT, "macro calls nested deeper than %d", c->opts->max_depth);
    struct jscope *s = scope_new(c, c->root);
    size_t npos = 0;
    for (size_t i = 0; i < n; i++) {
        if (kw && kw[i]) {
            size_t p;
            for (p = 0; p < m->n && strcmp(m->list[p]->name, kw[i]) != 0; p++)
                ;
            if (p == m->n)
                jfail(c, MOE_JINJA_RENDER, "macro '%s' takes no keyword argument '%s'", m->name, kw[i]);
            jscope_set(c, s, kw[i], args[i]);
        } else {
            if (npos >= m->n)
                jfail(c, MOE_JINJA_RENDER, "macro '%s' takes not more than %zu argument(s)", m->name, m->n);
            jscope_set(c, s, m->list[npos++]->name, args[i]);
        }
    }
    struct jscope *saved = c->scope;
    struct moe_buf *saved_out = c->out;
    c->scope = s;
    c->depth++;
    for (size_t p = 0; p < m->n; p++) {
        const struct jnode *prm = m->list[p];
        bool given = false;
        for (size_t i = 0; i < s->n && !given; i++)
            given = strcmp(s->names[i], prm->name) == 0;
        if (!given)
            jscope_set(c, s, prm->name, prm->a ? jeval(c, prm->a) : jv_undef(NULL));
    }
    struct moe_buf *b = jtmp_push(c);
    c->out = b;
    jexec_body(c, m->a);
    c->brk = 0;
    c->out = saved_out;
    c->scope = saved;
    c->depth--;
    return jtmp_pop(c, b);
}

struct jv jcall(struct jctx *c, struct jv f, struct jv *args, size_t n, const char *const *kw)
{
    switch (f.k) {
    case JK_FUNC: return f.u.fn->fn(c, NULL, args, n, kw);
    case JK_METHOD: return f.u.mt->b->fn(c, &f.u.mt->self, args, n, kw);
    case JK_MACRO: return call_macro(c, f.u.m, args, n, kw);
    case JK_UNDEF: jv_undef_fail(c, f);
    default: jfail(c, MOE_JINJA_RENDER, "'%s' object is not callable", jv_type_name(f));
    }
}

/* ---- expressions ---- */

static struct jv eval_cmp(struct jctx *c, const struct jnode *e)
{
    struct jv left = jeval(c, e->a);
    for (size_t i = 0; i < e->n; i++) {
        struct jv right = jeval(c, e->list[i]);
        if (!compare(c, e->ops[i], left, right))
            return jv_bool(false);
        left = right;
    }
    return jv_bool(true);
}

static struct jv eval_seq(struct jctx *c, const struct jnode *e, bool tuple)
{
    struct jv l = jv_list(c, e->n);
    l.u.l->tuple = tuple;
    for (size_t i = 0; i < e->n; i++)
        jl_push(c, l.u.l, jeval(c, e->list[i]));
    return l;
}

static struct jv eval_dict(struct jctx *c, const struct jnode *e)
{
    struct jv d = jv_dict(c, e->n / 2);
    for (size_t i = 0; i + 1 < e->n; i += 2) {
        struct jv k = jeval(c, e->list[i]);
        if (k.k == JK_LIST && !k.u.l->tuple)
            jfail(c, MOE_JINJA_RENDER, "unhashable type: 'list'");
        if (k.k == JK_DICT || k.k == JK_UNDEF)
            jfail(c, MOE_JINJA_RENDER, "unhashable type: '%s'", jv_type_name(k));
        jd_set(c, d.u.d, k, jeval(c, e->list[i + 1]));
    }
    return d;
}

static struct jv eval_unary(struct jctx *c, const struct jnode *e)
{
    struct jv v = jeval(c, e->a);
    if (v.k == JK_UNDEF)
        jv_undef_fail(c, v);
    if (v.k == JK_FLOAT)
        return jv_float(e->kind == E_NEG ? -v.u.f : v.u.f);
    if (v.k == JK_INT || v.k == JK_BOOL) {
        if (e->kind == E_NEG && v.u.i == INT64_MIN)
            jfail(c, MOE_JINJA_LIMIT, "integer overflow");
        return jv_int(e->kind == E_NEG ? -v.u.i : v.u.i);
    }
    jfail(c, MOE_JINJA_RENDER, "bad operand type for unary %s: '%s'", e->kind == E_NEG ? "-" : "+",
          jv_type_name(v));
}

static struct jv eval_bin(struct jctx *c, const struct jnode *e)
{
    struct jv a = jeval(c, e->a), b = jeval(c, e->b);
    if (e->op != OP_CONCAT)
        return arith(c, e->op, a, b);
    struct moe_buf *buf = jtmp_push(c);
    jv_write_str(c, buf, a);
    jv_write_str(c, buf, b);
    return jtmp_pop(c, buf);
}

static struct jv eval_node(struct jctx *c, const struct jnode *e);

/* Bounds the C recursion (expressions within statements within macro
 * calls) whatever the template's shape. */
#define MAX_RECURSION 2000

struct jv jeval(struct jctx *c, const struct jnode *e)
{
    if (++c->rec > MAX_RECURSION)
        jfail(c, MOE_JINJA_LIMIT, "template nested too deeply (more than %d levels of evaluation)", MAX_RECURSION);
    struct jv v = eval_node(c, e);
    c->rec--;
    return v;
}

static struct jv eval_node(struct jctx *c, const struct jnode *e)
{
    c->line = e->line;
    switch (e->kind) {
    case E_CONST: return e->cv;
    case E_NAME: return lookup(c, e->name);
    case E_ATTR: return jgetattr(c, jeval(c, e->a), e->name);
    case E_ITEM: {
        struct jv obj = jeval(c, e->a);
        return jgetitem(c, obj, jeval(c, e->b));
    }
    case E_SLICE: return eval_slice(c, e);
    case E_CALL: {
        struct jv f = jeval(c, e->a);
        struct args a = eval_args(c, e);
        c->line = e->line;
        return jcall(c, f, a.v, a.n, a.kw);
    }
    case E_FILTER: {
        struct jv v = jeval(c, e->a);
        struct args a = eval_args(c, e);
        c->line = e->line;
        return jfilter(c, e->name, v, a.v, a.n, a.kw);
    }
    case E_TEST: {
        struct jv v = jeval(c, e->a);
        struct args a = eval_args(c, e);
        c->line = e->line;
        return jv_bool(jtest(c, e->name, v, a.v, a.n) != (e->op != 0));
    }
    case E_NEG: case E_POS: return eval_unary(c, e);
    case E_NOT: return jv_bool(!jv_truthy(jeval(c, e->a)));
    case E_BIN: return eval_bin(c, e);
    case E_AND: {
        struct jv a = jeval(c, e->a);
        return jv_truthy(a) ? jeval(c, e->b) : a;
    }
    case E_OR: {
        struct jv a = jeval(c, e->a);
        return jv_truthy(a) ? a : jeval(c, e->b);
    }
    case E_CMP: return eval_cmp(c, e);
    case E_COND:
        if (jv_truthy(jeval(c, e->a)))
            return jeval(c, e->b);
        return e->c ? jeval(c, e->c) : jv_undef("the inline if-expression evaluated to false and no else "
                                                "section was defined");
    case E_LIST: return eval_seq(c, e, false);
    case E_TUPLE: return eval_seq(c, e, true);
    case E_DICT: return eval_dict(c, e);
    default: jfail(c, MOE_JINJA_RENDER, "internal error: node %d is not an expression", e->kind);
    }
}

/* ---- statements ---- */

static void assign(struct jctx *c, struct jscope *s, const struct jnode *target, struct jv v)
{
    if (target->kind == E_NAME) {
        jscope_set(c, s, target->name, v);
        return;
    }
    if (target->kind == E_NSREF) {
        struct jv ns = lookup(c, target->a->name);
        if (ns.k != JK_NS)
            jfail(c, MOE_JINJA_RENDER, "cannot assign attribute on non-namespace object");
        jd_set(c, ns.u.d, jv_cstr(c, target->name), v);
        return;
    }
    struct jv seq = v.k == JK_LIST ? v : v.k == JK_STR || v.k == JK_DICT ? jv_iterable(c, v) : v;
    if (seq.k != JK_LIST)
        jfail(c, MOE_JINJA_RENDER, "cannot unpack non-iterable %s object", jv_type_name(v));
    if (seq.u.l->n != target->n)
        jfail(c, MOE_JINJA_RENDER, seq.u.l->n > target->n ? "too many values to unpack (expected %zu)"
              : "not enough values to unpack (expected %zu)", target->n);
    for (size_t i = 0; i < target->n; i++)
        assign(c, s, target->list[i], seq.u.l->v[i]);
}

static struct jv filtered_items(struct jctx *c, const struct jnode *e, struct jv items)
{
    if (e->c == NULL)
        return items;
    struct jv r = jv_list(c, 0);
    struct jscope *saved = c->scope;
    for (size_t i = 0; i < items.u.l->n; i++) {
        jcheck_iter(c);
        c->scope = scope_new(c, saved);
        assign(c, c->scope, e->a, items.u.l->v[i]);
        if (jv_truthy(jeval(c, e->c)))
            jl_push(c, r.u.l, items.u.l->v[i]);
    }
    c->scope = saved;
    return r;
}

static void exec_for(struct jctx *c, const struct jnode *e)
{
    struct jv it = jeval(c, e->b);
    if (it.k == JK_NONE || it.k == JK_INT || it.k == JK_FLOAT || it.k == JK_BOOL)
        jfail(c, MOE_JINJA_RENDER, "'%s' object is not iterable", jv_type_name(it));
    struct jv items = filtered_items(c, e, jv_iterable(c, it));
    struct jscope *saved = c->scope;
    struct jscope *s = scope_new(c, saved);
    struct jloop *lp = ja_alloc(c, sizeof(*lp));
    lp->items = items.u.l;
    struct jv loopv = { .k = JK_LOOP };
    loopv.u.lp = lp;
    for (size_t i = 0; i < items.u.l->n; i++) {
        jcheck_iter(c);
        s->n = 0;
        lp->i = i;
        c->scope = s;
        jscope_set(c, s, "loop", loopv);
        assign(c, s, e->a, items.u.l->v[i]);
        jexec_body(c, e->d);
        int brk = c->brk;
        c->brk = 0;
        if (brk == 1)
            break;
    }
    c->scope = saved;
    if (items.u.l->n == 0 && e->n == 1) {
        c->scope = scope_new(c, saved);
        jexec_body(c, e->list[0]);
        c->scope = saved;
    }
}

static struct jv apply_filters(struct jctx *c, const struct jnode *f, struct jv v)
{
    if (f == NULL)
        return v;
    struct jv base = apply_filters(c, f->a, v);
    struct args a = eval_args(c, f);
    return jfilter(c, f->name, base, a.v, a.n, a.kw);
}

static void exec_stmt(struct jctx *c, const struct jnode *e)
{
    c->line = e->line;
    switch (e->kind) {
    case N_TEXT: jbuf_put(c, c->out, e->cv.u.s->s, e->cv.u.s->len); return;
    case N_OUT: jv_write_str(c, c->out, jeval(c, e->a)); return;
    case N_IF:
        if (jv_truthy(jeval(c, e->a)))
            jexec_body(c, e->b);
        else if (e->c)
            e->c->kind == N_IF ? exec_stmt(c, e->c) : jexec_body(c, e->c);
        return;
    case N_FOR: exec_for(c, e); return;
    case N_SET: assign(c, c->scope, e->a, jeval(c, e->b)); return;
    case N_SETBLOCK: {
        struct moe_buf *saved = c->out, *b = jtmp_push(c);
        c->out = b;
        jexec_body(c, e->b);
        c->out = saved;
        assign(c, c->scope, e->a, apply_filters(c, e->c, jtmp_pop(c, b)));
        return;
    }
    case N_MACRO: {
        struct jv m = { .k = JK_MACRO };
        m.u.m = e;
        jscope_set(c, c->scope, e->name, m);
        return;
    }
    case N_BREAK: c->brk = 1; return;
    case N_CONTINUE: c->brk = 2; return;
    case N_BODY: jexec_body(c, e); return;
    default: jfail(c, MOE_JINJA_RENDER, "internal error: node %d is not a statement", e->kind);
    }
}

void jexec_body(struct jctx *c, const struct jnode *body)
{
    if (++c->rec > MAX_RECURSION)
        jfail(c, MOE_JINJA_LIMIT, "template nested too deeply (more than %d levels of evaluation)", MAX_RECURSION);
    for (size_t i = 0; i < body->n && c->brk == 0; i++)
        exec_stmt(c, body->list[i]);
    c->rec--;
}
