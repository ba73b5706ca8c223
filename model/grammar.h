/* Constrained decoding: a context-free grammar over bytes, a matcher that
 * follows the text generated so far, and the mask of the vocabulary's
 * tokens that can come next.
 *
 * A grammar is a list of rules; a rule is a list of alternatives; an
 * alternative is a sequence of symbols: a byte, a byte set, or another rule.
 * Rules may refer to themselves, but not as their first symbol (no left
 * recursion: the matcher refuses it with MOE_ELIMIT rather than loop).
 * Rule 0 is the start. The matcher keeps the set of parse stacks that are
 * consistent with the bytes accepted so far (a pushdown automaton run on
 * every alternative at once, as llama.cpp's grammar sampler does); a token
 * is allowed when its piece's bytes can all be consumed. The vocabulary is
 * walked as a sorted list of pieces, so a prefix that no stack accepts cuts
 * every token that starts with it.
 *
 * Bounded: at most MOE_GRAMMAR_MAX_STACKS stacks of MOE_GRAMMAR_MAX_DEPTH
 * and MOE_GRAMMAR_MAX_SYMS symbols in a grammar; the JSON-schema compiler
 * (daemon/schema.c) writes the grammars moed uses. Not thread-safe: one
 * matcher per sequence; a grammar and a vocabulary index are read-only once
 * built and may be shared.
 */
#ifndef MOE_MODEL_GRAMMAR_H
#define MOE_MODEL_GRAMMAR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_GRAMMAR_MAX_SYMS   (1 << 20)
#define MOE_GRAMMAR_MAX_STACKS 4096
#define MOE_GRAMMAR_MAX_DEPTH  512

enum moe_gsym_kind { MOE_GSYM_BYTE, MOE_GSYM_SET, MOE_GSYM_REF };

struct moe_gsym {
    uint8_t kind;          /* enum moe_gsym_kind */
    uint32_t v;            /* the byte, the set's index, or the rule */
};

struct moe_grammar;

int moe_grammar_new(struct moe_grammar **out);
void moe_grammar_free(struct moe_grammar *g);
/* A new rule with no alternatives yet; its index (>= 0), or -ENOMEM /
 * MOE_ELIMIT. */
int moe_grammar_rule(struct moe_grammar *g);
/* A byte set from inclusive ranges lo[i]..hi[i]; negate: the complement.
 * Its index, or an error. */
int moe_grammar_set(struct moe_grammar *g, const uint8_t *lo, const uint8_t *hi, int n, bool negate);
/* Appends an alternative (n may be 0: the empty string) to rule. */
int moe_grammar_alt(struct moe_grammar *g, int rule, const struct moe_gsym *syms, int n);
/* Checks every reference and rule (each has an alternative, no rule is left
 * recursive) and freezes the grammar. diag names the rule at fault. */
int moe_grammar_finish(struct moe_grammar *g, struct moe_diag *diag);
int moe_grammar_n_rules(const struct moe_grammar *g);

/* The vocabulary as sorted pieces, for masks. piece(ud, id, buf, cap, &len)
 * writes token id's text (what the detokenizer emits); tokens whose piece is
 * empty (control tokens) are never allowed by a mask. */
struct moe_gvocab;
typedef int (*moe_gpiece_fn)(void *ud, int32_t id, char *buf, size_t cap, size_t *len);
int moe_gvocab_new(struct moe_gvocab **out, int n_vocab, moe_gpiece_fn piece, void *ud);
void moe_gvocab_free(struct moe_gvocab *v);

struct moe_gmatch;
int moe_gmatch_new(struct moe_gmatch **out, const struct moe_grammar *g);
void moe_gmatch_free(struct moe_gmatch *m);
/* Consumes bytes; MOE_EFORMAT (state unchanged) when the grammar cannot
 * continue with them. */
int moe_gmatch_accept(struct moe_gmatch *m, const char *bytes, size_t n);
/* The text so far is a complete sentence of the grammar. */
bool moe_gmatch_can_end(const struct moe_gmatch *m);
/* Nothing more can follow (only the end is possible). */
bool moe_gmatch_done(const struct moe_gmatch *m);
/* allowed[id] = 1 for every token whose piece can come next, 0 otherwise
 * (allowed has the vocabulary's n_vocab entries). Returns how many are
 * allowed, or a negative error (MOE_ELIMIT when the stacks outgrow the
 * bounds). */
int moe_gmatch_mask(struct moe_gmatch *m, const struct moe_gvocab *v, uint8_t *allowed);

#ifdef __cplusplus
}
#endif

#endif
