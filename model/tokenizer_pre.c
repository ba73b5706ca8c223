/* BPE pre-tokenizers: llama.cpp's regex lists per `tokenizer.ggml.pre`
 * (src/llama-vocab.cpp, llm_tokenizer_bpe), run on PCRE2.
 *
 * How the patterns relate to llama.cpp's:
 *  - `\s` is written as the explicit class WS below (Unicode White_Space,
 *    llama.cpp's unicode_set_whitespace), because PCRE2's UCP \s leaves out
 *    U+0085 and llama.cpp counts it.
 *  - The gpt2 and llama3 patterns are the original regexes; llama.cpp runs
 *    them through hand-written splitters (unicode_regex_split_custom_gpt2 /
 *    _llama3) that give the same splits as the regex (checked against the
 *    goldens in shared/ref/tokenizer).
 *  - llama.cpp runs the other patterns through std::regex on a "collapsed"
 *    text in which every non-ASCII code point becomes one byte standing for
 *    its category and non-ASCII whitespace becomes U+000B. Two consequences
 *    are reproduced: a literal non-ASCII range never matches a whitespace code
 *    point (the ranges are cut around them, tools/ref/gen_pretok_classes.py),
 *    and ASCII `~` is in neither \p{P} nor \p{S} there (deepseek-v3).
 *  - `$` means end of the piece only (PCRE2_DOLLAR_ENDONLY, as ECMAScript).
 */
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "common/alloc.h"
#include "common/buf.h"
#include "model/tokenizer-impl.h"

#define WS "\\t-\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"
#define S_ "[" WS "]"
#define NS_ "[^" WS "]"

/* 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S) */
#define RE_GPT2 "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" WS "\\p{L}\\p{N}]+|" S_ "+(?!" NS_ ")"
/* (?:'[sS]|...)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+ */
#define RE_LLAMA3_N(num) \
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|" num \
    "| ?[^" WS "\\p{L}\\p{N}]+[\\r\\n]*|" S_ "*[\\r\\n]+|" S_ "+(?!" NS_ ")|" S_ "+"
#define RE_LLAMA3 RE_LLAMA3_N("\\p{N}{1,3}")
/* qwen35: letters and marks together:
 * (?:'[sS]|...)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+ */
#define RE_QWEN35 \
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}" \
    "| ?[^" WS "\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|" S_ "*[\\r\\n]+|" S_ "+(?!" NS_ ")|" S_ "+"
/* gpt-4o / minimax-m2, as llama.cpp rewrites tokenizer.json's \p{Lu}... classes:
 * a letter that is not ASCII lower case ((?=\p{L})[^a-z]) / not ASCII upper
 * case ((?=\p{L})[^A-Z]), which is what its category-collapsed matching
 * sees for every non-ASCII letter; contractions attached */
#define CONTR "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
#define RE_GPT4O \
    "[^\\r\\n\\p{L}\\p{N}]?(?:(?=\\p{L})[^a-z])*(?:(?=\\p{L})[^A-Z])+" CONTR \
    "|[^\\r\\n\\p{L}\\p{N}]?(?:(?=\\p{L})[^a-z])+(?:(?=\\p{L})[^A-Z])*" CONTR \
    "|\\p{N}{1,3}| ?[^" WS "\\p{L}\\p{N}]+[\\r\\n/]*|" S_ "*[\\r\\n]+|" S_ "+(?!" NS_ ")|" S_ "+"
#define RE_QWEN2  RE_LLAMA3_N("\\p{N}")

/* deepseek-llm / deepseek-coder literal classes (gen_pretok_classes.py) */
#define CLS_DS_LETTERS \
    "A-Za-z\\x{B5}\\x{C0}-\\x{D6}\\x{D8}-\\x{F6}\\x{F8}-\\x{1BA}\\x{1BC}-\\x{1BF}\\x{1C4}-\\x{293}" \
    "\\x{295}-\\x{2AF}\\x{370}-\\x{373}\\x{376}\\x{377}\\x{37B}-\\x{37D}\\x{37F}\\x{386}\\x{388}-\\x{38A}" \
    "\\x{38C}\\x{38E}-\\x{3A1}\\x{3A3}-\\x{3F5}\\x{3F7}-\\x{481}\\x{48A}-\\x{52F}\\x{531}-\\x{556}" \
    "\\x{10A0}-\\x{10C5}\\x{13A0}-\\x{13F5}\\x{13F8}-\\x{13FD}\\x{1C90}-\\x{1CBA}\\x{1CBD}-\\x{1CBF}" \
    "\\x{1D00}-\\x{1D2B}\\x{1D6B}-\\x{1D77}\\x{1D79}-\\x{1D9A}\\x{1E00}-\\x{1F15}\\x{1F18}-\\x{1F1D}" \
    "\\x{1F20}-\\x{1F45}\\x{1F48}-\\x{1F4D}\\x{1F50}-\\x{1F57}\\x{1F59}\\x{1F5B}\\x{1F5D}\\x{1F5F}-\\x{1F7D}" \
    "\\x{1F80}-\\x{1FB4}\\x{1FB6}-\\x{1FBC}\\x{1FBE}\\x{1FC2}-\\x{1FC4}\\x{1FC6}-\\x{1FCC}\\x{1FD0}-\\x{1FD3}" \
    "\\x{1FD6}-\\x{1FDB}\\x{1FE0}-\\x{1FEC}\\x{1FF2}-\\x{1FF4}\\x{1FF6}-\\x{1FFC}\\x{2102}\\x{2107}" \
    "\\x{210A}-\\x{2113}\\x{2115}\\x{2119}-\\x{211D}\\x{2124}\\x{2126}\\x{2128}\\x{212A}-\\x{212D}" \
    "\\x{212F}-\\x{2134}\\x{2139}\\x{213C}-\\x{213F}\\x{2145}-\\x{2149}\\x{214E}\\x{2183}\\x{2184}" \
    "\\x{2C00}-\\x{2C7B}\\x{2C7E}-\\x{2CE4}\\x{2CEB}-\\x{2CEE}\\x{2CF2}\\x{2CF3}\\x{A640}-\\x{A66D}" \
    "\\x{A680}-\\x{A69B}\\x{A722}-\\x{A76F}\\x{A771}-\\x{A787}\\x{A78B}-\\x{A78E}\\x{AB70}-\\x{ABBF}" \
    "\\x{FB00}-\\x{FB06}\\x{FB13}-\\x{FB17}\\x{FF21}-\\x{FF3A}\\x{FF41}-\\x{FF5A}\\x{10400}-\\x{1044F}" \
    "\\x{104B0}-\\x{104D3}\\x{104D8}-\\x{104FB}\\x{10C80}-\\x{10CB2}\\x{10CC0}-\\x{10CF2}" \
    "\\x{118A0}-\\x{118DF}\\x{1E900}-\\x{1E943}"
#define CLS_DS_PUNCT \
    "\\x{21}-\\x{2F}\\x{3A}-\\x{7E}\\x{FF01}-\\x{FF0F}\\x{FF1A}-\\x{FF5E}\\x{2018}-\\x{201F}\\x{3001}-\\x{3002}"
#define CLS_DS_CJK \
    "\\x{4E00}-\\x{9FA5}\\x{800}-\\x{167F}\\x{1681}-\\x{1FFF}\\x{200B}-\\x{2027}\\x{202A}-\\x{202E}" \
    "\\x{2030}-\\x{205E}\\x{2060}-\\x{2FFF}\\x{3001}-\\x{4E00}\\x{AC00}-\\x{D7FF}"

#define MAX_RE 6

struct pretok_def {
    const char *names[12];        /* NULL-terminated aliases; [0] canonical */
    bool clean_spaces;
    bool ignore_merges;
    bool add_bos;
    const char *re[MAX_RE + 1];   /* NULL-terminated */
    bool spm_style, force_add_bos, newline_tokens;
};

/* Rows follow llama.cpp's llama_vocab::impl::load (names and flags) and
 * llm_tokenizer_bpe (regexes). Rows marked (golden) are checked against
 * shared/ref/tokenizer; the rest share a verified pattern. */
static const struct pretok_def defs[] = {
    /* "default" and a missing tokenizer.ggml.pre */
    { { "default", NULL }, true, false, false,
      { "[\\p{P}\\$\\+<=>\\^~\\|]+", RE_GPT2, "\\p{N}+", "[0-9][0-9][0-9]", NULL } },
    /* (golden: gpt-2) */
    { { "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
        "mellum", "modern-bert", "exaone4", NULL }, true, false, false, { RE_GPT2, NULL } },
    { { "olmo", NULL }, true, false, false, { RE_GPT2, NULL } },
    { { "mpt", NULL }, true, false, false, { RE_GPT2, NULL } },
    /* (golden: llama-bpe) */
    { { "llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", NULL },
      true, true, true, { RE_LLAMA3, NULL } },
    { { "dbrx", "smaug-bpe", NULL }, true, false, false, { RE_LLAMA3, NULL } },
    /* (golden: qwen2) */
    { { "qwen2", "deepseek-r1-qwen", "kormo", NULL }, false, false, false, { RE_QWEN2, NULL } },
    { { "stablelm2", "megrez", NULL }, true, false, false, { RE_QWEN2, NULL } },
    /* issue 22's families (tests/parity/test_tokenizer_pre.c against llama.cpp) */
    { { "qwen35", NULL }, false, false, false, { RE_QWEN35, NULL } },
    { { "glm4", "glm5", NULL }, true, true, false, { RE_LLAMA3, NULL } },
    { { "minimax-m2", "gpt-4o", "llama4", NULL }, false, false, false, { RE_GPT4O, NULL } },
    /* (golden: deepseek-llm) */
    { { "deepseek-llm", NULL }, false, false, false,
      { "[\\r\\n]", S_ "?[" CLS_DS_LETTERS "]+", S_ "?[" CLS_DS_PUNCT "]+", S_ "+$",
        "[" CLS_DS_CJK "]+", "\\p{N}+", NULL } },
    /* (golden: deepseek-coder) */
    { { "deepseek-coder", NULL }, false, false, false,
      { "[\\r\\n]", S_ "?\\p{L}+", S_ "?\\p{P}+", "[" CLS_DS_CJK "]+", "\\p{N}", NULL } },
    { { "deepseek-v3", NULL }, false, false, false,
      { "\\p{N}{1,3}", "[\\x{4E00}-\\x{9FA5}\\x{3040}-\\x{309F}\\x{30A0}-\\x{30FF}]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
        "|(?:~|[^\\r\\n\\p{L}\\p{P}\\p{S}])?[\\p{L}\\p{M}]+"
        "| ?(?:(?!~)[\\p{P}\\p{S}])+[\\r\\n]*|" S_ "*[\\r\\n]+|" S_ "+(?!" NS_ ")|" S_ "+", NULL } },
    { { "falcon", NULL }, true, false, false,
      { "[\\p{P}\\$\\+<=>\\^~\\|`]+", RE_GPT2, "[0-9][0-9][0-9]", NULL } },
    { { "starcoder", "refact", "codeshell", "exaone", "minerva-7b", NULL }, true, false, false,
      { "\\p{N}", RE_GPT2, NULL } },
    { { "command-r", "smollm", NULL }, false, false, false, { "\\p{N}", RE_GPT2, NULL } },
    /* SPM-style BPE (llama.cpp: byte_encode = false, escape_whitespaces):
     * llama.cpp's one pattern "[^\\n]+|[\\n]+" runs through its hand-written
     * unicode_regex_split_custom_newlines; model/tokenizer.c splits at
     * newline runs itself, so no regex here. (golden: every name of both
     * rows, tests/parity/test_tokenizer_gemma4.c) */
    { { "gemma4", "granite-embed-multi-311m", NULL }, true, false, false, { NULL }, true, true, true },
    { { "sarvam-moe", NULL }, false, false, false, { NULL }, true, false, false },
};

struct moe_pretok {
    const struct pretok_def *def;
    size_t n_re;
    pcre2_code *re[MAX_RE];
};

int moe_span_push(struct moe_span_vec *sv, uint32_t off, uint32_t len)
{
    /* no limit of its own: spans are pieces of a text of bounded length */
    if (moe_array_grow((void **)&sv->v, &sv->cap, sv->n + 1, sizeof(*sv->v), 0) != 0)
        return -ENOMEM;
    sv->v[sv->n].off = off;
    sv->v[sv->n].len = len;
    sv->n++;
    return 0;
}

static const struct pretok_def *find_def(const char *name, size_t len)
{
    for (size_t i = 0; i < sizeof(defs) / sizeof(defs[0]); i++) {
        for (const char *const *n = defs[i].names; *n != NULL; n++) {
            if (strlen(*n) == len && memcmp(*n, name, len) == 0)
                return &defs[i];
        }
    }
    return NULL;
}

int moe_pretok_create(struct moe_pretok **out, const char *name, size_t len,
                      struct moe_pretok_info *info, struct moe_diag *diag)
{
    *out = NULL;
    const struct pretok_def *def = find_def(name, len);
    if (def == NULL) {
        int shown = len > 64 ? 64 : (int)len;
        return moe_diag_set(diag, MOE_EUNSUPPORTED,
                            "tokenizer.ggml.pre: unknown pre-tokenizer '%.*s' (supported: see doc/tokenizer.md)",
                            shown, name);
    }
    struct moe_pretok *p = moe_calloc(1, sizeof(*p));
    if (p == NULL)
        return -ENOMEM;
    p->def = def;
    int rc = 0;
    for (size_t i = 0; i < MAX_RE && def->re[i] != NULL; i++) {
        int err;
        PCRE2_SIZE eoff;
        p->re[i] = pcre2_compile((PCRE2_SPTR)def->re[i], PCRE2_ZERO_TERMINATED,
                                 PCRE2_UTF | PCRE2_UCP | PCRE2_DOLLAR_ENDONLY | PCRE2_NO_UTF_CHECK,
                                 &err, &eoff, NULL);
        if (p->re[i] == NULL) {
            PCRE2_UCHAR msg[128];
            pcre2_get_error_message(err, msg, sizeof(msg));
            rc = moe_diag_set(diag, MOE_EUNSUPPORTED, "pre-tokenizer '%s': regex %zu: %s at offset %zu",
                              def->names[0], i, (const char *)msg, (size_t)eoff);
            goto fail;
        }
        /* JIT is an optimisation only: pcre2_match falls back to the
         * interpreter when it is unavailable. */
        (void)pcre2_jit_compile(p->re[i], PCRE2_JIT_COMPLETE);
        p->n_re = i + 1;
    }
    info->name = def->names[0];
    info->clean_spaces = def->clean_spaces;
    info->ignore_merges = def->ignore_merges;
    info->add_bos = def->add_bos;
    info->spm_style = def->spm_style;
    info->force_add_bos = def->force_add_bos;
    info->newline_tokens = def->newline_tokens;
    *out = p;
    return 0;
fail:
    moe_pretok_free(p);
    return rc;
}

void moe_pretok_free(struct moe_pretok *p)
{
    if (p == NULL)
        return;
    for (size_t i = 0; i < p->n_re; i++)
        pcre2_code_free(p->re[i]);
    moe_free(p);
}

static inline size_t utf8_next(const uint8_t *s, size_t len, size_t i)
{
    i++;
    while (i < len && (s[i] & 0xC0) == 0x80)
        i++;
    return i;
}

/* One regex over every span of `in`, matches and the gaps between them
 * appended to `out` (unicode_regex_split_stl). */
static int split_one(pcre2_code *re, pcre2_match_data *md, const uint8_t *text,
                     const struct moe_span_vec *in, struct moe_span_vec *out)
{
    out->n = 0;
    for (size_t k = 0; k < in->n; k++) {
        const uint8_t *subj = text + in->v[k].off;
        size_t len = in->v[k].len, start = 0, prev = 0;
        uint32_t base = in->v[k].off;
        while (start < len) {
            int rc = pcre2_match(re, subj, len, start, PCRE2_NO_UTF_CHECK, md, NULL);
            if (rc == PCRE2_ERROR_NOMATCH)
                break;
            if (rc < 0)
                return rc == PCRE2_ERROR_NOMEMORY ? -ENOMEM : MOE_ELIMIT;
            PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
            size_t ms = ov[0], me = ov[1];
            if (me == ms) {     /* no pattern here matches empty; be safe */
                start = utf8_next(subj, len, ms);
                continue;
            }
            if (ms > prev && moe_span_push(out, base + (uint32_t)prev, (uint32_t)(ms - prev)) != 0)
                return -ENOMEM;
            if (moe_span_push(out, base + (uint32_t)ms, (uint32_t)(me - ms)) != 0)
                return -ENOMEM;
            prev = start = me;
        }
        if (prev < len && moe_span_push(out, base + (uint32_t)prev, (uint32_t)(len - prev)) != 0)
            return -ENOMEM;
    }
    return 0;
}

int moe_pretok_split(const struct moe_pretok *p, const uint8_t *text, size_t len,
                     struct moe_span_vec *out, struct moe_span_vec *scratch)
{
    if (len == 0)
        return 0;
    pcre2_match_data *md = pcre2_match_data_create(4, NULL);
    if (md == NULL)
        return -ENOMEM;
    /* Ping-pong between the two vectors so that the last regex writes to out. */
    struct moe_span_vec *a = (p->n_re % 2 == 0) ? out : scratch;
    struct moe_span_vec *b = (a == out) ? scratch : out;
    int rc = 0;
    a->n = 0;
    if ((rc = moe_span_push(a, 0, (uint32_t)len)) != 0)
        goto done;
    for (size_t i = 0; i < p->n_re; i++) {
        if ((rc = split_one(p->re[i], md, text, a, b)) != 0)
            goto done;
        struct moe_span_vec *t = a;
        a = b;
        b = t;
    }
    MOE_ASSERT(a == out);
done:
    pcre2_match_data_free(md);
    return rc;
}
