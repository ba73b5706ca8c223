#include "daemon/schema.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#define MAX_ALT 600            /* symbols in one alternative (a literal property name, ...) */
#define MAX_REFS 128
#define MAX_DEPTH 64           /* nesting of schemas */
#define MAX_LEN_BOUND 4096     /* maxLength / maxItems that get their own rules */
#define DIGITS 16

struct alt {
    struct moe_gsym s[MAX_ALT];
    int n;
};

struct sc {
    struct moe_grammar *g;
    json_t *root;
    struct moe_diag *d;
    int err;
    struct {
        char ref[256];
        int rule;
    } refs[MAX_REFS];
    int n_refs;
    int depth;
    /* shared rules, made on first use (-1 until then) */
    int ws, str, chr, num, integer, value, object_any, array_any, boolean, null;
    int s_digit, s_digit19, s_plain, s_hex, s_cont, s_esc;
};

/* ---- building blocks ---------------------------------------------------- */

static int fail(struct sc *c, int code, const char *path, const char *fmt, const char *arg)
{
    if (c->err == 0) {
        char what[256];
        snprintf(what, sizeof(what), fmt, arg);
        c->err = moe_diag_set(c->d, code, "%s: %s", path, what);
    }
    return -1;
}

static int rule(struct sc *c)
{
    int r = moe_grammar_rule(c->g);
    if (r < 0 && c->err == 0)
        c->err = moe_diag_set(c->d, r, "response_format: the schema needs too large a grammar");
    return r;
}

static void a_sym(struct sc *c, struct alt *a, uint8_t kind, int v)
{
    if (v < 0 || a->n >= MAX_ALT) {
        if (c->err == 0)
            c->err = moe_diag_set(c->d, MOE_ELIMIT, "response_format: a name or value of the schema"
                                  " is too long");
        return;
    }
    a->s[a->n++] = (struct moe_gsym){ kind, (uint32_t)v };
}

static void a_lit(struct sc *c, struct alt *a, const char *t)
{
    for (; *t; t++)
        a_sym(c, a, MOE_GSYM_BYTE, (uint8_t)*t);
}

static void a_ref(struct sc *c, struct alt *a, int r) { a_sym(c, a, MOE_GSYM_REF, r); }
static void a_set(struct sc *c, struct alt *a, int s) { a_sym(c, a, MOE_GSYM_SET, s); }

static void add(struct sc *c, int r, const struct alt *a)
{
    if (c->err || r < 0)
        return;
    int rc = moe_grammar_alt(c->g, r, a->s, a->n);
    if (rc)
        c->err = moe_diag_set(c->d, rc, "response_format: the schema needs too large a grammar");
}

/* A rule with the one alternative a. */
static int seq(struct sc *c, const struct alt *a)
{
    int r = rule(c);
    add(c, r, a);
    return r;
}

static int set1(struct sc *c, uint8_t lo, uint8_t hi)
{
    return moe_grammar_set(c->g, &lo, &hi, 1, false);
}

/* x repeated min..max times (max < 0: unbounded), as right recursion. */
static int repeat(struct sc *c, int x_rule, int min, int max)
{
    int tail;
    if (max < 0) {
        tail = rule(c);                         /* tail ::= x tail | "" */
        struct alt a = { .n = 0 };
        a_ref(c, &a, x_rule);
        a_ref(c, &a, tail);
        add(c, tail, &a);
        add(c, tail, &(struct alt){ .n = 0 });
    } else {
        tail = rule(c);                         /* up to max - min more */
        add(c, tail, &(struct alt){ .n = 0 });
        for (int k = 0; k < max - min && !c->err; k++) {
            const int prev = tail;
            tail = rule(c);
            struct alt a = { .n = 0 };
            a_ref(c, &a, x_rule);
            a_ref(c, &a, prev);
            add(c, tail, &a);
            add(c, tail, &(struct alt){ .n = 0 });
        }
    }
    struct alt a = { .n = 0 };
    for (int k = 0; k < min; k++)
        a_ref(c, &a, x_rule);
    a_ref(c, &a, tail);
    return seq(c, &a);
}

static int r_ws(struct sc *c)
{
    if (c->ws < 0) {
        c->ws = rule(c);
        add(c, c->ws, &(struct alt){ .n = 0 });
        struct alt a = { .n = 0 };
        a_lit(c, &a, " ");
        add(c, c->ws, &a);
    }
    return c->ws;
}

/* One JSON string character: plain ASCII, an escape, or a UTF-8 sequence. */
static int r_char(struct sc *c)
{
    if (c->chr >= 0)
        return c->chr;
    const uint8_t plo[3] = { 0x20, 0x23, 0x5d }, phi[3] = { 0x21, 0x5b, 0x7f };   /* not " \ */
    c->s_plain = moe_grammar_set(c->g, plo, phi, 3, false);
    const uint8_t hlo[3] = { '0', 'a', 'A' }, hhi[3] = { '9', 'f', 'F' };
    c->s_hex = moe_grammar_set(c->g, hlo, hhi, 3, false);
    const char *esc = "\"\\/bfnrt";
    uint8_t elo[8], ehi[8];
    for (int i = 0; i < 8; i++)
        elo[i] = ehi[i] = (uint8_t)esc[i];
    c->s_esc = moe_grammar_set(c->g, elo, ehi, 8, false);
    c->s_cont = set1(c, 0x80, 0xbf);
    c->chr = rule(c);
    struct alt a = { .n = 0 };
    a_set(c, &a, c->s_plain);
    add(c, c->chr, &a);
    a.n = 0;
    a_lit(c, &a, "\\");
    a_set(c, &a, c->s_esc);
    add(c, c->chr, &a);
    a.n = 0;
    a_lit(c, &a, "\\u");
    for (int i = 0; i < 4; i++)
        a_set(c, &a, c->s_hex);
    add(c, c->chr, &a);
    static const uint8_t lead_lo[3] = { 0xc2, 0xe0, 0xf0 }, lead_hi[3] = { 0xdf, 0xef, 0xf4 };
    for (int k = 0; k < 3; k++) {
        a.n = 0;
        a_set(c, &a, set1(c, lead_lo[k], lead_hi[k]));
        for (int i = 0; i <= k; i++)
            a_set(c, &a, c->s_cont);
        add(c, c->chr, &a);
    }
    return c->chr;
}

static int r_string(struct sc *c, int min, int max)
{
    if (min == 0 && max < 0 && c->str >= 0)
        return c->str;
    struct alt a = { .n = 0 };
    a_lit(c, &a, "\"");
    a_ref(c, &a, repeat(c, r_char(c), min, max));
    a_lit(c, &a, "\"");
    const int r = seq(c, &a);
    if (min == 0 && max < 0)
        c->str = r;
    return r;
}

static int r_integer(struct sc *c)
{
    if (c->integer >= 0)
        return c->integer;
    c->s_digit = set1(c, '0', '9');
    c->s_digit19 = set1(c, '1', '9');
    struct alt d = { .n = 0 };
    a_set(c, &d, c->s_digit);
    const int digit = seq(c, &d);
    const int more = repeat(c, digit, 0, DIGITS - 1);
    const int mag = rule(c);                    /* "0" | [1-9] [0-9]{0,15} */
    struct alt a = { .n = 0 };
    a_lit(c, &a, "0");
    add(c, mag, &a);
    a.n = 0;
    a_set(c, &a, c->s_digit19);
    a_ref(c, &a, more);
    add(c, mag, &a);
    c->integer = rule(c);
    a.n = 0;
    a_ref(c, &a, mag);
    add(c, c->integer, &a);
    a.n = 0;
    a_lit(c, &a, "-");
    a_ref(c, &a, mag);
    add(c, c->integer, &a);
    return c->integer;
}

static int r_number(struct sc *c)
{
    if (c->num >= 0)
        return c->num;
    const int integer = r_integer(c);
    struct alt d = { .n = 0 };
    a_set(c, &d, c->s_digit);
    const int digit = seq(c, &d);
    const int frac = rule(c);                   /* ("." [0-9]{1,16})? */
    add(c, frac, &(struct alt){ .n = 0 });
    struct alt a = { .n = 0 };
    a_lit(c, &a, ".");
    a_ref(c, &a, repeat(c, digit, 1, DIGITS));
    add(c, frac, &a);
    const int exp = rule(c);                    /* ([eE] [-+]? [0-9]{1,3})? */
    add(c, exp, &(struct alt){ .n = 0 });
    const uint8_t elo[2] = { 'e', 'E' }, ehi[2] = { 'e', 'E' };
    const uint8_t slo[2] = { '-', '+' }, shi[2] = { '-', '+' };
    const int s_e = moe_grammar_set(c->g, elo, ehi, 2, false);
    const int s_sign = moe_grammar_set(c->g, slo, shi, 2, false);
    const int digits3 = repeat(c, digit, 1, 3);
    a.n = 0;
    a_set(c, &a, s_e);
    a_ref(c, &a, digits3);
    add(c, exp, &a);
    a.n = 0;
    a_set(c, &a, s_e);
    a_set(c, &a, s_sign);
    a_ref(c, &a, digits3);
    add(c, exp, &a);
    a.n = 0;
    a_ref(c, &a, integer);
    a_ref(c, &a, frac);
    a_ref(c, &a, exp);
    c->num = seq(c, &a);
    return c->num;
}

static int r_words(struct sc *c, const char *w1, const char *w2)
{
    const int r = rule(c);
    struct alt a = { .n = 0 };
    a_lit(c, &a, w1);
    add(c, r, &a);
    if (w2) {
        a.n = 0;
        a_lit(c, &a, w2);
        add(c, r, &a);
    }
    return r;
}

/* "[" ws (item ws ("," ws item ws){min-1..max-1})? "]" */
static int r_array(struct sc *c, int item, int min, int max)
{
    struct alt a = { .n = 0 };
    a_lit(c, &a, ",");
    a_ref(c, &a, r_ws(c));
    a_ref(c, &a, item);
    a_ref(c, &a, r_ws(c));
    const int next = seq(c, &a);
    const int r = rule(c);
    if (min == 0) {
        struct alt e = { .n = 0 };
        a_lit(c, &e, "[");
        a_ref(c, &e, r_ws(c));
        a_lit(c, &e, "]");
        add(c, r, &e);
    }
    a.n = 0;
    a_lit(c, &a, "[");
    a_ref(c, &a, r_ws(c));
    a_ref(c, &a, item);
    a_ref(c, &a, r_ws(c));
    a_ref(c, &a, repeat(c, next, min > 0 ? min - 1 : 0, max < 0 ? -1 : max - 1));
    a_lit(c, &a, "]");
    add(c, r, &a);
    return r;
}

static int r_value(struct sc *c);

static int r_object_any(struct sc *c)
{
    if (c->object_any >= 0)
        return c->object_any;
    c->object_any = rule(c);
    struct alt a = { .n = 0 };
    a_ref(c, &a, r_string(c, 0, -1));
    a_ref(c, &a, r_ws(c));
    a_lit(c, &a, ":");
    a_ref(c, &a, r_ws(c));
    a_ref(c, &a, r_value(c));
    a_ref(c, &a, r_ws(c));
    const int member = seq(c, &a);
    a.n = 0;
    a_lit(c, &a, ",");
    a_ref(c, &a, r_ws(c));
    a_ref(c, &a, member);
    const int next = seq(c, &a);
    a.n = 0;
    a_lit(c, &a, "{");
    a_ref(c, &a, r_ws(c));
    a_lit(c, &a, "}");
    add(c, c->object_any, &a);
    a.n = 0;
    a_lit(c, &a, "{");
    a_ref(c, &a, r_ws(c));
    a_ref(c, &a, member);
    a_ref(c, &a, repeat(c, next, 0, -1));
    a_lit(c, &a, "}");
    add(c, c->object_any, &a);
    return c->object_any;
}

/* Any JSON value. */
static int r_value(struct sc *c)
{
    if (c->value >= 0)
        return c->value;
    c->value = rule(c);
    if (c->array_any < 0)
        c->array_any = r_array(c, c->value, 0, -1);
    const int parts[6] = { r_object_any(c), c->array_any, r_string(c, 0, -1), r_number(c),
                           r_words(c, "true", "false"), r_words(c, "null", NULL) };
    for (int i = 0; i < 6; i++) {
        struct alt a = { .n = 0 };
        a_ref(c, &a, parts[i]);
        add(c, c->value, &a);
    }
    return c->value;
}

/* ---- schemas ------------------------------------------------------------ */

static int gen(struct sc *c, json_t *s, const char *path);

/* A JSON value as its literal (const, enum). */
static int literal(struct sc *c, json_t *v, const char *path)
{
    char *text = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
    if (text == NULL)
        return fail(c, -ENOMEM, path, "%s", "out of memory");
    struct alt a = { .n = 0 };
    a_lit(c, &a, text);
    free(text);
    return seq(c, &a);
}

static const char *const annotations[] = {
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
    "readOnly", "writeOnly", NULL,
};
static const char *const keywords[] = {
    "type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
    "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "minLength",
    "maxLength", NULL,
};

static bool in_list(const char *const *l, const char *k)
{
    for (; *l; l++)
        if (strcmp(*l, k) == 0)
            return true;
    return false;
}

static int check_keywords(struct sc *c, json_t *s, const char *path)
{
    const char *k;
    json_t *v;
    json_object_foreach(s, k, v) {
        if (!in_list(keywords, k) && !in_list(annotations, k))
            return fail(c, MOE_EUNSUPPORTED, path, "keyword '%s' is not supported (doc/daemon.md"
                        " lists the JSON Schema subset)", k);
    }
    return 0;
}

static int get_count(struct sc *c, json_t *s, const char *key, int def, const char *path)
{
    json_t *v = json_object_get(s, key);
    if (v == NULL)
        return def;
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > MAX_LEN_BOUND) {
        char what[64];
        snprintf(what, sizeof(what), "'%s' must be an integer 0..%d", key, MAX_LEN_BOUND);
        return fail(c, -EINVAL, path, "%s", what), -2;
    }
    return (int)json_integer_value(v);
}

/* Properties from index i on, some written already or not. */
struct props {
    const char **name;
    json_t **schema;
    bool *required;
    int n;
    int *memo;                 /* [2 * n]: rule per (i, emitted), -1 until made */
    const char *path;
};

static int props_from(struct sc *c, struct props *p, int i, bool emitted)
{
    if (i == p->n) {
        struct alt e = { .n = 0 };
        return seq(c, &e);
    }
    int *m = &p->memo[2 * i + emitted];
    if (*m >= 0)
        return *m;
    *m = rule(c);
    char key[300];
    json_t *ks = json_string(p->name[i]);
    char *kd = ks ? json_dumps(ks, JSON_ENCODE_ANY) : NULL;
    json_decref(ks);
    if (kd == NULL || strlen(kd) >= sizeof(key)) {
        free(kd);
        return fail(c, MOE_ELIMIT, p->path, "property name '%.64s' is too long", p->name[i]);
    }
    snprintf(key, sizeof(key), "%s", kd);
    free(kd);
    char sub[512];
    snprintf(sub, sizeof(sub), "%s.properties.%s", p->path, p->name[i]);
    const int value = gen(c, p->schema[i], sub);
    struct alt a = { .n = 0 };
    if (emitted) {
        a_lit(c, &a, ",");
        a_ref(c, &a, r_ws(c));
    }
    a_lit(c, &a, key);
    a_ref(c, &a, r_ws(c));
    a_lit(c, &a, ":");
    a_ref(c, &a, r_ws(c));
    a_ref(c, &a, value);
    a_ref(c, &a, r_ws(c));
    a_ref(c, &a, props_from(c, p, i + 1, true));
    add(c, *m, &a);
    if (!p->required[i]) {
        struct alt skip = { .n = 0 };
        a_ref(c, &skip, props_from(c, p, i + 1, emitted));
        add(c, *m, &skip);
    }
    return *m;
}

static int gen_object(struct sc *c, json_t *s, const char *path)
{
    json_t *props = json_object_get(s, "properties"), *req = json_object_get(s, "required");
    json_t *addl = json_object_get(s, "additionalProperties");
    if (props && !json_is_object(props))
        return fail(c, -EINVAL, path, "%s", "'properties' must be an object");
    if (req && !json_is_array(req))
        return fail(c, -EINVAL, path, "%s", "'required' must be an array of names");
    if (addl && !json_is_false(addl) && props && json_object_size(props) > 0)
        return fail(c, MOE_EUNSUPPORTED, path, "%s", "'additionalProperties' other than false is"
                    " not supported beside 'properties'");
    if (props == NULL || json_object_size(props) == 0) {
        if (!(addl && json_is_false(addl)))
            return r_object_any(c);
        json_t *empty = json_object();   /* no property allowed: "{}" */
        const int r = empty ? literal(c, empty, path) : fail(c, -ENOMEM, path, "%s", "out of memory");
        json_decref(empty);
        return r;
    }
    struct props p = { .n = (int)json_object_size(props), .path = path };
    p.name = calloc((size_t)p.n, sizeof(*p.name));
    p.schema = calloc((size_t)p.n, sizeof(*p.schema));
    p.required = calloc((size_t)p.n, sizeof(*p.required));
    p.memo = calloc((size_t)p.n * 2, sizeof(int));
    int r = -1;
    if (p.name && p.schema && p.required && p.memo) {
        const char *k;
        json_t *v;
        int i = 0;
        json_object_foreach(props, k, v) {
            p.name[i] = k;
            p.schema[i++] = v;
        }
        for (int j = 0; j < 2 * p.n; j++)
            p.memo[j] = -1;
        for (size_t j = 0; j < json_array_size(req); j++) {
            json_t *nm = json_array_get(req, j);
            int found = -1;
            for (int q = 0; q < p.n && json_is_string(nm); q++)
                if (strcmp(p.name[q], json_string_value(nm)) == 0)
                    found = q;
            if (found < 0) {
                fail(c, -EINVAL, path, "'required' names '%.64s', which is not in 'properties'",
                     json_is_string(nm) ? json_string_value(nm) : "(not a string)");
                break;
            }
            p.required[found] = true;
        }
        if (!c->err) {
            struct alt a = { .n = 0 };
            a_lit(c, &a, "{");
            a_ref(c, &a, r_ws(c));
            a_ref(c, &a, props_from(c, &p, 0, false));
            a_lit(c, &a, "}");
            r = seq(c, &a);
        }
    } else {
        fail(c, -ENOMEM, path, "%s", "out of memory");
    }
    free(p.name);
    free(p.schema);
    free(p.required);
    free(p.memo);
    return r;
}

static int gen_array(struct sc *c, json_t *s, const char *path)
{
    json_t *items = json_object_get(s, "items");
    char sub[512];
    snprintf(sub, sizeof(sub), "%s.items", path);
    const int item = items ? gen(c, items, sub) : r_value(c);
    const int min = get_count(c, s, "minItems", 0, path);
    const int max = get_count(c, s, "maxItems", -1, path);
    if (c->err)
        return -1;
    if (max >= 0 && max < min)
        return fail(c, -EINVAL, path, "%s", "'maxItems' is below 'minItems'");
    return r_array(c, item, min, max);
}

static int gen_type(struct sc *c, json_t *s, const char *type, const char *path)
{
    if (strcmp(type, "object") == 0)
        return gen_object(c, s, path);
    if (strcmp(type, "array") == 0)
        return gen_array(c, s, path);
    if (strcmp(type, "string") == 0) {
        const int min = get_count(c, s, "minLength", 0, path);
        const int max = get_count(c, s, "maxLength", -1, path);
        if (c->err)
            return -1;
        if (max >= 0 && max < min)
            return fail(c, -EINVAL, path, "%s", "'maxLength' is below 'minLength'");
        return r_string(c, min, max);
    }
    if (strcmp(type, "number") == 0)
        return r_number(c);
    if (strcmp(type, "integer") == 0)
        return r_integer(c);
    if (strcmp(type, "boolean") == 0)
        return r_words(c, "true", "false");
    if (strcmp(type, "null") == 0)
        return r_words(c, "null", NULL);
    return fail(c, -EINVAL, path, "'type' '%.32s' is not a JSON Schema type", type);
}

/* anyOf / oneOf / enum / a list of types: one rule with an alternative each. */
static int gen_choice(struct sc *c, json_t *list, const char *key, json_t *s, const char *path)
{
    if (!json_is_array(list) || json_array_size(list) == 0)
        return fail(c, -EINVAL, path, "'%s' must be a non-empty array", key);
    const int r = rule(c);
    for (size_t i = 0; i < json_array_size(list) && !c->err; i++) {
        json_t *x = json_array_get(list, i);
        char sub[512];
        snprintf(sub, sizeof(sub), "%s.%s[%zu]", path, key, i);
        int one;
        if (strcmp(key, "enum") == 0)
            one = literal(c, x, sub);
        else if (strcmp(key, "type") == 0)
            one = json_is_string(x) ? gen_type(c, s, json_string_value(x), path)
                                    : fail(c, -EINVAL, sub, "%s", "a type must be a string");
        else
            one = gen(c, x, sub);
        struct alt a = { .n = 0 };
        a_ref(c, &a, one);
        add(c, r, &a);
    }
    return r;
}

static int gen_ref(struct sc *c, const char *ref, const char *path)
{
    for (int i = 0; i < c->n_refs; i++)
        if (strcmp(c->refs[i].ref, ref) == 0)
            return c->refs[i].rule;
    const char *name = NULL;
    json_t *defs = NULL;
    if (strncmp(ref, "#/$defs/", 8) == 0) {
        name = ref + 8;
        defs = json_object_get(c->root, "$defs");
    } else if (strncmp(ref, "#/definitions/", 14) == 0) {
        name = ref + 14;
        defs = json_object_get(c->root, "definitions");
    }
    json_t *target = name ? json_object_get(defs, name) : NULL;
    if (target == NULL)
        return fail(c, -EINVAL, path, "'$ref' '%.128s' does not name a schema in $defs or"
                    " definitions of the root", ref);
    if (c->n_refs >= MAX_REFS || strlen(ref) >= sizeof(c->refs[0].ref))
        return fail(c, MOE_ELIMIT, path, "%s", "too many or too long '$ref's");
    /* the rule exists before its body, so the schema may refer to itself */
    const int r = rule(c);
    snprintf(c->refs[c->n_refs].ref, sizeof(c->refs[0].ref), "%s", ref);
    c->refs[c->n_refs++].rule = r;
    char sub[512];
    snprintf(sub, sizeof(sub), "%s", ref);
    struct alt a = { .n = 0 };
    a_ref(c, &a, gen(c, target, sub));
    add(c, r, &a);
    return r;
}

static int gen(struct sc *c, json_t *s, const char *path)
{
    if (c->err)
        return -1;
    if (json_is_true(s) || (json_is_object(s) && json_object_size(s) == 0))
        return r_value(c);
    if (!json_is_object(s))
        return fail(c, MOE_EUNSUPPORTED, path, "%s", "a schema must be an object (or true)");
    if (check_keywords(c, s, path))
        return -1;
    if (++c->depth > MAX_DEPTH) {
        c->depth--;
        return fail(c, MOE_ELIMIT, path, "%s", "schemas nest too deep");
    }
    json_t *v;
    int r;
    if ((v = json_object_get(s, "$ref")))
        r = json_is_string(v) ? gen_ref(c, json_string_value(v), path)
                              : fail(c, -EINVAL, path, "%s", "'$ref' must be a string");
    else if ((v = json_object_get(s, "const")))
        r = literal(c, v, path);
    else if ((v = json_object_get(s, "enum")))
        r = gen_choice(c, v, "enum", s, path);
    else if ((v = json_object_get(s, "anyOf")))
        r = gen_choice(c, v, "anyOf", s, path);
    else if ((v = json_object_get(s, "oneOf")))
        r = gen_choice(c, v, "oneOf", s, path);
    else if ((v = json_object_get(s, "allOf")))
        r = json_is_array(v) && json_array_size(v) == 1
                ? gen(c, json_array_get(v, 0), path)
                : fail(c, MOE_EUNSUPPORTED, path, "%s", "'allOf' is supported with one schema only");
    else if ((v = json_object_get(s, "type")))
        r = json_is_string(v) ? gen_type(c, s, json_string_value(v), path)
                              : gen_choice(c, v, "type", s, path);
    else if (json_object_get(s, "properties"))
        r = gen_object(c, s, path);
    else if (json_object_get(s, "items"))
        r = gen_array(c, s, path);
    else
        r = r_value(c);
    c->depth--;
    return r;
}

static void sc_init(struct sc *c, struct moe_diag *d)
{
    memset(c, 0, sizeof(*c));
    c->d = d;
    c->ws = c->str = c->chr = c->num = c->integer = c->value = c->object_any = c->array_any = -1;
    c->boolean = c->null = -1;
}

/* root ::= " "? prefix body suffix (a first token may carry a space before
 * bare JSON; tagged text starts with its tag) */
static int finish(struct sc *c, int body, const char *prefix, const char *suffix,
                  struct moe_grammar **out)
{
    for (int space = 0; space < (prefix[0] ? 1 : 2) && c->err == 0; space++) {
        struct alt a = { .n = 0 };
        if (space)
            a_lit(c, &a, " ");
        a_lit(c, &a, prefix);
        a_ref(c, &a, body);
        a_lit(c, &a, suffix);
        add(c, 0, &a);
    }
    if (c->err == 0)
        c->err = moe_grammar_finish(c->g, c->d);
    if (c->err) {
        moe_grammar_free(c->g);
        return c->err;
    }
    *out = c->g;
    return 0;
}

int moed_schema_grammar(json_t *schema, const char *where, struct moe_grammar **out,
                        struct moe_diag *diag)
{
    return moed_schema_grammar_wrap(schema, where, "", "", out, diag);
}

int moed_schema_grammar_wrap(json_t *schema, const char *where, const char *prefix,
                             const char *suffix, struct moe_grammar **out, struct moe_diag *diag)
{
    *out = NULL;
    struct sc c;
    sc_init(&c, diag);
    if (moe_grammar_new(&c.g) != 0)
        return moe_diag_set(diag, -ENOMEM, "out of memory");
    c.root = schema;
    rule(&c);                                   /* rule 0: the start */
    const int body = gen(&c, schema, where);
    return finish(&c, body, prefix, suffix, out);
}

int moed_json_object_grammar(struct moe_grammar **out, struct moe_diag *diag)
{
    *out = NULL;
    struct sc c;
    sc_init(&c, diag);
    if (moe_grammar_new(&c.g) != 0)
        return moe_diag_set(diag, -ENOMEM, "out of memory");
    rule(&c);
    const int body = r_object_any(&c);
    return finish(&c, body, "", "", out);
}
