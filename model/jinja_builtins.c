/* Jinja globals (range, namespace, dict, raise_exception, strftime_now) and
 * the methods of strings, dicts, lists and loop objects that chat
 * templates call, with Python's semantics. Methods that mutate a list or
 * dict exist only with llama_ext (transformers' sandbox refuses them). */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "model/jinja-impl.h"

#define MAX_RANGE 100000   /* jinja2.sandbox.MAX_RANGE */

struct jv jarg(struct jv *args, size_t n, const char *const *kw, size_t pos, const char *name)
{
    size_t npos = 0;
    for (size_t i = 0; i < n; i++) {
        if (kw && kw[i]) {
            if (name && strcmp(kw[i], name) == 0)
                return args[i];
        } else if (npos++ == pos) {
            return args[i];
        }
    }
    return jv_undef(NULL);
}

static bool given(struct jv v) { return !(v.k == JK_UNDEF && v.u.why == NULL); }

static struct jv need_str(struct jctx *c, struct jv v, const char *what)
{
    if (v.k != JK_STR) {
        if (v.k == JK_UNDEF && v.u.why)
            jv_undef_fail(c, v);
        jfail(c, MOE_JINJA_RENDER, "%s must be str, not %s", what, jv_type_name(v));
    }
    return v;
}

static int64_t need_int(struct jctx *c, struct jv v, const char *what)
{
    if (v.k != JK_INT && v.k != JK_BOOL) {
        if (v.k == JK_UNDEF && v.u.why)
            jv_undef_fail(c, v);
        jfail(c, MOE_JINJA_RENDER, "%s must be an integer, not %s", what, jv_type_name(v));
    }
    return v.u.i;
}

/* ---- globals ---- */

static struct jv g_range(struct jctx *c, const struct jv *self, struct jv *a, size_t n, const char *const *kw)
{
    (void)self;
    (void)kw;
    if (n < 1 || n > 3)
        jfail(c, MOE_JINJA_RENDER, "range expected 1 to 3 arguments, got %zu", n);
    int64_t start = 0, stop, step = 1;
    if (n == 1) {
        stop = need_int(c, a[0], "range() argument");
    } else {
        start = need_int(c, a[0], "range() argument");
        stop = need_int(c, a[1], "range() argument");
        if (n == 3)
            step = need_int(c, a[2], "range() argument");
    }
    if (step == 0)
        jfail(c, MOE_JINJA_RENDER, "range() arg 3 must not be zero");
    struct jv l = jv_list(c, 0);
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
        if (l.u.l->n >= MAX_RANGE)
            jfail(c, MOE_JINJA_RENDER, "Range too big. The sandbox blocks ranges larger than MAX_RANGE (%d).",
                  MAX_RANGE);
        jl_push(c, l.u.l, jv_int(i));
    }
    return l;
}

static struct jv kwargs_dict(struct jctx *c, struct jv *a, size_t n, const char *const *kw, int kind)
{
    struct jv d = jv_dict(c, n);
    for (size_t i = 0; i < n; i++) {
        if (kw && kw[i]) {
            jd_set(c, d.u.d, jv_cstr(c, kw[i]), a[i]);
        } else if (a[i].k == JK_DICT) {
            for (size_t j = 0; j < a[i].u.d->n; j++)
                jd_set(c, d.u.d, a[i].u.d->k[j], a[i].u.d->v[j]);
        } else {
            jfail(c, MOE_JINJA_RENDER, "%s() takes a mapping or keyword arguments",
                  kind == JK_NS ? "namespace" : "dict");
        }
    }
    d.k = (uint8_t)kind;
    return d;
}

static struct jv g_dict(struct jctx *c, const struct jv *self, struct jv *a, size_t n, const char *const *kw)
{
    (void)self;
    return kwargs_dict(c, a, n, kw, JK_DICT);
}

static struct jv g_namespace(struct jctx *c, const struct jv *self, struct jv *a, size_t n, const char *const *kw)
{
    (void)self;
    return kwargs_dict(c, a, n, kw, JK_NS);
}

static struct jv g_raise(struct jctx *c, const struct jv *self, struct jv *a, size_t n, const char *const *kw)
{
    (void)self;
    struct jv m = jarg(a, n, kw, 0, "message");
    if (!given(m))
        jfail(c, MOE_JINJA_RENDER, "raise_exception() missing 1 required positional argument: 'message'");
    struct jv s = jv_to_str(c, m);
    jfail(c, MOE_JINJA_RAISE, "%s", s.u.s->s);
}

static struct jv g_strftime(struct jctx *c, const struct jv *self, struct jv *a, size_t n, const char *const *kw)
{
    (void)self;
    struct jv f = need_str(c, jarg(a, n, kw, 0, "format"), "strftime_now() format");
    time_t t = c->opts->clock ? (time_t)c->opts->clock : time(NULL);
    struct tm tm;
    if (c->opts->clock)
        gmtime_r(&t, &tm);
    else
        localtime_r(&t, &tm);
    char out[512];
    size_t k = f.u.s->len ? strftime(out, sizeof(out), f.u.s->s, &tm) : 0;
    if (k == 0 && f.u.s->len > 0 && f.u.s->len < 200)
        out[0] = '\0';
    return jv_str(c, out, k);
}

static const struct jbuiltin globals[] = {
    { "range", g_range }, { "dict", g_dict }, { "namespace", g_namespace },
    { "raise_exception", g_raise }, { "strftime_now", g_strftime },
};

const struct jbuiltin *jglobal(const char *name)
{
    for (size_t i = 0; i < sizeof(globals) / sizeof(globals[0]); i++)
        if (strcmp(globals[i].name, name) == 0)
            return &globals[i];
    return NULL;
}

/* ---- string helpers ---- */

static bool py_space(uint32_t cp)
{
    return (cp >= 9 && cp <= 13) || (cp >= 0x1c && cp <= 0x20) || cp == 0x85 || cp == 0xa0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 || cp == 0x2029 || cp == 0x202f || cp == 0x205f ||
           cp == 0x3000;
}

static uint32_t cp_at(const char *s, size_t n, size_t i, size_t *len)
{
    const unsigned char *p = (const unsigned char *)s + i;
    unsigned char c0 = p[0];
    size_t want = c0 < 0x80 ? 1 : c0 >= 0xF0 ? 4 : c0 >= 0xE0 ? 3 : c0 >= 0xC0 ? 2 : 1;
    if (want > n - i)
        want = 1;
    uint32_t cp = want == 1 ? c0 : want == 2 ? c0 & 0x1f : want == 3 ? c0 & 0x0f : c0 & 0x07;
    for (size_t k = 1; k < want; k++)
        cp = (cp << 6) | (p[k] & 0x3f);
    *len = want;
    return cp;
}

/* The start of the code point that ends just before byte i (> lo), as
 * cp_at would have decoded it going forward: a stray continuation byte is
 * a character of its own. */
static size_t prev_start(const char *s, size_t lo, size_t i)
{
    size_t j = i - 1, k = 0, len;
    while (j > lo && k < 3 && ((unsigned char)s[j] & 0xC0) == 0x80) {
        j--;
        k++;
    }
    cp_at(s, i, j, &len);
    return j + len == i ? j : i - 1;
}

static bool in_set(const struct jstr *set, uint32_t cp)
{
    if (set == NULL)
        return py_space(cp);
    for (size_t i = 0; i < set->len;) {
        size_t l;
        if (cp_at(set->s, set->len, i, &l) == cp)
            return true;
        i += l;
    }
    return false;
}

struct jv jv_str_strip(struct jctx *c, struct jv s, struct jv chars, bool left, bool right)
{
    const struct jstr *set = NULL;
    if (given(chars) && chars.k != JK_NONE)
        set = need_str(c, chars, "strip arg").u.s;
    const char *p = s.u.s->s;
    size_t a = 0, b = s.u.s->len, l;
    while (left && a < b && in_set(set, cp_at(p, b, a, &l)))
        a += l;
    while (right && b > a) {
        size_t st = prev_start(p, a, b);
        if (!in_set(set, cp_at(p, b, st, &l)))
            break;
        b = st;
    }
    return jv_str(c, p + a, b - a);
}

static struct jv m_strip(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    return jv_str_strip(c, *s, jarg(a, n, kw, 0, "chars"), true, true);
}

static struct jv m_lstrip(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    return jv_str_strip(c, *s, jarg(a, n, kw, 0, "chars"), true, false);
}

static struct jv m_rstrip(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    return jv_str_strip(c, *s, jarg(a, n, kw, 0, "chars"), false, true);
}

static bool affix(struct jctx *c, const struct jstr *s, struct jv x, bool end)
{
    if (x.k == JK_LIST && x.u.l->tuple) {
        for (size_t i = 0; i < x.u.l->n; i++)
            if (affix(c, s, x.u.l->v[i], end))
                return true;
        return false;
    }
    const struct jstr *p = need_str(c, x, end ? "endswith arg" : "startswith arg").u.s;
    if (p->len > s->len)
        return false;
    return memcmp(s->s + (end ? s->len - p->len : 0), p->s, p->len) == 0;
}

static struct jv m_startswith(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    return jv_bool(affix(c, s->u.s, jarg(a, n, kw, 0, "prefix"), false));
}

static struct jv m_endswith(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    return jv_bool(affix(c, s->u.s, jarg(a, n, kw, 0, "suffix"), true));
}

static struct jv split_ws(struct jctx *c, const struct jstr *s, int64_t maxsplit)
{
    struct jv l = jv_list(c, 0);
    size_t i = 0, len;
    for (;;) {
        while (i < s->len && py_space(cp_at(s->s, s->len, i, &len)))
            i += len;
        if (i >= s->len)
            break;
        if (maxsplit >= 0 && (int64_t)l.u.l->n == maxsplit) {
            size_t e = s->len;
            while (e > i && py_space(cp_at(s->s, e, prev_start(s->s, i, e), &len)))
                e = prev_start(s->s, i, e);
            jl_push(c, l.u.l, jv_str(c, s->s + i, e - i));
            break;
        }
        size_t j = i;
        while (j < s->len && !py_space(cp_at(s->s, s->len, j, &len)))
            j += len;
        jl_push(c, l.u.l, jv_str(c, s->s + i, j - i));
        i = j;
    }
    return l;
}

static struct jv split_sep(struct jctx *c, const struct jstr *s, const struct jstr *sep, int64_t maxsplit)
{
    if (sep->len == 0)
        jfail(c, MOE_JINJA_RENDER, "empty separator");
    struct jv l = jv_list(c, 0);
    size_t i = 0;
    for (;;) {
        const char *hit = maxsplit >= 0 && (int64_t)l.u.l->n >= maxsplit ? NULL
                          : memmem(s->s + i, s->len - i, sep->s, sep->len);
        if (hit == NULL) {
            jl_push(c, l.u.l, jv_str(c, s->s + i, s->len - i));
            return l;
        }
        jl_push(c, l.u.l, jv_str(c, s->s + i, (size_t)(hit - s->s) - i));
        i = (size_t)(hit - s->s) + sep->len;
    }
}

static struct jv m_split(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    struct jv sep = jarg(a, n, kw, 0, "sep"), mx = jarg(a, n, kw, 1, "maxsplit");
    int64_t maxsplit = given(mx) ? need_int(c, mx, "maxsplit") : -1;
    if (!given(sep) || sep.k == JK_NONE)
        return split_ws(c, s->u.s, maxsplit);
    return split_sep(c, s->u.s, need_str(c, sep, "separator").u.s, maxsplit);
}

static struct jv m_rsplit(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    struct jv sep = jarg(a, n, kw, 0, "sep"), mx = jarg(a, n, kw, 1, "maxsplit");
    int64_t maxsplit = given(mx) ? need_int(c, mx, "maxsplit") : -1;
    struct jv all = (!given(sep) || sep.k == JK_NONE) ? split_ws(c, s->u.s, -1)
                    : split_sep(c, s->u.s, need_str(c, sep, "separator").u.s, -1);
    if (maxsplit < 0 || (size_t)maxsplit + 1 >= all.u.l->n)
        return all;
    /* join the leading parts back: exact for a separator; runs of whitespace become one space */
    size_t keep = all.u.l->n - (size_t)maxsplit;
    struct jv l = jv_list(c, 0);
    struct moe_buf *b = jtmp_push(c);
    for (size_t i = 0; i < keep; i++) {
        if (i)
            jbuf_put(c, b, given(sep) && sep.k == JK_STR ? sep.u.s->s : " ", given(sep) && sep.k == JK_STR
                     ? sep.u.s->len : 1);
        jbuf_put(c, b, all.u.l->v[i].u.s->s, all.u.l->v[i].u.s->len);
    }
    jl_push(c, l.u.l, jtmp_pop(c, b));
    for (size_t i = keep; i < all.u.l->n; i++)
        jl_push(c, l.u.l, all.u.l->v[i]);
    return l;
}

static struct jv m_replace(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    const struct jstr *old = need_str(c, jarg(a, n, kw, 0, "old"), "replace() arg 1").u.s;
    const struct jstr *new = need_str(c, jarg(a, n, kw, 1, "new"), "replace() arg 2").u.s;
    struct jv cnt = jarg(a, n, kw, 2, "count");
    int64_t count = given(cnt) ? need_int(c, cnt, "count") : -1;
    const struct jstr *src = s->u.s;
    struct moe_buf *b = jtmp_push(c);
    size_t i = 0;
    int64_t done = 0;
    if (old->len == 0) {
        /* Python inserts `new` between every character and at both ends */
        size_t l;
        while (count < 0 || done < count) {
            jbuf_put(c, b, new->s, new->len);
            done++;
            if (i >= src->len)
                break;
            cp_at(src->s, src->len, i, &l);
            jbuf_put(c, b, src->s + i, l);
            i += l;
        }
        jbuf_put(c, b, src->s + i, src->len - i);
        return jtmp_pop(c, b);
    }
    while (count < 0 || done < count) {
        const char *hit = memmem(src->s + i, src->len - i, old->s, old->len);
        if (hit == NULL)
            break;
        jbuf_put(c, b, src->s + i, (size_t)(hit - src->s) - i);
        jbuf_put(c, b, new->s, new->len);
        i = (size_t)(hit - src->s) + old->len;
        done++;
    }
    jbuf_put(c, b, src->s + i, src->len - i);
    return jtmp_pop(c, b);
}

static struct jv map_ascii(struct jctx *c, const struct jstr *s, int mode)
{
    struct jv r = jv_str(c, s->s, s->len);
    char *p = r.u.s->s;
    bool prev_cased = false;
    for (size_t i = 0; i < s->len; i++) {
        char ch = p[i];
        bool lower = ch >= 'a' && ch <= 'z', upper = ch >= 'A' && ch <= 'Z';
        bool up = mode == 'U' || (mode == 'T' && !prev_cased) || (mode == 'C' && i == 0);
        if (mode == 'S')
            up = lower;
        if (up && lower)
            p[i] = (char)(ch - 32);
        else if (!up && upper)
            p[i] = (char)(ch + 32);
        prev_cased = lower || upper;
    }
    return r;
}

static struct jv m_upper(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    (void)a, (void)n, (void)kw;
    return map_ascii(c, s->u.s, 'U');
}

static struct jv m_lower(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    (void)a, (void)n, (void)kw;
    return map_ascii(c, s->u.s, 'L');
}

static struct jv m_title(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    (void)a, (void)n, (void)kw;
    return map_ascii(c, s->u.s, 'T');
}

static struct jv m_capitalize(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    (void)a, (void)n, (void)kw;
    return map_ascii(c, s->u.s, 'C');
}

static struct jv m_join(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    struct jv it = jarg(a, n, kw, 0, "iterable");
    if (it.k == JK_UNDEF && it.u.why)
        jv_undef_fail(c, it);
    struct jv l = jv_iterable(c, it);
    struct moe_buf *b = jtmp_push(c);
    for (size_t i = 0; i < l.u.l->n; i++) {
        if (i)
            jbuf_put(c, b, s->u.s->s, s->u.s->len);
        struct jv x = need_str(c, l.u.l->v[i], "sequence item");
        jbuf_put(c, b, x.u.s->s, x.u.s->len);
    }
    return jtmp_pop(c, b);
}

static int64_t find_sub(struct jctx *c, const struct jv *s, struct jv sub, bool last)
{
    const struct jstr *h = s->u.s, *x = need_str(c, sub, "substring").u.s;
    int64_t found = -1;
    for (size_t i = 0; i + x->len <= h->len; i++) {
        if (memcmp(h->s + i, x->s, x->len) == 0) {
            found = (int64_t)ju8_count(h->s, i);
            if (!last)
                break;
        }
    }
    return found;
}

static struct jv m_find(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    return jv_int(find_sub(c, s, jarg(a, n, kw, 0, "sub"), false));
}

static struct jv m_rfind(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    return jv_int(find_sub(c, s, jarg(a, n, kw, 0, "sub"), true));
}

static struct jv m_count(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    struct jv x = jarg(a, n, kw, 0, "x");
    int64_t k = 0;
    if (s->k == JK_LIST) {
        for (size_t i = 0; i < s->u.l->n; i++)
            k += jv_equal(s->u.l->v[i], x);
        return jv_int(k);
    }
    const struct jstr *h = s->u.s, *sub = need_str(c, x, "substring").u.s;
    if (sub->len == 0)
        return jv_int((int64_t)ju8_count(h->s, h->len) + 1);
    for (size_t i = 0; i + sub->len <= h->len;) {
        if (memcmp(h->s + i, sub->s, sub->len) == 0) {
            k++;
            i += sub->len;
        } else {
            i++;
        }
    }
    return jv_int(k);
}

static struct jv m_splitlines(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    (void)a, (void)n, (void)kw;
    const struct jstr *h = s->u.s;
    struct jv l = jv_list(c, 0);
    size_t st = 0;
    for (size_t i = 0; i < h->len; i++) {
        if (h->s[i] == '\n' || h->s[i] == '\r') {
            jl_push(c, l.u.l, jv_str(c, h->s + st, i - st));
            if (h->s[i] == '\r' && i + 1 < h->len && h->s[i + 1] == '\n')
                i++;
            st = i + 1;
        }
    }
    if (st < h->len)
        jl_push(c, l.u.l, jv_str(c, h->s + st, h->len - st));
    return l;
}

static struct jv str_class(const struct jv *s, int cls)
{
    const struct jstr *h = s->u.s;
    bool any_cased = false;
    if (h->len == 0)
        return jv_bool(false);
    for (size_t i = 0; i < h->len; i++) {
        char ch = h->s[i];
        bool dig = ch >= '0' && ch <= '9', low = ch >= 'a' && ch <= 'z', up = ch >= 'A' && ch <= 'Z';
        any_cased |= low || up;
        bool ok = cls == 'd' ? dig : cls == 'a' ? low || up : cls == 'n' ? dig || low || up
                  : cls == 's' ? py_space((unsigned char)ch) : cls == 'l' ? !up : !low;
        if (!ok)
            return jv_bool(false);
    }
    return jv_bool(cls == 'l' || cls == 'u' ? any_cased : true);
}

#define STR_CLASS(fn, cls) \
    static struct jv fn(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw) \
    { (void)c, (void)a, (void)n, (void)kw; return str_class(s, cls); }
STR_CLASS(m_isdigit, 'd')
STR_CLASS(m_isalpha, 'a')
STR_CLASS(m_isalnum, 'n')
STR_CLASS(m_isspace, 's')
STR_CLASS(m_islower, 'l')
STR_CLASS(m_isupper, 'u')

/* str.format: {} {0} {name} and {{ }}; no format specs */
static struct jv m_format(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    const struct jstr *f = s->u.s;
    struct moe_buf *b = jtmp_push(c);
    size_t auto_i = 0;
    for (size_t i = 0; i < f->len; i++) {
        char ch = f->s[i];
        if ((ch == '{' || ch == '}') && i + 1 < f->len && f->s[i + 1] == ch) {
            jbuf_put(c, b, &ch, 1);
            i++;
            continue;
        }
        if (ch != '{') {
            if (ch == '}')
                jfail(c, MOE_JINJA_RENDER, "Single '}' encountered in format string");
            jbuf_put(c, b, &ch, 1);
            continue;
        }
        const char *e = memchr(f->s + i, '}', f->len - i);
        if (e == NULL)
            jfail(c, MOE_JINJA_RENDER, "Single '{' encountered in format string");
        size_t fl = (size_t)(e - (f->s + i)) - 1;
        char field[64];
        if (fl >= sizeof(field) || memchr(f->s + i + 1, ':', fl) || memchr(f->s + i + 1, '!', fl))
            jfail(c, MOE_JINJA_RENDER, "str.format: only {}, {N} and {name} fields are supported");
        memcpy(field, f->s + i + 1, fl);
        field[fl] = '\0';
        struct jv v;
        if (fl == 0)
            v = jarg(a, n, kw, auto_i++, NULL);
        else if (field[0] >= '0' && field[0] <= '9')
            v = jarg(a, n, kw, (size_t)atoi(field), NULL);
        else
            v = jarg(a, n, kw, (size_t)-1, field);
        if (!given(v))
            jfail(c, MOE_JINJA_RENDER, "str.format: no argument for field '{%s}'", field);
        jv_write_str(c, b, v);
        i = (size_t)(e - f->s);
    }
    return jtmp_pop(c, b);
}

/* ---- dict, list and loop methods ---- */

static struct jv pair(struct jctx *c, struct jv k, struct jv v)
{
    struct jv t = jv_list(c, 2);
    t.u.l->tuple = true;
    jl_push(c, t.u.l, k);
    jl_push(c, t.u.l, v);
    return t;
}

static struct jv m_items(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    (void)a, (void)n, (void)kw;
    struct jv l = jv_list(c, s->u.d->n);
    for (size_t i = 0; i < s->u.d->n; i++)
        jl_push(c, l.u.l, pair(c, s->u.d->k[i], s->u.d->v[i]));
    return l;
}

static struct jv m_keys(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    (void)a, (void)n, (void)kw;
    struct jv l = jv_list(c, s->u.d->n);
    for (size_t i = 0; i < s->u.d->n; i++)
        jl_push(c, l.u.l, s->u.d->k[i]);
    return l;
}

static struct jv m_values(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    (void)a, (void)n, (void)kw;
    struct jv l = jv_list(c, s->u.d->n);
    for (size_t i = 0; i < s->u.d->n; i++)
        jl_push(c, l.u.l, s->u.d->v[i]);
    return l;
}

static struct jv m_get(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    (void)c;
    struct jv k = jarg(a, n, kw, 0, NULL), d = jarg(a, n, kw, 1, NULL);
    struct jv *v = jd_get(s->u.d, k);
    return v ? *v : given(d) ? d : jv_none();
}

static struct jv m_copy(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    (void)a, (void)n, (void)kw;
    struct jv d = jv_dict(c, s->u.d->n);
    for (size_t i = 0; i < s->u.d->n; i++)
        jd_set(c, d.u.d, s->u.d->k[i], s->u.d->v[i]);
    return d;
}

static struct jv m_update(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    struct jv add = kwargs_dict(c, a, n, kw, JK_DICT);
    for (size_t i = 0; i < add.u.d->n; i++)
        jd_set(c, s->u.d, add.u.d->k[i], add.u.d->v[i]);
    return jv_none();
}

static struct jv m_append(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    jl_push(c, s->u.l, jarg(a, n, kw, 0, NULL));
    return jv_none();
}

static struct jv m_extend(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    struct jv l = jv_iterable(c, jarg(a, n, kw, 0, NULL));
    for (size_t i = 0; i < l.u.l->n; i++)
        jl_push(c, s->u.l, l.u.l->v[i]);
    return jv_none();
}

static struct jv m_pop(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    struct jv k = jarg(a, n, kw, 0, NULL);
    if (s->k == JK_DICT) {
        struct jv *v = jd_get(s->u.d, k);
        if (v == NULL) {
            struct jv d = jarg(a, n, kw, 1, NULL);
            if (!given(d))
                jfail(c, MOE_JINJA_RENDER, "pop: key not found");
            return d;
        }
        struct jv r = *v;
        size_t i = (size_t)(v - s->u.d->v);
        memmove(&s->u.d->k[i], &s->u.d->k[i + 1], (s->u.d->n - i - 1) * sizeof(struct jv));
        memmove(&s->u.d->v[i], &s->u.d->v[i + 1], (s->u.d->n - i - 1) * sizeof(struct jv));
        s->u.d->n--;
        return r;
    }
    struct jlist *l = s->u.l;
    int64_t i = given(k) ? need_int(c, k, "pop index") : -1;
    if (i < 0)
        i += (int64_t)l->n;
    if (i < 0 || i >= (int64_t)l->n)
        jfail(c, MOE_JINJA_RENDER, "pop index out of range");
    struct jv r = l->v[i];
    memmove(&l->v[i], &l->v[i + 1], (l->n - (size_t)i - 1) * sizeof(struct jv));
    l->n--;
    return r;
}

static struct jv m_index(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    struct jv x = jarg(a, n, kw, 0, NULL);
    if (s->k == JK_STR) {
        int64_t i = find_sub(c, s, x, false);
        if (i < 0)
            jfail(c, MOE_JINJA_RENDER, "substring not found");
        return jv_int(i);
    }
    for (size_t i = 0; i < s->u.l->n; i++)
        if (jv_equal(s->u.l->v[i], x))
            return jv_int((int64_t)i);
    jfail(c, MOE_JINJA_RENDER, "value is not in list");
}

static struct jv m_cycle(struct jctx *c, const struct jv *s, struct jv *a, size_t n, const char *const *kw)
{
    (void)kw;
    if (n == 0)
        jfail(c, MOE_JINJA_RENDER, "no items for cycling given");
    return a[s->u.lp->i % n];
}

static const struct jbuiltin str_methods[] = {
    { "strip", m_strip }, { "lstrip", m_lstrip }, { "rstrip", m_rstrip }, { "startswith", m_startswith },
    { "endswith", m_endswith }, { "split", m_split }, { "rsplit", m_rsplit }, { "replace", m_replace },
    { "upper", m_upper }, { "lower", m_lower }, { "title", m_title }, { "capitalize", m_capitalize },
    { "join", m_join }, { "find", m_find }, { "rfind", m_rfind }, { "count", m_count }, { "index", m_index },
    { "splitlines", m_splitlines }, { "isdigit", m_isdigit }, { "isalpha", m_isalpha },
    { "isalnum", m_isalnum }, { "isspace", m_isspace }, { "islower", m_islower }, { "isupper", m_isupper },
    { "format", m_format }, { NULL, NULL },
};
static const struct jbuiltin dict_methods[] = {
    { "items", m_items }, { "keys", m_keys }, { "values", m_values }, { "get", m_get }, { "copy", m_copy },
    { NULL, NULL },
};
static const struct jbuiltin dict_mutators[] = {
    { "update", m_update }, { "pop", m_pop }, { "setdefault", NULL }, { "clear", NULL }, { "popitem", NULL },
    { NULL, NULL },
};
static const struct jbuiltin list_methods[] = {
    { "index", m_index }, { "count", m_count }, { NULL, NULL },
};
static const struct jbuiltin list_mutators[] = {
    { "append", m_append }, { "extend", m_extend }, { "pop", m_pop }, { "insert", NULL }, { "remove", NULL },
    { "reverse", NULL }, { "sort", NULL }, { "clear", NULL }, { NULL, NULL },
};
static const struct jbuiltin loop_methods[] = { { "cycle", m_cycle }, { NULL, NULL } };
static const struct jbuiltin unsafe = { "unsafe", NULL };

static const struct jbuiltin *find_in(const struct jbuiltin *t, const char *name)
{
    for (; t->name; t++)
        if (strcmp(t->name, name) == 0)
            return t;
    return NULL;
}

const struct jbuiltin *jmethod_find(struct jv self, const char *name, bool llama_ext)
{
    const struct jbuiltin *m = NULL, *mut = NULL;
    switch (self.k) {
    case JK_STR: return find_in(str_methods, name);
    case JK_LOOP: return find_in(loop_methods, name);
    case JK_DICT: m = find_in(dict_methods, name); mut = find_in(dict_mutators, name); break;
    case JK_LIST: m = find_in(list_methods, name); mut = find_in(list_mutators, name); break;
    default: return NULL;
    }
    if (m)
        return m;
    if (mut == NULL)
        return NULL;
    return llama_ext && mut->fn ? mut : &unsafe;
}
