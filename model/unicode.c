#include "model/unicode.h"

static inline bool is_cont(uint8_t b)
{
    return (b & 0xC0) == 0x80;
}

uint32_t moe_utf8_decode(const uint8_t *s, size_t len, size_t *off)
{
    size_t i = *off;
    uint8_t b0 = s[i];
    if (!(b0 & 0x80)) {
        *off = i + 1;
        return b0;
    }
    /* Same tests, in the same order, as llama.cpp's unicode_cpt_from_utf8:
     * only the continuation bytes are checked, not the value. */
    if (!(b0 & 0x40))
        goto bad;
    if (!(b0 & 0x20)) {
        if (i + 1 >= len || !is_cont(s[i + 1]))
            goto bad;
        *off = i + 2;
        return ((uint32_t)(b0 & 0x1F) << 6) | (s[i + 1] & 0x3F);
    }
    if (!(b0 & 0x10)) {
        if (i + 2 >= len || !is_cont(s[i + 1]) || !is_cont(s[i + 2]))
            goto bad;
        *off = i + 3;
        return ((uint32_t)(b0 & 0x0F) << 12) | ((uint32_t)(s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F);
    }
    if (!(b0 & 0x08)) {
        if (i + 3 >= len || !is_cont(s[i + 1]) || !is_cont(s[i + 2]) || !is_cont(s[i + 3]))
            goto bad;
        *off = i + 4;
        return ((uint32_t)(b0 & 0x07) << 18) | ((uint32_t)(s[i + 1] & 0x3F) << 12) |
               ((uint32_t)(s[i + 2] & 0x3F) << 6) | (s[i + 3] & 0x3F);
    }
bad:
    *off = i + 1;
    return MOE_UNICODE_REPLACEMENT;
}

size_t moe_utf8_encode(uint32_t cpt, uint8_t out[4])
{
    if (cpt <= 0x7F) {
        out[0] = (uint8_t)cpt;
        return 1;
    }
    if (cpt <= 0x7FF) {
        out[0] = (uint8_t)(0xC0 | (cpt >> 6));
        out[1] = (uint8_t)(0x80 | (cpt & 0x3F));
        return 2;
    }
    if (cpt <= 0xFFFF) {
        out[0] = (uint8_t)(0xE0 | (cpt >> 12));
        out[1] = (uint8_t)(0x80 | ((cpt >> 6) & 0x3F));
        out[2] = (uint8_t)(0x80 | (cpt & 0x3F));
        return 3;
    }
    if (cpt <= 0x10FFFF) {
        out[0] = (uint8_t)(0xF0 | (cpt >> 18));
        out[1] = (uint8_t)(0x80 | ((cpt >> 12) & 0x3F));
        out[2] = (uint8_t)(0x80 | ((cpt >> 6) & 0x3F));
        out[3] = (uint8_t)(0x80 | (cpt & 0x3F));
        return 4;
    }
    return 0;
}

bool moe_utf8_valid(const uint8_t *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        uint8_t b = s[i];
        if (b < 0x80) {
            i++;
            continue;
        }
        size_t n;
        uint32_t min, c;
        if (b >= 0xC2 && b <= 0xDF) {
            n = 2; min = 0x80; c = b & 0x1F;
        } else if (b >= 0xE0 && b <= 0xEF) {
            n = 3; min = 0x800; c = b & 0x0F;
        } else if (b >= 0xF0 && b <= 0xF4) {
            n = 4; min = 0x10000; c = b & 0x07;
        } else {
            return false;
        }
        if (len - i < n)
            return false;
        for (size_t k = 1; k < n; k++) {
            if (!is_cont(s[i + k]))
                return false;
            c = (c << 6) | (s[i + k] & 0x3F);
        }
        if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF))
            return false;
        i += n;
    }
    return true;
}

bool moe_unicode_is_whitespace(uint32_t c)
{
    /* Unicode 15 White_Space (PropList.txt); llama.cpp's unicode-data.cpp
     * was generated from Python's `regex` \s, which is this set. */
    if (c <= 0x7F)
        return (c >= 0x09 && c <= 0x0D) || c == 0x20;
    return c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
           c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

/* GPT-2 bytes_to_unicode (openai/gpt-2 encoder.py): printable Latin-1 bytes
 * map to themselves, the other 68 to U+0100.. in byte order. */
static inline bool byte_is_printable(unsigned b)
{
    return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
}

uint32_t moe_unicode_byte_to_cpt(uint8_t b)
{
    if (byte_is_printable(b))
        return b;
    unsigned n = 0;
    for (unsigned x = 0; x < b; x++)
        n += !byte_is_printable(x);
    return 256 + n;
}

int moe_unicode_cpt_to_byte(uint32_t cpt)
{
    if (cpt < 256)
        return byte_is_printable(cpt) ? (int)cpt : -1;
    if (cpt >= 256 + 68)
        return -1;
    unsigned n = cpt - 256;
    for (unsigned x = 0; x < 256; x++) {
        if (!byte_is_printable(x)) {
            if (n == 0)
                return (int)x;
            n--;
        }
    }
    return -1;
}
