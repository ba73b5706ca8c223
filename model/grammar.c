#include "model/grammar.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/alloc.h"
#include "common/buf.h"

#define SYM_END 0xffu   /* ends an alternative in el[] */

struct galt {
    int rule;
    uint32_t start;
};

struct moe_grammar {
    struct moe_gsym *el;
    size_t n_el, cap_el;
    uint64_t (*sets)[4];
    size_t n_sets, cap_sets;
    int n_rules;
    struct galt *alts;
    size_t n_alts, cap_alts;
    uint32_t *rule_first;     /* frozen: alternatives of rule r are alt_start[rule_first[r] ..
                                 rule_first[r + 1]) */
    uint32_t *alt_start;
    bool frozen;
};

/* ---- building ---------------------------------------------------------- */

int moe_grammar_new(struct moe_grammar **out)
{
    *out = moe_calloc(1, sizeof(**out));
    return *out ? 0 : -ENOMEM;
}

void moe_grammar_free(struct moe_grammar *g)
{
    if (g == NULL)
        return;
    moe_free(g->el);
    moe_free(g->sets);
    moe_free(g->alts);
    moe_free(g->rule_first);
    moe_free(g->alt_start);
    moe_free(g);
}

int moe_grammar_n_rules(const struct moe_grammar *g)
{
    return g->n_rules;
}

int moe_grammar_rule(struct moe_grammar *g)
{
    if (g->frozen || g->n_rules >= MOE_GRAMMAR_MAX_SYMS)
        return MOE_ELIMIT;
    return g->n_rules++;
}

int moe_grammar_set(struct moe_grammar *g, const uint8_t *lo, const uint8_t *hi, int n, bool negate)
{
    if (g->frozen || g->n_sets >= MOE_GRAMMAR_MAX_SYMS)
        return MOE_ELIMIT;
    if (moe_array_grow((void **)&g->sets, &g->cap_sets, g->n_sets + 1, sizeof(*g->sets), 0))
        return -ENOMEM;
    uint64_t *b = g->sets[g->n_sets];
    memset(b, 0, 4 * sizeof(uint64_t));
    for (int i = 0; i < n; i++)
        for (unsigned c = lo[i]; c <= hi[i]; c++)
            b[c >> 6] |= 1ull << (c & 63);
    if (negate)
        for (int k = 0; k < 4; k++)
            b[k] = ~b[k];
    return (int)g->n_sets++;
}

int moe_grammar_alt(struct moe_grammar *g, int rule, const struct moe_gsym *syms, int n)
{
    if (g->frozen || rule < 0 || rule >= g->n_rules || n < 0 ||
        g->n_el + (size_t)n + 1 > MOE_GRAMMAR_MAX_SYMS)
        return rule < 0 || rule >= g->n_rules || n < 0 ? -EINVAL : MOE_ELIMIT;
    if (moe_array_grow((void **)&g->el, &g->cap_el, g->n_el + (size_t)n + 1, sizeof(*g->el), 0) ||
        moe_array_grow((void **)&g->alts, &g->cap_alts, g->n_alts + 1, sizeof(*g->alts), 0))
        return -ENOMEM;
    g->alts[g->n_alts++] = (struct galt){ rule, (uint32_t)g->n_el };
    if (n > 0)
        memcpy(g->el + g->n_el, syms, (size_t)n * sizeof(*syms));
    g->n_el += (size_t)n;
    g->el[g->n_el++] = (struct moe_gsym){ SYM_END, 0 };
    return 0;
}

/* ---- checks ------------------------------------------------------------ */

static bool sym_nullable(const struct moe_gsym *s, const bool *nullable)
{
    return s->kind == MOE_GSYM_REF && nullable[s->v];
}

/* Which rules derive the empty string (a fixpoint). */
static void find_nullable(const struct moe_grammar *g, bool *nullable)
{
    bool changed = true;
    while (changed) {
        changed = false;
        for (size_t a = 0; a < g->n_alts; a++) {
            const int r = g->alts[a].rule;
            if (nullable[r])
                continue;
            const struct moe_gsym *s = g->el + g->alts[a].start;
            while (s->kind != SYM_END && sym_nullable(s, nullable))
                s++;
            if (s->kind == SYM_END)
                nullable[r] = changed = true;
        }
    }
}

/* Depth-first over "rule r can begin with rule q" edges; a back edge is
 * left recursion. color: 0 new, 1 on the path, 2 done. */
static int left_dfs(const struct moe_grammar *g, int r, const bool *nullable, uint8_t *color,
                    int depth)
{
    if (color[r] == 1)
        return r;
    if (color[r] == 2)
        return -1;
    if (depth > MOE_GRAMMAR_MAX_DEPTH)
        return r;
    color[r] = 1;
    for (uint32_t k = g->rule_first[r]; k < g->rule_first[r + 1]; k++) {
        for (const struct moe_gsym *s = g->el + g->alt_start[k]; s->kind != SYM_END; s++) {
            if (s->kind != MOE_GSYM_REF)
                break;
            int bad = left_dfs(g, (int)s->v, nullable, color, depth + 1);
            if (bad >= 0)
                return bad;
            if (!nullable[s->v])
                break;
        }
    }
    color[r] = 2;
    return -1;
}

static int check_syms(const struct moe_grammar *g, struct moe_diag *diag)
{
    for (size_t a = 0; a < g->n_alts; a++)
        for (const struct moe_gsym *s = g->el + g->alts[a].start; s->kind != SYM_END; s++) {
            if (s->kind == MOE_GSYM_REF && s->v >= (uint32_t)g->n_rules)
                return moe_diag_set(diag, -EINVAL, "grammar: rule %d refers to rule %u, which does"
                                    " not exist", g->alts[a].rule, s->v);
            if (s->kind == MOE_GSYM_SET && s->v >= g->n_sets)
                return moe_diag_set(diag, -EINVAL, "grammar: rule %d uses byte set %u, which does"
                                    " not exist", g->alts[a].rule, s->v);
            if (s->kind == MOE_GSYM_BYTE && s->v > 255)
                return moe_diag_set(diag, -EINVAL, "grammar: rule %d: byte %u", g->alts[a].rule, s->v);
        }
    return 0;
}

/* Alternatives grouped by rule (a counting sort, stable). */
static int index_alts(struct moe_grammar *g)
{
    g->rule_first = moe_calloc((size_t)g->n_rules + 1, sizeof(uint32_t));
    g->alt_start = moe_calloc(g->n_alts ? g->n_alts : 1, sizeof(uint32_t));
    if (g->rule_first == NULL || g->alt_start == NULL)
        return -ENOMEM;
    for (size_t a = 0; a < g->n_alts; a++)
        g->rule_first[g->alts[a].rule + 1]++;
    for (int r = 0; r < g->n_rules; r++)
        g->rule_first[r + 1] += g->rule_first[r];
    uint32_t *fill = moe_calloc((size_t)g->n_rules + 1, sizeof(uint32_t));
    if (fill == NULL)
        return -ENOMEM;
    for (size_t a = 0; a < g->n_alts; a++) {
        const int r = g->alts[a].rule;
        g->alt_start[g->rule_first[r] + fill[r]++] = g->alts[a].start;
    }
    moe_free(fill);
    return 0;
}

int moe_grammar_finish(struct moe_grammar *g, struct moe_diag *diag)
{
    if (g->frozen)
        return 0;
    if (g->n_rules == 0)
        return moe_diag_set(diag, -EINVAL, "grammar: no rules");
    int rc = check_syms(g, diag);
    if (rc)
        return rc;
    if (index_alts(g))
        return moe_diag_set(diag, -ENOMEM, "grammar: out of memory");
    for (int r = 0; r < g->n_rules; r++)
        if (g->rule_first[r] == g->rule_first[r + 1])
            return moe_diag_set(diag, -EINVAL, "grammar: rule %d has no alternative", r);
    bool *nullable = moe_calloc((size_t)g->n_rules, sizeof(bool));
    uint8_t *color = moe_calloc((size_t)g->n_rules, 1);
    rc = nullable && color ? 0 : moe_diag_set(diag, -ENOMEM, "grammar: out of memory");
    if (rc == 0) {
        find_nullable(g, nullable);
        for (int r = 0; r < g->n_rules && rc == 0; r++) {
            int bad = left_dfs(g, r, nullable, color, 0);
            if (bad >= 0)
                rc = moe_diag_set(diag, MOE_ELIMIT, "grammar: rule %d is left-recursive (or nests"
                                  " deeper than %d rules)", bad, MOE_GRAMMAR_MAX_DEPTH);
        }
    }
    moe_free(nullable);
    moe_free(color);
    if (rc == 0)
        g->frozen = true;
    return rc;
}

/* ---- the vocabulary ---------------------------------------------------- */

struct moe_gvocab {
    int n_vocab;
    int n;                     /* tokens with a non-empty piece */
    int32_t *id;               /* sorted by piece */
    uint32_t *off, *len;       /* into bytes, per sorted entry */
    char *bytes;
    uint32_t max_len;
};

static int cmp_piece(const void *a, const void *b, void *ud)
{
    const struct moe_gvocab *v = ud;
    const uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    const uint32_t n = v->len[x] < v->len[y] ? v->len[x] : v->len[y];
    int c = memcmp(v->bytes + v->off[x], v->bytes + v->off[y], n);
    if (c)
        return c;
    return v->len[x] < v->len[y] ? -1 : v->len[x] > v->len[y] ? 1 : (x > y) - (x < y);
}

/* Pieces of every token into one buffer, in id order. */
static int read_pieces(struct moe_gvocab *v, moe_gpiece_fn piece, void *ud, uint32_t *len_by_id)
{
    struct moe_buf b;
    moe_buf_init(&b, 0);
    char tmp[1024];
    int rc = 0;
    for (int i = 0; i < v->n_vocab && rc == 0; i++) {
        size_t len = 0;
        v->off[i] = (uint32_t)b.len;
        rc = piece(ud, i, tmp, sizeof(tmp), &len);
        if (rc == -ENOSPC || len > sizeof(tmp)) {
            rc = 0;
            len = 0;       /* a piece over 1 KiB is never allowed */
        }
        if (rc == 0)
            rc = moe_buf_append(&b, tmp, len);
        len_by_id[i] = (uint32_t)len;
    }
    size_t total = 0;
    v->bytes = moe_buf_take(&b, &total);
    if (rc == 0 && v->bytes == NULL)
        v->bytes = moe_malloc(1);
    moe_buf_free(&b);
    return rc ? rc : v->bytes ? 0 : -ENOMEM;
}

int moe_gvocab_new(struct moe_gvocab **out, int n_vocab, moe_gpiece_fn piece, void *ud)
{
    *out = NULL;
    if (n_vocab <= 0)
        return -EINVAL;
    struct moe_gvocab *v = moe_calloc(1, sizeof(*v));
    uint32_t *order = moe_calloc((size_t)n_vocab, sizeof(uint32_t));
    if (v == NULL || order == NULL ||
        (v->off = moe_calloc((size_t)n_vocab, sizeof(uint32_t))) == NULL ||
        (v->len = moe_calloc((size_t)n_vocab, sizeof(uint32_t))) == NULL ||
        (v->id = moe_calloc((size_t)n_vocab, sizeof(int32_t))) == NULL) {
        moe_free(order);
        moe_gvocab_free(v);
        return -ENOMEM;
    }
    v->n_vocab = n_vocab;
    int rc = read_pieces(v, piece, ud, v->len);
    if (rc) {
        moe_free(order);
        moe_gvocab_free(v);
        return rc;
    }
    int n = 0;
    for (int i = 0; i < n_vocab; i++)
        if (v->len[i] > 0)
            order[n++] = (uint32_t)i;
    qsort_r(order, (size_t)n, sizeof(uint32_t), cmp_piece, v);
    /* re-lay off/len in sorted order */
    uint32_t *off2 = moe_calloc((size_t)n + 1, sizeof(uint32_t));
    uint32_t *len2 = moe_calloc((size_t)n + 1, sizeof(uint32_t));
    if (off2 == NULL || len2 == NULL) {
        moe_free(off2);
        moe_free(len2);
        moe_free(order);
        moe_gvocab_free(v);
        return -ENOMEM;
    }
    for (int k = 0; k < n; k++) {
        v->id[k] = (int32_t)order[k];
        off2[k] = v->off[order[k]];
        len2[k] = v->len[order[k]];
        if (len2[k] > v->max_len)
            v->max_len = len2[k];
    }
    moe_free(v->off);
    moe_free(v->len);
    moe_free(order);
    v->off = off2;
    v->len = len2;
    v->n = n;
    *out = v;
    return 0;
}

void moe_gvocab_free(struct moe_gvocab *v)
{
    if (v == NULL)
        return;
    moe_free(v->id);
    moe_free(v->off);
    moe_free(v->len);
    moe_free(v->bytes);
    moe_free(v);
}

/* ---- matching ---------------------------------------------------------- */

/* Parse stacks share their tails: a node is the top symbol's position and
 * the rest of the stack; -1 is the empty stack (the sentence is complete). */
struct gnode {
    uint32_t pos;
    int32_t parent;
};

struct gset {
    int32_t *s;
    int n;
    size_t cap;
};

struct moe_gmatch {
    const struct moe_grammar *g;
    struct gnode *nodes;
    size_t n_nodes, cap_nodes;
    struct gset cur;                /* the stacks after the bytes accepted so far */
    struct gset *lvl;               /* scratch sets, one per piece byte depth */
    size_t n_lvl;
    size_t live;                    /* nodes after the last compaction */
    int err;
};

static int32_t node_new(struct moe_gmatch *m, uint32_t pos, int32_t parent)
{
    if (m->n_nodes >= (size_t)INT32_MAX ||
        moe_array_grow((void **)&m->nodes, &m->cap_nodes, m->n_nodes + 1, sizeof(*m->nodes), 0)) {
        m->err = -ENOMEM;
        return -2;
    }
    m->nodes[m->n_nodes] = (struct gnode){ pos, parent };
    return (int32_t)m->n_nodes++;
}

static bool stack_equal(const struct moe_gmatch *m, int32_t a, int32_t b)
{
    while (a >= 0 && b >= 0 && a != b) {
        if (m->nodes[a].pos != m->nodes[b].pos)
            return false;
        a = m->nodes[a].parent;
        b = m->nodes[b].parent;
    }
    return a == b;
}

static void set_add(struct moe_gmatch *m, struct gset *out, int32_t s)
{
    for (int i = 0; i < out->n; i++)
        if (stack_equal(m, out->s[i], s))
            return;
    if (out->n >= MOE_GRAMMAR_MAX_STACKS) {
        m->err = MOE_ELIMIT;
        return;
    }
    if (moe_array_grow((void **)&out->s, &out->cap, (size_t)out->n + 1, sizeof(int32_t), 0)) {
        m->err = -ENOMEM;
        return;
    }
    out->s[out->n++] = s;
}

static void expand(struct moe_gmatch *m, int32_t s, struct gset *out, int depth);

/* The stack whose top is the symbol at pos, on top of parent; an
 * alternative's end pops at once (so right recursion does not grow the
 * stack). */
static void push_expand(struct moe_gmatch *m, uint32_t pos, int32_t parent, struct gset *out,
                        int depth)
{
    if (m->g->el[pos].kind == SYM_END) {
        expand(m, parent, out, depth + 1);
        return;
    }
    const int32_t n = node_new(m, pos, parent);
    if (n >= 0)
        expand(m, n, out, depth + 1);
}

/* Adds to out every stack s can become without consuming a byte, whose top
 * is a byte or a set (or the empty stack). */
static void expand(struct moe_gmatch *m, int32_t s, struct gset *out, int depth)
{
    if (m->err)
        return;
    if (depth > MOE_GRAMMAR_MAX_DEPTH) {
        m->err = MOE_ELIMIT;
        return;
    }
    if (s < 0) {
        set_add(m, out, -1);
        return;
    }
    const struct moe_grammar *g = m->g;
    const uint32_t pos = m->nodes[s].pos;
    const struct moe_gsym *sym = &g->el[pos];
    if (sym->kind != MOE_GSYM_REF) {
        set_add(m, out, s);
        return;
    }
    /* the continuation after the rule, then each of its alternatives */
    int32_t cont = m->nodes[s].parent;
    if (g->el[pos + 1].kind != SYM_END && (cont = node_new(m, pos + 1, cont)) < -1)
        return;
    for (uint32_t k = g->rule_first[sym->v]; k < g->rule_first[sym->v + 1] && !m->err; k++)
        push_expand(m, g->alt_start[k], cont, out, depth);
}

static bool sym_match(const struct moe_grammar *g, const struct moe_gsym *s, uint8_t c)
{
    if (s->kind == MOE_GSYM_BYTE)
        return s->v == c;
    return (g->sets[s->v][c >> 6] >> (c & 63)) & 1;
}

static void advance(struct moe_gmatch *m, const struct gset *in, uint8_t c, struct gset *out)
{
    out->n = 0;
    for (int i = 0; i < in->n && !m->err; i++) {
        const int32_t s = in->s[i];
        if (s < 0 || !sym_match(m->g, &m->g->el[m->nodes[s].pos], c))
            continue;
        push_expand(m, m->nodes[s].pos + 1, m->nodes[s].parent, out, 0);
    }
}

int moe_gmatch_new(struct moe_gmatch **out, const struct moe_grammar *g)
{
    *out = NULL;
    if (!g->frozen)
        return -EINVAL;
    struct moe_gmatch *m = moe_calloc(1, sizeof(*m));
    if (m == NULL)
        return -ENOMEM;
    m->g = g;
    for (uint32_t k = g->rule_first[0]; k < g->rule_first[1] && !m->err; k++)
        push_expand(m, g->alt_start[k], -1, &m->cur, 0);
    if (m->err) {
        int rc = m->err;
        moe_gmatch_free(m);
        return rc;
    }
    *out = m;
    return 0;
}

void moe_gmatch_free(struct moe_gmatch *m)
{
    if (m == NULL)
        return;
    for (size_t i = 0; i < m->n_lvl; i++)
        moe_free(m->lvl[i].s);
    moe_free(m->lvl);
    moe_free(m->cur.s);
    moe_free(m->nodes);
    moe_free(m);
}

static struct gset *level(struct moe_gmatch *m, size_t d)
{
    if (d >= m->n_lvl) {
        size_t cap = m->n_lvl;
        if (moe_array_grow((void **)&m->lvl, &cap, d + 1, sizeof(*m->lvl), 0)) {
            m->err = -ENOMEM;
            return NULL;
        }
        memset(m->lvl + m->n_lvl, 0, (cap - m->n_lvl) * sizeof(*m->lvl));
        m->n_lvl = cap;
    }
    return &m->lvl[d];
}

/* Copies the current stacks into a fresh node arena (accepting bytes only
 * ever adds nodes). */
static int compact(struct moe_gmatch *m)
{
    int32_t *map = moe_malloc(m->n_nodes * sizeof(int32_t));
    struct gnode *nn = moe_malloc((m->n_nodes ? m->n_nodes : 1) * sizeof(*nn));
    if (map == NULL || nn == NULL) {
        moe_free(map);
        moe_free(nn);
        return -ENOMEM;
    }
    for (size_t i = 0; i < m->n_nodes; i++)
        map[i] = -2;
    size_t n = 0;
    /* parents are always older than children: one pass in index order over
     * the nodes that some current stack reaches */
    uint8_t *live = moe_calloc(m->n_nodes ? m->n_nodes : 1, 1);
    if (live == NULL) {
        moe_free(map);
        moe_free(nn);
        return -ENOMEM;
    }
    for (int i = 0; i < m->cur.n; i++)
        for (int32_t s = m->cur.s[i]; s >= 0 && !live[s]; s = m->nodes[s].parent)
            live[s] = 1;
    for (size_t i = 0; i < m->n_nodes; i++) {
        if (!live[i])
            continue;
        const int32_t p = m->nodes[i].parent;
        nn[n] = (struct gnode){ m->nodes[i].pos, p < 0 ? p : map[p] };
        map[i] = (int32_t)n++;
    }
    for (int i = 0; i < m->cur.n; i++)
        if (m->cur.s[i] >= 0)
            m->cur.s[i] = map[m->cur.s[i]];
    moe_free(m->nodes);
    m->cap_nodes = m->n_nodes ? m->n_nodes : 1;
    m->nodes = nn;
    m->n_nodes = n;
    m->live = n;
    moe_free(map);
    moe_free(live);
    return 0;
}

int moe_gmatch_accept(struct moe_gmatch *m, const char *bytes, size_t n)
{
    if (m->err)
        return m->err;
    const size_t mark = m->n_nodes;
    struct gset a = { 0 }, b = { 0 };
    struct gset *in = &m->cur, *out = &a;
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        advance(m, in, (uint8_t)bytes[i], out);
        rc = m->err ? m->err : out->n == 0 ? MOE_EFORMAT : 0;
        in = out;
        out = in == &a ? &b : &a;
    }
    if (rc == 0 && n > 0) {
        struct gset *done = in;
        moe_free(m->cur.s);
        m->cur = *done;
        *done = (struct gset){ 0 };
    } else {
        m->n_nodes = mark;
        m->err = 0;
    }
    moe_free(a.s);
    moe_free(b.s);
    if (rc == 0 && m->n_nodes > 4096 && m->n_nodes > 2 * m->live && compact(m) != 0)
        rc = -ENOMEM;
    return rc;
}

bool moe_gmatch_can_end(const struct moe_gmatch *m)
{
    for (int i = 0; i < m->cur.n; i++)
        if (m->cur.s[i] < 0)
            return true;
    return false;
}

bool moe_gmatch_done(const struct moe_gmatch *m)
{
    return m->cur.n == 1 && m->cur.s[0] < 0;
}

static uint8_t piece_byte(const struct moe_gvocab *v, int k, uint32_t d)
{
    return (uint8_t)v->bytes[v->off[k] + d];
}

/* Tokens [lo, hi) share their first d bytes, which the stacks in set have
 * consumed: mark those that end here, then descend per next byte. */
static int walk(struct moe_gmatch *m, const struct moe_gvocab *v, int lo, int hi, uint32_t d,
                const struct gset *set, uint8_t *allowed)
{
    int count = 0, i = lo;
    for (; i < hi && v->len[i] == d; i++) {
        allowed[v->id[i]] = 1;
        count++;
    }
    while (i < hi && !m->err) {
        const uint8_t c = piece_byte(v, i, d);
        int a = i + 1, b = hi;     /* first entry whose byte d is above c */
        while (a < b) {
            const int mid = a + (b - a) / 2;
            if (piece_byte(v, mid, d) > c)
                b = mid;
            else
                a = mid + 1;
        }
        struct gset *next = &m->lvl[d + 1];
        const size_t mark = m->n_nodes;
        advance(m, set, c, next);
        if (next->n > 0 && !m->err)
            count += walk(m, v, i, a, d + 1, next, allowed);
        m->n_nodes = mark;
        i = a;
    }
    return count;
}

int moe_gmatch_mask(struct moe_gmatch *m, const struct moe_gvocab *v, uint8_t *allowed)
{
    memset(allowed, 0, (size_t)v->n_vocab);
    if (m->err)
        return m->err;
    if (level(m, (size_t)v->max_len + 1) == NULL) {   /* no reallocation while walking */
        m->err = 0;
        return -ENOMEM;
    }
    const size_t mark = m->n_nodes;
    const int count = walk(m, v, 0, v->n, 0, &m->cur, allowed);
    m->n_nodes = mark;
    const int rc = m->err;
    m->err = 0;
    return rc ? rc : count;
}
