/* Private to model/tokenizer*.c: the BPE pre-tokenizers (regex splitting).
 *
 * A pre-tokenizer is llama.cpp's list of regexes for one
 * `tokenizer.ggml.pre` value, applied one after the other: each regex cuts
 * every piece left by the previous one into its matches and the text
 * between them (unicode_regex_split in llama.cpp's src/unicode.cpp).
 * Patterns run on PCRE2 in UTF + UCP mode; where llama.cpp's std::regex
 * route sees different character classes (non-ASCII whitespace replaced by
 * U+000B, `~` in no category), the patterns here are adapted so that the
 * splits come out the same; see tokenizer_pre.c.
 */
#ifndef MOE_MODEL_TOKENIZER_IMPL_H
#define MOE_MODEL_TOKENIZER_IMPL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

struct moe_pretok;

/* Vocabulary flags llama.cpp ties to the pre-tokenizer name. */
struct moe_pretok_info {
    const char *name;       /* canonical name (static) */
    bool clean_spaces;
    bool ignore_merges;
    bool add_bos;           /* default before metadata overrides */
    /* SPM-style BPE (gemma4, sarvam-moe): merges run on raw UTF-8 code
     * points of the text with spaces as U+2581, split only at runs of
     * newlines, `<0xXX>` tokens for bytes no symbol covers; no regex. */
    bool spm_style;
    bool force_add_bos;     /* gemma4: add_bos true whatever the metadata says */
    bool newline_tokens;    /* gemma4: a run of newlines that is a token is kept whole */
};

/* One piece of text: bytes [off, off + len). */
struct moe_span {
    uint32_t off;
    uint32_t len;
};

struct moe_span_vec {
    struct moe_span *v;
    size_t n, cap;
};

int moe_span_push(struct moe_span_vec *sv, uint32_t off, uint32_t len);

/* Compiles the regexes for `name` (none for spm_style rows) (len bytes, may lack a NUL). Unknown name:
 * MOE_EUNSUPPORTED with the name in diag. */
int moe_pretok_create(struct moe_pretok **out, const char *name, size_t len,
                      struct moe_pretok_info *info, struct moe_diag *diag);
void moe_pretok_free(struct moe_pretok *p);

/* Splits text[0..len) (valid UTF-8) into words, appended to *out (a and b
 * are scratch the caller keeps between calls). Returns 0, -ENOMEM, or
 * MOE_ELIMIT when PCRE2 gives up (match limit on pathological input). */
int moe_pretok_split(const struct moe_pretok *p, const uint8_t *text, size_t len,
                     struct moe_span_vec *out, struct moe_span_vec *scratch);

#endif
