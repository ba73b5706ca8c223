/* The grammar matcher (model/grammar.c): literal and set matching, complete
 * and incomplete sentences, right recursion that does not grow the stacks,
 * refusal of left recursion and of dangling references, and the token mask
 * against brute force (each token's piece fed to a fresh matcher after the
 * same prefix) on random grammars and random vocabularies. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/rng.h"
#include "model/grammar.h"
#include "tests/harness.h"

static struct moe_gsym B(char c) { return (struct moe_gsym){ MOE_GSYM_BYTE, (uint8_t)c }; }
static struct moe_gsym R(int r) { return (struct moe_gsym){ MOE_GSYM_REF, (uint32_t)r }; }
static struct moe_gsym S(int s) { return (struct moe_gsym){ MOE_GSYM_SET, (uint32_t)s }; }

static bool accepts(const struct moe_grammar *g, const char *text)
{
    struct moe_gmatch *m;
    if (moe_gmatch_new(&m, g) != 0)
        return false;
    const bool ok = moe_gmatch_accept(m, text, strlen(text)) == 0 && moe_gmatch_can_end(m);
    moe_gmatch_free(m);
    return ok;
}

static void test_basics(void)
{
    /* root ::= "a" ("b" | "c") digits ; digits ::= [0-9] digits | [0-9] */
    struct moe_grammar *g;
    CHECK(moe_grammar_new(&g) == 0);
    const int root = moe_grammar_rule(g), bc = moe_grammar_rule(g), dig = moe_grammar_rule(g);
    const uint8_t lo = '0', hi = '9';
    const int d = moe_grammar_set(g, &lo, &hi, 1, false);
    CHECK(moe_grammar_alt(g, root, (struct moe_gsym[]){ B('a'), R(bc), R(dig) }, 3) == 0);
    CHECK(moe_grammar_alt(g, bc, (struct moe_gsym[]){ B('b') }, 1) == 0);
    CHECK(moe_grammar_alt(g, bc, (struct moe_gsym[]){ B('c') }, 1) == 0);
    CHECK(moe_grammar_alt(g, dig, (struct moe_gsym[]){ S(d), R(dig) }, 2) == 0);
    CHECK(moe_grammar_alt(g, dig, (struct moe_gsym[]){ S(d) }, 1) == 0);
    struct moe_diag diag = { 0 };
    CHECK_MSG(moe_grammar_finish(g, &diag) == 0, "%s", diag.msg);
    CHECK(accepts(g, "ab1") && accepts(g, "ac0123"));
    CHECK(!accepts(g, "ab") && !accepts(g, "ad1") && !accepts(g, "b1") && !accepts(g, "ab1x"));
    struct moe_gmatch *m;
    CHECK(moe_gmatch_new(&m, g) == 0);
    CHECK(!moe_gmatch_can_end(m));
    CHECK(moe_gmatch_accept(m, "ax", 2) == MOE_EFORMAT);   /* refused, state unchanged */
    CHECK(moe_gmatch_accept(m, "ab", 2) == 0);
    /* 100k digits: the right recursion pops as it goes */
    char digits[1000];
    memset(digits, '7', sizeof(digits));
    for (int i = 0; i < 100; i++)
        CHECK(moe_gmatch_accept(m, digits, sizeof(digits)) == 0);
    CHECK(moe_gmatch_can_end(m) && !moe_gmatch_done(m));
    moe_gmatch_free(m);
    moe_grammar_free(g);
}

static void test_refusals(void)
{
    struct moe_grammar *g;
    struct moe_diag d = { 0 };
    /* a ::= b "x" | "y" ; b ::= "" | a  (left recursion through a nullable) */
    CHECK(moe_grammar_new(&g) == 0);
    int a = moe_grammar_rule(g), b = moe_grammar_rule(g);
    CHECK(moe_grammar_alt(g, a, (struct moe_gsym[]){ R(b), B('x') }, 2) == 0);
    CHECK(moe_grammar_alt(g, a, (struct moe_gsym[]){ B('y') }, 1) == 0);
    CHECK(moe_grammar_alt(g, b, NULL, 0) == 0);
    CHECK(moe_grammar_alt(g, b, (struct moe_gsym[]){ R(a) }, 1) == 0);
    CHECK(moe_grammar_finish(g, &d) == MOE_ELIMIT && strstr(d.msg, "left-recursive"));
    moe_grammar_free(g);
    /* a reference to a rule that does not exist; a rule without alternatives */
    CHECK(moe_grammar_new(&g) == 0);
    a = moe_grammar_rule(g);
    CHECK(moe_grammar_alt(g, a, (struct moe_gsym[]){ R(7) }, 1) == 0);
    moe_diag_clear(&d);
    CHECK(moe_grammar_finish(g, &d) != 0 && strstr(d.msg, "rule 7"));
    moe_grammar_free(g);
    CHECK(moe_grammar_new(&g) == 0);
    a = moe_grammar_rule(g);
    b = moe_grammar_rule(g);
    CHECK(moe_grammar_alt(g, a, (struct moe_gsym[]){ R(b) }, 1) == 0);
    moe_diag_clear(&d);
    CHECK(moe_grammar_finish(g, &d) != 0 && strstr(d.msg, "no alternative"));
    moe_grammar_free(g);
}

/* ---- masks vs brute force ------------------------------------------------ */

struct vocab {
    int n;
    char piece[64][8];
};

static int piece_of(void *ud, int32_t id, char *buf, size_t cap, size_t *len)
{
    const struct vocab *v = ud;
    *len = strlen(v->piece[id]);
    if (*len > cap)
        return -ENOSPC;
    memcpy(buf, v->piece[id], *len);
    return 0;
}

/* A random grammar over "abc": every alternative starts with a byte or a
 * set, so none is left-recursive; later symbols may refer to any rule. */
static struct moe_grammar *random_grammar(uint64_t *rng)
{
    struct moe_grammar *g;
    if (moe_grammar_new(&g) != 0)
        return NULL;
    const int nr = 1 + (int)(moe_splitmix64(rng) % 5);
    for (int r = 0; r < nr; r++)
        moe_grammar_rule(g);
    const uint8_t lo[2] = { 'a', 'c' }, hi[2] = { 'b', 'c' };
    const int set = moe_grammar_set(g, lo, hi, 1, false);   /* [ab] */
    const int notb = moe_grammar_set(g, (const uint8_t[]){ 'b' }, (const uint8_t[]){ 'b' }, 1, true);
    (void)lo[1];
    (void)hi[1];
    for (int r = 0; r < nr; r++) {
        const int na = 1 + (int)(moe_splitmix64(rng) % 3);
        for (int k = 0; k < na; k++) {
            struct moe_gsym s[4];
            const int n = 1 + (int)(moe_splitmix64(rng) % 4);
            for (int i = 0; i < n; i++) {
                const uint64_t x = moe_splitmix64(rng) % 6;
                if (i == 0 || x < 3)
                    s[i] = x == 4 ? S(set) : x == 5 ? S(notb) : B((char)('a' + x % 3));
                else
                    s[i] = R((int)(moe_splitmix64(rng) % (uint64_t)nr));
            }
            moe_grammar_alt(g, r, s, n);
        }
        if (moe_splitmix64(rng) % 4 == 0)
            moe_grammar_alt(g, r, NULL, 0);
    }
    if (moe_grammar_finish(g, NULL) != 0) {
        moe_grammar_free(g);
        return NULL;
    }
    return g;
}

static void test_mask_brute_force(void)
{
    uint64_t rng = 0x5eed;
    struct vocab v = { .n = 64 };
    int checked = 0, allowed_total = 0, limited = 0;
    for (int trial = 0; trial < 300; trial++) {
        for (int t = 0; t < v.n; t++) {
            const int len = (int)(moe_splitmix64(&rng) % 5);   /* 0: an "empty" control token */
            for (int i = 0; i < len; i++)
                v.piece[t][i] = (char)('a' + moe_splitmix64(&rng) % 4);   /* 'd' never matches */
            v.piece[t][len] = '\0';
        }
        struct moe_grammar *g = random_grammar(&rng);
        if (g == NULL)
            continue;
        struct moe_gvocab *gv;
        CHECK(moe_gvocab_new(&gv, v.n, piece_of, &v) == 0);
        struct moe_gmatch *m;
        CHECK(moe_gmatch_new(&m, g) == 0);
        char prefix[256] = "";
        size_t plen = 0;
        for (int step = 0; step < 12; step++) {
            uint8_t allowed[64];
            const int n = moe_gmatch_mask(m, gv, allowed);
            if (n == MOE_ELIMIT) {   /* an ambiguous grammar outgrew the stack bound */
                limited++;
                break;
            }
            CHECK_MSG(n >= 0, "mask: %d", n);
            int count = 0;
            for (int t = 0; t < v.n; t++) {
                struct moe_gmatch *f;
                CHECK(moe_gmatch_new(&f, g) == 0);
                const bool want = v.piece[t][0] != '\0' && moe_gmatch_accept(f, prefix, plen) == 0 &&
                                  moe_gmatch_accept(f, v.piece[t], strlen(v.piece[t])) == 0;
                moe_gmatch_free(f);
                CHECK_MSG(allowed[t] == want, "trial %d step %d prefix '%s' token '%s': mask %d,"
                          " brute force %d", trial, step, prefix, v.piece[t], allowed[t], want);
                count += want;
                checked++;
            }
            CHECK_INT(n, ==, count);
            allowed_total += count;
            if (count == 0)
                break;
            int pick = (int)(moe_splitmix64(&rng) % (uint64_t)count);
            int t = 0;
            while (!allowed[t] || pick-- > 0)
                t++;
            CHECK(moe_gmatch_accept(m, v.piece[t], strlen(v.piece[t])) == 0);
            if (plen + strlen(v.piece[t]) >= sizeof(prefix))
                break;
            memcpy(prefix + plen, v.piece[t], strlen(v.piece[t]) + 1);
            plen += strlen(v.piece[t]);
        }
        moe_gmatch_free(m);
        moe_gvocab_free(gv);
        moe_grammar_free(g);
    }
    printf("  %d token checks, %d allowed, %d walks stopped at the stack bound\n", checked,
           allowed_total, limited);
    CHECK(checked > 50000 && allowed_total > 1000 && limited < 30);
}

int main(void)
{
    MOE_TEST_RUN(test_basics);
    MOE_TEST_RUN(test_refusals);
    MOE_TEST_RUN(test_mask_brute_force);
    return moe_test_exit_code();
}
