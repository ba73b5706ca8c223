/* Jinja filters and tests, as jinja2's filters.py and tests.py define them
 * (the ones chat templates use), plus transformers' tojson (json.dumps) and
 * llama.cpp's from_json (with llama_ext only). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model/jinja-impl.h"

static bool given(struct jv v) { return !(v.k == JK_UNDEF && v.u.why == NULL); }

#define ARG(i, name) jarg(args, n, kw, (i), (name))

/* a stable merge sort whose comparison may fail (longjmp): no malloc inside */
typedef int (*jcmp_fn)(struct jctx *c, struct jv a, struct jv b, const void *arg);

static void msort(struct jctx *c, struct jv *v, struct jv *tmp, size_t n, jcmp_fn cmp, const void *arg)
{
    if (n < 2)
        return;
    size_t h = n / 2;
    msort(c, v, tmp, h, cmp, arg);
    msort(c, v + h, tmp, n - h, cmp, arg);
    size_t i = 0, j = h, k = 0;
    while (i < h && j < n)
        tmp[k++] = cmp(c, v[j], v[i], arg) < 0 ? v[j++] : v[i++];
    while (i < h)
        tmp[k++] = v[i++];
    while (j < n)
        tmp[k++] = v[j++];
    memcpy(v, tmp, n * sizeof(*v));
}

static struct jv sorted(struct jctx *c, struct jv l, jcmp_fn cmp, const void *arg, bool reverse)
{
    struct jv r = jv_list(c, l.u.l->n);
    for (size_t i = 0; i < l.u.l->n; i++)
        jl_push(c, r.u.l, l.u.l->v[i]);
    struct jv *tmp = ja_alloc(c, (r.u.l->n + 1) * sizeof(struct jv));
    msort(c, r.u.l->v, tmp, r.u.l->n, cmp, arg);
    if (reverse)
        for (size_t i = 0; i < r.u.l->n / 2; i++) {
            struct jv t = r.u.l->v[i];
            r.u.l->v[i] = r.u.l->v[r.u.l->n - 1 - i];
            r.u.l->v[r.u.l->n - 1 - i] = t;
        }
    return r;
}

static struct jv lower_if_str(struct jctx *c, struct jv v, bool cs)
{
    if (cs || v.k != JK_STR)
        return v;
    struct jv r = jv_str(c, v.u.s->s, v.u.s->len);
    for (size_t i = 0; i < r.u.s->len; i++)
        if (r.u.s->s[i] >= 'A' && r.u.s->s[i] <= 'Z')
            r.u.s->s[i] = (char)(r.u.s->s[i] + 32);
    return r;
}

/* environment.getitem along a dotted path ("a.b", "0"), as make_attrgetter */
static struct jv attr_path(struct jctx *c, struct jv v, struct jv path)
{
    if (path.k == JK_INT)
        return jgetitem(c, v, path);
    const char *p = path.k == JK_STR ? path.u.s->s : "";
    while (*p) {
        const char *dot = strchr(p, '.');
        size_t len = dot ? (size_t)(dot - p) : strlen(p);
        struct jv key = jv_str(c, p, len);
        bool digits = len > 0;
        for (size_t i = 0; i < len; i++)
            digits &= p[i] >= '0' && p[i] <= '9';
        if (digits)
            key = jv_int(atoll(key.u.s->s));
        v = jgetitem(c, v, key);
        p += len + (dot != NULL);
    }
    return v;
}

struct sortarg { bool cs; struct jv attr; int by_value; };

static int cmp_sort(struct jctx *c, struct jv a, struct jv b, const void *arg)
{
    const struct sortarg *s = arg;
    if (s->by_value >= 0) {
        a = a.u.l->v[s->by_value];
        b = b.u.l->v[s->by_value];
    } else if (given(s->attr)) {
        a = attr_path(c, a, s->attr);
        b = attr_path(c, b, s->attr);
    }
    return jv_compare(c, lower_if_str(c, a, s->cs), lower_if_str(c, b, s->cs));
}

/* ---- tojson / from_json ---- */

struct jv jv_tojson(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    struct jv ea = ARG(0, "ensure_ascii"), ind = ARG(1, "indent"), sep = ARG(2, "separators"),
              sk = ARG(3, "sort_keys");
    bool ascii = given(ea) && jv_truthy(ea);
    int indent = -1;
    if (given(ind) && ind.k != JK_NONE) {
        if (ind.k != JK_INT)
            jfail(c, MOE_JINJA_RENDER, "tojson: indent must be an integer");
        indent = ind.u.i < 0 ? 0 : ind.u.i > 64 ? 64 : (int)ind.u.i;
    }
    const char *isep = indent >= 0 ? "," : ", ", *ksep = ": ";
    if (given(sep) && sep.k != JK_NONE) {
        if (sep.k != JK_LIST || sep.u.l->n != 2 || sep.u.l->v[0].k != JK_STR || sep.u.l->v[1].k != JK_STR)
            jfail(c, MOE_JINJA_RENDER, "tojson: separators must be a pair of strings");
        isep = sep.u.l->v[0].u.s->s;
        ksep = sep.u.l->v[1].u.s->s;
    }
    struct moe_buf *b = jtmp_push(c);
    jv_write_json(c, b, v, ascii, indent, isep, ksep, given(sk) && jv_truthy(sk), 0);
    return jtmp_pop(c, b);
}

/* ---- filters ---- */

typedef struct jv (*filter_fn)(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw);

static struct jv f_tojson(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    return jv_tojson(c, v, args, n, kw);
}

static struct jv f_from_json(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    (void)args, (void)n, (void)kw;
    if (v.k != JK_STR)
        jfail(c, MOE_JINJA_RENDER, "from_json expects a string, not %s", jv_type_name(v));
    return jv_from_json_text(c, v.u.s->s, v.u.s->len);
}

static struct jv f_length(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    (void)args, (void)n, (void)kw;
    return jv_int((int64_t)jv_len(c, v));
}

static struct jv f_string(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    (void)args, (void)n, (void)kw;
    return jv_to_str(c, v);
}

static struct jv f_safe(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    (void)args, (void)n, (void)kw;
    struct jv r = v.k == JK_UNDEF ? jv_str(c, "", 0) : jv_to_str(c, v);
    r.safe = 1;
    return r;
}

static struct jv f_trim(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    struct jv r = jv_str_strip(c, jv_to_str(c, v), ARG(0, "chars"), true, true);
    r.safe = v.k == JK_STR && v.safe;
    return r;
}

static struct jv f_items(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    (void)args, (void)n, (void)kw;
    if (v.k == JK_UNDEF)
        return jv_list(c, 0);
    if (v.k != JK_DICT)
        jfail(c, MOE_JINJA_RENDER, "Can only get item pairs from a mapping.");
    struct jv l = jv_list(c, v.u.d->n);
    for (size_t i = 0; i < v.u.d->n; i++) {
        struct jv t = jv_list(c, 2);
        t.u.l->tuple = true;
        jl_push(c, t.u.l, v.u.d->k[i]);
        jl_push(c, t.u.l, v.u.d->v[i]);
        jl_push(c, l.u.l, t);
    }
    return l;
}

static struct jv f_join(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    struct jv sep = ARG(0, "d"), attr = ARG(1, "attribute");
    struct jv l = jv_iterable(c, v);
    struct moe_buf *b = jtmp_push(c);
    for (size_t i = 0; i < l.u.l->n; i++) {
        if (i && given(sep))
            jv_write_str(c, b, sep);
        jv_write_str(c, b, given(attr) ? attr_path(c, l.u.l->v[i], attr) : l.u.l->v[i]);
    }
    return jtmp_pop(c, b);
}

static struct jv f_default(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    struct jv d = ARG(0, "default_value"), boolean = ARG(1, "boolean");
    if (v.k == JK_UNDEF || (given(boolean) && jv_truthy(boolean) && !jv_truthy(v)))
        return given(d) ? d : jv_str(c, "", 0);
    return v;
}

static struct jv f_list(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    (void)args, (void)n, (void)kw;
    struct jv it = jv_iterable(c, v);
    struct jv l = jv_list(c, it.u.l->n);
    for (size_t i = 0; i < it.u.l->n; i++)
        jl_push(c, l.u.l, it.u.l->v[i]);
    return l;
}

static struct jv f_first(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    (void)args, (void)n, (void)kw;
    struct jv l = jv_iterable(c, v);
    return l.u.l->n ? l.u.l->v[0] : jv_undef("No first item, sequence was empty.");
}

static struct jv f_last(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    (void)args, (void)n, (void)kw;
    if (v.k == JK_DICT)
        jfail(c, MOE_JINJA_RENDER, "'dict' object is not reversible");
    struct jv l = jv_iterable(c, v);
    return l.u.l->n ? l.u.l->v[l.u.l->n - 1] : jv_undef("No last item, sequence was empty.");
}

static struct jv f_reverse(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    (void)args, (void)n, (void)kw;
    struct jv l = jv_iterable(c, v), r = jv_list(c, l.u.l->n);
    for (size_t i = l.u.l->n; i-- > 0;)
        jl_push(c, r.u.l, l.u.l->v[i]);
    if (v.k != JK_STR)
        return r;
    struct moe_buf *b = jtmp_push(c);
    for (size_t i = 0; i < r.u.l->n; i++)
        jv_write_str(c, b, r.u.l->v[i]);
    return jtmp_pop(c, b);
}

static struct jv call_method(struct jctx *c, struct jv self, const char *name, struct jv *args, size_t n,
                             const char *const *kw)
{
    return jcall(c, jgetattr(c, self, name), args, n, kw);
}

static struct jv f_replace(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    struct jv a[3] = { ARG(0, "old"), ARG(1, "new"), ARG(2, "count") };
    return call_method(c, jv_to_str(c, v), "replace", a, given(a[2]) && a[2].k != JK_NONE ? 3 : 2, NULL);
}

static struct jv f_upper(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    (void)args, (void)n, (void)kw;
    return call_method(c, jv_to_str(c, v), "upper", NULL, 0, NULL);
}

static struct jv f_lower(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    (void)args, (void)n, (void)kw;
    return call_method(c, jv_to_str(c, v), "lower", NULL, 0, NULL);
}

static struct jv f_capitalize(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    (void)args, (void)n, (void)kw;
    return call_method(c, jv_to_str(c, v), "capitalize", NULL, 0, NULL);
}

/* jinja2's do_title: words split at -, whitespace, (, {, [ and < */
static struct jv f_title(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    (void)args, (void)n, (void)kw;
    struct jv s = jv_to_str(c, v);
    struct jv r = jv_str(c, s.u.s->s, s.u.s->len);
    bool start = true;
    for (size_t i = 0; i < r.u.s->len; i++) {
        char *ch = &r.u.s->s[i];
        bool sep = strchr("-({[< \t\n\r\f\v", *ch) != NULL && *ch;
        if (sep) {
            start = true;
            continue;
        }
        if (start && *ch >= 'a' && *ch <= 'z')
            *ch = (char)(*ch - 32);
        else if (!start && *ch >= 'A' && *ch <= 'Z')
            *ch = (char)(*ch + 32);
        start = false;
    }
    return r;
}

static struct jv f_int(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    struct jv d = ARG(0, "default");
    (void)c;
    if (v.k == JK_INT || v.k == JK_BOOL)
        return jv_int(v.u.i);
    if (v.k == JK_FLOAT && isfinite(v.u.f) && fabs(v.u.f) < 9e18)
        return jv_int((int64_t)v.u.f);
    if (v.k == JK_STR) {
        char *end;
        const char *s = v.u.s->s;
        long long i = strtoll(s, &end, 10);
        while (*end == ' ')
            end++;
        if (end != s && *end == '\0')
            return jv_int(i);
        double f = strtod(s, &end);
        if (end != s && *end == '\0' && isfinite(f) && fabs(f) < 9e18)
            return jv_int((int64_t)f);
    }
    return given(d) ? d : jv_int(0);
}

static struct jv f_float(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    struct jv d = ARG(0, "default");
    (void)c;
    if (v.k == JK_INT || v.k == JK_BOOL)
        return jv_float((double)v.u.i);
    if (v.k == JK_FLOAT)
        return v;
    if (v.k == JK_STR) {
        char *end;
        double f = strtod(v.u.s->s, &end);
        if (end != v.u.s->s && *end == '\0')
            return jv_float(f);
    }
    return given(d) ? d : jv_float(0);
}

static struct jv f_abs(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    (void)args, (void)n, (void)kw;
    if (v.k == JK_FLOAT)
        return jv_float(fabs(v.u.f));
    if ((v.k == JK_INT || v.k == JK_BOOL) && v.u.i != INT64_MIN)
        return jv_int(v.u.i < 0 ? -v.u.i : v.u.i);
    jfail(c, MOE_JINJA_RENDER, "bad operand type for abs(): '%s'", jv_type_name(v));
}

static struct jv f_round(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    struct jv p = ARG(0, "precision"), m = ARG(1, "method");
    int64_t prec = given(p) && p.k == JK_INT ? p.u.i : 0;
    if (v.k == JK_INT || v.k == JK_BOOL)
        return jv_int(v.u.i);
    if (v.k != JK_FLOAT)
        jfail(c, MOE_JINJA_RENDER, "type %s doesn't define __round__ method", jv_type_name(v));
    double scale = pow(10, (double)prec), x = v.u.f * scale;
    if (given(m) && jv_is_str(m, "floor"))
        x = floor(x);
    else if (given(m) && jv_is_str(m, "ceil"))
        x = ceil(x);
    else
        x = nearbyint(x);    /* round half to even, as Python's round() */
    return jv_float(x / scale);
}

static struct jv f_sort(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    struct jv rev = ARG(0, "reverse"), cs = ARG(1, "case_sensitive"), attr = ARG(2, "attribute");
    struct sortarg s = { given(cs) && jv_truthy(cs), attr, -1 };
    return sorted(c, jv_iterable(c, v), cmp_sort, &s, given(rev) && jv_truthy(rev));
}

static struct jv f_dictsort(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    struct jv cs = ARG(0, "case_sensitive"), by = ARG(1, "by"), rev = ARG(2, "reverse");
    struct jv items = f_items(c, v, NULL, 0, NULL);
    struct sortarg s = { given(cs) && jv_truthy(cs), jv_undef(NULL), given(by) && jv_is_str(by, "value") };
    return sorted(c, items, cmp_sort, &s, given(rev) && jv_truthy(rev));
}

static struct jv f_unique(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    struct jv cs = ARG(0, "case_sensitive"), attr = ARG(1, "attribute");
    struct jv l = jv_iterable(c, v), r = jv_list(c, 0), seen = jv_list(c, 0);
    for (size_t i = 0; i < l.u.l->n; i++) {
        struct jv key = lower_if_str(c, given(attr) ? attr_path(c, l.u.l->v[i], attr) : l.u.l->v[i],
                                     given(cs) && jv_truthy(cs));
        bool dup = false;
        for (size_t j = 0; j < seen.u.l->n && !dup; j++)
            dup = jv_equal(seen.u.l->v[j], key);
        if (!dup) {
            jl_push(c, seen.u.l, key);
            jl_push(c, r.u.l, l.u.l->v[i]);
        }
    }
    return r;
}

static struct jv f_map(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    struct jv attr = ARG((size_t)-1, "attribute"), def = ARG((size_t)-1, "default");
    struct jv l = jv_iterable(c, v), r = jv_list(c, l.u.l->n);
    for (size_t i = 0; i < l.u.l->n; i++) {
        struct jv x = l.u.l->v[i];
        if (given(attr)) {
            x = attr_path(c, x, attr);
            if (x.k == JK_UNDEF && given(def))
                x = def;
        } else {
            struct jv name = ARG(0, NULL);
            if (name.k != JK_STR)
                jfail(c, MOE_JINJA_RENDER, "map: expected a filter name or attribute=");
            /* the remaining positional arguments go to the filter */
            size_t skip = 0;
            while (skip < n && kw && kw[skip])
                skip++;
            x = jfilter(c, name.u.s->s, x, args + skip + 1, n - skip - 1, kw ? kw + skip + 1 : NULL);
        }
        jl_push(c, r.u.l, x);
    }
    return r;
}

/* select/reject(test, args...), selectattr/rejectattr(attr, test, args...) */
static struct jv select_common(struct jctx *c, struct jv v, struct jv *args, size_t n, bool attr, bool want)
{
    struct jv l = jv_iterable(c, v), r = jv_list(c, 0);
    size_t k = 0;
    struct jv path = jv_undef(NULL);
    if (attr) {
        if (n < 1)
            jfail(c, MOE_JINJA_RENDER, "selectattr/rejectattr need an attribute");
        path = args[k++];
    }
    const char *test = NULL;
    if (k < n) {
        if (args[k].k != JK_STR)
            jfail(c, MOE_JINJA_RENDER, "select: the test name must be a string");
        test = args[k++].u.s->s;
    }
    for (size_t i = 0; i < l.u.l->n; i++) {
        struct jv x = attr ? attr_path(c, l.u.l->v[i], path) : l.u.l->v[i];
        bool ok = test ? jtest(c, test, x, args + k, n - k) : jv_truthy(x);
        if (ok == want)
            jl_push(c, r.u.l, l.u.l->v[i]);
    }
    return r;
}

static struct jv f_select(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    (void)kw;
    return select_common(c, v, args, n, false, true);
}

static struct jv f_reject(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    (void)kw;
    return select_common(c, v, args, n, false, false);
}

static struct jv f_selectattr(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    (void)kw;
    return select_common(c, v, args, n, true, true);
}

static struct jv f_rejectattr(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    (void)kw;
    return select_common(c, v, args, n, true, false);
}

static struct jv f_attr(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    struct jv name = ARG(0, "name");
    if (name.k != JK_STR)
        jfail(c, MOE_JINJA_RENDER, "attr: the name must be a string");
    return jgetattr(c, v, name.u.s->s);
}

static struct jv minmax(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw, int sign)
{
    struct jv cs = ARG(0, "case_sensitive"), attr = ARG(1, "attribute");
    struct jv l = jv_iterable(c, v);
    if (l.u.l->n == 0)
        return jv_undef("No aggregated item, sequence was empty.");
    struct sortarg s = { given(cs) && jv_truthy(cs), attr, -1 };
    struct jv best = l.u.l->v[0];
    for (size_t i = 1; i < l.u.l->n; i++)
        if (cmp_sort(c, l.u.l->v[i], best, &s) * sign > 0)
            best = l.u.l->v[i];
    return best;
}

static struct jv f_min(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    return minmax(c, v, args, n, kw, -1);
}

static struct jv f_max(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    return minmax(c, v, args, n, kw, 1);
}

static struct jv f_sum(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    struct jv attr = ARG(0, "attribute"), start = ARG(1, "start");
    struct jv l = jv_iterable(c, v), acc = given(start) ? start : jv_int(0);
    for (size_t i = 0; i < l.u.l->n; i++) {
        struct jv x = given(attr) ? attr_path(c, l.u.l->v[i], attr) : l.u.l->v[i];
        struct jnode a = { .kind = E_CONST, .cv = acc }, b = { .kind = E_CONST, .cv = x };
        struct jnode add = { .kind = E_BIN, .op = OP_ADD, .a = &a, .b = &b, .line = c->line };
        acc = jeval(c, &add);
    }
    return acc;
}

static struct jv f_escape(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    (void)args, (void)n, (void)kw;
    struct jv s = jv_to_str(c, v);
    if (s.safe)
        return s;
    struct moe_buf *b = jtmp_push(c);
    for (size_t i = 0; i < s.u.s->len; i++) {
        char ch = s.u.s->s[i];
        const char *e = ch == '&' ? "&amp;" : ch == '<' ? "&lt;" : ch == '>' ? "&gt;" : ch == '"' ? "&#34;"
                        : ch == '\'' ? "&#39;" : NULL;
        if (e)
            jbuf_put(c, b, e, strlen(e));
        else
            jbuf_put(c, b, &ch, 1);
    }
    struct jv r = jtmp_pop(c, b);
    r.safe = 1;
    return r;
}

static struct jv f_wordcount(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    (void)args, (void)n, (void)kw;
    struct jv s = jv_to_str(c, v);
    int64_t k = 0;
    bool in = false;
    for (size_t i = 0; i < s.u.s->len; i++) {
        unsigned char ch = (unsigned char)s.u.s->s[i];
        bool w = ch >= 0x80 || (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                 ch == '_';
        k += w && !in;
        in = w;
    }
    return jv_int(k);
}

/* jinja2 3.1's do_indent */
static struct jv f_indent(struct jctx *c, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    struct jv w = ARG(0, "width"), first = ARG(1, "first"), blank = ARG(2, "blank");
    struct jv ind = w.k == JK_STR ? w : jv_str(c, "", 0);
    if (w.k != JK_STR) {
        int64_t k = given(w) ? (w.k == JK_INT ? w.u.i : 4) : 4;
        struct moe_buf *b = jtmp_push(c);
        for (int64_t i = 0; i < k && i < 256; i++)
            jbuf_put(c, b, " ", 1);
        ind = jtmp_pop(c, b);
    }
    struct jv s = jv_to_str(c, v);
    struct jv self = s;
    struct jv lines = call_method(c, self, "splitlines", NULL, 0, NULL);
    struct moe_buf *b = jtmp_push(c);
    if (given(first) && jv_truthy(first))
        jv_write_str(c, b, ind);
    for (size_t i = 0; i < lines.u.l->n; i++) {
        struct jv line = lines.u.l->v[i];
        if (i) {
            jbuf_put(c, b, "\n", 1);
            if (line.u.s->len || (given(blank) && jv_truthy(blank)))
                jv_write_str(c, b, ind);
        }
        jv_write_str(c, b, line);
    }
    return jtmp_pop(c, b);
}

static const struct { const char *name; filter_fn fn; bool ext; } filters[] = {
    { "tojson", f_tojson, false }, { "length", f_length, false }, { "count", f_length, false },
    { "string", f_string, false }, { "safe", f_safe, false }, { "trim", f_trim, false },
    { "items", f_items, false }, { "join", f_join, false }, { "default", f_default, false },
    { "d", f_default, false }, { "list", f_list, false }, { "first", f_first, false }, { "last", f_last, false },
    { "reverse", f_reverse, false }, { "replace", f_replace, false }, { "upper", f_upper, false },
    { "lower", f_lower, false }, { "title", f_title, false }, { "capitalize", f_capitalize, false },
    { "int", f_int, false }, { "float", f_float, false }, { "abs", f_abs, false }, { "round", f_round, false },
    { "sort", f_sort, false }, { "dictsort", f_dictsort, false }, { "unique", f_unique, false },
    { "map", f_map, false }, { "select", f_select, false }, { "reject", f_reject, false },
    { "selectattr", f_selectattr, false }, { "rejectattr", f_rejectattr, false }, { "attr", f_attr, false },
    { "min", f_min, false }, { "max", f_max, false }, { "sum", f_sum, false }, { "escape", f_escape, false },
    { "e", f_escape, false }, { "wordcount", f_wordcount, false }, { "indent", f_indent, false },
    { "from_json", f_from_json, true },
};

struct jv jfilter(struct jctx *c, const char *name, struct jv v, struct jv *args, size_t n, const char *const *kw)
{
    for (size_t i = 0; i < sizeof(filters) / sizeof(filters[0]); i++)
        if (strcmp(filters[i].name, name) == 0 && (!filters[i].ext || c->opts->llama_ext))
            return filters[i].fn(c, v, args, n, kw);
    jfail(c, MOE_JINJA_RENDER, "No filter named '%s' found.", name);
}

/* ---- tests ---- */

static bool callable(struct jv v) { return v.k == JK_FUNC || v.k == JK_MACRO || v.k == JK_METHOD; }

static bool test_cmp(struct jctx *c, const char *name, struct jv v, struct jv *args, size_t n)
{
    static const struct { const char *names[4]; int op; } ops[] = {
        { { "eq", "equalto", "==", NULL }, OP_EQ }, { { "ne", "!=", NULL }, OP_NE },
        { { "lt", "lessthan", "<", NULL }, OP_LT }, { { "le", "<=", NULL }, OP_LE },
        { { "gt", "greaterthan", ">", NULL }, OP_GT }, { { "ge", ">=", NULL }, OP_GE },
    };
    for (size_t i = 0; i < sizeof(ops) / sizeof(ops[0]); i++) {
        for (size_t k = 0; ops[i].names[k]; k++) {
            if (strcmp(ops[i].names[k], name) != 0)
                continue;
            if (n < 1)
                jfail(c, MOE_JINJA_RENDER, "test '%s' needs an argument", name);
            if (ops[i].op == OP_EQ)
                return jv_equal(v, args[0]);
            if (ops[i].op == OP_NE)
                return !jv_equal(v, args[0]);
            int r = jv_compare(c, v, args[0]);
            return ops[i].op == OP_LT ? r < 0 : ops[i].op == OP_LE ? r <= 0 : ops[i].op == OP_GT ? r > 0 : r >= 0;
        }
    }
    jfail(c, MOE_JINJA_RENDER, "No test named '%s' found.", name);
}

static bool str_case(struct jctx *c, struct jv v, bool upper)
{
    struct jv s = jv_to_str(c, v);
    bool cased = false;
    for (size_t i = 0; i < s.u.s->len; i++) {
        char ch = s.u.s->s[i];
        if ((upper && ch >= 'a' && ch <= 'z') || (!upper && ch >= 'A' && ch <= 'Z'))
            return false;
        cased |= (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z');
    }
    return cased;
}

static bool test_int_arg(struct jctx *c, struct jv v, const char *name, struct jv *args, size_t n)
{
    if (v.k != JK_INT && v.k != JK_BOOL)
        jfail(c, MOE_JINJA_RENDER, "test '%s' needs an integer, not %s", name, jv_type_name(v));
    if (!strcmp(name, "odd"))
        return v.u.i % 2 != 0;
    if (!strcmp(name, "even"))
        return v.u.i % 2 == 0;
    if (n < 1 || (args[0].k != JK_INT && args[0].k != JK_BOOL) || args[0].u.i == 0)
        jfail(c, MOE_JINJA_RENDER, "divisibleby needs a non-zero integer");
    return v.u.i % args[0].u.i == 0;
}

bool jtest(struct jctx *c, const char *name, struct jv v, struct jv *args, size_t n)
{
    int k = v.k;
    if (!strcmp(name, "defined")) return k != JK_UNDEF;
    if (!strcmp(name, "undefined")) return k == JK_UNDEF;
    if (!strcmp(name, "none")) return k == JK_NONE;
    if (!strcmp(name, "string")) return k == JK_STR;
    if (!strcmp(name, "mapping")) return k == JK_DICT;
    if (!strcmp(name, "iterable") || !strcmp(name, "sequence"))
        return k == JK_STR || k == JK_LIST || k == JK_DICT || k == JK_UNDEF;
    if (!strcmp(name, "number")) return k == JK_INT || k == JK_FLOAT || k == JK_BOOL;
    if (!strcmp(name, "integer")) return k == JK_INT;
    if (!strcmp(name, "float")) return k == JK_FLOAT;
    if (!strcmp(name, "boolean")) return k == JK_BOOL;
    if (!strcmp(name, "true")) return k == JK_BOOL && v.u.i;
    if (!strcmp(name, "false")) return k == JK_BOOL && !v.u.i;
    if (!strcmp(name, "callable")) return callable(v);
    if (!strcmp(name, "lower")) return str_case(c, v, false);
    if (!strcmp(name, "upper")) return str_case(c, v, true);
    if (!strcmp(name, "escaped")) return false;
    if (!strcmp(name, "odd") || !strcmp(name, "even") || !strcmp(name, "divisibleby"))
        return test_int_arg(c, v, name, args, n);
    if (!strcmp(name, "in")) {
        if (n < 1)
            jfail(c, MOE_JINJA_RENDER, "test 'in' needs an argument");
        struct jnode a = { .kind = E_CONST, .cv = v }, b = { .kind = E_CONST, .cv = args[0] };
        struct jnode *list[1] = { &b };
        uint8_t ops[1] = { OP_IN };
        struct jnode cmp = { .kind = E_CMP, .a = &a, .list = list, .ops = ops, .n = 1, .line = c->line };
        return jv_truthy(jeval(c, &cmp));
    }
    if (!strcmp(name, "sameas")) {
        if (n < 1)
            jfail(c, MOE_JINJA_RENDER, "test 'sameas' needs an argument");
        return v.k == args[0].k && jv_equal(v, args[0]);
    }
    return test_cmp(c, name, v, args, n);
}
