/* Jinja parser: tokens to a syntax tree, after jinja2's parser.py (the same
 * precedence: condexpr < or < and < not < compare < +,- < ~ < *,/,//,% <
 * ** < unary < postfix and filters/tests). Statements: if, for (with else,
 * a filter condition and tuple targets), set (names, tuples, namespace
 * attributes, blocks), macro, break, continue, print and transformers'
 * {% generation %}. Nesting is bounded so that hostile input cannot
 * exhaust the stack. */
#include <string.h>

#include "model/jinja-impl.h"
#include "model/jinja-lex.h"

#define MAX_NEST 200

struct parser {
    struct jctx *c;
    struct jtok *t;
    size_t n, i;
    int nest;
};

static struct jtok *cur(struct parser *P) { return &P->t[P->i]; }

static _Noreturn void perr(struct parser *P, const char *fmt, const char *what)
{
    P->c->line = cur(P)->line;
    jfail(P->c, MOE_JINJA_SYNTAX, fmt, what);
}

static bool tok_is(const struct jtok *t, enum jtok_type ty, const char *s)
{
    return t->type == ty && (s == NULL || (t->len == strlen(s) && memcmp(t->s, s, t->len) == 0));
}

static bool at_op(struct parser *P, const char *s) { return tok_is(cur(P), T_OP, s); }
static bool at_name(struct parser *P, const char *s) { return tok_is(cur(P), T_NAME, s); }

static bool skip_op(struct parser *P, const char *s)
{
    if (!at_op(P, s))
        return false;
    P->i++;
    return true;
}

static bool skip_name(struct parser *P, const char *s)
{
    if (!at_name(P, s))
        return false;
    P->i++;
    return true;
}

static void expect_op(struct parser *P, const char *s)
{
    if (!skip_op(P, s))
        perr(P, "expected '%s'", s);
}

static const char *tok_text(struct parser *P, const struct jtok *t)
{
    char *s = ja_alloc(P->c, t->len + 1);
    memcpy(s, t->s, t->len);
    s[t->len] = '\0';
    return s;
}

static const char *expect_name(struct parser *P)
{
    if (cur(P)->type != T_NAME)
        perr(P, "expected a name%s", "");
    return tok_text(P, &P->t[P->i++]);
}

static void expect_block_end(struct parser *P)
{
    if (cur(P)->type != T_BLOCK_END)
        perr(P, "expected the end of the statement '%%}'%s", "");
    P->i++;
}

static struct jnode *node(struct parser *P, int kind)
{
    struct jnode *n = ja_alloc(P->c, sizeof(*n));
    memset(n, 0, sizeof(*n));
    n->kind = (uint8_t)kind;
    n->line = cur(P)->line;
    return n;
}

static void nest_in(struct parser *P)
{
    if (++P->nest > MAX_NEST)
        perr(P, "template nested deeper than %s levels", "200");
}

/* growable child list */
struct nlist { struct jnode **v; const char **kw; size_t n, cap; };

static void nl_push(struct parser *P, struct nlist *l, struct jnode *x, const char *kw)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 4;
        struct jnode **nv = ja_alloc(P->c, cap * sizeof(*nv));
        const char **nk = ja_alloc(P->c, cap * sizeof(*nk));
        if (l->n) {
            memcpy(nv, l->v, l->n * sizeof(*nv));
            memcpy(nk, l->kw, l->n * sizeof(*nk));
        }
        l->v = nv;
        l->kw = nk;
        l->cap = cap;
    }
    l->v[l->n] = x;
    l->kw[l->n++] = kw;
}

static void nl_store(struct jnode *n, const struct nlist *l)
{
    n->list = l->v;
    n->names = l->kw;
    n->n = l->n;
}

static struct jnode *parse_expr(struct parser *P, bool condexpr);
static struct jnode *parse_or(struct parser *P);
static struct jnode *parse_unary(struct parser *P, bool filters);
static struct jnode *parse_primary(struct parser *P);

/* a, b, c (a tuple when there is a comma, or explicit ()) */
static struct jnode *parse_tuple(struct parser *P, bool condexpr, const char *end_name, bool explicit)
{
    struct nlist l = { 0 };
    bool comma = false;
    int line = cur(P)->line;
    for (;;) {
        if (l.n && !skip_op(P, ","))
            break;
        if (l.n)
            comma = true;
        struct jtok *t = cur(P);
        if (t->type == T_BLOCK_END || t->type == T_VAR_END || tok_is(t, T_OP, ")") ||
            (end_name && tok_is(t, T_NAME, end_name)) || (l.n && tok_is(t, T_NAME, "in")))
            break;
        nl_push(P, &l, condexpr ? parse_expr(P, true) : parse_or(P), NULL);
    }
    if (!comma && l.n == 1)
        return l.v[0];
    if (l.n == 0 && !explicit)
        perr(P, "expected an expression%s", "");
    struct jnode *n = node(P, E_TUPLE);
    n->line = line;
    nl_store(n, &l);
    return n;
}

static void parse_args(struct parser *P, struct nlist *l)
{
    expect_op(P, "(");
    while (!skip_op(P, ")")) {
        if (l->n)
            expect_op(P, ",");
        if (skip_op(P, ")"))
            break;
        const char *kw = NULL;
        if (cur(P)->type == T_NAME && P->i + 1 < P->n && tok_is(&P->t[P->i + 1], T_OP, "=")) {
            kw = expect_name(P);
            P->i++;
        } else if (at_op(P, "*") || at_op(P, "**")) {
            kw = at_op(P, "*") ? "*" : "**";   /* f(*seq) and f(**mapping), expanded when called */
            P->i++;
        }
        nl_push(P, l, parse_expr(P, true), kw);
    }
}

static struct jnode *parse_list_lit(struct parser *P)
{
    struct jnode *n = node(P, E_LIST);
    struct nlist l = { 0 };
    expect_op(P, "[");
    while (!skip_op(P, "]")) {
        if (l.n)
            expect_op(P, ",");
        if (skip_op(P, "]"))
            break;
        nl_push(P, &l, parse_expr(P, true), NULL);
    }
    nl_store(n, &l);
    return n;
}

static struct jnode *parse_dict_lit(struct parser *P)
{
    struct jnode *n = node(P, E_DICT);
    struct nlist l = { 0 };
    expect_op(P, "{");
    while (!skip_op(P, "}")) {
        if (l.n)
            expect_op(P, ",");
        if (skip_op(P, "}"))
            break;
        nl_push(P, &l, parse_expr(P, true), NULL);
        expect_op(P, ":");
        nl_push(P, &l, parse_expr(P, true), NULL);
    }
    nl_store(n, &l);
    return n;
}

static struct jnode *const_node(struct parser *P, struct jv v)
{
    struct jnode *n = node(P, E_CONST);
    n->cv = v;
    return n;
}

static struct jnode *parse_primary(struct parser *P)
{
    struct jtok *t = cur(P);
    if (t->type == T_NAME) {
        const char *s = tok_text(P, t);
        P->i++;
        if (!strcmp(s, "true") || !strcmp(s, "True") || !strcmp(s, "false") || !strcmp(s, "False"))
            return const_node(P, jv_bool(s[0] == 't' || s[0] == 'T'));
        if (!strcmp(s, "none") || !strcmp(s, "None"))
            return const_node(P, jv_none());
        struct jnode *n = node(P, E_NAME);
        n->name = s;
        return n;
    }
    if (t->type == T_STRING) {
        /* adjacent literals concatenate */
        size_t total = 0, j = P->i;
        while (P->t[j].type == T_STRING)
            total += P->t[j++].len;
        char *s = ja_alloc(P->c, total + 1);
        size_t k = 0;
        for (; P->i < j; P->i++) {
            memcpy(s + k, P->t[P->i].s, P->t[P->i].len);
            k += P->t[P->i].len;
        }
        s[k] = '\0';
        return const_node(P, jv_str(P->c, s, k));
    }
    if (t->type == T_INT || t->type == T_FLOAT) {
        P->i++;
        return const_node(P, t->type == T_INT ? jv_int(t->i) : jv_float(t->f));
    }
    if (tok_is(t, T_OP, "(")) {
        P->i++;
        struct jnode *n = parse_tuple(P, true, NULL, true);
        expect_op(P, ")");
        return n;
    }
    if (tok_is(t, T_OP, "["))
        return parse_list_lit(P);
    if (tok_is(t, T_OP, "{"))
        return parse_dict_lit(P);
    perr(P, "unexpected token in an expression%s", "");
}

static struct jnode *parse_subscript(struct parser *P, struct jnode *obj)
{
    expect_op(P, "[");
    struct jnode *args[3] = { NULL, NULL, NULL };
    bool slice = false;
    for (int k = 0; k < 3; k++) {
        if (!at_op(P, ":") && !at_op(P, "]"))
            args[k] = parse_expr(P, true);
        if (k < 2 && skip_op(P, ":")) {
            slice = true;
            continue;
        }
        break;
    }
    expect_op(P, "]");
    struct jnode *n = node(P, slice ? E_SLICE : E_ITEM);
    n->a = obj;
    n->b = args[0];
    n->c = args[1];
    n->d = args[2];
    if (!slice && args[0] == NULL)
        perr(P, "expected a subscript%s", "");
    return n;
}

static struct jnode *parse_postfix(struct parser *P, struct jnode *x)
{
    for (;;) {
        if (skip_op(P, ".")) {
            struct jnode *n = node(P, E_ATTR);
            n->a = x;
            if (cur(P)->type == T_INT) {
                n->kind = E_ITEM;
                n->b = const_node(P, jv_int(cur(P)->i));
                P->i++;
            } else {
                n->name = expect_name(P);
            }
            x = n;
        } else if (at_op(P, "[")) {
            x = parse_subscript(P, x);
        } else if (at_op(P, "(")) {
            struct jnode *n = node(P, E_CALL);
            struct nlist l = { 0 };
            parse_args(P, &l);
            nl_store(n, &l);
            n->a = x;
            x = n;
        } else {
            return x;
        }
    }
}

static struct jnode *parse_filter(struct parser *P, struct jnode *x)
{
    struct jnode *n = node(P, E_FILTER);
    n->name = expect_name(P);
    while (skip_op(P, "."))    /* dotted filter names: kept whole */
        n->name = expect_name(P);
    if (at_op(P, "(")) {
        struct nlist l = { 0 };
        parse_args(P, &l);
        nl_store(n, &l);
    }
    n->a = x;
    return n;
}

static bool test_arg_follows(struct parser *P)
{
    struct jtok *t = cur(P);
    if (t->type == T_NAME)
        return !tok_is(t, T_NAME, "else") && !tok_is(t, T_NAME, "or") && !tok_is(t, T_NAME, "and") &&
               !tok_is(t, T_NAME, "if") && !tok_is(t, T_NAME, "in") && !tok_is(t, T_NAME, "is") &&
               !tok_is(t, T_NAME, "not");
    return t->type == T_STRING || t->type == T_INT || t->type == T_FLOAT || tok_is(t, T_OP, "[") ||
           tok_is(t, T_OP, "{");
}

static struct jnode *parse_test(struct parser *P, struct jnode *x)
{
    struct jnode *n = node(P, E_TEST);
    n->op = skip_name(P, "not");
    n->name = expect_name(P);
    struct nlist l = { 0 };
    if (at_op(P, "(")) {
        parse_args(P, &l);
    } else if (test_arg_follows(P)) {
        struct jnode *arg = parse_primary(P);
        nl_push(P, &l, parse_postfix(P, arg), NULL);
    }
    nl_store(n, &l);
    n->a = x;
    return n;
}

static struct jnode *parse_filter_expr(struct parser *P, struct jnode *x)
{
    for (;;) {
        if (skip_op(P, "|"))
            x = parse_filter(P, x);
        else if (skip_name(P, "is"))
            x = parse_test(P, x);
        else if (at_op(P, "(")) {
            struct jnode *n = node(P, E_CALL);
            struct nlist l = { 0 };
            parse_args(P, &l);
            nl_store(n, &l);
            n->a = x;
            x = n;
        } else
            return x;
    }
}

static struct jnode *parse_unary(struct parser *P, bool filters)
{
    nest_in(P);
    struct jnode *x;
    if (at_op(P, "-") || at_op(P, "+")) {
        bool neg = at_op(P, "-");
        P->i++;
        x = node(P, neg ? E_NEG : E_POS);
        x->a = parse_unary(P, false);
    } else {
        x = parse_postfix(P, parse_primary(P));
    }
    if (filters)
        x = parse_filter_expr(P, x);
    P->nest--;
    return x;
}

static struct jnode *binop(struct parser *P, int op, struct jnode *a, struct jnode *b)
{
    struct jnode *n = node(P, E_BIN);
    n->op = (uint8_t)op;
    n->a = a;
    n->b = b;
    return n;
}

static struct jnode *parse_pow(struct parser *P)
{
    struct jnode *x = parse_unary(P, true);
    while (skip_op(P, "**"))
        x = binop(P, OP_POW, x, parse_unary(P, true));
    return x;
}

static struct jnode *parse_math2(struct parser *P)
{
    struct jnode *x = parse_pow(P);
    for (;;) {
        int op = at_op(P, "*") ? OP_MUL : at_op(P, "/") ? OP_DIV : at_op(P, "//") ? OP_FLOORDIV
                 : at_op(P, "%") ? OP_MOD : 0;
        if (!op)
            return x;
        P->i++;
        x = binop(P, op, x, parse_pow(P));
    }
}

static struct jnode *parse_concat(struct parser *P)
{
    struct jnode *x = parse_math2(P);
    while (skip_op(P, "~"))
        x = binop(P, OP_CONCAT, x, parse_math2(P));
    return x;
}

static struct jnode *parse_math1(struct parser *P)
{
    struct jnode *x = parse_concat(P);
    for (;;) {
        int op = at_op(P, "+") ? OP_ADD : at_op(P, "-") ? OP_SUB : 0;
        if (!op)
            return x;
        P->i++;
        x = binop(P, op, x, parse_concat(P));
    }
}

static int cmp_op(struct parser *P)
{
    static const char *const ops[] = { "==", "!=", "<", "<=", ">", ">=" };
    static const int codes[] = { OP_EQ, OP_NE, OP_LT, OP_LE, OP_GT, OP_GE };
    for (int i = 0; i < 6; i++)
        if (skip_op(P, ops[i]))
            return codes[i];
    if (skip_name(P, "in"))
        return OP_IN;
    if (at_name(P, "not") && P->i + 1 < P->n && tok_is(&P->t[P->i + 1], T_NAME, "in")) {
        P->i += 2;
        return OP_NOTIN;
    }
    return 0;
}

static struct jnode *parse_compare(struct parser *P)
{
    struct jnode *x = parse_math1(P);
    struct nlist l = { 0 };
    uint8_t ops[64];
    int op;
    while ((op = cmp_op(P)) != 0) {
        if (l.n >= 64)
            perr(P, "comparison chain too long%s", "");
        ops[l.n] = (uint8_t)op;
        nl_push(P, &l, parse_math1(P), NULL);
    }
    if (l.n == 0)
        return x;
    struct jnode *n = node(P, E_CMP);
    n->a = x;
    nl_store(n, &l);
    n->ops = ja_alloc(P->c, l.n);
    memcpy(n->ops, ops, l.n);
    return n;
}

static struct jnode *parse_not(struct parser *P)
{
    if (at_name(P, "not")) {
        P->i++;
        nest_in(P);
        struct jnode *n = node(P, E_NOT);
        n->a = parse_not(P);
        P->nest--;
        return n;
    }
    return parse_compare(P);
}

static struct jnode *parse_and(struct parser *P)
{
    struct jnode *x = parse_not(P);
    while (skip_name(P, "and")) {
        struct jnode *n = node(P, E_AND);
        n->a = x;
        n->b = parse_not(P);
        x = n;
    }
    return x;
}

static struct jnode *parse_or(struct parser *P)
{
    struct jnode *x = parse_and(P);
    while (skip_name(P, "or")) {
        struct jnode *n = node(P, E_OR);
        n->a = x;
        n->b = parse_and(P);
        x = n;
    }
    return x;
}

static struct jnode *parse_expr(struct parser *P, bool condexpr)
{
    nest_in(P);
    struct jnode *x = parse_or(P);
    while (condexpr && skip_name(P, "if")) {
        struct jnode *n = node(P, E_COND);
        n->a = parse_or(P);
        n->b = x;
        if (skip_name(P, "else"))
            n->c = parse_expr(P, true);
        x = n;
    }
    P->nest--;
    return x;
}

/* ---- statements ---- */

static struct jnode *parse_body(struct parser *P, const char *const *ends);

static bool at_end_tag(struct parser *P, const char *const *ends)
{
    if (cur(P)->type != T_BLOCK_BEGIN || P->i + 1 >= P->n)
        return false;
    for (size_t k = 0; ends && ends[k]; k++)
        if (tok_is(&P->t[P->i + 1], T_NAME, ends[k]))
            return true;
    return false;
}

static struct jnode *parse_assign_target(struct parser *P, bool allow_ns)
{
    struct nlist l = { 0 };
    bool paren = skip_op(P, "(");
    do {
        const char *name = expect_name(P);
        struct jnode *n = node(P, E_NAME);
        n->name = name;
        if (allow_ns && l.n == 0 && skip_op(P, ".")) {
            n->kind = E_NSREF;
            n->a = node(P, E_NAME);
            n->a->name = name;
            n->name = expect_name(P);
            return n;
        }
        nl_push(P, &l, n, NULL);
    } while (skip_op(P, ","));
    if (paren)
        expect_op(P, ")");
    if (l.n == 1 && !paren)
        return l.v[0];
    struct jnode *t = node(P, E_TUPLE);
    nl_store(t, &l);
    return t;
}

static struct jnode *parse_for(struct parser *P)
{
    struct jnode *n = node(P, N_FOR);
    n->a = parse_assign_target(P, false);
    if (!skip_name(P, "in"))
        perr(P, "expected 'in' in a for loop%s", "");
    n->b = parse_tuple(P, false, "recursive", false);
    if (skip_name(P, "if"))
        n->c = parse_expr(P, true);
    if (skip_name(P, "recursive"))
        perr(P, "recursive for loops are not supported%s", "");
    expect_block_end(P);
    static const char *const ends[] = { "endfor", "else", NULL };
    n->d = parse_body(P, ends);
    P->i++;   /* {% */
    if (skip_name(P, "else")) {
        expect_block_end(P);
        static const char *const end2[] = { "endfor", NULL };
        n->list = ja_alloc(P->c, sizeof(struct jnode *));
        n->list[0] = parse_body(P, end2);
        n->n = 1;
        P->i++;
    }
    P->i++;   /* endfor */
    expect_block_end(P);
    return n;
}

static struct jnode *parse_if(struct parser *P)
{
    struct jnode *n = node(P, N_IF);
    n->a = parse_tuple(P, false, NULL, false);
    expect_block_end(P);
    static const char *const ends[] = { "elif", "else", "endif", NULL };
    n->b = parse_body(P, ends);
    P->i++;
    if (skip_name(P, "elif")) {
        n->c = parse_if(P);   /* consumes through endif */
        return n;
    }
    if (skip_name(P, "else")) {
        expect_block_end(P);
        static const char *const end2[] = { "endif", NULL };
        n->c = parse_body(P, end2);
        P->i++;
    }
    P->i++;   /* endif */
    expect_block_end(P);
    return n;
}

static struct jnode *parse_set(struct parser *P)
{
    struct jnode *target = parse_assign_target(P, true);
    if (skip_op(P, "=")) {
        struct jnode *n = node(P, N_SET);
        n->a = target;
        n->b = parse_tuple(P, true, NULL, false);
        expect_block_end(P);
        return n;
    }
    struct jnode *n = node(P, N_SETBLOCK);
    n->a = target;
    struct jnode *holder = NULL;
    while (skip_op(P, "|")) {
        holder = parse_filter(P, holder);
    }
    n->c = holder;    /* filter chain applied to the body's text (innermost a = NULL) */
    expect_block_end(P);
    static const char *const ends[] = { "endset", NULL };
    n->b = parse_body(P, ends);
    P->i += 2;
    expect_block_end(P);
    return n;
}

static struct jnode *parse_macro(struct parser *P)
{
    struct jnode *n = node(P, N_MACRO);
    n->name = expect_name(P);
    struct nlist params = { 0 };
    expect_op(P, "(");
    while (!skip_op(P, ")")) {
        if (params.n)
            expect_op(P, ",");
        struct jnode *p = node(P, E_NAME);
        p->name = expect_name(P);
        if (skip_op(P, "="))
            p->a = parse_expr(P, true);
        nl_push(P, &params, p, NULL);
    }
    nl_store(n, &params);
    expect_block_end(P);
    static const char *const ends[] = { "endmacro", NULL };
    n->a = parse_body(P, ends);
    P->i += 2;
    if (cur(P)->type == T_NAME)
        P->i++;   /* {% endmacro name %} */
    expect_block_end(P);
    return n;
}

static struct jnode *parse_simple_block(struct parser *P, const char *end)
{
    expect_block_end(P);
    const char *ends[] = { end, NULL };
    struct jnode *b = parse_body(P, ends);
    P->i += 2;
    expect_block_end(P);
    return b;
}

static struct jnode *parse_statement(struct parser *P)
{
    P->i++;   /* {% */
    struct jtok *t = cur(P);
    if (t->type != T_NAME)
        perr(P, "expected a statement name after '{%%'%s", "");
    const char *kw = tok_text(P, t);
    P->i++;
    struct jnode *n;
    if (!strcmp(kw, "for"))
        return parse_for(P);
    if (!strcmp(kw, "if"))
        return parse_if(P);
    if (!strcmp(kw, "set"))
        return parse_set(P);
    if (!strcmp(kw, "macro"))
        return parse_macro(P);
    if (!strcmp(kw, "break") || !strcmp(kw, "continue")) {
        n = node(P, kw[0] == 'b' ? N_BREAK : N_CONTINUE);
        expect_block_end(P);
        return n;
    }
    if (!strcmp(kw, "print")) {
        n = node(P, N_OUT);
        n->a = parse_tuple(P, true, NULL, false);
        expect_block_end(P);
        return n;
    }
    if (!strcmp(kw, "generation"))
        return parse_simple_block(P, "endgeneration");
    P->i--;
    perr(P, "unknown or unsupported statement '%s'", kw);
}

static struct jnode *parse_body(struct parser *P, const char *const *ends)
{
    nest_in(P);
    struct jnode *body = node(P, N_BODY);
    struct nlist l = { 0 };
    for (;;) {
        struct jtok *t = cur(P);
        if (t->type == T_EOF) {
            if (ends)
                perr(P, "unexpected end of template: missing {%% %s %%}", ends[0]);
            break;
        }
        if (t->type == T_DATA) {
            struct jnode *n = node(P, N_TEXT);
            n->cv = jv_str(P->c, t->s, t->len);
            nl_push(P, &l, n, NULL);
            P->i++;
        } else if (t->type == T_VAR_BEGIN) {
            P->i++;
            struct jnode *n = node(P, N_OUT);
            n->a = parse_tuple(P, true, NULL, false);
            if (cur(P)->type != T_VAR_END)
                perr(P, "expected '}}'%s", "");
            P->i++;
            nl_push(P, &l, n, NULL);
        } else if (t->type == T_BLOCK_BEGIN) {
            if (at_end_tag(P, ends))
                break;
            nl_push(P, &l, parse_statement(P), NULL);
        } else {
            perr(P, "unexpected token%s", "");
        }
    }
    nl_store(body, &l);
    P->nest--;
    return body;
}

struct jnode *jparse(struct jctx *c, struct jtok *toks, size_t n)
{
    struct parser P = { .c = c, .t = toks, .n = n };
    return parse_body(&P, NULL);
}
