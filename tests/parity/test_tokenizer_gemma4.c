/* Gemma 4's tokenizer (tokenizer.ggml.model = "gemma4") and the pre values
 * llama.cpp runs the same way (gemma4, granite-embed-multi-311m,
 * sarvam-moe on a gpt2 model) against llama.cpp: tools/ref/
 * make_gemma4_tok_goldens.py built a gemma-style vocabulary from
 * shared/ref's llama-spm (Gemma 4's special tokens, <0xXX> bytes, newline
 * and tab tokens, merges as Hugging Face derives them from a SentencePiece
 * vocabulary), committed as tests/fixtures/tokenizer/gemma4-vocab.gguf, and
 * recorded what llama-cpp-python 0.3.36 gives on 201 texts (spaces, runs of
 * newlines, tabs, CJK, emoji, NUL, bad UTF-8, special-token text) in each
 * variant: the ids with add_special x parse_special, eight
 * detokenizations, the pieces, add_bos, BOS/EOS, the EOG set and the
 * attributes of the special tokens. Every value must be equal. Needs only
 * the committed fixtures (no shared/ref). */
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/gguf.h"
#include "model/tokenizer.h"
#include "tests/harness.h"

static size_t unhex(const char *h, uint8_t *out)
{
    size_t n = strlen(h) / 2;
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        sscanf(h + 2 * i, "%2x", &v);
        out[i] = (uint8_t)v;
    }
    return n;
}

static bool ids_equal(const int32_t *got, size_t n, json_t *want)
{
    if (n != json_array_size(want))
        return false;
    for (size_t i = 0; i < n; i++)
        if (got[i] != (int32_t)json_integer_value(json_array_get(want, i)))
            return false;
    return true;
}

/* want: a string, or {"hex": ...} */
static bool text_equal(const char *got, size_t n, json_t *want, uint8_t *tmp)
{
    if (json_is_string(want))
        return n == json_string_length(want) && memcmp(got, json_string_value(want), n) == 0;
    const char *h = json_string_value(json_object_get(want, "hex"));
    if (h == NULL)
        return false;
    size_t wn = unhex(h, tmp);
    return n == wn && memcmp(got, tmp, n) == 0;
}

struct tally {
    int ok, n;
};

static void count(struct tally *t, bool ok, const char *what, size_t ti)
{
    if (!ok && t->n - t->ok < 5)
        fprintf(stderr, "    differs: %s, text %zu\n", what, ti);
    t->ok += ok;
    t->n++;
}

static void run_variant(const uint8_t *data, size_t data_len, json_t *texts, json_t *v, json_t *first)
{
    const char *model = json_string_value(json_object_get(v, "model"));
    const char *pre = json_string_value(json_object_get(v, "pre"));
    size_t l1 = 0, l2 = 0;
    uint8_t *d1 = moe_test_gguf_set_str(data, data_len, "tokenizer.ggml.model", model, &l1);
    uint8_t *d2 = d1 ? moe_test_gguf_set_str(d1, l1, "tokenizer.ggml.pre", pre, &l2) : NULL;
    CHECK_MSG(d2 != NULL, "gemma4-vocab.gguf: no tokenizer.ggml.model / pre string");
    struct moe_diag d = { 0 };
    struct moe_gguf *g = NULL;
    struct moe_tokenizer *t = NULL;
    CHECK_MSG(moe_gguf_open_mem(&g, d2, l2, "gemma4-vocab.gguf", &d) == 0, "%s", d.msg);
    CHECK_MSG(moe_tokenizer_load(&t, g, &d) == 0, "model %s pre %s: %s", model, pre, d.msg);

    struct tally meta = { 0 }, tok = { 0 }, det = { 0 }, pcs = { 0 };
    count(&meta, moe_tokenizer_add_bos(t) == json_is_true(json_object_get(v, "add_bos")), "add_bos", 0);
    count(&meta, moe_tokenizer_bos(t) == json_integer_value(json_object_get(v, "bos")), "bos", 0);
    count(&meta, moe_tokenizer_eos(t) == json_integer_value(json_object_get(v, "eos")), "eos", 0);
    count(&meta, moe_tokenizer_n_tokens(t) == json_integer_value(json_object_get(v, "n_tokens")), "n_tokens", 0);
    json_t *eog = json_object_get(v, "eog");
    size_t n_eog = 0;
    for (uint32_t id = 0; id < moe_tokenizer_n_tokens(t); id++) {
        if (!moe_tokenizer_is_eog(t, (int32_t)id))
            continue;
        count(&meta, n_eog < json_array_size(eog) &&
                     (int64_t)id == json_integer_value(json_array_get(eog, n_eog)), "eog", id);
        n_eog++;
    }
    count(&meta, n_eog == json_array_size(eog), "eog count", 0);
    json_t *attr = json_object_get(v, "attr");
    for (size_t i = 0; i < json_array_size(attr); i++)
        count(&meta, moe_tokenizer_token_attr(t, (int32_t)i) == (uint32_t)json_integer_value(json_array_get(attr, i)),
              "attr", i);

    json_t *cases = json_object_get(json_is_true(json_object_get(v, "same_as_first")) ? first : v, "cases");
    CHECK(json_array_size(cases) == json_array_size(texts));
    static const char *const modes[4] = { "TF", "FF", "TT", "FT" };
    static uint8_t text[1 << 16], tmp[1 << 16];
    static int32_t ids[1 << 14];
    static char out[1 << 16];
    for (size_t ti = 0; ti < json_array_size(texts); ti++) {
        json_t *c = json_array_get(cases, ti);
        size_t tl = unhex(json_string_value(json_array_get(texts, ti)), text);
        json_t *cid = json_object_get(c, "ids");
        for (int m = 0; m < 4; m++) {
            size_t n = 0;
            int rc = moe_tokenize(t, (const char *)text, tl, modes[m][0] == 'T', modes[m][1] == 'T', ids,
                                  sizeof(ids) / sizeof(ids[0]), &n);
            count(&tok, rc == 0 && ids_equal(ids, n, json_object_get(cid, modes[m])), modes[m], ti);
        }
        const char *key;
        json_t *want;
        json_object_foreach(json_object_get(c, "detok"), key, want) {
            /* "X_RU": ids of mode X, remove_special R, unparse_special U */
            json_t *src = json_object_get(cid, (char[3]){ key[0], key[1], 0 });
            size_t n = json_array_size(src), len = 0;
            for (size_t i = 0; i < n; i++)
                ids[i] = (int32_t)json_integer_value(json_array_get(src, i));
            int rc = moe_detokenize(t, ids, n, out, sizeof(out), key[3] == 'T', key[4] == 'T', &len);
            count(&det, rc == 0 && text_equal(out, len, want, tmp), key, ti);
        }
        for (int sp = 0; sp < 2; sp++) {
            json_t *pw = json_object_get(c, sp ? "pieces_special" : "pieces");
            json_t *tt = json_object_get(cid, "TT");
            if (pw == NULL)
                continue;
            bool ok = json_array_size(pw) == json_array_size(tt);
            for (size_t i = 0; ok && i < json_array_size(tt); i++) {
                size_t len = 0;
                int rc = moe_token_to_piece(t, (int32_t)json_integer_value(json_array_get(tt, i)), out,
                                            sizeof(out), 0, sp == 1, &len);
                size_t wn = unhex(json_string_value(json_array_get(pw, i)), tmp);
                ok = rc == 0 && len == wn && memcmp(out, tmp, len) == 0;
            }
            count(&pcs, ok, sp ? "pieces_special" : "pieces", ti);
        }
    }
    printf("  model %s, pre %s: metadata %d/%d, tokenizations %d/%d, detokenizations %d/%d,"
           " piece lists %d/%d identical to llama.cpp\n", model, pre, meta.ok, meta.n, tok.ok, tok.n,
           det.ok, det.n, pcs.ok, pcs.n);
    CHECK_INT(meta.ok, ==, meta.n);
    CHECK_INT(tok.ok, ==, tok.n);
    CHECK_INT(det.ok, ==, det.n);
    CHECK_INT(pcs.ok, ==, pcs.n);
    moe_tokenizer_free(t);
    moe_gguf_close(g);
    free(d1);
    free(d2);
}

static void test_gemma4_goldens(void)
{
    const char *root = getenv("MOE_SOURCE_ROOT");
    CHECK(root != NULL);
    char path[4096];
    snprintf(path, sizeof(path), "%s/tests/fixtures/tokenizer/gemma4-goldens.json", root);
    json_error_t jerr;
    json_t *j = json_load_file(path, 0, &jerr);
    CHECK_MSG(j != NULL, "%s: %s", path, jerr.text);
    snprintf(path, sizeof(path), "%s/tests/fixtures/tokenizer/gemma4-vocab.gguf", root);
    size_t len = 0;
    uint8_t *data = moe_test_read_file(path, &len);
    CHECK_MSG(data != NULL, "%s", path);
    json_t *texts = json_object_get(j, "texts_hex"), *vs = json_object_get(j, "variants");
    CHECK(json_array_size(texts) > 0 && json_array_size(vs) > 0);
    for (size_t i = 0; i < json_array_size(vs); i++)
        run_variant(data, len, texts, json_array_get(vs, i), json_array_get(vs, 0));
    free(data);
    json_decref(j);
}

int main(void)
{
    MOE_TEST_RUN(test_gemma4_goldens);
    return moe_test_exit_code();
}
