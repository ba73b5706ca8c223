/* UTF-8 helpers for the tokenizers, with llama.cpp's exact leniency.
 *
 * llama.cpp (src/unicode.cpp) decodes UTF-8 without rejecting overlong
 * forms or surrogates, turns every byte it cannot decode into U+FFFD and
 * goes on at the next byte; the tokenizers here must do the same to give the
 * same ids on malformed input. The byte-level BPE mapping (GPT-2's
 * bytes_to_unicode) lives here too.
 *
 * All functions are pure and thread-safe; nothing allocates.
 */
#ifndef MOE_MODEL_UNICODE_H
#define MOE_MODEL_UNICODE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_UNICODE_REPLACEMENT 0xFFFDu

/* Length of the UTF-8 sequence a lead byte announces (1 for continuation
 * and invalid bytes), as llama.cpp's unicode_len_utf8. */
static inline size_t moe_utf8_len(uint8_t lead)
{
    static const uint8_t lookup[16] = { 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4 };
    return lookup[lead >> 4];
}

/* Decodes one code point at s[*off] (off < len) the way llama.cpp's
 * unicode_cpt_from_utf8 + unicode_cpts_from_utf8 do: a byte that does not
 * start a complete sequence yields U+FFFD and advances one byte. The result
 * may be a surrogate or above 0x10FFFF (4-byte forms are not range-checked). */
uint32_t moe_utf8_decode(const uint8_t *s, size_t len, size_t *off);

/* Encodes cpt (<= 0x10FFFF, surrogates allowed) into out[4]; returns the
 * byte count, 0 when cpt is out of range. */
size_t moe_utf8_encode(uint32_t cpt, uint8_t out[4]);

/* True when s[0..len) is strictly valid UTF-8 (no overlongs, surrogates or
 * values above 0x10FFFF), i.e. what PCRE2 accepts in UTF mode. */
bool moe_utf8_valid(const uint8_t *s, size_t len);

/* Unicode White_Space, the set llama.cpp's tokenizers call whitespace. */
bool moe_unicode_is_whitespace(uint32_t cpt);

/* GPT-2 bytes_to_unicode: the code point byte b is written as in a
 * byte-level BPE vocabulary, and the reverse (-1 when cpt is not one). */
uint32_t moe_unicode_byte_to_cpt(uint8_t b);
int moe_unicode_cpt_to_byte(uint32_t cpt);

#ifdef __cplusplus
}
#endif

#endif
