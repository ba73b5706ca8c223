/* SPM, byte-level BPE and SPM-style BPE (gemma4) tokenizers with
 * llama.cpp's semantics (src/llama-vocab.cpp). Comments name the llama.cpp
 * function each part mirrors; where this code differs on purpose it says so.
 *
 * Data layout: every string the tokenizer knows (token texts, and for BPE
 * the halves and results of merges that are not tokens) is interned in one
 * pool with an id; ids < n_tokens are the tokens. Merges are a hash from
 * (left id, right id) to (rank, result id), so BPE never builds strings
 * while merging; SPM looks up contiguous slices of its (escaped) text.
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/alloc.h"
#include "common/buf.h"
#include "io/gguf.h"
#include "model/tokenizer-impl.h"
#include "model/tokenizer.h"
#include "model/unicode.h"

#define NONE UINT32_MAX

/* The string and piece pools hold at most 2 GiB: offsets are uint32_t, and
 * the doubling from 4096 this replaces stopped at 2^31 bytes. */
#define POOL_LIMIT ((size_t)1 << 31)

struct str_slot {
    uint32_t id;    /* NONE = empty */
    uint32_t hash;  /* low 32 bits of the string's hash */
};

struct merge_slot {
    uint64_t key;   /* (left << 32) | right; UINT64_MAX = empty */
    uint32_t rank;
    uint32_t result;
};

struct moe_tokenizer {
    enum moe_vocab_type type;
    uint32_t n_tokens;

    /* interned strings: [0, n_tokens) tokens, then merge parts, each
     * followed by a NUL in the pool (limit POOL_LIMIT) */
    struct moe_buf pool;
    uint32_t *str_off, *str_len;
    uint32_t n_str;
    size_t str_cap;
    struct str_slot *strtab;
    uint32_t strtab_mask;

    float *score;
    uint32_t *attr;

    struct merge_slot *merges;
    uint64_t merge_mask;
    uint32_t byte_sym[256];       /* BPE: string id of each byte's encoded char;
                                     spm_style: token id of its <0xXX> (or NONE) */

    /* pieces with special = true (llama.cpp cache_token_to_piece) */
    char *piece_pool;
    uint32_t *piece_off, *piece_len;
    size_t max_piece;

    int32_t bos, eos, eot, unk;
    bool add_bos, add_eos, add_space_prefix, clean_spaces, ignore_merges;
    /* SPM-style BPE (moe_pretok_info): spaces as U+2581, merges on code
     * points, <0xXX> fallback; force_add_bos, newline_tokens as named */
    bool spm_style, force_add_bos, newline_tokens;
    uint8_t *eog;                 /* bitmap */

    int32_t *special;             /* CONTROL/USER_DEFINED/UNKNOWN, longest first */
    size_t n_special;

    struct moe_pretok *pre;
    const char *pre_name;
    char *chat_template;
};

/* ---- hashing and interning ---------------------------------------------- */

static inline uint64_t hash_bytes(const uint8_t *p, size_t n)
{
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xff51afd7ed558ccdull);
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        h = (h ^ v) * 0xff51afd7ed558ccdull;
        h ^= h >> 32;
        p += 8;
        n -= 8;
    }
    uint64_t v = 0;
    if (n)
        memcpy(&v, p, n);
    h = (h ^ v) * 0xc4ceb9fe1a85ec53ull;
    h ^= h >> 29;
    h *= 0x94d049bb133111ebull;
    h ^= h >> 31;
    return h;
}

static inline uint64_t hash_u64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

static inline const char *str_ptr(const struct moe_tokenizer *t, uint32_t id)
{
    return t->pool.data + t->str_off[id];
}

/* Id of the string s[0..n), or NONE. */
static uint32_t str_find(const struct moe_tokenizer *t, const void *s, size_t n)
{
    if (t->strtab == NULL)
        return NONE;
    uint64_t h = hash_bytes(s, n);
    uint32_t h32 = (uint32_t)h;
    for (uint32_t i = (uint32_t)(h >> 32) & t->strtab_mask;; i = (i + 1) & t->strtab_mask) {
        const struct str_slot *sl = &t->strtab[i];
        if (sl->id == NONE)
            return NONE;
        if (sl->hash == h32 && t->str_len[sl->id] == n && memcmp(str_ptr(t, sl->id), s, n) == 0)
            return sl->id;
    }
}

static inline int32_t token_find(const struct moe_tokenizer *t, const void *s, size_t n)
{
    uint32_t id = str_find(t, s, n);
    return id < t->n_tokens ? (int32_t)id : MOE_TOKEN_NULL;
}

static void strtab_place(struct str_slot *tab, uint32_t mask, uint32_t id, uint64_t h)
{
    uint32_t i = (uint32_t)(h >> 32) & mask;
    while (tab[i].id != NONE)
        i = (i + 1) & mask;
    tab[i].id = id;
    tab[i].hash = (uint32_t)h;
}

static int strtab_grow(struct moe_tokenizer *t)
{
    uint32_t cap = t->strtab_mask ? (t->strtab_mask + 1) * 2 : 1024;
    if (cap == 0 || cap > (1u << 30))
        return MOE_ELIMIT;
    struct str_slot *tab = moe_malloc((size_t)cap * sizeof(*tab));
    if (tab == NULL)
        return -ENOMEM;
    for (uint32_t i = 0; i < cap; i++)
        tab[i].id = NONE;
    for (uint32_t id = 0; id < t->n_str; id++)
        strtab_place(tab, cap - 1, id, hash_bytes((const uint8_t *)str_ptr(t, id), t->str_len[id]));
    moe_free(t->strtab);
    t->strtab = tab;
    t->strtab_mask = cap - 1;
    return 0;
}

/* Adds s as a new string (caller checked it is absent); returns its id via
 * *id. The pool keeps a NUL after each string for printing. */
static int str_add(struct moe_tokenizer *t, const void *s, size_t n, uint32_t *id)
{
    if (n > UINT32_MAX / 2 || t->n_str >= UINT32_MAX / 4)
        return MOE_ELIMIT;
    /* the two arrays share one capacity: off grows first, len to match */
    size_t cap_off = t->str_cap, cap_len = t->str_cap;
    int rc = moe_array_grow((void **)&t->str_off, &cap_off, (size_t)t->n_str + 1, sizeof(uint32_t), 0);
    if (rc == 0)
        rc = moe_array_grow((void **)&t->str_len, &cap_len, cap_off, sizeof(uint32_t), 0);
    if (rc != 0)
        return rc;
    t->str_cap = cap_off;
    /* room for the string and its NUL first, so the appends cannot fail */
    if ((rc = moe_buf_reserve(&t->pool, n + 1)) != 0)
        return rc;
    if ((uint64_t)(t->n_str + 1) * 2 > (uint64_t)t->strtab_mask + 1) {
        rc = strtab_grow(t);
        if (rc != 0)
            return rc;
    }
    uint32_t nid = t->n_str++;
    t->str_off[nid] = (uint32_t)t->pool.len;
    t->str_len[nid] = (uint32_t)n;
    moe_buf_append(&t->pool, s, n);
    moe_buf_putc(&t->pool, '\0');
    strtab_place(t->strtab, t->strtab_mask, nid, hash_bytes(s, n));
    *id = nid;
    return 0;
}

static int str_intern(struct moe_tokenizer *t, const void *s, size_t n, uint32_t *id)
{
    *id = str_find(t, s, n);
    if (*id != NONE)
        return 0;
    return str_add(t, s, n, id);
}

static const struct merge_slot *merge_find(const struct moe_tokenizer *t, uint32_t l, uint32_t r)
{
    uint64_t key = ((uint64_t)l << 32) | r;
    for (uint64_t i = hash_u64(key) & t->merge_mask;; i = (i + 1) & t->merge_mask) {
        const struct merge_slot *m = &t->merges[i];
        if (m->key == key)
            return m;
        if (m->key == UINT64_MAX)
            return NULL;
    }
}

/* ---- loading -------------------------------------------------------------- */

/* llama_token_type (llama.h) -> llama_token_attr */
static uint32_t type_to_attr(int32_t type)
{
    switch (type) {
    case 1: return MOE_TOKEN_ATTR_NORMAL;
    case 2: return MOE_TOKEN_ATTR_UNKNOWN;
    case 3: return MOE_TOKEN_ATTR_CONTROL;
    case 4: return MOE_TOKEN_ATTR_USER_DEFINED;
    case 5: return MOE_TOKEN_ATTR_UNUSED;
    case 6: return MOE_TOKEN_ATTR_BYTE;
    default: return MOE_TOKEN_ATTR_UNDEFINED;
    }
}

static bool str_eq(const struct moe_gguf_str *s, const char *lit)
{
    size_t n = strlen(lit);
    return s->len == n && memcmp(s->ptr, lit, n) == 0;
}

static bool tok_is(const struct moe_tokenizer *t, uint32_t id, const char *lit)
{
    size_t n = strlen(lit);
    return t->str_len[id] == n && memcmp(str_ptr(t, id), lit, n) == 0;
}

static bool tok_is_any(const struct moe_tokenizer *t, uint32_t id, const char *const *lits)
{
    for (; *lits != NULL; lits++)
        if (tok_is(t, id, *lits))
            return true;
    return false;
}

/* Reads an optional token id key: absent leaves *id; out of range keeps the
 * default, as llama.cpp does (it only warns). */
static int read_special_id(const struct moe_gguf *g, const char *key, uint32_t n_tokens,
                           int32_t *id, struct moe_diag *diag)
{
    uint32_t v;
    int rc = moe_gguf_get_u32(g, key, &v, diag);
    if (rc == -ENOENT)
        return 0;
    if (rc != 0)
        return rc;
    if (v < n_tokens)
        *id = (int32_t)v;
    return 0;
}

static int read_bool(const struct moe_gguf *g, const char *key, bool *out, struct moe_diag *diag)
{
    int rc = moe_gguf_get_bool(g, key, out, diag);
    return rc == -ENOENT ? 0 : rc;
}

/* Appends the piece of token id with special = true to b
 * (llama_vocab::impl::token_to_piece as it fills llama.cpp's cache). */
static int piece_for_cache(const struct moe_tokenizer *t, uint32_t id, struct moe_buf *b)
{
    uint32_t attr = t->attr[id];
    const uint8_t *s = (const uint8_t *)str_ptr(t, id);
    size_t n = t->str_len[id];
    int rc = 0;
    if (attr & (MOE_TOKEN_ATTR_UNKNOWN | MOE_TOKEN_ATTR_CONTROL | MOE_TOKEN_ATTR_USER_DEFINED))
        return moe_buf_append(b, s, n);
    if (attr & MOE_TOKEN_ATTR_NORMAL) {
        if (t->type == MOE_VOCAB_SPM || t->spm_style) {
            /* llama_unescape_whitespace: U+2581 -> ' ' */
            for (size_t i = 0; i < n && rc == 0;) {
                if (i + 3 <= n && s[i] == 0xE2 && s[i + 1] == 0x96 && s[i + 2] == 0x81) {
                    rc = moe_buf_append(b, " ", 1);
                    i += 3;
                } else {
                    rc = moe_buf_append(b, s + i++, 1);
                }
            }
            return rc;
        }
        /* llama_decode_text: each code point back to its byte */
        for (size_t i = 0; i < n && rc == 0;) {
            uint32_t cpt = moe_utf8_decode(s, n, &i);
            int by = moe_unicode_cpt_to_byte(cpt);
            if (by >= 0) {
                char c = (char)by;
                rc = moe_buf_append(b, &c, 1);
                continue;
            }
            /* the marker llama.cpp writes for a char outside the map */
            uint8_t u[4];
            size_t un = moe_utf8_encode(cpt, u);
            char hex[16];
            rc = moe_buf_append(b, "[UNK_BYTE_0x", 12);
            for (size_t k = 0; k < un && rc == 0; k++) {
                snprintf(hex, sizeof(hex), "%02x", u[k]);
                rc = moe_buf_append(b, hex, 2);
            }
            if (rc == 0)
                rc = moe_buf_append(b, s, n);
            if (rc == 0)
                rc = moe_buf_append(b, "]", 1);
        }
        return rc;
    }
    if (attr & MOE_TOKEN_ATTR_BYTE) {
        /* token_to_byte: the two hex digits of <0xNN> */
        char hex[3] = { n > 3 ? (char)s[3] : '0', n > 4 ? (char)s[4] : '0', 0 };
        char c = (char)strtol(hex, NULL, 16);
        return moe_buf_append(b, &c, 1);
    }
    return 0;
}

static int build_pieces(struct moe_tokenizer *t)
{
    struct moe_buf b;
    moe_buf_init(&b, POOL_LIMIT);
    t->piece_off = moe_malloc((size_t)t->n_tokens * sizeof(uint32_t));
    t->piece_len = moe_malloc((size_t)t->n_tokens * sizeof(uint32_t));
    if (t->piece_off == NULL || t->piece_len == NULL)
        return -ENOMEM;
    for (uint32_t i = 0; i < t->n_tokens; i++) {
        size_t before = b.len;
        int rc = piece_for_cache(t, i, &b);
        if (rc != 0) {
            moe_buf_free(&b);
            return rc;
        }
        t->piece_off[i] = (uint32_t)before;
        t->piece_len[i] = (uint32_t)(b.len - before);
        if (b.len - before > t->max_piece)
            t->max_piece = b.len - before;
    }
    t->piece_pool = moe_buf_take(&b, NULL);
    return t->piece_pool ? 0 : -ENOMEM;
}

static int cmp_special(const void *a, const void *b, void *ctx)
{
    const struct moe_tokenizer *t = ctx;
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    uint32_t lx = t->str_len[x], ly = t->str_len[y];
    if (lx != ly)
        return lx > ly ? -1 : 1;
    return x < y ? -1 : x > y;
}

static inline void eog_set(struct moe_tokenizer *t, int32_t id)
{
    if (id >= 0 && (uint32_t)id < t->n_tokens)
        t->eog[id >> 3] |= (uint8_t)(1u << (id & 7));
}

/* The attribute fix-ups llama.cpp applies by token text after reading the
 * vocabulary (llama_vocab::impl::load, "auto-detect special tokens"). One
 * deliberate difference: llama.cpp promotes only the first FIM/EOT
 * candidate met in unordered_map order; here every candidate is promoted,
 * which is the same whenever a vocabulary has at most one of each. */
static void apply_text_rules(struct moe_tokenizer *t)
{
    static const char *const eot[] = { "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
        "<|endoftext|>", "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]",
        "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>", "<end_of_utterance>", NULL };
    static const char *const fim[] = { "<|eom_id|>",
        "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\xef\xbd\x9c" "fim\xe2\x96\x81" "begin\xef\xbd\x9c>",
        "<PRE>", "\xe2\x96\x81<PRE>", "<|code_prefix|>", "<|prefix|>",
        "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\xef\xbd\x9c" "fim\xe2\x96\x81hole\xef\xbd\x9c>",
        "<SUF>", "\xe2\x96\x81<SUF>", "<|code_suffix|>", "<|suffix|>",
        "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\xef\xbd\x9c" "fim\xe2\x96\x81" "end\xef\xbd\x9c>",
        "<MID>", "\xe2\x96\x81<MID>", "<|code_middle|>", "<|middle|>",
        "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]",
        "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>",
        "<|file_sep|>", NULL };
    static const char *const eog_fim[] = { "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]",
        "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>", NULL };
    static const char *const eog[] = { "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>",
        "<|flush|>", "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>",
        "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>",
        "<|tool_response>", "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>", "[e~[", NULL };
    static const char *const harmony[] = { "<|channel|>", "<|message|>", "<|start|>", "<|constrain|>", NULL };

    bool eot_given = t->eot != MOE_TOKEN_NULL;
    for (uint32_t id = 0; id < t->n_tokens; id++) {
        if (!eot_given && tok_is_any(t, id, eot)) {
            if (t->eot == MOE_TOKEN_NULL)
                t->eot = (int32_t)id;
            t->attr[id] |= MOE_TOKEN_ATTR_CONTROL;
        }
        if (tok_is_any(t, id, fim))
            t->attr[id] |= MOE_TOKEN_ATTR_CONTROL;
        if ((t->attr[id] & MOE_TOKEN_ATTR_CONTROL) && !(t->attr[id] & MOE_TOKEN_ATTR_UNUSED) &&
            memmem(str_ptr(t, id), t->str_len[id], "unused", 6) != NULL)
            t->attr[id] |= MOE_TOKEN_ATTR_UNUSED;
        if (tok_is_any(t, id, eog_fim))
            eog_set(t, (int32_t)id);
        if (tok_is_any(t, id, eog)) {
            eog_set(t, (int32_t)id);
            t->attr[id] |= MOE_TOKEN_ATTR_CONTROL;
        }
    }
    for (uint32_t id = 0; id < t->n_tokens; id++) {
        if (tok_is_any(t, id, harmony))
            t->attr[id] = MOE_TOKEN_ATTR_USER_DEFINED;
    }
    eog_set(t, t->eos);
    eog_set(t, t->eot);
    /* o200k_harmony / solar-open: <|end|> is not EOG when <|return|> and
     * <|call|> (or <|calls|> and <|flush|>) are there. */
    int32_t end_id = MOE_TOKEN_NULL;
    bool has_return = false, has_call = false, has_flush = false;
    for (uint32_t id = 0; id < t->n_tokens; id++) {
        if (!moe_tokenizer_is_eog(t, (int32_t)id))
            continue;
        if (tok_is(t, id, "<|return|>"))
            has_return = true;
        else if (tok_is(t, id, "<|call|>") || tok_is(t, id, "<|calls|>"))
            has_call = true;
        else if (tok_is(t, id, "<|flush|>"))
            has_flush = true;
        else if (tok_is(t, id, "<|end|>"))
            end_id = (int32_t)id;
    }
    if (end_id != MOE_TOKEN_NULL && has_call && (has_return || has_flush)) {
        t->eog[end_id >> 3] &= (uint8_t)~(1u << (end_id & 7));
        t->attr[end_id] = MOE_TOKEN_ATTR_USER_DEFINED;
    }
    /* gemma4 and plamo have a normal </s>: when <|tool_response> or
     * <|plamo:eos|> is EOG, an EOG </s> stops being EOG and becomes NORMAL */
    int32_t s_id = MOE_TOKEN_NULL;
    bool normal_s = false;
    for (uint32_t id = 0; id < t->n_tokens; id++) {
        if (!moe_tokenizer_is_eog(t, (int32_t)id))
            continue;
        if (tok_is(t, id, "<|tool_response>") || tok_is(t, id, "<|plamo:eos|>"))
            normal_s = true;
        else if (tok_is(t, id, "</s>"))
            s_id = (int32_t)id;
    }
    if (normal_s && s_id != MOE_TOKEN_NULL) {
        t->eog[s_id >> 3] &= (uint8_t)~(1u << (s_id & 7));
        t->attr[s_id] = MOE_TOKEN_ATTR_NORMAL;
    }
}

static int load_merges(struct moe_tokenizer *t, const struct moe_gguf *g, struct moe_diag *diag)
{
    const struct moe_gguf_value *arr;
    int rc = moe_gguf_get_arr(g, "tokenizer.ggml.merges", MOE_GGUF_STRING, &arr, diag);
    if (rc == -ENOENT)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: tokenizer.ggml.merges: missing (required for gpt2 vocabularies)",
                            moe_gguf_path(g));
    if (rc != 0)
        return rc;
    uint64_t n = arr->v.arr.n;
    if (n > MOE_TOKENIZER_MAX_MERGES)
        return moe_diag_set(diag, MOE_ELIMIT, "%s: tokenizer.ggml.merges: %llu entries, at most %u",
                            moe_gguf_path(g), (unsigned long long)n, MOE_TOKENIZER_MAX_MERGES);
    uint64_t cap = 1024;
    while (cap < n * 2 + 16)
        cap *= 2;
    t->merges = moe_malloc(cap * sizeof(*t->merges));
    if (t->merges == NULL)
        return -ENOMEM;
    for (uint64_t i = 0; i < cap; i++)
        t->merges[i].key = UINT64_MAX;
    t->merge_mask = cap - 1;
    const struct moe_gguf_str *s = arr->v.arr.data;
    for (uint64_t i = 0; i < n; i++) {
        /* llama.cpp: word.find(' ', 1); a line without one gives the pair
         * ("", ""), which no symbol pair can match, so it is skipped. */
        const char *sp = s[i].len > 1 ? memchr(s[i].ptr + 1, ' ', s[i].len - 1) : NULL;
        if (sp == NULL)
            continue;
        size_t ln = (size_t)(sp - s[i].ptr), rn = s[i].len - ln - 1;
        uint32_t l, r, res;
        if ((rc = str_intern(t, s[i].ptr, ln, &l)) != 0 || (rc = str_intern(t, sp + 1, rn, &r)) != 0)
            goto fail;
        /* the merged text is the two halves side by side */
        char small[256];
        char *cat = ln + rn <= sizeof(small) ? small : moe_malloc(ln + rn);
        if (cat == NULL) {
            rc = -ENOMEM;
            goto fail;
        }
        memcpy(cat, s[i].ptr, ln);
        memcpy(cat + ln, sp + 1, rn);
        rc = str_intern(t, cat, ln + rn, &res);
        if (cat != small)
            moe_free(cat);
        if (rc != 0)
            goto fail;
        uint64_t key = ((uint64_t)l << 32) | r;
        uint64_t j = hash_u64(key) & t->merge_mask;
        while (t->merges[j].key != UINT64_MAX && t->merges[j].key != key)
            j = (j + 1) & t->merge_mask;
        if (t->merges[j].key == UINT64_MAX) {   /* first rank wins (emplace) */
            t->merges[j].key = key;
            t->merges[j].rank = (uint32_t)i;
            t->merges[j].result = res;
        }
    }
    return 0;
fail:
    return rc == MOE_ELIMIT ? moe_diag_set(diag, rc, "%s: tokenizer.ggml.merges: too large", moe_gguf_path(g)) : rc;
}

/* The vocabulary type and its llama.cpp defaults (tokenizer.ggml.model),
 * and for BPE the pre-tokenizer named by tokenizer.ggml.pre. */
static int load_type(struct moe_tokenizer *t, const struct moe_gguf *g, struct moe_diag *diag)
{
    const char *path = moe_gguf_path(g);
    struct moe_gguf_str model = { 0 }, pre = { 0 };
    int rc = moe_gguf_get_str(g, "tokenizer.ggml.model", &model, diag);
    if (rc == -ENOENT)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: tokenizer.ggml.model: missing", path);
    if (rc != 0)
        return rc;
    rc = moe_gguf_get_str(g, "tokenizer.ggml.pre", &pre, diag);
    if (rc != 0 && rc != -ENOENT)
        return rc;

    struct moe_pretok_info info = { 0 };
    if (str_eq(&model, "llama")) {
        /* llama.cpp defaults for SPM */
        t->type = MOE_VOCAB_SPM;
        t->bos = 1;
        t->eos = 2;
        t->unk = 0;
        t->add_space_prefix = true;
        t->add_bos = true;
        t->pre_name = "default";
    } else if (str_eq(&model, "gpt2") || str_eq(&model, "gemma4")) {
        t->type = MOE_VOCAB_BPE;
        /* llama.cpp: gpt2 defaults BOS = EOS = 11; gemma4 has no defaults
         * and its pre-tokenizer is "gemma4" whatever tokenizer.ggml.pre says */
        bool gemma4 = str_eq(&model, "gemma4");
        t->bos = gemma4 ? MOE_TOKEN_NULL : 11;
        t->eos = gemma4 ? MOE_TOKEN_NULL : 11;
        t->unk = MOE_TOKEN_NULL;
        const char *pn = gemma4 ? "gemma4" : pre.len ? pre.ptr : "default";
        size_t pl = gemma4 ? 6 : pre.len ? (size_t)pre.len : 7;
        rc = moe_pretok_create(&t->pre, pn, pl, &info, diag);
        if (rc != 0)
            return rc;
        t->pre_name = info.name;
        t->clean_spaces = info.clean_spaces;
        t->ignore_merges = info.ignore_merges;
        t->add_bos = info.add_bos;
        t->spm_style = info.spm_style;
        t->force_add_bos = info.force_add_bos;
        t->newline_tokens = info.newline_tokens;
    } else {
        int shown = model.len > 64 ? 64 : (int)model.len;
        return moe_diag_set(diag, MOE_EUNSUPPORTED,
                            "%s: tokenizer.ggml.model: unsupported tokenizer '%.*s' (supported: llama, gpt2, gemma4)",
                            path, shown, model.ptr);
    }
    t->eot = MOE_TOKEN_NULL;
    return read_bool(g, "tokenizer.ggml.add_space_prefix", &t->add_space_prefix, diag);
}

/* An optional per-token array of 4-byte values; *arr NULL when absent. */
static int token_array(const struct moe_gguf *g, const char *key, uint64_t n, bool int_or_float,
                       const struct moe_gguf_value **arr, struct moe_diag *diag)
{
    int rc = moe_gguf_get_arr(g, key, MOE_GGUF_TYPE_COUNT, arr, diag);
    if (rc == -ENOENT) {
        *arr = NULL;
        return 0;
    }
    if (rc != 0)
        return rc;
    const enum moe_gguf_type et = (*arr)->v.arr.elem_type;
    if ((et != MOE_GGUF_INT32 && (!int_or_float || et != MOE_GGUF_FLOAT32)) || (*arr)->v.arr.n < n)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: %s: expected %llu %s, got %llu of type %s",
                            moe_gguf_path(g), key, (unsigned long long)n,
                            int_or_float ? "float32 or int32" : "int32",
                            (unsigned long long)(*arr)->v.arr.n, moe_gguf_type_name(et));
    return 0;
}

/* Token texts (interned as string ids 0..n-1), scores and attributes. */
static int load_tokens(struct moe_tokenizer *t, const struct moe_gguf *g, struct moe_diag *diag)
{
    const char *path = moe_gguf_path(g);
    const struct moe_gguf_value *toks, *scores, *types;
    int rc = moe_gguf_get_arr(g, "tokenizer.ggml.tokens", MOE_GGUF_STRING, &toks, diag);
    if (rc == -ENOENT)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: tokenizer.ggml.tokens: missing", path);
    if (rc != 0)
        return rc;
    uint64_t n = toks->v.arr.n;
    if (n == 0 || n > MOE_TOKENIZER_MAX_TOKENS)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: tokenizer.ggml.tokens: %llu tokens, expected 1..%u",
                            path, (unsigned long long)n, MOE_TOKENIZER_MAX_TOKENS);
    if ((rc = token_array(g, "tokenizer.ggml.scores", n, true, &scores, diag)) != 0 ||
        (rc = token_array(g, "tokenizer.ggml.token_type", n, false, &types, diag)) != 0)
        return rc;
    t->n_tokens = (uint32_t)n;
    t->score = moe_calloc(n, sizeof(float));
    t->attr = moe_calloc(n, sizeof(uint32_t));
    t->eog = moe_calloc((n + 7) / 8, 1);
    if (t->score == NULL || t->attr == NULL || t->eog == NULL)
        return -ENOMEM;
    const struct moe_gguf_str *ts = toks->v.arr.data;
    for (uint32_t i = 0; i < t->n_tokens; i++) {
        char empty[32];
        const char *s = ts[i].ptr;
        size_t len = ts[i].len;
        if (len == 0) {     /* llama.cpp renames empty tokens */
            len = (size_t)snprintf(empty, sizeof(empty), "[EMPTY_%u]", i);
            s = empty;
        }
        if (str_find(t, s, len) != NONE) {
            int shown = len > 64 ? 64 : (int)len;
            return moe_diag_set(diag, MOE_EFORMAT, "%s: tokenizer.ggml.tokens: duplicate token '%.*s' at id %u (first id %u)",
                                path, shown, s, i, str_find(t, s, len));
        }
        uint32_t id;
        if ((rc = str_add(t, s, len, &id)) != 0)
            return rc == MOE_ELIMIT ? moe_diag_set(diag, rc, "%s: tokenizer.ggml.tokens: too large", path) : rc;
        MOE_ASSERT(id == i);
        if (scores != NULL) {
            const uint8_t *p = (const uint8_t *)scores->v.arr.data + 4 * (size_t)i;
            if (scores->v.arr.elem_type == MOE_GGUF_FLOAT32) {
                memcpy(&t->score[i], p, 4);
            } else {
                int32_t v;
                memcpy(&v, p, 4);
                t->score[i] = (float)v;
            }
        }
        if (types != NULL) {
            int32_t v;
            memcpy(&v, (const uint8_t *)types->v.arr.data + 4 * (size_t)i, 4);
            t->attr[i] = type_to_attr(v);
        } else {
            t->attr[i] = MOE_TOKEN_ATTR_NORMAL;
        }
    }
    return 0;
}

/* Special ids: defaults out of range are disabled, then metadata. */
static int load_special_ids(struct moe_tokenizer *t, const struct moe_gguf *g, struct moe_diag *diag)
{
    const char *path = moe_gguf_path(g);
    int rc;
    if (t->bos >= (int32_t)t->n_tokens)
        t->bos = MOE_TOKEN_NULL;
    if (t->eos >= (int32_t)t->n_tokens)
        t->eos = MOE_TOKEN_NULL;
    if (t->unk >= (int32_t)t->n_tokens)
        t->unk = MOE_TOKEN_NULL;
    if ((rc = read_special_id(g, "tokenizer.ggml.bos_token_id", t->n_tokens, &t->bos, diag)) != 0 ||
        (rc = read_special_id(g, "tokenizer.ggml.eos_token_id", t->n_tokens, &t->eos, diag)) != 0 ||
        (rc = read_special_id(g, "tokenizer.ggml.eot_token_id", t->n_tokens, &t->eot, diag)) != 0 ||
        (rc = read_special_id(g, "tokenizer.ggml.unknown_token_id", t->n_tokens, &t->unk, diag)) != 0)
        return rc;
    if ((rc = read_bool(g, "tokenizer.ggml.add_bos_token", &t->add_bos, diag)) != 0 ||
        (rc = read_bool(g, "tokenizer.ggml.add_eos_token", &t->add_eos, diag)) != 0)
        return rc;
    /* llama.cpp's "workaround for Gemma 4" (its PR 21500): BOS is always added */
    if (t->force_add_bos)
        t->add_bos = true;
    /* llama.cpp loads these and aborts (GGML_ASSERT) at the first tokenize
     * with add_special; refusing the file names the missing key instead */
    if (t->add_bos && t->bos == MOE_TOKEN_NULL && t->force_add_bos)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: tokenizer.ggml.bos_token_id: missing or out of range"
                            " (%s vocabularies always add BOS)", path, t->pre_name);
    if (t->add_bos && t->bos == MOE_TOKEN_NULL)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: tokenizer.ggml.add_bos_token is true, but tokenizer.ggml.bos_token_id is not set", path);
    if (t->add_eos && t->eos == MOE_TOKEN_NULL)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: tokenizer.ggml.add_eos_token is true, but tokenizer.ggml.eos_token_id is not set", path);
    return 0;
}

/* The special-token cache, longest first (ties by id; llama.cpp's
 * std::sort leaves ties in an unspecified order). */
static int build_special(struct moe_tokenizer *t)
{
    const uint32_t kinds = MOE_TOKEN_ATTR_CONTROL | MOE_TOKEN_ATTR_USER_DEFINED | MOE_TOKEN_ATTR_UNKNOWN;
    size_t n_sp = 0;
    for (uint32_t i = 0; i < t->n_tokens; i++)
        n_sp += (t->attr[i] & kinds) != 0;
    t->special = moe_malloc((n_sp ? n_sp : 1) * sizeof(int32_t));
    if (t->special == NULL)
        return -ENOMEM;
    for (uint32_t i = 0; i < t->n_tokens; i++)
        if (t->attr[i] & kinds)
            t->special[t->n_special++] = (int32_t)i;
    qsort_r(t->special, t->n_special, sizeof(int32_t), cmp_special, t);
    return 0;
}

int moe_tokenizer_load(struct moe_tokenizer **out, const struct moe_gguf *g, struct moe_diag *diag)
{
    *out = NULL;
    const char *path = moe_gguf_path(g);
    struct moe_tokenizer *t = moe_calloc(1, sizeof(*t));
    if (t == NULL)
        return -ENOMEM;
    moe_buf_init(&t->pool, POOL_LIMIT);
    int rc;
    if ((rc = load_type(t, g, diag)) != 0 || (rc = load_tokens(t, g, diag)) != 0)
        goto fail;
    if (t->type == MOE_VOCAB_BPE) {
        if ((rc = load_merges(t, g, diag)) != 0)
            goto fail;
        for (unsigned b = 0; b < 256; b++) {
            if (t->spm_style) {
                /* the byte's <0xXX> token (hex upper case, as llama.cpp
                 * writes the name it looks up), NONE without one */
                char name[8];
                snprintf(name, sizeof(name), "<0x%02X>", b);
                uint32_t id = str_find(t, name, 6);
                t->byte_sym[b] = id < t->n_tokens ? id : NONE;
                continue;
            }
            uint8_t u[4];
            size_t un = moe_utf8_encode(moe_unicode_byte_to_cpt((uint8_t)b), u);
            t->byte_sym[b] = str_find(t, u, un);
        }
    }
    if ((rc = load_special_ids(t, g, diag)) != 0)
        goto fail;
    apply_text_rules(t);
    if ((rc = build_special(t)) != 0)
        goto fail;
    if ((rc = build_pieces(t)) != 0) {
        if (rc == MOE_ELIMIT)
            rc = moe_diag_set(diag, rc, "%s: tokenizer.ggml.tokens: pieces exceed 4 GiB", path);
        goto fail;
    }

    struct moe_gguf_str tmpl;
    rc = moe_gguf_get_str(g, "tokenizer.chat_template", &tmpl, diag);
    if (rc == 0) {
        t->chat_template = moe_strndup(tmpl.ptr, tmpl.len);
        if (t->chat_template == NULL) {
            rc = -ENOMEM;
            goto fail;
        }
    } else if (rc != -ENOENT) {
        goto fail;
    }
    *out = t;
    return 0;
fail:
    if (rc == -ENOMEM)
        moe_diag_set(diag, rc, "%s: out of memory loading the tokenizer", path);
    moe_tokenizer_free(t);
    return rc;
}

void moe_tokenizer_free(struct moe_tokenizer *t)
{
    if (t == NULL)
        return;
    moe_buf_free(&t->pool);
    moe_free(t->str_off);
    moe_free(t->str_len);
    moe_free(t->strtab);
    moe_free(t->score);
    moe_free(t->attr);
    moe_free(t->merges);
    moe_free(t->piece_pool);
    moe_free(t->piece_off);
    moe_free(t->piece_len);
    moe_free(t->eog);
    moe_free(t->special);
    moe_pretok_free(t->pre);
    moe_free(t->chat_template);
    moe_free(t);
}

/* ---- per-call scratch ----------------------------------------------------- */

struct frag {
    int32_t token;      /* >= 0: a special token; MOE_TOKEN_NULL: raw text */
    uint32_t off, len;
};

struct sym {
    int32_t prev, next;
    uint32_t start, n;
    uint32_t id;        /* BPE: string id (NONE: not interned) */
};

struct bigram {
    float score;        /* SPM */
    uint32_t rank;      /* BPE */
    int32_t left, right;
    uint32_t size;      /* SPM: byte size of the pair */
    uint32_t lid, rid, res;
};

struct work {
    const struct moe_tokenizer *tok;
    int32_t *ids;
    size_t max, n;      /* n counts every id, written or not */

    struct frag *fa, *fb;
    size_t nfa, cap_frag;

    uint8_t *buf;       /* SPM: escaped text; BPE: sanitized text / encoded word */
    size_t buf_cap;

    struct sym *sym;
    size_t sym_cap;
    struct bigram *heap;
    size_t nheap, heap_cap;

    struct moe_span_vec words, scratch;
};
/* These arrays grow by moe_array_grow without a limit of their own: the
 * text's length (at most MOE_TOKENIZER_MAX_TEXT) bounds them. */

static void work_free(struct work *w)
{
    moe_free(w->fa);
    moe_free(w->fb);
    moe_free(w->buf);
    moe_free(w->sym);
    moe_free(w->heap);
    moe_free(w->words.v);
    moe_free(w->scratch.v);
}

static inline void emit(struct work *w, int32_t id)
{
    if (w->n < w->max)
        w->ids[w->n] = id;
    w->n++;
}

/* Binary heap; SPM: highest score first then lowest left (llm_bigram_spm),
 * BPE: lowest rank first then lowest left (llm_bigram_bpe). */
static inline bool before(enum moe_vocab_type ty, const struct bigram *a, const struct bigram *b)
{
    if (ty == MOE_VOCAB_SPM) {
        if (a->score != b->score)
            return a->score > b->score;
    } else if (a->rank != b->rank) {
        return a->rank < b->rank;
    }
    return a->left < b->left;
}

static int heap_push(struct work *w, const struct bigram *b)
{
    if (moe_array_grow((void **)&w->heap, &w->heap_cap, w->nheap + 1, sizeof(*w->heap), 0) != 0)
        return -ENOMEM;
    enum moe_vocab_type ty = w->tok->type;
    size_t i = w->nheap++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!before(ty, b, &w->heap[p]))
            break;
        w->heap[i] = w->heap[p];
        i = p;
    }
    w->heap[i] = *b;
    return 0;
}

static struct bigram heap_pop(struct work *w)
{
    enum moe_vocab_type ty = w->tok->type;
    struct bigram top = w->heap[0];
    struct bigram last = w->heap[--w->nheap];
    size_t i = 0, n = w->nheap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && before(ty, &w->heap[c + 1], &w->heap[c]))
            c++;
        if (!before(ty, &w->heap[c], &last))
            break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (n > 0)
        w->heap[i] = last;
    return top;
}

/* ---- special-token partition (tokenizer_st_partition) --------------------- */

/* fa and fb (the fragment list and the one being rebuilt, swapped after
 * each special token) share one capacity: both grow together. */
static int frag_grow(struct work *w, size_t need)
{
    size_t cap_a = w->cap_frag, cap_b = w->cap_frag;
    if (moe_array_grow((void **)&w->fa, &cap_a, need, sizeof(struct frag), 0) != 0 ||
        moe_array_grow((void **)&w->fb, &cap_b, cap_a, sizeof(struct frag), 0) != 0)
        return -ENOMEM;
    w->cap_frag = cap_a;
    return 0;
}

static int frag_push(struct work *w, struct frag **arr, size_t *n, int32_t token, uint32_t off, uint32_t len)
{
    if (*n == w->cap_frag && frag_grow(w, *n + 1) != 0)
        return -ENOMEM;
    (*arr)[*n].token = token;
    (*arr)[*n].off = off;
    (*arr)[*n].len = len;
    (*n)++;
    return 0;
}

static int partition(struct work *w, const uint8_t *text, size_t len, bool parse_special)
{
    const struct moe_tokenizer *t = w->tok;
    w->nfa = 0;
    if (len == 0)
        return 0;
    if (frag_grow(w, 64) != 0)
        return -ENOMEM;
    w->fa[0] = (struct frag){ MOE_TOKEN_NULL, 0, (uint32_t)len };
    w->nfa = 1;
    if (t->n_special == 0)
        return 0;

    /* A special token absent from the whole text cannot be in a fragment:
     * one pass over the text marks which bytes and byte pairs occur, so that
     * memmem runs only for tokens that may be there. */
    uint8_t bytes[256 / 8] = { 0 };
    uint8_t *pairs = moe_calloc(65536 / 8, 1);
    if (pairs == NULL)
        return -ENOMEM;
    for (size_t i = 0; i < len; i++) {
        bytes[text[i] >> 3] |= (uint8_t)(1u << (text[i] & 7));
        if (i + 1 < len) {
            unsigned p = ((unsigned)text[i] << 8) | text[i + 1];
            pairs[p >> 3] |= (uint8_t)(1u << (p & 7));
        }
    }
    int rc = 0;
    for (size_t k = 0; k < t->n_special; k++) {
        int32_t sid = t->special[k];
        uint32_t attr = t->attr[sid];
        if (!parse_special && (attr & (MOE_TOKEN_ATTR_CONTROL | MOE_TOKEN_ATTR_UNKNOWN)))
            continue;
        const uint8_t *st = (const uint8_t *)str_ptr(t, (uint32_t)sid);
        size_t sl = t->str_len[sid];
        if (sl == 0 || sl > len)
            continue;
        if (!(bytes[st[0] >> 3] & (1u << (st[0] & 7))))
            continue;
        if (sl >= 2) {
            unsigned p0 = ((unsigned)st[0] << 8) | st[1], p1 = ((unsigned)st[sl - 2] << 8) | st[sl - 1];
            if (!(pairs[p0 >> 3] & (1u << (p0 & 7))) || !(pairs[p1 >> 3] & (1u << (p1 & 7))))
                continue;
        }
        /* rebuild the fragment list into fb, then swap */
        size_t nb = 0;
        for (size_t f = 0; f < w->nfa; f++) {
            struct frag fr = w->fa[f];
            if (fr.token != MOE_TOKEN_NULL) {
                if ((rc = frag_push(w, &w->fb, &nb, fr.token, 0, 0)) != 0)
                    goto done;
                continue;
            }
            size_t off = fr.off, flen = fr.len;
            for (;;) {
                const uint8_t *m = memmem(text + off, flen, st, sl);
                if (m == NULL) {
                    if (flen > 0 && (rc = frag_push(w, &w->fb, &nb, MOE_TOKEN_NULL, (uint32_t)off, (uint32_t)flen)) != 0)
                        goto done;
                    break;
                }
                size_t mpos = (size_t)(m - text);
                if (mpos > off) {
                    size_t ll = mpos - off;
                    if (attr & MOE_TOKEN_ATTR_LSTRIP)
                        while (ll > 0 && isspace(text[off + ll - 1]))
                            ll--;
                    if (ll > 0 && (rc = frag_push(w, &w->fb, &nb, MOE_TOKEN_NULL, (uint32_t)off, (uint32_t)ll)) != 0)
                        goto done;
                }
                if ((rc = frag_push(w, &w->fb, &nb, sid, 0, 0)) != 0)
                    goto done;
                size_t roff = mpos + sl, rlen = off + flen - roff;
                if (rlen == 0)
                    break;
                if (attr & MOE_TOKEN_ATTR_RSTRIP)
                    while (rlen > 0 && isspace(text[roff])) {
                        roff++;
                        rlen--;
                    }
                off = roff;
                flen = rlen;
            }
        }
        struct frag *tmp = w->fa;
        w->fa = w->fb;
        w->fb = tmp;
        w->nfa = nb;
    }
done:
    moe_free(pairs);
    return rc;
}

/* ---- SPM (llm_tokenizer_spm_session) ------------------------------------ */

static int spm_try_bigram(struct work *w, const uint8_t *s, int32_t l, int32_t r)
{
    if (l < 0 || r < 0)
        return 0;
    const struct sym *a = &w->sym[l], *b = &w->sym[r];
    size_t size = (size_t)a->n + b->n;
    int32_t id = token_find(w->tok, s + a->start, size);
    if (id == MOE_TOKEN_NULL)
        return 0;
    struct bigram bg = { .score = w->tok->score[id], .left = l, .right = r, .size = (uint32_t)size };
    return heap_push(w, &bg);
}

static void spm_byte(struct work *w, uint8_t c)
{
    static const char hex[] = "0123456789ABCDEF";
    char b[6] = { '<', '0', 'x', hex[c >> 4], hex[c & 15], '>' };
    int32_t id = token_find(w->tok, b, 6);
    if (id == MOE_TOKEN_NULL)
        id = token_find(w->tok, &c, 1);
    /* llama.cpp throws (std::out_of_range) here; the unknown token is the
     * closest thing to "this byte has no token". */
    if (id == MOE_TOKEN_NULL)
        id = w->tok->unk;
    if (id != MOE_TOKEN_NULL)
        emit(w, id);
}

static int spm_tokenize(struct work *w, const uint8_t *s, size_t len)
{
    if (len == 0)
        return 0;
    if (moe_array_grow((void **)&w->sym, &w->sym_cap, len, sizeof(*w->sym), 0) != 0)
        return -ENOMEM;
    int32_t nsym = 0;
    for (size_t off = 0; off < len;) {
        size_t n = moe_utf8_len(s[off]);
        if (n > len - off)
            n = len - off;
        w->sym[nsym] = (struct sym){ nsym - 1, off + n == len ? -1 : nsym + 1, (uint32_t)off, (uint32_t)n, NONE };
        nsym++;
        off += n;
    }
    w->nheap = 0;
    int rc;
    for (int32_t i = 1; i < nsym; i++)
        if ((rc = spm_try_bigram(w, s, i - 1, i)) != 0)
            return rc;
    while (w->nheap > 0) {
        struct bigram bg = heap_pop(w);
        struct sym *l = &w->sym[bg.left], *r = &w->sym[bg.right];
        if (l->n == 0 || r->n == 0 || l->n + r->n != bg.size)
            continue;
        l->n += r->n;
        r->n = 0;
        l->next = r->next;
        if (r->next >= 0)
            w->sym[r->next].prev = bg.left;
        if ((rc = spm_try_bigram(w, s, l->prev, bg.left)) != 0 ||
            (rc = spm_try_bigram(w, s, bg.left, l->next)) != 0)
            return rc;
    }
    /* resegment: a final symbol is a token or a single unmerged character
     * (llama.cpp's rev_merge path only holds texts that are tokens, so it
     * never applies), else its bytes */
    for (int32_t i = 0; i != -1; i = w->sym[i].next) {
        const struct sym *sy = &w->sym[i];
        int32_t id = token_find(w->tok, s + sy->start, sy->n);
        if (id != MOE_TOKEN_NULL) {
            emit(w, id);
            continue;
        }
        for (uint32_t j = 0; j < sy->n; j++)
            spm_byte(w, s[sy->start + j]);
    }
    return 0;
}

/* ---- BPE (llm_tokenizer_bpe_session) ------------------------------------ */

static int bpe_add_bigram(struct work *w, int32_t l, int32_t r)
{
    if (l < 0 || r < 0)
        return 0;
    uint32_t lid = w->sym[l].id, rid = w->sym[r].id;
    if (lid == NONE || rid == NONE)
        return 0;
    const struct merge_slot *m = merge_find(w->tok, lid, rid);
    if (m == NULL)
        return 0;
    struct bigram bg = { .rank = m->rank, .left = l, .right = r, .lid = lid, .rid = rid, .res = m->result };
    return heap_push(w, &bg);
}

/* Writes the byte-level encoding of word[0..n) to w->buf; returns length. */
static size_t bpe_encode(struct work *w, const uint8_t *word, size_t n)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t c = moe_unicode_byte_to_cpt(word[i]);
        o += moe_utf8_encode(c, w->buf + o);
    }
    return o;
}

/* The merge loop of llm_tokenizer_bpe_session::tokenize over w->sym[0..]
 * (a chain from symbol 0, ids set): the lowest-ranked adjacent pair first,
 * leftmost among equal ranks. */
static int bpe_merge(struct work *w, size_t nsym)
{
    w->nheap = 0;
    int rc;
    for (size_t i = 1; i < nsym; i++)
        if ((rc = bpe_add_bigram(w, (int32_t)i - 1, (int32_t)i)) != 0)
            return rc;
    while (w->nheap > 0) {
        struct bigram bg = heap_pop(w);
        struct sym *l = &w->sym[bg.left], *r = &w->sym[bg.right];
        /* outdated when either side changed since the pair was queued */
        if (l->n == 0 || r->n == 0 || l->id != bg.lid || r->id != bg.rid || l->next != bg.right)
            continue;
        l->id = bg.res;
        l->n += r->n;
        r->n = 0;
        l->next = r->next;
        if (r->next >= 0)
            w->sym[r->next].prev = bg.left;
        if ((rc = bpe_add_bigram(w, l->prev, bg.left)) != 0 || (rc = bpe_add_bigram(w, bg.left, l->next)) != 0)
            return rc;
    }
    return 0;
}

static int bpe_word(struct work *w, const uint8_t *word, size_t n)
{
    const struct moe_tokenizer *t = w->tok;
    if (t->ignore_merges) {
        size_t en = bpe_encode(w, word, n);
        int32_t id = token_find(t, w->buf, en);
        if (id != MOE_TOKEN_NULL) {
            emit(w, id);
            return 0;
        }
    }
    for (size_t i = 0; i < n; i++)
        w->sym[i] = (struct sym){ (int32_t)i - 1, i + 1 == n ? -1 : (int32_t)i + 1, (uint32_t)i, 1, t->byte_sym[word[i]] };
    int rc = bpe_merge(w, n);
    if (rc != 0)
        return rc;
    for (int32_t i = 0; i != -1; i = w->sym[i].next) {
        const struct sym *sy = &w->sym[i];
        if (sy->id != NONE && sy->id < t->n_tokens) {
            emit(w, (int32_t)sy->id);
            continue;
        }
        /* no such token: llama.cpp looks each byte of the symbol's encoded
         * text up as a one-byte token and drops the bytes it cannot find */
        size_t en = bpe_encode(w, word + sy->start, sy->n);
        for (size_t j = 0; j < en; j++) {
            int32_t id = token_find(t, w->buf + j, 1);
            if (id != MOE_TOKEN_NULL)
                emit(w, id);
        }
    }
    return 0;
}

/* ---- SPM-style BPE (gemma4: llm_tokenizer_bpe_session, byte_encode off) -- */

/* One word (a run of newlines or a run without one) of valid UTF-8 text,
 * surrogates allowed. */
static int spm_bpe_word(struct work *w, const uint8_t *word, size_t n)
{
    const struct moe_tokenizer *t = w->tok;
    /* llama.cpp: ignore_merges (no spm_style row sets it), else gemma4's
     * "fix for gemma 4" (its PR 21343): a run of newlines that is a token
     * is that token */
    if (t->ignore_merges || (t->newline_tokens && word[0] == '\n')) {
        int32_t id = token_find(t, word, n);
        if (id != MOE_TOKEN_NULL) {
            emit(w, id);
            return 0;
        }
    }
    /* one symbol per code point (unicode_len_utf8 of its lead byte) */
    size_t nsym = 0;
    for (size_t off = 0; off < n; nsym++) {
        size_t cn = moe_utf8_len(word[off]);
        if (cn > n - off)
            cn = n - off;
        w->sym[nsym] = (struct sym){ (int32_t)nsym - 1, off + cn == n ? -1 : (int32_t)nsym + 1, (uint32_t)off,
                                     (uint32_t)cn, str_find(t, word + off, cn) };
        off += cn;
    }
    int rc = bpe_merge(w, nsym);
    if (rc != 0)
        return rc;
    for (int32_t i = 0; i != -1; i = w->sym[i].next) {
        const struct sym *sy = &w->sym[i];
        if (sy->id != NONE && sy->id < t->n_tokens) {
            emit(w, (int32_t)sy->id);
            continue;
        }
        /* no such token: each byte's <0xXX> token; bytes without one are
         * dropped (llama.cpp) */
        for (uint32_t j = 0; j < sy->n; j++) {
            uint32_t id = t->byte_sym[word[sy->start + j]];
            if (id != NONE)
                emit(w, (int32_t)id);
        }
    }
    return 0;
}

/* One raw-text fragment: ' ' -> U+2581 (llama_escape_whitespace), then the
 * text as llama.cpp's unicode_regex_split hands it back (code points
 * decoded by unicode_cpts_from_utf8 and re-encoded: a byte that starts no
 * complete sequence becomes U+FFFD; overlong forms and surrogates are
 * re-encoded as the code point they decode to), cut into runs of '\n' and
 * runs without (unicode_regex_split_custom_newlines). */
static int spm_bpe_tokenize(struct work *w, const uint8_t *text, size_t len)
{
    size_t n_sp = 0;
    for (size_t i = 0; i < len; i++)
        n_sp += text[i] == ' ';
    size_t elen = len + 2 * n_sp;    /* <= 3 GiB: len <= MOE_TOKENIZER_MAX_TEXT */
    uint8_t *esc = moe_malloc(elen ? elen : 1), *san = NULL;
    if (esc == NULL)
        return -ENOMEM;
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        if (text[i] == ' ') {
            memcpy(esc + o, "\xe2\x96\x81", 3);
            o += 3;
        } else {
            esc[o++] = text[i];
        }
    }
    const uint8_t *s = esc;
    size_t slen = elen;
    int rc = 0;
    if (!moe_utf8_valid(esc, elen)) {
        /* each input byte gives at most 3 (its U+2581 or a U+FFFD, never
         * both: U+2581 is complete), so slen <= 3 GiB fits the uint32_t
         * offsets of the symbols */
        if ((san = moe_malloc(len * 3)) == NULL) {
            rc = -ENOMEM;
            goto done;
        }
        slen = 0;
        for (size_t i = 0; i < elen;) {
            uint32_t c = moe_utf8_decode(esc, elen, &i);
            if (c > 0x10FFFF) {     /* llama.cpp: unicode_cpt_to_utf8 throws */
                rc = MOE_EFORMAT;
                goto done;
            }
            slen += moe_utf8_encode(c, san + slen);
        }
        s = san;
    }
    size_t maxw = 0;
    for (size_t i = 0; i < slen;) {
        size_t j = i + 1;
        while (j < slen && (s[j] == '\n') == (s[i] == '\n'))
            j++;
        if (j - i > maxw)
            maxw = j - i;
        i = j;
    }
    if (moe_array_grow((void **)&w->sym, &w->sym_cap, maxw + 1, sizeof(*w->sym), 0) != 0) {
        rc = -ENOMEM;
        goto done;
    }
    for (size_t i = 0; i < slen;) {
        size_t j = i + 1;
        while (j < slen && (s[j] == '\n') == (s[i] == '\n'))
            j++;
        if ((rc = spm_bpe_word(w, s + i, j - i)) != 0)
            goto done;
        i = j;
    }
done:
    moe_free(esc);
    moe_free(san);
    return rc;
}

/* llama.cpp decodes BPE text code point by code point (bad bytes become
 * U+FFFD) and re-encodes it; valid UTF-8, the usual case, is unchanged.
 * Returns the text to use (text itself or w->buf) in *out. */
static int bpe_sanitize(struct work *w, const uint8_t *text, size_t len, const uint8_t **out, size_t *out_len)
{
    if (moe_utf8_valid(text, len)) {
        *out = text;
        *out_len = len;
        return 0;
    }
    if (moe_array_grow((void **)&w->buf, &w->buf_cap, len * 3 + 4, 1, 0) != 0)
        return -ENOMEM;
    size_t o = 0;
    for (size_t i = 0; i < len;) {
        uint32_t c = moe_utf8_decode(text, len, &i);
        if (c > 0x10FFFF)
            return MOE_EFORMAT;
        /* A surrogate stays as its three bytes in the token text, but PCRE2
         * needs valid UTF-8: U+E000 has the same length and, like a
         * surrogate, no category any pattern names. */
        if (c >= 0xD800 && c <= 0xDFFF)
            c = 0xE000;
        o += moe_utf8_encode(c, w->buf + o);
    }
    *out = w->buf;
    *out_len = o;
    return 0;
}

static int bpe_tokenize(struct work *w, const uint8_t *text, size_t len)
{
    const uint8_t *s;
    size_t slen;
    int rc = bpe_sanitize(w, text, len, &s, &slen);
    if (rc != 0)
        return rc;
    uint8_t *own = NULL;
    if (s == w->buf) {
        /* words and encodings below reuse w->buf: keep the text apart */
        own = moe_malloc(slen ? slen : 1);
        if (own == NULL)
            return -ENOMEM;
        memcpy(own, s, slen);
        s = own;
    }
    if ((rc = moe_pretok_split(w->tok->pre, s, slen, &w->words, &w->scratch)) != 0)
        goto done;
    size_t maxw = 0;
    for (size_t i = 0; i < w->words.n; i++)
        if (w->words.v[i].len > maxw)
            maxw = w->words.v[i].len;
    if (moe_array_grow((void **)&w->sym, &w->sym_cap, maxw + 1, sizeof(*w->sym), 0) != 0 ||
        moe_array_grow((void **)&w->buf, &w->buf_cap, maxw * 2 + 4, 1, 0) != 0) {
        rc = -ENOMEM;
        goto done;
    }
    for (size_t i = 0; i < w->words.n; i++)
        if ((rc = bpe_word(w, s + w->words.v[i].off, w->words.v[i].len)) != 0)
            goto done;
done:
    moe_free(own);
    return rc;
}

/* ---- public: tokenize ----------------------------------------------------- */

int moe_tokenize(const struct moe_tokenizer *t, const char *text, size_t len,
                 bool add_special, bool parse_special, int32_t *ids, size_t max, size_t *n)
{
    *n = 0;
    if (len > MOE_TOKENIZER_MAX_TEXT)
        return MOE_ELIMIT;
    if (text == NULL && len > 0)
        return -EINVAL;
    struct work w = { .tok = t, .ids = ids, .max = ids ? max : 0 };
    const uint8_t *tx = (const uint8_t *)text;
    int rc = partition(&w, tx, len, parse_special);
    if (rc != 0)
        goto done;

    if (t->type == MOE_VOCAB_SPM) {
        bool prev_special = true;   /* a leading space if first */
        if (add_special && t->add_bos)
            emit(&w, t->bos);
        for (size_t f = 0; f < w.nfa; f++) {
            const struct frag *fr = &w.fa[f];
            if (fr->token != MOE_TOKEN_NULL) {
                emit(&w, fr->token);
                prev_special = true;
                continue;
            }
            /* llama_escape_whitespace on (" " +) the fragment */
            size_t need = (size_t)fr->len * 3 + 3;
            if (moe_array_grow((void **)&w.buf, &w.buf_cap, need, 1, 0) != 0) {
                rc = -ENOMEM;
                goto done;
            }
            size_t o = 0;
            if (t->add_space_prefix && prev_special) {
                memcpy(w.buf, "\xe2\x96\x81", 3);
                o = 3;
            }
            for (uint32_t i = 0; i < fr->len; i++) {
                uint8_t c = tx[fr->off + i];
                if (c == ' ') {
                    memcpy(w.buf + o, "\xe2\x96\x81", 3);
                    o += 3;
                } else {
                    w.buf[o++] = c;
                }
            }
            if ((rc = spm_tokenize(&w, w.buf, o)) != 0)
                goto done;
            prev_special = false;
        }
        if (add_special && t->add_eos)
            emit(&w, t->eos);
    } else {
        if (add_special && t->add_bos)
            emit(&w, t->bos);
        for (size_t f = 0; f < w.nfa; f++) {
            const struct frag *fr = &w.fa[f];
            if (fr->token != MOE_TOKEN_NULL) {
                emit(&w, fr->token);
                continue;
            }
            rc = t->spm_style ? spm_bpe_tokenize(&w, tx + fr->off, fr->len)
                              : bpe_tokenize(&w, tx + fr->off, fr->len);
            if (rc != 0)
                goto done;
        }
        if (add_special && t->add_eos)
            emit(&w, t->eos);
    }
    *n = w.n;
    if (w.n > max)
        rc = -ENOSPC;
done:
    work_free(&w);
    return rc;
}

/* ---- public: pieces and detokenize --------------------------------------- */

int moe_token_to_piece(const struct moe_tokenizer *t, int32_t id, char *buf, size_t cap,
                       int lstrip, bool special, size_t *len)
{
    *len = 0;
    if (id < 0 || (uint32_t)id >= t->n_tokens)
        return -EINVAL;
    if (!special && (t->attr[id] & (MOE_TOKEN_ATTR_UNKNOWN | MOE_TOKEN_ATTR_CONTROL)))
        return 0;
    const char *p = t->piece_pool + t->piece_off[id];
    size_t n = t->piece_len[id];
    for (int i = 0; i < lstrip && n && *p == ' '; i++) {
        p++;
        n--;
    }
    *len = n;
    if (n > cap)
        return -ENOSPC;
    if (n)
        memcpy(buf, p, n);
    return 0;
}

int moe_detokenize(const struct moe_tokenizer *t, const int32_t *ids, size_t n_ids,
                   char *buf, size_t cap, bool remove_special, bool unparse_special, size_t *len)
{
    *len = 0;
    for (size_t i = 0; i < n_ids; i++)
        if (ids[i] < 0 || (uint32_t)ids[i] >= t->n_tokens)
            return -EINVAL;
    bool remove_space = t->add_space_prefix;
    if (remove_special && t->add_bos && n_ids > 0 && ids[0] == t->bos) {
        remove_space = false;
        n_ids--;
        ids++;
    }
    if (remove_special && t->add_eos && n_ids > 0 && ids[n_ids - 1] == t->eos)
        n_ids--;
    size_t total = 0;
    for (size_t i = 0; i < n_ids; i++) {
        size_t n;
        int rc = moe_token_to_piece(t, ids[i], total < cap ? buf + total : NULL, total < cap ? cap - total : 0,
                                    remove_space, unparse_special, &n);
        if (rc != 0 && rc != -ENOSPC)
            return rc;
        remove_space = false;
        total += n;
    }
    *len = total;
    if (total > cap)
        return -ENOSPC;
    if (t->clean_spaces && total > 0) {
        /* the three passes of llama_vocab::impl::detokenize, verbatim */
        char *x = buf;
        size_t t1 = total;
        total = 1;
        for (size_t i = 1; i < t1; i++) {
            char c = x[i];
            if (x[i - 1] == ' ' && (c == '?' || c == '!' || c == '.' || c == ','))
                total--;
            x[total++] = c;
        }
        size_t t2 = total;
        total = 1;
        for (size_t i = 1; i < t2; i++) {
            char c = x[i];
            if (c == '\'' && i + 1 < t2 && x[i - 1] == ' ' && x[i + 1] == ' ') {
                total--;
                x[++i] = '\0';
            }
            x[total++] = c;
        }
        size_t t3 = total;
        total = 1;
        for (size_t i = 1; i < t3; i++) {
            char c = x[i];
            if (x[i - 1] == ' ' && c == '\'' && i + 1 < t3) {
                char c1 = x[i + 1];
                if (c1 == 's' || c1 == 'm')
                    total--;
                else if (i + 2 < t3 && ((c1 == 'r' && x[i + 2] == 'e') || (c1 == 'v' && x[i + 2] == 'e')))
                    total--;
            }
            x[total++] = c;
        }
    }
    *len = total;
    if (total < cap)
        buf[total] = '\0';
    return 0;
}

/* ---- streaming ------------------------------------------------------------ */

void moe_detok_stream_init(struct moe_detok_stream *s, const struct moe_tokenizer *tok, bool special)
{
    s->tok = tok;
    s->special = special;
    s->n_pending = 0;
}

/* Bytes at the end of b[0..n) that start a UTF-8 character not yet
 * complete (0 when the text ends on a boundary or the tail is invalid
 * anyway, in which case holding it back would not help). */
static size_t incomplete_tail(const uint8_t *b, size_t n)
{
    for (size_t k = 1; k <= 3 && k <= n; k++) {
        uint8_t c = b[n - k];
        if ((c & 0xC0) == 0x80)
            continue;           /* continuation: look further back */
        size_t need = (c >= 0xF0 && c <= 0xF4) ? 4 : (c >= 0xE0 && c < 0xF0) ? 3 : (c >= 0xC2 && c < 0xE0) ? 2 : 1;
        return need > k ? k : 0;
    }
    return 0;
}

int moe_detok_stream_push(struct moe_detok_stream *s, int32_t id, char *buf, size_t cap, size_t *len)
{
    *len = 0;
    size_t pn;
    int rc = moe_token_to_piece(s->tok, id, NULL, 0, 0, s->special, &pn);
    if (rc != 0 && rc != -ENOSPC)
        return rc;
    size_t total = s->n_pending + pn;
    if (total > cap) {
        *len = total;
        return -ENOSPC;
    }
    memcpy(buf, s->pending, s->n_pending);
    if ((rc = moe_token_to_piece(s->tok, id, buf + s->n_pending, cap - s->n_pending, 0, s->special, &pn)) != 0)
        return rc;
    size_t hold = incomplete_tail((const uint8_t *)buf, total);
    memcpy(s->pending, buf + total - hold, hold);
    s->n_pending = hold;
    *len = total - hold;
    return 0;
}

int moe_detok_stream_flush(struct moe_detok_stream *s, char *buf, size_t cap, size_t *len)
{
    *len = s->n_pending;
    if (s->n_pending > cap)
        return -ENOSPC;
    memcpy(buf, s->pending, s->n_pending);
    s->n_pending = 0;
    return 0;
}

/* ---- getters ---------------------------------------------------------------- */

enum moe_vocab_type moe_tokenizer_type(const struct moe_tokenizer *t) { return t->type; }
const char *moe_tokenizer_pre(const struct moe_tokenizer *t) { return t->pre_name; }
uint32_t moe_tokenizer_n_tokens(const struct moe_tokenizer *t) { return t->n_tokens; }
int32_t moe_tokenizer_bos(const struct moe_tokenizer *t) { return t->bos; }
int32_t moe_tokenizer_eos(const struct moe_tokenizer *t) { return t->eos; }
int32_t moe_tokenizer_eot(const struct moe_tokenizer *t) { return t->eot; }
bool moe_tokenizer_add_bos(const struct moe_tokenizer *t) { return t->add_bos; }
bool moe_tokenizer_add_eos(const struct moe_tokenizer *t) { return t->add_eos; }
size_t moe_tokenizer_max_piece(const struct moe_tokenizer *t) { return t->max_piece; }
const char *moe_tokenizer_chat_template(const struct moe_tokenizer *t) { return t->chat_template; }

bool moe_tokenizer_is_eog(const struct moe_tokenizer *t, int32_t id)
{
    return id >= 0 && (uint32_t)id < t->n_tokens && (t->eog[id >> 3] & (1u << (id & 7)));
}

const char *moe_tokenizer_token_text(const struct moe_tokenizer *t, int32_t id, size_t *len)
{
    if (id < 0 || (uint32_t)id >= t->n_tokens)
        return NULL;
    if (len)
        *len = t->str_len[id];
    return str_ptr(t, (uint32_t)id);
}

uint32_t moe_tokenizer_token_attr(const struct moe_tokenizer *t, int32_t id)
{
    if (id < 0 || (uint32_t)id >= t->n_tokens)
        return MOE_TOKEN_ATTR_UNDEFINED;
    return t->attr[id];
}
