/* Jinja values: the arena, constructors, Python's truth, equality, ordering,
 * str(), repr() and json.dumps() of values, the way the reference (Python
 * jinja2 under transformers) prints them. */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/alloc.h"
#include "common/error.h"
#include "model/jinja-impl.h"

/* ---- arena ---- */

void *ja_alloc_raw(struct jarena *a, size_t n)
{
    n = (n + 15) & ~(size_t)15;
    if (n == 0)
        n = 16;
    struct jchunk *h = a->head;
    if (h == NULL || h->cap - h->used < n) {
        size_t cap = n > 65536 ? n : 65536;
        if (a->limit && (a->total > a->limit || cap > a->limit - a->total))
            return NULL;
        h = moe_malloc(sizeof(*h) + cap);
        if (h == NULL)
            return NULL;
        h->next = a->head;
        h->used = 0;
        h->cap = cap;
        a->head = h;
        a->total += cap;
    }
    void *p = h->mem + h->used;
    h->used += n;
    return p;
}

void ja_free_all(struct jarena *a)
{
    while (a->head) {
        struct jchunk *n = a->head->next;
        moe_free(a->head);
        a->head = n;
    }
    a->total = 0;
}

void *ja_alloc(struct jctx *c, size_t n)
{
    if (n > SIZE_MAX / 2)
        jfail(c, MOE_JINJA_LIMIT, "memory limit of the template exceeded");
    void *p = ja_alloc_raw(c->ar, n);
    if (p == NULL)
        jfail(c, MOE_JINJA_LIMIT, "memory limit of the template exceeded (%zu bytes)", c->ar->limit);
    return p;
}

_Noreturn void jfail(struct jctx *c, enum moe_jinja_err_kind kind, const char *fmt, ...)
{
    if (c->err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->err->msg, sizeof(c->err->msg), fmt, ap);
        va_end(ap);
        c->err->kind = kind;
        c->err->line = c->line;
    }
    longjmp(c->jb, 1);
}

void jbuf_put(struct jctx *c, struct moe_buf *b, const char *s, size_t n)
{
    int rc = moe_buf_append(b, s, n);
    if (rc == MOE_ELIMIT)
        jfail(c, MOE_JINJA_LIMIT, "output of the template exceeds %zu bytes", b->limit);
    if (rc != 0)
        jfail(c, MOE_JINJA_LIMIT, "out of memory rendering the template");
}

static void put(struct jctx *c, struct moe_buf *b, const char *s)
{
    jbuf_put(c, b, s, strlen(s));
}

/* ---- constructors ---- */

struct jv jv_str(struct jctx *c, const char *s, size_t n)
{
    struct jstr *st = ja_alloc(c, sizeof(*st) + n + 1);
    st->len = n;
    if (n)
        memcpy(st->s, s, n);
    st->s[n] = '\0';
    struct jv v = { .k = JK_STR };
    v.u.s = st;
    return v;
}

struct jv jv_cstr(struct jctx *c, const char *s) { return jv_str(c, s, strlen(s)); }

struct jv jv_strbuf(struct jctx *c, const struct moe_buf *b) { return jv_str(c, b->data ? b->data : "", b->len); }

struct jv jv_list(struct jctx *c, size_t cap)
{
    struct jlist *l = ja_alloc(c, sizeof(*l));
    l->n = 0;
    l->cap = cap;
    l->tuple = false;
    l->v = cap ? ja_alloc(c, cap * sizeof(struct jv)) : NULL;
    struct jv v = { .k = JK_LIST };
    v.u.l = l;
    return v;
}

struct jv jv_dict(struct jctx *c, size_t cap)
{
    struct jdict *d = ja_alloc(c, sizeof(*d));
    d->n = 0;
    d->cap = cap;
    d->k = cap ? ja_alloc(c, cap * sizeof(struct jv)) : NULL;
    d->v = cap ? ja_alloc(c, cap * sizeof(struct jv)) : NULL;
    struct jv v = { .k = JK_DICT };
    v.u.d = d;
    return v;
}

void jl_push(struct jctx *c, struct jlist *l, struct jv v)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 8;
        struct jv *nv = ja_alloc(c, cap * sizeof(*nv));
        if (l->n)
            memcpy(nv, l->v, l->n * sizeof(*nv));
        l->v = nv;
        l->cap = cap;
    }
    l->v[l->n++] = v;
}

struct jv *jd_get(const struct jdict *d, struct jv k)
{
    for (size_t i = 0; i < d->n; i++)
        if (jv_equal(d->k[i], k))
            return &d->v[i];
    return NULL;
}

struct jv *jd_gets(const struct jdict *d, const char *k)
{
    size_t n = strlen(k);
    for (size_t i = 0; i < d->n; i++)
        if (d->k[i].k == JK_STR && d->k[i].u.s->len == n && memcmp(d->k[i].u.s->s, k, n) == 0)
            return &d->v[i];
    return NULL;
}

void jd_set(struct jctx *c, struct jdict *d, struct jv k, struct jv v)
{
    struct jv *old = jd_get(d, k);
    if (old) {
        *old = v;
        return;
    }
    if (d->n == d->cap) {
        size_t cap = d->cap ? d->cap * 2 : 8;
        struct jv *nk = ja_alloc(c, cap * sizeof(*nk)), *nv = ja_alloc(c, cap * sizeof(*nv));
        if (d->n) {
            memcpy(nk, d->k, d->n * sizeof(*nk));
            memcpy(nv, d->v, d->n * sizeof(*nv));
        }
        d->k = nk;
        d->v = nv;
        d->cap = cap;
    }
    d->k[d->n] = k;
    d->v[d->n++] = v;
}

bool jv_is_str(struct jv v, const char *s)
{
    return v.k == JK_STR && strcmp(v.u.s->s, s) == 0;
}

/* ---- UTF-8 ---- */

size_t ju8_count(const char *s, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        k += ((unsigned char)s[i] & 0xC0) != 0x80;
    return k;
}

size_t ju8_offset(const char *s, size_t n, size_t cps)
{
    size_t i = 0, k = 0;
    while (i < n) {
        if (((unsigned char)s[i] & 0xC0) != 0x80) {
            if (k == cps)
                return i;
            k++;
        }
        i++;
    }
    return n;
}

/* ---- Python semantics ---- */

const char *jv_type_name(struct jv v)
{
    static const char *const names[] = {
        [JK_UNDEF] = "Undefined", [JK_NONE] = "NoneType", [JK_BOOL] = "bool", [JK_INT] = "int",
        [JK_FLOAT] = "float", [JK_STR] = "str", [JK_LIST] = "list", [JK_DICT] = "dict",
        [JK_NS] = "Namespace", [JK_FUNC] = "function", [JK_MACRO] = "Macro", [JK_METHOD] = "method",
        [JK_LOOP] = "LoopContext",
    };
    if (v.k == JK_LIST && v.u.l->tuple)
        return "tuple";
    return names[v.k];
}

_Noreturn void jv_undef_fail(struct jctx *c, struct jv v)
{
    jfail(c, MOE_JINJA_RENDER, "%s", v.u.why ? v.u.why : "undefined value used");
}

bool jv_truthy(struct jv v)
{
    switch (v.k) {
    case JK_UNDEF: case JK_NONE: return false;
    case JK_BOOL: case JK_INT: return v.u.i != 0;
    case JK_FLOAT: return v.u.f != 0;
    case JK_STR: return v.u.s->len != 0;
    case JK_LIST: return v.u.l->n != 0;
    case JK_DICT: return v.u.d->n != 0;
    default: return true;
    }
}

static bool is_num(struct jv v) { return v.k == JK_INT || v.k == JK_BOOL || v.k == JK_FLOAT; }
static double num(struct jv v) { return v.k == JK_FLOAT ? v.u.f : (double)v.u.i; }

bool jv_equal(struct jv a, struct jv b)
{
    if (is_num(a) && is_num(b)) {
        if (a.k != JK_FLOAT && b.k != JK_FLOAT)
            return a.u.i == b.u.i;
        return num(a) == num(b);
    }
    if (a.k != b.k)
        return false;
    switch (a.k) {
    case JK_UNDEF: case JK_NONE: return true;
    case JK_STR: return a.u.s->len == b.u.s->len && memcmp(a.u.s->s, b.u.s->s, a.u.s->len) == 0;
    case JK_LIST:
        if (a.u.l->tuple != b.u.l->tuple || a.u.l->n != b.u.l->n)
            return false;
        for (size_t i = 0; i < a.u.l->n; i++)
            if (!jv_equal(a.u.l->v[i], b.u.l->v[i]))
                return false;
        return true;
    case JK_DICT:
        if (a.u.d->n != b.u.d->n)
            return false;
        for (size_t i = 0; i < a.u.d->n; i++) {
            struct jv *o = jd_get(b.u.d, a.u.d->k[i]);
            if (o == NULL || !jv_equal(a.u.d->v[i], *o))
                return false;
        }
        return true;
    case JK_NS: return a.u.d == b.u.d;
    case JK_FUNC: return a.u.fn == b.u.fn;
    case JK_MACRO: return a.u.m == b.u.m;
    case JK_LOOP: return a.u.lp == b.u.lp;
    default: return false;
    }
}

int jv_compare(struct jctx *c, struct jv a, struct jv b)
{
    if (a.k == JK_UNDEF)
        jv_undef_fail(c, a);
    if (b.k == JK_UNDEF)
        jv_undef_fail(c, b);
    if (is_num(a) && is_num(b)) {
        if (a.k != JK_FLOAT && b.k != JK_FLOAT)
            return (a.u.i > b.u.i) - (a.u.i < b.u.i);
        double x = num(a), y = num(b);
        return (x > y) - (x < y);
    }
    if (a.k == JK_STR && b.k == JK_STR) {
        size_t n = a.u.s->len < b.u.s->len ? a.u.s->len : b.u.s->len;
        int r = memcmp(a.u.s->s, b.u.s->s, n);
        if (r)
            return r;
        return (a.u.s->len > b.u.s->len) - (a.u.s->len < b.u.s->len);
    }
    if (a.k == JK_LIST && b.k == JK_LIST && a.u.l->tuple == b.u.l->tuple) {
        for (size_t i = 0; i < a.u.l->n && i < b.u.l->n; i++) {
            if (!jv_equal(a.u.l->v[i], b.u.l->v[i]))
                return jv_compare(c, a.u.l->v[i], b.u.l->v[i]);
        }
        return (a.u.l->n > b.u.l->n) - (a.u.l->n < b.u.l->n);
    }
    jfail(c, MOE_JINJA_RENDER, "'<' not supported between instances of '%s' and '%s'", jv_type_name(a),
          jv_type_name(b));
}

size_t jv_len(struct jctx *c, struct jv v)
{
    switch (v.k) {
    case JK_UNDEF: return 0;
    case JK_STR: return ju8_count(v.u.s->s, v.u.s->len);
    case JK_LIST: return v.u.l->n;
    case JK_DICT: return v.u.d->n;
    case JK_LOOP: return v.u.lp->items->n;
    default: jfail(c, MOE_JINJA_RENDER, "object of type '%s' has no len()", jv_type_name(v));
    }
}

struct jv jv_iterable(struct jctx *c, struct jv v)
{
    switch (v.k) {
    case JK_UNDEF: return jv_list(c, 0);
    case JK_LIST: return v;
    case JK_DICT: {
        struct jv l = jv_list(c, v.u.d->n);
        for (size_t i = 0; i < v.u.d->n; i++)
            jl_push(c, l.u.l, v.u.d->k[i]);
        return l;
    }
    case JK_STR: {
        const char *s = v.u.s->s;
        size_t n = v.u.s->len;
        struct jv l = jv_list(c, n);
        for (size_t i = 0; i < n;) {
            size_t j = i + 1;
            while (j < n && ((unsigned char)s[j] & 0xC0) == 0x80)
                j++;
            jl_push(c, l.u.l, jv_str(c, s + i, j - i));
            i = j;
        }
        return l;
    }
    default: jfail(c, MOE_JINJA_RENDER, "'%s' object is not iterable", jv_type_name(v));
    }
}

/* ---- printing ---- */

/* Python's repr(float): the shortest text that reads back the same double,
 * in exponent form below 1e-4 and from 1e16. */
size_t jv_format_float(char *o, double f)
{
    char t[40];
    if (isnan(f))
        return (size_t)sprintf(o, "nan");
    if (isinf(f))
        return (size_t)sprintf(o, f < 0 ? "-inf" : "inf");
    int p;
    for (p = 1; p <= 17; p++) {
        snprintf(t, sizeof(t), "%.*e", p - 1, f);
        if (strtod(t, NULL) == f)
            break;
    }
    /* t is d.ddde[+-]XX with p significant digits */
    char digits[24];
    size_t nd = 0;
    const char *q = t;
    bool neg = *q == '-';
    if (neg)
        q++;
    for (; *q && *q != 'e'; q++)
        if (*q != '.')
            digits[nd++] = *q;
    int exp10 = atoi(q + 1);
    while (nd > 1 && digits[nd - 1] == '0')
        nd--;
    digits[nd] = '\0';
    size_t k = 0;
    if (neg)
        o[k++] = '-';
    if (exp10 < -4 || exp10 >= 16) {
        o[k++] = digits[0];
        if (nd > 1) {
            o[k++] = '.';
            memcpy(o + k, digits + 1, nd - 1);
            k += nd - 1;
        }
        k += (size_t)snprintf(o + k, 16, "e%c%02d", exp10 < 0 ? '-' : '+', abs(exp10));
    } else if (exp10 < 0) {
        o[k++] = '0';
        o[k++] = '.';
        for (int i = 0; i < -exp10 - 1; i++)
            o[k++] = '0';
        memcpy(o + k, digits, nd);
        k += nd;
    } else {
        for (int i = 0; i <= exp10; i++)
            o[k++] = (size_t)i < nd ? digits[i] : '0';
        o[k++] = '.';
        if ((size_t)exp10 + 1 < nd) {
            memcpy(o + k, digits + exp10 + 1, nd - (size_t)exp10 - 1);
            k += nd - (size_t)exp10 - 1;
        } else {
            o[k++] = '0';
        }
    }
    o[k] = '\0';
    return k;
}

static void write_float(struct jctx *c, struct moe_buf *b, double f)
{
    char t[64];
    size_t n = jv_format_float(t, f);
    jbuf_put(c, b, t, n);
}

static void write_int(struct jctx *c, struct moe_buf *b, int64_t i)
{
    char t[32];
    int n = snprintf(t, sizeof(t), "%lld", (long long)i);
    jbuf_put(c, b, t, (size_t)n);
}

/* Python's str.isprintable() for the code points a chat template meets */
static bool printable_cp(uint32_t cp)
{
    if (cp < 0x20 || cp == 0x7f || (cp >= 0x80 && cp <= 0xa0) || cp == 0xad)
        return false;
    if ((cp >= 0x2000 && cp <= 0x200f) || (cp >= 0x2028 && cp <= 0x202f) || (cp >= 0x205f && cp <= 0x206f) ||
        cp == 0x3000 || cp == 0xfeff || cp == 0x1680 || (cp >= 0xfff9 && cp <= 0xfffb))
        return false;
    return true;
}

static uint32_t decode_cp(const unsigned char *s, size_t n, size_t *used)
{
    unsigned char c0 = s[0];
    size_t want = c0 < 0x80 ? 1 : c0 >= 0xF0 ? 4 : c0 >= 0xE0 ? 3 : c0 >= 0xC0 ? 2 : 1;
    if (want > n)
        want = 1;
    uint32_t cp = want == 1 ? c0 : want == 2 ? c0 & 0x1f : want == 3 ? c0 & 0x0f : c0 & 0x07;
    for (size_t i = 1; i < want; i++)
        cp = (cp << 6) | (s[i] & 0x3f);
    *used = want;
    return cp;
}

static void write_str_repr(struct jctx *c, struct moe_buf *b, const struct jstr *s)
{
    bool sq = memchr(s->s, '\'', s->len) != NULL, dq = memchr(s->s, '"', s->len) != NULL;
    char q = sq && !dq ? '"' : '\'';
    jbuf_put(c, b, &q, 1);
    const unsigned char *p = (const unsigned char *)s->s;
    for (size_t i = 0; i < s->len;) {
        size_t used;
        uint32_t cp = decode_cp(p + i, s->len - i, &used);
        char t[16];
        if (cp == (uint32_t)q || cp == '\\') {
            t[0] = '\\';
            t[1] = (char)cp;
            jbuf_put(c, b, t, 2);
        } else if (cp == '\n' || cp == '\r' || cp == '\t') {
            jbuf_put(c, b, cp == '\n' ? "\\n" : cp == '\r' ? "\\r" : "\\t", 2);
        } else if (!printable_cp(cp)) {
            int n = cp <= 0xff ? snprintf(t, sizeof(t), "\\x%02x", cp)
                    : cp <= 0xffff ? snprintf(t, sizeof(t), "\\u%04x", cp) : snprintf(t, sizeof(t), "\\U%08x", cp);
            jbuf_put(c, b, t, (size_t)n);
        } else {
            jbuf_put(c, b, (const char *)p + i, used);
        }
        i += used;
    }
    jbuf_put(c, b, &q, 1);
}

void jv_write_repr(struct jctx *c, struct moe_buf *b, struct jv v)
{
    switch (v.k) {
    case JK_STR: write_str_repr(c, b, v.u.s); return;
    case JK_LIST: {
        const struct jlist *l = v.u.l;
        put(c, b, l->tuple ? "(" : "[");
        for (size_t i = 0; i < l->n; i++) {
            if (i)
                put(c, b, ", ");
            jv_write_repr(c, b, l->v[i]);
        }
        put(c, b, l->tuple ? (l->n == 1 ? ",)" : ")") : "]");
        return;
    }
    case JK_DICT: {
        const struct jdict *d = v.u.d;
        put(c, b, "{");
        for (size_t i = 0; i < d->n; i++) {
            if (i)
                put(c, b, ", ");
            jv_write_repr(c, b, d->k[i]);
            put(c, b, ": ");
            jv_write_repr(c, b, d->v[i]);
        }
        put(c, b, "}");
        return;
    }
    case JK_NS: {
        struct jv d = v;
        d.k = JK_DICT;
        put(c, b, "<Namespace ");
        jv_write_repr(c, b, d);
        put(c, b, ">");
        return;
    }
    default: jv_write_str(c, b, v);
    }
}

void jv_write_str(struct jctx *c, struct moe_buf *b, struct jv v)
{
    switch (v.k) {
    case JK_UNDEF: return;
    case JK_NONE: put(c, b, "None"); return;
    case JK_BOOL: put(c, b, v.u.i ? "True" : "False"); return;
    case JK_INT: write_int(c, b, v.u.i); return;
    case JK_FLOAT: write_float(c, b, v.u.f); return;
    case JK_STR: jbuf_put(c, b, v.u.s->s, v.u.s->len); return;
    case JK_LIST: case JK_DICT: case JK_NS: jv_write_repr(c, b, v); return;
    case JK_FUNC: case JK_METHOD: put(c, b, "<built-in function>"); return;
    case JK_MACRO: put(c, b, "<Macro>"); return;
    case JK_LOOP: put(c, b, "<LoopContext>"); return;
    }
}

struct jv jv_to_str(struct jctx *c, struct jv v)
{
    if (v.k == JK_STR)
        return v;
    struct moe_buf *b = jtmp_push(c);
    jv_write_str(c, b, v);
    return jtmp_pop(c, b);
}

struct moe_buf *jtmp_push(struct jctx *c)
{
    if (c->ntmp >= (int)(sizeof(c->tmp) / sizeof(c->tmp[0])))
        jfail(c, MOE_JINJA_LIMIT, "template nested too deeply");
    struct moe_buf *b = ja_alloc(c, sizeof(*b));
    moe_buf_init(b, c->opts->max_output);
    c->tmp[c->ntmp++] = b;
    return b;
}

struct jv jtmp_pop(struct jctx *c, struct moe_buf *b)
{
    MOE_ASSERT(c->ntmp > 0 && c->tmp[c->ntmp - 1] == b);
    struct jv r = jv_strbuf(c, b);
    moe_buf_free(b);
    c->ntmp--;
    return r;
}

void jtmp_free_all(struct jctx *c)
{
    while (c->ntmp > 0)
        moe_buf_free(c->tmp[--c->ntmp]);
}

/* ---- json.dumps ---- */

static void write_json_str(struct jctx *c, struct moe_buf *b, const struct jstr *s, bool ascii)
{
    jbuf_put(c, b, "\"", 1);
    const unsigned char *p = (const unsigned char *)s->s;
    size_t run = 0;
    for (size_t i = 0; i < s->len;) {
        unsigned char ch = p[i];
        bool esc = ch < 0x20 || ch == '"' || ch == '\\' || (ascii && ch >= 0x7f);
        if (!esc) {
            i++;
            run++;
            continue;
        }
        jbuf_put(c, b, (const char *)p + i - run, run);
        run = 0;
        char t[16];
        int n;
        size_t used = 1;
        switch (ch) {
        case '"': n = snprintf(t, sizeof(t), "\\\""); break;
        case '\\': n = snprintf(t, sizeof(t), "\\\\"); break;
        case '\n': n = snprintf(t, sizeof(t), "\\n"); break;
        case '\r': n = snprintf(t, sizeof(t), "\\r"); break;
        case '\t': n = snprintf(t, sizeof(t), "\\t"); break;
        case '\b': n = snprintf(t, sizeof(t), "\\b"); break;
        case '\f': n = snprintf(t, sizeof(t), "\\f"); break;
        default: {
            uint32_t cp = decode_cp(p + i, s->len - i, &used);
            if (cp >= 0x10000) {
                cp -= 0x10000;
                n = snprintf(t, sizeof(t), "\\u%04x\\u%04x", 0xd800 + (cp >> 10), 0xdc00 + (cp & 0x3ff));
            } else {
                n = snprintf(t, sizeof(t), "\\u%04x", cp);
            }
        }
        }
        jbuf_put(c, b, t, (size_t)n);
        i += used;
    }
    jbuf_put(c, b, (const char *)p + s->len - run, run);
    jbuf_put(c, b, "\"", 1);
}

static void json_newline(struct jctx *c, struct moe_buf *b, int indent, int level)
{
    jbuf_put(c, b, "\n", 1);
    for (int i = 0; i < indent * level; i++)
        jbuf_put(c, b, " ", 1);
}

static struct jv json_key(struct jctx *c, struct jv k)
{
    switch (k.k) {
    case JK_STR: return k;
    case JK_NONE: return jv_cstr(c, "null");
    case JK_BOOL: return jv_cstr(c, k.u.i ? "true" : "false");
    case JK_INT: case JK_FLOAT: return jv_to_str(c, k);
    default: jfail(c, MOE_JINJA_RENDER, "keys must be str, int, float, bool or None, not %s", jv_type_name(k));
    }
}

static int cmp_keys(const void *x, const void *y)
{
    const struct jv *a = x, *b = y;
    size_t n = a->u.s->len < b->u.s->len ? a->u.s->len : b->u.s->len;
    int r = memcmp(a->u.s->s, b->u.s->s, n);
    return r ? r : (a->u.s->len > b->u.s->len) - (a->u.s->len < b->u.s->len);
}

static void write_json_dict(struct jctx *c, struct moe_buf *b, const struct jdict *d, bool ascii, int indent,
                            const char *isep, const char *ksep, bool sort, int level)
{
    if (d->n == 0) {
        put(c, b, "{}");
        return;
    }
    /* pairs as [key-string, index] for sorting */
    struct jv *keys = ja_alloc(c, d->n * 2 * sizeof(struct jv));
    for (size_t i = 0; i < d->n; i++) {
        keys[2 * i] = json_key(c, d->k[i]);
        keys[2 * i + 1] = jv_int((int64_t)i);
    }
    if (sort)
        qsort(keys, d->n, 2 * sizeof(struct jv), cmp_keys);
    put(c, b, "{");
    for (size_t i = 0; i < d->n; i++) {
        if (i)
            put(c, b, isep);
        if (indent >= 0)
            json_newline(c, b, indent, level + 1);
        write_json_str(c, b, keys[2 * i].u.s, ascii);
        put(c, b, ksep);
        jv_write_json(c, b, d->v[keys[2 * i + 1].u.i], ascii, indent, isep, ksep, sort, level + 1);
    }
    if (indent >= 0)
        json_newline(c, b, indent, level);
    put(c, b, "}");
}

void jv_write_json(struct jctx *c, struct moe_buf *b, struct jv v, bool ascii, int indent, const char *isep,
                   const char *ksep, bool sort, int level)
{
    if (level > 200)
        jfail(c, MOE_JINJA_LIMIT, "tojson: value nested deeper than 200 levels");
    switch (v.k) {
    case JK_NONE: put(c, b, "null"); return;
    case JK_BOOL: put(c, b, v.u.i ? "true" : "false"); return;
    case JK_INT: write_int(c, b, v.u.i); return;
    case JK_FLOAT:
        if (isnan(v.u.f))
            put(c, b, "NaN");
        else if (isinf(v.u.f))
            put(c, b, v.u.f < 0 ? "-Infinity" : "Infinity");
        else
            write_float(c, b, v.u.f);
        return;
    case JK_STR: write_json_str(c, b, v.u.s, ascii); return;
    case JK_LIST: {
        const struct jlist *l = v.u.l;
        if (l->n == 0) {
            put(c, b, "[]");
            return;
        }
        put(c, b, "[");
        for (size_t i = 0; i < l->n; i++) {
            if (i)
                put(c, b, isep);
            if (indent >= 0)
                json_newline(c, b, indent, level + 1);
            jv_write_json(c, b, l->v[i], ascii, indent, isep, ksep, sort, level + 1);
        }
        if (indent >= 0)
            json_newline(c, b, indent, level);
        put(c, b, "]");
        return;
    }
    case JK_DICT: write_json_dict(c, b, v.u.d, ascii, indent, isep, ksep, sort, level); return;
    default: jfail(c, MOE_JINJA_RENDER, "Object of type %s is not JSON serializable", jv_type_name(v));
    }
}
