/* Tokenizers driven by GGUF metadata, giving the ids llama.cpp gives.
 *
 * Supported: `tokenizer.ggml.model` = "llama" (SentencePiece BPE with scores,
 * byte fallback <0xNN>, U+2581 for spaces, add_space_prefix), "gpt2"
 * (byte-level BPE with merges), the latter with the pre-tokenizers listed in
 * doc/tokenizer.md (`tokenizer.ggml.pre`), whose split patterns run on PCRE2,
 * and "gemma4" (BPE merges on code points with U+2581 for spaces, <0xNN>
 * byte fallback, split at newline runs only).
 * Anything else is refused at load with a message naming it.
 *
 * Semantics follow llama.cpp's llama_tokenize / llama_detokenize /
 * llama_token_to_piece (src/llama-vocab.cpp), including its defaults when
 * metadata is absent and its promotion of some tokens to CONTROL by text.
 *
 * Ownership: moe_tokenizer_load copies what it needs; the GGUF may be closed
 * afterwards. Strings returned by getters are owned by the tokenizer and
 * live until moe_tokenizer_free.
 * Threading: after load the tokenizer is read-only; every function below may
 * be called from any number of threads at once (each call uses its own
 * scratch memory).
 */
#ifndef MOE_MODEL_TOKENIZER_H
#define MOE_MODEL_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

#ifdef __cplusplus
extern "C" {
#endif

struct moe_gguf;
struct moe_tokenizer;

enum moe_vocab_type {
    MOE_VOCAB_SPM = 1,   /* tokenizer.ggml.model = llama */
    MOE_VOCAB_BPE = 2,   /* tokenizer.ggml.model = gpt2 or gemma4 */
};

/* llama_token_attr bits (llama.h). */
enum moe_token_attr {
    MOE_TOKEN_ATTR_UNDEFINED    = 0,
    MOE_TOKEN_ATTR_UNKNOWN      = 1 << 0,
    MOE_TOKEN_ATTR_UNUSED       = 1 << 1,
    MOE_TOKEN_ATTR_NORMAL       = 1 << 2,
    MOE_TOKEN_ATTR_CONTROL      = 1 << 3,
    MOE_TOKEN_ATTR_USER_DEFINED = 1 << 4,
    MOE_TOKEN_ATTR_BYTE         = 1 << 5,
    MOE_TOKEN_ATTR_LSTRIP       = 1 << 7,
    MOE_TOKEN_ATTR_RSTRIP       = 1 << 8,
};

#define MOE_TOKEN_NULL (-1)

/* Caps on what a GGUF may declare (far above every real vocabulary). */
#define MOE_TOKENIZER_MAX_TOKENS  (4u << 20)
#define MOE_TOKENIZER_MAX_MERGES  (8u << 20)
/* Largest text moe_tokenize accepts in one call (llama.cpp: INT32_MAX). */
#define MOE_TOKENIZER_MAX_TEXT    ((size_t)1 << 30)

/* Builds a tokenizer from g's tokenizer.* metadata (a vocab-only GGUF is
 * enough). Errors: MOE_EUNSUPPORTED for an unknown tokenizer model or
 * pre-tokenizer (named in diag), MOE_EFORMAT for missing or malformed
 * arrays, duplicate tokens, ids out of range; -ENOMEM. On failure *out is
 * NULL. */
int moe_tokenizer_load(struct moe_tokenizer **out, const struct moe_gguf *g, struct moe_diag *diag);
void moe_tokenizer_free(struct moe_tokenizer *tok);

/* Tokenizes text[0..len) (any bytes, NUL included). add_special: add BOS/EOS
 * as the vocabulary says (llama.cpp add_special); parse_special: turn the
 * text of CONTROL/UNKNOWN tokens into their ids (USER_DEFINED tokens are
 * always matched, as in llama.cpp). Writes up to max ids and sets *n to the
 * number of ids of the full result.
 * Returns 0; -ENOSPC when *n > max (nothing useful in ids, call again with
 * a larger buffer); MOE_EFORMAT when a BPE text decodes to a code point above
 * U+10FFFF (llama.cpp aborts there); MOE_ELIMIT when len >
 * MOE_TOKENIZER_MAX_TEXT; -ENOMEM. */
int moe_tokenize(const struct moe_tokenizer *tok, const char *text, size_t len,
                 bool add_special, bool parse_special,
                 int32_t *ids, size_t max, size_t *n);

/* The bytes token id stands for (llama_token_to_piece): CONTROL/UNKNOWN
 * tokens give "" unless special; lstrip drops up to that many leading
 * spaces. Writes up to cap bytes (no NUL) and sets *len to the piece length.
 * Returns 0, -ENOSPC when *len > cap, -EINVAL for an id out of range. */
int moe_token_to_piece(const struct moe_tokenizer *tok, int32_t id, char *buf, size_t cap,
                       int lstrip, bool special, size_t *len);

/* llama_detokenize: remove_special drops a leading BOS / trailing EOS the
 * vocabulary adds; unparse_special renders CONTROL tokens as their text.
 * Applies the vocabulary's clean-up of spaces (llama.cpp clean_spaces).
 * Writes up to cap bytes, NUL-terminates when there is room, sets *len.
 * Returns 0, -ENOSPC when *len > cap, -EINVAL for an id out of range. */
int moe_detokenize(const struct moe_tokenizer *tok, const int32_t *ids, size_t n_ids,
                   char *buf, size_t cap, bool remove_special, bool unparse_special,
                   size_t *len);

/* Getters. */
enum moe_vocab_type moe_tokenizer_type(const struct moe_tokenizer *tok);
const char *moe_tokenizer_pre(const struct moe_tokenizer *tok);   /* "default" for SPM */
uint32_t moe_tokenizer_n_tokens(const struct moe_tokenizer *tok);
int32_t moe_tokenizer_bos(const struct moe_tokenizer *tok);       /* MOE_TOKEN_NULL if none */
int32_t moe_tokenizer_eos(const struct moe_tokenizer *tok);
int32_t moe_tokenizer_eot(const struct moe_tokenizer *tok);
bool moe_tokenizer_add_bos(const struct moe_tokenizer *tok);
bool moe_tokenizer_add_eos(const struct moe_tokenizer *tok);
bool moe_tokenizer_is_eog(const struct moe_tokenizer *tok, int32_t id);
/* Token text as stored (NUL-terminated copy; may contain NUL: use *len). NULL
 * when id is out of range. */
const char *moe_tokenizer_token_text(const struct moe_tokenizer *tok, int32_t id, size_t *len);
uint32_t moe_tokenizer_token_attr(const struct moe_tokenizer *tok, int32_t id);
/* Longest piece any token renders to, with special = true. */
size_t moe_tokenizer_max_piece(const struct moe_tokenizer *tok);
/* tokenizer.chat_template, or NULL when the file has none. */
const char *moe_tokenizer_chat_template(const struct moe_tokenizer *tok);

/* Streaming detokenizer: feed ids one at a time, get text that never ends in
 * the middle of a UTF-8 character (an incomplete tail is held back until the
 * next piece completes it, or until flush). Pieces are llama_token_to_piece
 * with the given special flag, as llama.cpp's servers stream them (no
 * clean-up of spaces, which needs the whole text). No allocation.
 * Not thread-safe: one per sequence. */
struct moe_detok_stream {
    const struct moe_tokenizer *tok;
    bool special;
    uint8_t pending[4];
    size_t n_pending;
};

void moe_detok_stream_init(struct moe_detok_stream *s, const struct moe_tokenizer *tok, bool special);
/* Appends id's piece; writes the printable part to buf and sets *len.
 * cap >= moe_tokenizer_max_piece(tok) + 4 always suffices. Returns 0,
 * -ENOSPC (state unchanged, *len = bytes needed), -EINVAL bad id. */
int moe_detok_stream_push(struct moe_detok_stream *s, int32_t id, char *buf, size_t cap, size_t *len);
/* Writes whatever is held back (an incomplete character, as is). */
int moe_detok_stream_flush(struct moe_detok_stream *s, char *buf, size_t cap, size_t *len);

#ifdef __cplusplus
}
#endif

#endif
