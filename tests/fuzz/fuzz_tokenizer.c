/* Fuzz entry for model/tokenizer (and chat-template detection).
 *
 * Input: byte 0 picks the vocabulary (bits 0-1 and 6) and the flags
 * add_special (bit 2), parse_special (bit 3), remove_special (bit 4),
 * unparse_special (bit 5); the rest is the text. Vocabularies: a small
 * byte-level BPE (pre qwen2) and a small SPM written once to a temporary
 * directory, the real qwen2 and llama-spm vocabularies when MOE_REF_DIR
 * names shared/ref, then a small gemma4 (SPM-style BPE) one.
 *
 * Checked: tokenize succeeds (or refuses a code point above U+10FFFF),
 * returns the same ids twice, ids are in range; detokenize succeeds; the
 * streaming detokenizer gives out only whole UTF-8 characters and, with its
 * flush, exactly the concatenated pieces. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/gguf.h"
#include "io/gguf_writer.h"
#include "model/chat_template.h"
#include "model/tokenizer.h"
#include "model/unicode.h"

#define N_TOK 8
static struct moe_tokenizer *toks[N_TOK];
static int n_toks;

/* kind 0: gpt2 (byte-level BPE), 1: llama (SPM), 2: gemma4 */
static int write_small(const char *path, int kind)
{
    const bool bpe = kind == 0, g4 = kind == 2;
    struct moe_gguf_writer *w;
    if (moe_gguf_writer_create(&w, path, NULL) != 0)
        return -1;
    const char *t[300];
    char store[300][16];
    int32_t types[300];
    float scores[300];
    size_t n = 0;
    if (!bpe) {
        t[n] = "<unk>"; types[n] = 2; scores[n] = 0; n++;
        t[n] = "<s>"; types[n] = 3; scores[n] = 0; n++;
        t[n] = "</s>"; types[n] = 3; scores[n] = 0; n++;
    }
    for (int b = 0; b < 256; b++) {
        if (bpe) {
            uint8_t u[4];
            size_t un = moe_utf8_encode(moe_unicode_byte_to_cpt((uint8_t)b), u);
            memcpy(store[n], u, un);
            store[n][un] = '\0';
        } else {
            snprintf(store[n], sizeof(store[n]), "<0x%02X>", b);
        }
        t[n] = store[n];
        types[n] = bpe ? 1 : 6;
        scores[n] = 0;
        n++;
    }
    static const char *const words[] = { "he", "ll", "hell", "hello", "\xc4\xa0w", "\xe2\x96\x81he",
                                         "\xe2\x96\x81", "lo", "\xe2\x96\x81\xe2\x96\x81" };
    for (size_t i = 0; i < sizeof(words) / sizeof(words[0]); i++) {
        t[n] = words[i];
        types[n] = 1;
        scores[n] = -(float)i;
        n++;
    }
    t[n] = "<|im_start|>"; types[n] = 3; scores[n] = 0; n++;
    t[n] = "<|u|>"; types[n] = 4; scores[n] = 0; n++;
    int rc = moe_gguf_writer_add_str(w, "tokenizer.ggml.model", bpe ? "gpt2" : g4 ? "gemma4" : "llama");
    if (rc == 0 && bpe)
        rc = moe_gguf_writer_add_str(w, "tokenizer.ggml.pre", "qwen2");
    if (rc == 0)
        rc = moe_gguf_writer_add_str_arr(w, "tokenizer.ggml.tokens", n, t, NULL);
    if (rc == 0)
        rc = moe_gguf_writer_add_arr(w, "tokenizer.ggml.token_type", MOE_GGUF_INT32, n, types);
    if (rc == 0 && !bpe)
        rc = moe_gguf_writer_add_arr(w, "tokenizer.ggml.scores", MOE_GGUF_FLOAT32, n, scores);
    if (rc == 0 && bpe) {
        static const char *const merges[] = { "h e", "l l", "he ll", "hell o", "\xc4\xa0 w", "l o" };
        rc = moe_gguf_writer_add_str_arr(w, "tokenizer.ggml.merges", 6, merges, NULL);
    }
    if (rc == 0 && g4) {
        static const char *const merges[] = { "h e", "l l", "he ll", "hell o", "\xe2\x96\x81 he", "l o",
                                              "\xe2\x96\x81 \xe2\x96\x81" };
        rc = moe_gguf_writer_add_str_arr(w, "tokenizer.ggml.merges", 7, merges, NULL);
        if (rc == 0)
            rc = moe_gguf_writer_add_u32(w, "tokenizer.ggml.bos_token_id", 1);
    }
    if (rc != 0) {
        moe_gguf_writer_abort(w);
        return -1;
    }
    return moe_gguf_writer_finish(w, NULL);
}

static void add(const char *path)
{
    struct moe_gguf *g = NULL;
    struct moe_tokenizer *t = NULL;
    if (moe_gguf_open(&g, path, NULL) == 0 && moe_tokenizer_load(&t, g, NULL) == 0)
        toks[n_toks++] = t;
    moe_gguf_close(g);
}

static void init(void)
{
    char dir[] = "/tmp/fuzz_tokenizer.XXXXXX";
    if (mkdtemp(dir) != NULL) {
        char p[sizeof(dir) + 16];
        snprintf(p, sizeof(p), "%s/bpe.gguf", dir);
        if (write_small(p, 0) == 0)
            add(p);
        unlink(p);
        snprintf(p, sizeof(p), "%s/spm.gguf", dir);
        if (write_small(p, 1) == 0)
            add(p);
        unlink(p);
    }
    const char *ref = getenv("MOE_REF_DIR");
    if (ref != NULL) {
        char p[4096];
        snprintf(p, sizeof(p), "%s/vocab/ggml-vocab-qwen2.gguf", ref);
        if (access(p, R_OK) == 0)
            add(p);
        snprintf(p, sizeof(p), "%s/vocab/ggml-vocab-llama-spm.gguf", ref);
        if (access(p, R_OK) == 0)
            add(p);
    }
    {
        char p[sizeof(dir) + 16];
        snprintf(p, sizeof(p), "%s/g4.gguf", dir);
        if (write_small(p, 2) == 0)
            add(p);
        unlink(p);
        rmdir(dir);
    }
    if (n_toks < 3)
        abort();    /* the synthetic vocabularies must always load */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (n_toks == 0)
        init();
    if (size == 0)
        return 0;
    uint8_t sel = data[0];
    const struct moe_tokenizer *t = toks[((sel & 3) | ((sel & 64) >> 4)) % n_toks];
    bool add_special = sel & 4, parse_special = sel & 8, remove_special = sel & 16, unparse = sel & 32;
    const char *text = (const char *)data + 1;
    size_t len = size - 1;

    enum moe_chat_template tm;
    (void)moe_chat_template_detect(text, len, &tm, NULL);

    size_t cap = 3 * len + 8, n = 0, n2 = 0;
    int32_t *ids = malloc(cap * sizeof(int32_t)), *ids2 = malloc(cap * sizeof(int32_t));
    if (ids == NULL || ids2 == NULL)
        abort();
    int rc = moe_tokenize(t, text, len, add_special, parse_special, ids, cap, &n);
    if (rc == MOE_EFORMAT && moe_tokenizer_type(t) == MOE_VOCAB_BPE)
        goto out;
    if (rc != 0)
        abort();
    if (moe_tokenize(t, text, len, add_special, parse_special, ids2, cap, &n2) != 0 || n2 != n ||
        memcmp(ids, ids2, n * sizeof(int32_t)) != 0)
        abort();
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || (uint32_t)ids[i] >= moe_tokenizer_n_tokens(t))
            abort();

    size_t dcap = (n + 1) * (moe_tokenizer_max_piece(t) + 1), dlen;
    char *dbuf = malloc(dcap);
    if (dbuf == NULL || moe_detokenize(t, ids, n, dbuf, dcap, remove_special, unparse, &dlen) != 0)
        abort();

    /* stream vs pieces */
    struct moe_detok_stream st;
    moe_detok_stream_init(&st, t, unparse);
    size_t pcap = moe_tokenizer_max_piece(t) + 8, plen, total = 0, ptotal = 0;
    char *piece = malloc(pcap), *chunk = malloc(pcap);
    if (piece == NULL || chunk == NULL)
        abort();
    for (size_t i = 0; i < n; i++) {
        if (moe_detok_stream_push(&st, ids[i], chunk, pcap, &plen) != 0)
            abort();
        /* ends on a lead byte: a split character, unless the byte held
         * back after it (a new lead) shows it can never be completed */
        if (plen > 0 && moe_utf8_len((uint8_t)chunk[plen - 1]) > 1 && (chunk[plen - 1] & 0xC0) != 0x80 &&
            (uint8_t)chunk[plen - 1] >= 0xC2 && (uint8_t)chunk[plen - 1] <= 0xF4 && st.n_pending == 0)
            abort();
        memcpy(dbuf, chunk, plen);  /* dbuf is scratch now */
        total += plen;
        size_t l;
        if (moe_token_to_piece(t, ids[i], piece, pcap, 0, unparse, &l) != 0)
            abort();
        ptotal += l;
    }
    if (moe_detok_stream_flush(&st, chunk, pcap, &plen) != 0 || total + plen != ptotal)
        abort();
    free(piece);
    free(chunk);
    free(dbuf);
out:
    free(ids);
    free(ids2);
    return 0;
}
