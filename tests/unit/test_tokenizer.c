/* model/tokenizer, model/chat_template and moectl tokenize/detokenize:
 * load errors named, round trips, malformed and large input, streaming
 * detokenization, allocation failures, chat rendering. The exact-id parity
 * with llama.cpp is tests/parity/test_tokenizer_ref.c. Cases that need the
 * real vocabularies skip without shared/ref. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/alloc.h"
#include "io/gguf.h"
#include "io/gguf_writer.h"
#include "model/chat_template.h"
#include "model/tokenizer.h"
#include "model/unicode.h"
#include "tests/harness.h"

int moectl_tokenize_main(int argc, char **argv);
int moectl_detokenize_main(int argc, char **argv);

/* ---- helpers ---------------------------------------------------------------- */

static struct moe_tokenizer *load_path(const char *path, struct moe_diag *diag)
{
    struct moe_gguf *g = NULL;
    struct moe_tokenizer *t = NULL;
    int rc = moe_gguf_open(&g, path, diag);
    if (rc == 0)
        rc = moe_tokenizer_load(&t, g, diag);
    moe_gguf_close(g);
    return rc == 0 ? t : NULL;
}

static struct moe_tokenizer *load_ref(const char *vocab)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        return NULL;
    char path[1024];
    snprintf(path, sizeof(path), "%s/vocab/ggml-vocab-%s.gguf", ref, vocab);
    struct moe_diag diag = { 0 };
    struct moe_tokenizer *t = load_path(path, &diag);
    if (t == NULL)
        fprintf(stderr, "  load %s: %s\n", path, diag.msg);
    return t;
}

/* A small vocabulary file: `model` and `pre` as given, 256 byte tokens
 * (byte-level chars for gpt2, <0xNN> for llama and gemma4) and a few
 * merges/words; gemma4 files get BOS 1 / EOS 2 when with_bos. */
static int write_vocab_bos(const char *path, const char *model, const char *pre, bool with_merges, bool with_bos)
{
    struct moe_diag diag = { 0 };
    struct moe_gguf_writer *w;
    int rc = moe_gguf_writer_create(&w, path, &diag);
    if (rc != 0)
        return rc;
    const char *toks[300];
    char store[300][16];
    int32_t types[300];
    float scores[300];
    size_t n = 0;
    bool bpe = strcmp(model, "gpt2") == 0, g4 = strcmp(model, "gemma4") == 0;
    if (!bpe) {
        toks[n] = "<unk>"; types[n] = 2; scores[n] = 0; n++;
        toks[n] = "<s>"; types[n] = 3; scores[n] = 0; n++;
        toks[n] = "</s>"; types[n] = 3; scores[n] = 0; n++;
    }
    for (int b = 0; b < 256; b++) {
        if (bpe) {
            uint8_t u[4];
            size_t un = moe_utf8_encode(moe_unicode_byte_to_cpt((uint8_t)b), u);
            memcpy(store[n], u, un);
            store[n][un] = '\0';
            types[n] = 1;
        } else {
            snprintf(store[n], sizeof(store[n]), "<0x%02X>", b);
            types[n] = 6;
        }
        toks[n] = store[n];
        scores[n] = 0;
        n++;
    }
    const char *words[] = { "he", "ll", "hell", "hello", "\xc4\xa0w", "\xe2\x96\x81he", "\xe2\x96\x81", "lo" };
    for (size_t i = 0; i < sizeof(words) / sizeof(words[0]); i++) {
        toks[n] = words[i];
        types[n] = 1;
        scores[n] = -(float)i;
        n++;
    }
    toks[n] = "<|im_start|>"; types[n] = 3; scores[n] = 0; n++;
    toks[n] = "<|user|>"; types[n] = 4; scores[n] = 0; n++;
    rc = moe_gguf_writer_add_str(w, "general.architecture", "llama");
    if (rc == 0) rc = moe_gguf_writer_add_str(w, "tokenizer.ggml.model", model);
    if (rc == 0 && pre) rc = moe_gguf_writer_add_str(w, "tokenizer.ggml.pre", pre);
    if (rc == 0) rc = moe_gguf_writer_add_str_arr(w, "tokenizer.ggml.tokens", n, toks, NULL);
    if (rc == 0) rc = moe_gguf_writer_add_arr(w, "tokenizer.ggml.token_type", MOE_GGUF_INT32, n, types);
    if (rc == 0 && !bpe) rc = moe_gguf_writer_add_arr(w, "tokenizer.ggml.scores", MOE_GGUF_FLOAT32, n, scores);
    if (rc == 0 && bpe && with_merges) {
        const char *merges[] = { "h e", "l l", "he ll", "hell o", "\xc4\xa0 w", "l o" };
        rc = moe_gguf_writer_add_str_arr(w, "tokenizer.ggml.merges", 6, merges, NULL);
    }
    if (rc == 0 && g4 && with_merges) {
        const char *merges[] = { "h e", "l l", "he ll", "hell o", "\xe2\x96\x81 he", "l o" };
        rc = moe_gguf_writer_add_str_arr(w, "tokenizer.ggml.merges", 6, merges, NULL);
    }
    if (rc == 0 && g4 && with_bos) {
        uint32_t bos = 1, eos = 2;
        rc = moe_gguf_writer_add_u32(w, "tokenizer.ggml.bos_token_id", bos);
        if (rc == 0)
            rc = moe_gguf_writer_add_u32(w, "tokenizer.ggml.eos_token_id", eos);
    }
    if (rc != 0) {
        moe_gguf_writer_abort(w);
        return rc;
    }
    return moe_gguf_writer_finish(w, &diag);
}

static int write_vocab(const char *path, const char *model, const char *pre, bool with_merges)
{
    return write_vocab_bos(path, model, pre, with_merges, true);
}

static size_t tokenize_all(const struct moe_tokenizer *t, const char *s, size_t len, bool add, bool parse,
                           int32_t **ids, int *rc)
{
    size_t cap = 3 * len + 8, n = 0;   /* a bad byte can become 3 byte tokens */
    *ids = malloc(cap * sizeof(int32_t));
    *rc = moe_tokenize(t, s, len, add, parse, *ids, cap, &n);
    return n;
}

/* ---- load ------------------------------------------------------------------- */

static void test_load_errors_named(void)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/v.gguf", moe_test_tmpdir());
    struct moe_diag diag = { 0 };

    CHECK_INT(write_vocab(path, "t5x", NULL, false), ==, 0);
    CHECK(load_path(path, &diag) == NULL);
    CHECK_INT(diag.code, ==, MOE_EUNSUPPORTED);
    CHECK_MSG(strstr(diag.msg, "'t5x'") && strstr(diag.msg, "tokenizer.ggml.model"), "%s", diag.msg);

    memset(&diag, 0, sizeof(diag));
    CHECK_INT(write_vocab(path, "gpt2", "no-such-pre", true), ==, 0);
    CHECK(load_path(path, &diag) == NULL);
    CHECK_INT(diag.code, ==, MOE_EUNSUPPORTED);
    CHECK_MSG(strstr(diag.msg, "'no-such-pre'") && strstr(diag.msg, "tokenizer.ggml.pre"), "%s", diag.msg);

    memset(&diag, 0, sizeof(diag));
    CHECK_INT(write_vocab(path, "gpt2", "qwen2", false), ==, 0);
    CHECK(load_path(path, &diag) == NULL);
    CHECK_MSG(strstr(diag.msg, "tokenizer.ggml.merges"), "%s", diag.msg);

    /* gemma4: merges required; BOS required (always added) */
    memset(&diag, 0, sizeof(diag));
    CHECK_INT(write_vocab(path, "gemma4", NULL, false), ==, 0);
    CHECK(load_path(path, &diag) == NULL);
    CHECK_INT(diag.code, ==, MOE_EFORMAT);
    CHECK_MSG(strstr(diag.msg, "tokenizer.ggml.merges"), "%s", diag.msg);
    memset(&diag, 0, sizeof(diag));
    CHECK_INT(write_vocab_bos(path, "gemma4", NULL, true, false), ==, 0);
    CHECK(load_path(path, &diag) == NULL);
    CHECK_INT(diag.code, ==, MOE_EFORMAT);
    CHECK_MSG(strstr(diag.msg, "tokenizer.ggml.bos_token_id") && strstr(diag.msg, "gemma4"), "%s", diag.msg);
}

/* The small gemma4 file: spaces as U+2581 merged on code points, byte
 * fallback, BOS forced on, and its pieces back to spaces. */
static void test_small_gemma4(void)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/g4.gguf", moe_test_tmpdir());
    CHECK_INT(write_vocab(path, "gemma4", "qwen2", true), ==, 0);
    struct moe_diag diag = { 0 };
    struct moe_tokenizer *t = load_path(path, &diag);
    CHECK_MSG(t != NULL, "%s", diag.msg);
    CHECK_STR(moe_tokenizer_pre(t), "gemma4");   /* tokenizer.ggml.pre is ignored */
    CHECK(moe_tokenizer_add_bos(t));
    /* "\u2581hello!": h e, l l, he ll, hell o merge in rank order; the
     * pair (\u2581, he) was queued but "he" became "hello" first, and '!'
     * has no token: <0x21> */
    int32_t ids[64];
    size_t n, len;
    CHECK_INT(moe_tokenize(t, " hello!", 7, true, false, ids, 64, &n), ==, 0);
    CHECK_INT(n, ==, 4);
    CHECK_INT(ids[0], ==, 1);
    const char *txt = moe_tokenizer_token_text(t, ids[1], &len);
    CHECK_MSG(len == 3 && memcmp(txt, "\xe2\x96\x81", 3) == 0, "%.*s", (int)len, txt);
    txt = moe_tokenizer_token_text(t, ids[2], &len);
    CHECK_MSG(len == 5 && memcmp(txt, "hello", 5) == 0, "%.*s", (int)len, txt);
    txt = moe_tokenizer_token_text(t, ids[3], &len);
    CHECK_MSG(len == 6 && memcmp(txt, "<0x21>", 6) == 0, "%.*s", (int)len, txt);
    char buf[64];
    CHECK_INT(moe_detokenize(t, ids, n, buf, sizeof(buf), true, false, &len), ==, 0);
    CHECK_MSG(len == 7 && memcmp(buf, " hello!", 7) == 0, "%.*s", (int)len, buf);
    /* a code point above U+10FFFF: llama.cpp aborts, here an error */
    CHECK_INT(moe_tokenize(t, "x\xf7\xbf\xbf\xbfy", 6, false, false, ids, 64, &n), ==, MOE_EFORMAT);
    moe_tokenizer_free(t);
}

static void test_small_bpe(void)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/bpe.gguf", moe_test_tmpdir());
    CHECK_INT(write_vocab(path, "gpt2", "qwen2", true), ==, 0);
    struct moe_diag diag = { 0 };
    struct moe_tokenizer *t = load_path(path, &diag);
    CHECK_MSG(t != NULL, "%s", diag.msg);
    CHECK_STR(moe_tokenizer_pre(t), "qwen2");
    /* "hello" merges to one token; " w" via Ġw; "<|im_start|>" only when asked */
    int32_t ids[64];
    size_t n;
    CHECK_INT(moe_tokenize(t, "hello world", 11, false, false, ids, 64, &n), ==, 0);
    size_t len;
    const char *txt = moe_tokenizer_token_text(t, ids[0], &len);
    CHECK_MSG(n >= 2 && len == 5 && memcmp(txt, "hello", 5) == 0, "n=%zu first=%.*s", n, (int)len, txt);
    int32_t start = ids[0];
    (void)start;
    CHECK_INT(moe_tokenize(t, "<|im_start|>", 12, false, true, ids, 64, &n), ==, 0);
    CHECK_INT(n, ==, 1);
    CHECK(moe_tokenizer_token_attr(t, ids[0]) & MOE_TOKEN_ATTR_CONTROL);
    CHECK_INT(moe_tokenize(t, "<|im_start|>", 12, false, false, ids, 64, &n), ==, 0);
    CHECK_INT(n, >, 1);
    /* user-defined tokens match even without parse_special (llama.cpp) */
    CHECK_INT(moe_tokenize(t, "a<|user|>b", 10, false, false, ids, 64, &n), ==, 0);
    CHECK_INT(n, ==, 3);
    CHECK(moe_tokenizer_token_attr(t, ids[1]) & MOE_TOKEN_ATTR_USER_DEFINED);
    /* too small a buffer: -ENOSPC and the needed count */
    CHECK_INT(moe_tokenize(t, "hello world", 11, false, false, ids, 1, &n), ==, -ENOSPC);
    CHECK_INT(n, >=, 2);
    moe_tokenizer_free(t);
}

static void alloc_failures_on(const char *path, const char *text);

/* Every allocation of load and tokenize fails in turn: an error, never a
 * crash or a leak. */
static void test_alloc_failures(void)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/bpe2.gguf", moe_test_tmpdir());
    CHECK_INT(write_vocab(path, "gpt2", "llama-bpe", true), ==, 0);
    alloc_failures_on(path, "hello <|im_start|> wor\xffld 123");
    CHECK_INT(write_vocab(path, "gemma4", NULL, true), ==, 0);
    alloc_failures_on(path, "hello <|im_start|>\n\n wor\xffld  123 \xc3");
}

static void alloc_failures_on(const char *path, const char *text)
{
    struct moe_gguf *g = NULL;
    struct moe_diag diag = { 0 };
    CHECK_INT(moe_gguf_open(&g, path, &diag), ==, 0);
    long base = moe_alloc_live();
    int ok_at = -1;
    for (long k = 0; k < 400; k++) {
        struct moe_tokenizer *t = NULL;
        moe_alloc_fail_after(k);
        int rc = moe_tokenizer_load(&t, g, NULL);
        if (rc == 0) {
            int32_t ids[64];
            size_t n;
            rc = moe_tokenize(t, text, strlen(text), true, true, ids, 64, &n);
            moe_alloc_fail_after(-1);
            moe_tokenizer_free(t);
            if (rc == 0) {
                ok_at = (int)k;
                break;
            }
            CHECK_INT(rc, ==, -ENOMEM);
        } else {
            moe_alloc_fail_after(-1);
            CHECK_MSG(rc == -ENOMEM, "k=%ld rc=%d", k, rc);
            CHECK(t == NULL);
        }
        CHECK_INT(moe_alloc_live(), ==, base);
    }
    moe_alloc_fail_after(-1);
    moe_gguf_close(g);
    CHECK_MSG(ok_at > 0, "never succeeded");
}

/* ---- real vocabularies ------------------------------------------------------- */

static const char *const all_vocabs[] = { "llama-spm", "qwen2", "llama-bpe", "gpt-2", "deepseek-llm",
                                          "deepseek-coder" };

static const char *const round_trip_texts[] = {
    "plain words and more words",
    "tabs\tand\nnewlines\r\n  indented\n\n\n",
    "\xe4\xb8\xad\xe6\x96\x87 \xed\x95\x9c\xea\xb5\xad\xec\x96\xb4 \xf0\x9f\x98\x80 caf\xc3\xa9",
    "x = f(y) + 42 * (z - 7); // comment",
    "<|im_start|>system\nhi<|im_end|>",
    "   ",
};

static void test_round_trips(void)
{
    if (moe_test_ref_dir() == NULL)
        MOE_SKIP("no shared/ref");
    for (size_t v = 0; v < sizeof(all_vocabs) / sizeof(all_vocabs[0]); v++) {
        struct moe_tokenizer *t = load_ref(all_vocabs[v]);
        CHECK(t != NULL);
        for (size_t i = 0; i < sizeof(round_trip_texts) / sizeof(round_trip_texts[0]); i++) {
            const char *s = round_trip_texts[i];
            int rc;
            int32_t *ids;
            size_t n = tokenize_all(t, s, strlen(s), false, false, &ids, &rc);
            char buf[1024];
            size_t len;
            int drc = moe_detokenize(t, ids, n, buf, sizeof(buf), false, false, &len);
            free(ids);
            if (rc != 0 || drc != 0 || len != strlen(s) || memcmp(buf, s, len) != 0) {
                moe_tokenizer_free(t);
                CHECK_MSG(0, "%s: round trip of \"%s\" gave \"%.*s\" (rc %d/%d)", all_vocabs[v], s, (int)len, buf, rc, drc);
            }
        }
        moe_tokenizer_free(t);
    }
}

/* NUL bytes, invalid UTF-8 and a 1 MB input on every vocabulary: results
 * with the properties llama.cpp's have (exact values: see the ids below). */
static void test_malformed_and_large(void)
{
    if (moe_test_ref_dir() == NULL)
        MOE_SKIP("no shared/ref");
    static const char bad[] = "a\0b \xff\xfe \xc3 \xe4\xb8 \xed\xa0\x80 \xc0\x80 end";
    size_t big_len = 1 << 20;
    char *big = malloc(big_len);
    CHECK(big != NULL);
    const char *chunk = "The quick brown fox \xe4\xb8\xad\xe6\x96\x87 int x = 1;\n";
    size_t cl = strlen(chunk);
    for (size_t i = 0; i < big_len; i++)
        big[i] = chunk[i % cl];
    for (size_t v = 0; v < sizeof(all_vocabs) / sizeof(all_vocabs[0]); v++) {
        struct moe_tokenizer *t = load_ref(all_vocabs[v]);
        CHECK(t != NULL);
        int rc;
        int32_t *ids;
        size_t n = tokenize_all(t, bad, sizeof(bad) - 1, true, true, &ids, &rc);
        CHECK_MSG(rc == 0 && n > 10, "%s: rc %d n %zu", all_vocabs[v], rc, n);
        /* SPM keeps every byte (byte fallback); BPE turns bad bytes into
         * U+FFFD like llama.cpp: both detokenize without error */
        char buf[4096];
        size_t len;
        CHECK_INT(moe_detokenize(t, ids, n, buf, sizeof(buf), true, false, &len), ==, 0);
        if (moe_tokenizer_type(t) == MOE_VOCAB_SPM)   /* bytes kept; a space after a bad lead
                                                          byte comes back as U+2581's bytes, as in llama.cpp */
            CHECK_MSG(len > 10 && memcmp(buf, " a\0b \xff\xfe", 7) == 0, "spm bytes not kept");
        else
            CHECK_MSG(memmem(buf, len, "\xef\xbf\xbd", 3) != NULL && memmem(buf, len, "a\0b", 3) != NULL,
                      "%s: no U+FFFD / NUL kept", all_vocabs[v]);
        free(ids);

        n = tokenize_all(t, big, big_len, false, false, &ids, &rc);
        CHECK_MSG(rc == 0 && n > big_len / 8, "%s: 1 MB: rc %d n %zu", all_vocabs[v], rc, n);
        char *out = malloc(big_len + 16);
        CHECK_INT(moe_detokenize(t, ids, n, out, big_len + 16, false, false, &len), ==, 0);
        bool same = len == big_len && memcmp(out, big, len) == 0;
        free(out);
        free(ids);
        moe_tokenizer_free(t);
        CHECK_MSG(same, "%s: 1 MB round trip differs", all_vocabs[v]);
    }
    free(big);
}

/* A code point above U+10FFFF makes llama.cpp's BPE path abort; here it is
 * an error. SPM never decodes, so it tokenizes the bytes. */
static void test_out_of_range_codepoint(void)
{
    struct moe_tokenizer *q = load_ref("qwen2"), *s = load_ref("llama-spm");
    if (q == NULL || s == NULL) {
        moe_tokenizer_free(q);
        moe_tokenizer_free(s);
        MOE_SKIP("no shared/ref");
    }
    int32_t ids[32];
    size_t n;
    int rq = moe_tokenize(q, "x\xf7\xbf\xbf\xbfy", 6, false, false, ids, 32, &n);
    int rs = moe_tokenize(s, "x\xf7\xbf\xbf\xbfy", 6, false, false, ids, 32, &n);
    moe_tokenizer_free(q);
    moe_tokenizer_free(s);
    CHECK_INT(rq, ==, MOE_EFORMAT);
    CHECK_INT(rs, ==, 0);
}

/* Ids checked against llama-cpp-python 0.3.36 (libllama, vocab_only):
 * tools/ref/tokenizer_extra.py prints them. */
static void test_known_malformed_ids(void)
{
    struct moe_tokenizer *q = load_ref("qwen2"), *s = load_ref("llama-spm");
    if (q == NULL || s == NULL) {
        moe_tokenizer_free(q);
        moe_tokenizer_free(s);
        MOE_SKIP("no shared/ref");
    }
    static const char text[] = "a\0b \xff\xfe \xc3 \xe4\xb8 end";
    static const int32_t want_q[] = { 64, 188, 65, 220, 9973, 29333, 220, 9973, 835 };
    static const int32_t want_s[] = { 1, 263, 3, 29890, 29871, 258, 257, 229, 153, 132, 198, 229, 153, 132,
                                      231, 187, 229, 153, 132, 355 };
    int32_t ids[64];
    size_t nq, ns;
    int rq = moe_tokenize(q, text, sizeof(text) - 1, false, false, ids, 64, &nq);
    bool okq = rq == 0 && nq == sizeof(want_q) / 4 && memcmp(ids, want_q, sizeof(want_q)) == 0;
    int32_t ids_q[64];
    memcpy(ids_q, ids, sizeof(ids));
    int rs = moe_tokenize(s, text, sizeof(text) - 1, true, false, ids, 64, &ns);
    bool oks = rs == 0 && ns == sizeof(want_s) / 4 && memcmp(ids, want_s, sizeof(want_s)) == 0;
    moe_tokenizer_free(q);
    moe_tokenizer_free(s);
    if (!okq) {
        fprintf(stderr, "  qwen2 got:");
        for (size_t i = 0; i < nq; i++)
            fprintf(stderr, " %d", ids_q[i]);
        fputc('\n', stderr);
    }
    if (!oks) {
        fprintf(stderr, "  spm got:");
        for (size_t i = 0; i < ns; i++)
            fprintf(stderr, " %d", ids[i]);
        fputc('\n', stderr);
    }
    CHECK(okq);
    CHECK(oks);
}

/* Streaming: pieces one id at a time never end inside a UTF-8 character,
 * and their concatenation equals the per-token pieces. */
static void test_stream_utf8(void)
{
    struct moe_tokenizer *t = load_ref("llama-spm");
    if (t == NULL)
        MOE_SKIP("no shared/ref");
    /* byte-fallback tokens split emoji into single bytes */
    const char *s = "ok \xf0\x9f\x98\x80\xf0\x9f\x9a\x80 \xe4\xb8\xad!";
    int rc;
    int32_t *ids;
    size_t n = tokenize_all(t, s, strlen(s), false, false, &ids, &rc);
    CHECK_INT(rc, ==, 0);
    struct moe_detok_stream st;
    moe_detok_stream_init(&st, t, false);
    char out[256], buf[64];
    size_t total = 0, len;
    bool split_seen = false;
    for (size_t i = 0; i < n; i++) {
        CHECK_INT(moe_detok_stream_push(&st, ids[i], buf, sizeof(buf), &len), ==, 0);
        CHECK_MSG(moe_utf8_valid((const uint8_t *)buf, len), "chunk %zu not whole UTF-8", i);
        split_seen |= st.n_pending > 0;
        memcpy(out + total, buf, len);
        total += len;
    }
    CHECK_INT(moe_detok_stream_flush(&st, buf, sizeof(buf), &len), ==, 0);
    CHECK_INT(len, ==, 0);
    free(ids);
    moe_tokenizer_free(t);
    CHECK(split_seen);
    /* SPM pieces keep the leading space of the first word */
    CHECK_INT(total, ==, strlen(s) + 1);
    CHECK(memcmp(out + 1, s, strlen(s)) == 0);
}

/* A cut-off character is held back, then given out as is by flush; a
 * buffer too small leaves the stream unchanged. */
static void test_stream_flush_and_nospace(void)
{
    struct moe_tokenizer *t = load_ref("llama-spm");
    if (t == NULL)
        MOE_SKIP("no shared/ref");
    size_t len;
    const char *txt = moe_tokenizer_token_text(t, 231, &len);   /* <0xE4> */
    CHECK(txt != NULL && len == 6 && memcmp(txt, "<0xE4>", 6) == 0);
    struct moe_detok_stream st;
    moe_detok_stream_init(&st, t, false);
    char buf[8];
    CHECK_INT(moe_detok_stream_push(&st, 231, buf, sizeof(buf), &len), ==, 0);
    CHECK_INT(len, ==, 0);
    CHECK_INT(st.n_pending, ==, 1);
    CHECK_INT(moe_detok_stream_push(&st, 187, buf, 1, &len), ==, -ENOSPC);   /* <0xB8> */
    CHECK_INT(st.n_pending, ==, 1);
    CHECK_INT(moe_detok_stream_push(&st, 187, buf, sizeof(buf), &len), ==, 0);
    CHECK_INT(len, ==, 0);
    CHECK_INT(moe_detok_stream_push(&st, -1, buf, sizeof(buf), &len), ==, -EINVAL);
    CHECK_INT(moe_detok_stream_flush(&st, buf, sizeof(buf), &len), ==, 0);
    CHECK_INT(len, ==, 2);
    CHECK(memcmp(buf, "\xe4\xb8", 2) == 0);
    moe_tokenizer_free(t);
}

/* ---- chat templates ------------------------------------------------------------ */

static void test_chat_templates(void)
{
    struct moe_chat_msg msgs[] = { { "system", "Be brief." }, { "user", "Hi" }, { "assistant", "Hello" },
                                   { "user", "Bye" } };
    char *out;
    size_t len;
    CHECK_INT(moe_chat_template_apply(MOE_CHAT_TMPL_CHATML, msgs, 4, true, NULL, &out, &len, NULL), ==, 0);
    CHECK_STR(out, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                   "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                   "<|im_start|>assistant\n");
    moe_free(out);
    CHECK_INT(moe_chat_template_apply(MOE_CHAT_TMPL_LLAMA2, msgs + 1, 3, true, NULL, &out, &len, NULL), ==, 0);
    CHECK_STR(out, "[INST] Hi [/INST]Hello</s>[INST] Bye [/INST]");
    moe_free(out);
    CHECK_INT(moe_chat_template_apply(MOE_CHAT_TMPL_OLMOE, msgs + 1, 3, true, "<|endoftext|>", &out, &len, NULL), ==, 0);
    CHECK_STR(out, "<|user|>\nHi\n<|assistant|>\nHello<|endoftext|>\n<|user|>\nBye\n<|assistant|>\n");
    moe_free(out);
    CHECK_INT(moe_chat_template_apply(MOE_CHAT_TMPL_DEEPSEEK2, msgs, 4, true, NULL, &out, &len, NULL), ==, 0);
    CHECK_STR(out, "Be brief.\n\nUser: Hi\n\nAssistant: Hello<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence"
                   "\xef\xbd\x9c>User: Bye\n\nAssistant:");
    moe_free(out);

    /* detection from the real qwen2 template text, by name, and the error */
    enum moe_chat_template tm;
    struct moe_tokenizer *q = load_ref("qwen2");
    if (q != NULL) {
        const char *src = moe_tokenizer_chat_template(q);
        CHECK(src != NULL);
        CHECK_INT(moe_chat_template_detect(src, strlen(src), &tm, NULL), ==, 0);
        moe_tokenizer_free(q);
        CHECK_INT(tm, ==, MOE_CHAT_TMPL_CHATML);
    }
    const char *mixtral = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                          "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                          "{{ message['content'] + eos_token}}{% endif %}{% endfor %}";
    CHECK_INT(moe_chat_template_detect(mixtral, strlen(mixtral), &tm, NULL), ==, 0);
    CHECK_INT(tm, ==, MOE_CHAT_TMPL_LLAMA2);
    CHECK_INT(moe_chat_template_from_name("deepseek3", &tm, NULL), ==, 0);
    CHECK_INT(tm, ==, MOE_CHAT_TMPL_DEEPSEEK3);
    struct moe_diag diag = { 0 };
    CHECK_INT(moe_chat_template_detect("{{ weird }}", 11, &tm, &diag), ==, MOE_EUNSUPPORTED);
    CHECK_MSG(strstr(diag.msg, "--chat-template") && strstr(diag.msg, "chat_template") && strstr(diag.msg, "chatml"),
              "%s", diag.msg);
}

/* ---- CLI ------------------------------------------------------------------------- */

/* Runs fn(argc, argv) with stdout captured into out. */
static int capture(int (*fn)(int, char **), int argc, char **argv, char *out, size_t cap)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/stdout.txt", moe_test_tmpdir());
    fflush(stdout);
    int saved = dup(1);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    dup2(fd, 1);
    int rc = fn(argc, argv);
    fflush(stdout);
    dup2(saved, 1);
    close(saved);
    ssize_t r = pread(fd, out, cap - 1, 0);
    close(fd);
    out[r > 0 ? r : 0] = '\0';
    return rc;
}

static void test_cli(void)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("no shared/ref");
    char model[1024], out[4096];
    snprintf(model, sizeof(model), "%s/vocab/ggml-vocab-llama-spm.gguf", ref);
    char *a1[] = { "tokenize", "--model", model, "Hello world", NULL };
    CHECK_INT(capture(moectl_tokenize_main, 4, a1, out, sizeof(out)), ==, 0);
    CHECK_STR(out, "[1, 15043, 3186]\n");
    char *a2[] = { "tokenize", "--model", model, "--no-bos", "Hello world", NULL };
    CHECK_INT(capture(moectl_tokenize_main, 5, a2, out, sizeof(out)), ==, 0);
    CHECK_STR(out, "[15043, 3186]\n");
    char qwen[1024];
    snprintf(qwen, sizeof(qwen), "%s/vocab/ggml-vocab-qwen2.gguf", ref);
    char *a3[] = { "tokenize", "--model", qwen, "--special", "<|im_start|>user", NULL };
    CHECK_INT(capture(moectl_tokenize_main, 5, a3, out, sizeof(out)), ==, 0);
    CHECK_STR(out, "[151644, 872]\n");
    char *a4[] = { "detokenize", "--model", model, "1", "15043", "3186", NULL };
    CHECK_INT(capture(moectl_detokenize_main, 6, a4, out, sizeof(out)), ==, 0);
    CHECK_STR(out, " Hello world\n");
    char *a4b[] = { "detokenize", "--model", model, "--remove-special", "[1, 15043, 3186]", NULL };
    CHECK_INT(capture(moectl_detokenize_main, 5, a4b, out, sizeof(out)), ==, 0);
    CHECK_STR(out, " Hello world\n");
    /* usage errors: 2; bad input: 1, nothing on stdout */
    char *a5[] = { "tokenize", "Hello", NULL };
    CHECK_INT(capture(moectl_tokenize_main, 2, a5, out, sizeof(out)), ==, 2);
    char *a6[] = { "tokenize", "--model", "/nonexistent.gguf", "x", NULL };
    CHECK_INT(capture(moectl_tokenize_main, 4, a6, out, sizeof(out)), ==, 1);
    CHECK_STR(out, "");
    char *a7[] = { "detokenize", "--model", model, "99999999", NULL };
    CHECK_INT(capture(moectl_detokenize_main, 4, a7, out, sizeof(out)), ==, 1);
    char *a8[] = { "detokenize", "--model", model, "12x", NULL };
    CHECK_INT(capture(moectl_detokenize_main, 4, a8, out, sizeof(out)), ==, 2);
}

int main(void)
{
    MOE_TEST_RUN(test_load_errors_named);
    MOE_TEST_RUN(test_small_bpe);
    MOE_TEST_RUN(test_small_gemma4);
    MOE_TEST_RUN(test_alloc_failures);
    MOE_TEST_RUN(test_round_trips);
    MOE_TEST_RUN(test_malformed_and_large);
    MOE_TEST_RUN(test_out_of_range_codepoint);
    MOE_TEST_RUN(test_known_malformed_ids);
    MOE_TEST_RUN(test_stream_utf8);
    MOE_TEST_RUN(test_stream_flush_and_nospace);
    MOE_TEST_RUN(test_chat_templates);
    MOE_TEST_RUN(test_cli);
    return moe_test_exit_code();
}
