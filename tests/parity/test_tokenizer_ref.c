/* Tokenizer parity with llama.cpp: every case of every
 * shared/ref/tokenizer/tokenizer-<vocab>.json must give exactly the ids,
 * detokenizations and pieces that libllama gave (see shared/ref/README.md,
 * "Tokenizer goldens"). Prints a per-vocabulary summary. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/gguf.h"
#include "model/tokenizer.h"
#include "tests/harness.h"

enum { L_ADD, L_NO, L_PARSE, D_SPECIAL, D_NOSPECIAL, D_REMOVED, PIECES, N_CHECKS };
static const char *const check_names[N_CHECKS] = {
    "ids_add_special", "ids_no_special", "ids_add_special_parse_special",
    "detok_special", "detok_nospecial", "detok_special_removed", "pieces_hex",
};

static int ids_from_json(json_t *arr, int32_t **out, size_t *n)
{
    *n = json_array_size(arr);
    *out = malloc((*n ? *n : 1) * sizeof(int32_t));
    if (*out == NULL)
        return -1;
    for (size_t i = 0; i < *n; i++)
        (*out)[i] = (int32_t)json_integer_value(json_array_get(arr, i));
    return 0;
}

static void print_ids(const char *label, const int32_t *ids, size_t n)
{
    fprintf(stderr, "    %s:", label);
    for (size_t i = 0; i < n && i < 64; i++)
        fprintf(stderr, " %d", ids[i]);
    fprintf(stderr, n > 64 ? " ...\n" : "\n");
}

static bool check_ids(const struct moe_tokenizer *tok, const char *text, size_t len, bool add, bool parse,
                      json_t *want_j)
{
    int32_t *want;
    size_t nw;
    if (ids_from_json(want_j, &want, &nw) != 0)
        return false;
    size_t cap = len + 16, n = 0;
    int32_t *got = malloc(cap * sizeof(int32_t));
    int rc = got ? moe_tokenize(tok, text, len, add, parse, got, cap, &n) : -1;
    bool ok = rc == 0 && n == nw && memcmp(got, want, n * sizeof(int32_t)) == 0;
    if (!ok) {
        fprintf(stderr, "  mismatch (add=%d parse=%d rc=%d) text=\"%.60s\"\n", add, parse, rc, text);
        print_ids("want", want, nw);
        print_ids("got ", got, n);
    }
    free(got);
    free(want);
    return ok;
}

static bool check_detok(const struct moe_tokenizer *tok, json_t *ids_j, bool remove_special, const char *want)
{
    int32_t *ids;
    size_t n, len = 0;
    if (ids_from_json(ids_j, &ids, &n) != 0)
        return false;
    size_t cap = strlen(want) * 2 + 64;
    char *buf = malloc(cap);
    int rc = buf ? moe_detokenize(tok, ids, n, buf, cap, remove_special, false, &len) : -1;
    bool ok = rc == 0 && len == strlen(want) && memcmp(buf, want, len) == 0;
    if (!ok)
        fprintf(stderr, "  detok mismatch (remove_special=%d rc=%d): want \"%s\" got \"%.*s\"\n",
                remove_special, rc, want, (int)len, buf ? buf : "");
    free(buf);
    free(ids);
    return ok;
}

static bool check_pieces(const struct moe_tokenizer *tok, json_t *ids_j, json_t *hex_j)
{
    size_t n = json_array_size(ids_j);
    if (n != json_array_size(hex_j))
        return false;
    for (size_t i = 0; i < n; i++) {
        int32_t id = (int32_t)json_integer_value(json_array_get(ids_j, i));
        char buf[512], hex[1100];
        size_t len;
        if (moe_token_to_piece(tok, id, buf, sizeof(buf), 0, false, &len) != 0)
            return false;
        for (size_t k = 0; k < len; k++)
            snprintf(hex + 2 * k, 3, "%02x", (unsigned char)buf[k]);
        hex[2 * len] = '\0';
        const char *want = json_string_value(json_array_get(hex_j, i));
        if (want == NULL || strcmp(want, hex) != 0) {
            fprintf(stderr, "  piece mismatch for id %d: want %s got %s\n", id, want ? want : "?", hex);
            return false;
        }
    }
    return true;
}

static void run_vocab(const char *vocab)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("no shared/ref");
    char gpath[1024], jpath[1024];
    snprintf(gpath, sizeof(gpath), "%s/vocab/ggml-vocab-%s.gguf", ref, vocab);
    snprintf(jpath, sizeof(jpath), "%s/tokenizer/tokenizer-%s.json", ref, vocab);
    json_error_t jerr;
    json_t *root = json_load_file(jpath, 0, &jerr);
    CHECK_MSG(root != NULL, "%s: %s", jpath, jerr.text);
    struct moe_diag diag = { 0 };
    struct moe_gguf *g = NULL;
    struct moe_tokenizer *tok = NULL;
    int rc = moe_gguf_open(&g, gpath, &diag);
    if (rc == 0)
        rc = moe_tokenizer_load(&tok, g, &diag);
    moe_gguf_close(g);
    if (rc != 0) {
        json_decref(root);
        CHECK_MSG(0, "load %s: %s", gpath, diag.msg);
    }
    CHECK_INT(moe_tokenizer_n_tokens(tok), ==, json_integer_value(json_object_get(root, "n_tokens")));
    CHECK_INT(moe_tokenizer_bos(tok), ==, json_integer_value(json_object_get(root, "bos")));
    CHECK_INT(moe_tokenizer_eos(tok), ==, json_integer_value(json_object_get(root, "eos")));
    CHECK_INT(moe_tokenizer_add_bos(tok), ==, json_is_true(json_object_get(root, "add_bos")));
    CHECK_INT(moe_tokenizer_add_eos(tok), ==, json_is_true(json_object_get(root, "add_eos")));

    json_t *cases = json_object_get(root, "cases");
    size_t nc = json_array_size(cases);
    size_t pass[N_CHECKS] = { 0 };
    for (size_t i = 0; i < nc; i++) {
        json_t *c = json_array_get(cases, i);
        const char *text = json_string_value(json_object_get(c, "text"));
        size_t len = json_string_length(json_object_get(c, "text"));
        pass[L_ADD] += check_ids(tok, text, len, true, false, json_object_get(c, "ids_add_special"));
        pass[L_NO] += check_ids(tok, text, len, false, false, json_object_get(c, "ids_no_special"));
        pass[L_PARSE] += check_ids(tok, text, len, true, true, json_object_get(c, "ids_add_special_parse_special"));
        pass[D_SPECIAL] += check_detok(tok, json_object_get(c, "ids_add_special"), false,
                                       json_string_value(json_object_get(c, "detok_special")));
        pass[D_NOSPECIAL] += check_detok(tok, json_object_get(c, "ids_no_special"), false,
                                         json_string_value(json_object_get(c, "detok_nospecial")));
        pass[D_REMOVED] += check_detok(tok, json_object_get(c, "ids_add_special"), true,
                                       json_string_value(json_object_get(c, "detok_special_removed")));
        pass[PIECES] += check_pieces(tok, json_object_get(c, "ids_no_special"), json_object_get(c, "pieces_hex"));
    }
    fprintf(stderr, "  %-15s", vocab);
    for (int k = 0; k < N_CHECKS; k++)
        fprintf(stderr, " %s %zu/%zu%s", check_names[k], pass[k], nc, k + 1 < N_CHECKS ? "," : "\n");
    moe_tokenizer_free(tok);
    json_decref(root);
    for (int k = 0; k < N_CHECKS; k++)
        CHECK_MSG(pass[k] == nc, "%s: %s %zu/%zu", vocab, check_names[k], pass[k], nc);
}

static void test_llama_spm(void) { run_vocab("llama-spm"); }
static void test_qwen2(void) { run_vocab("qwen2"); }
static void test_llama_bpe(void) { run_vocab("llama-bpe"); }
static void test_gpt2(void) { run_vocab("gpt-2"); }
static void test_deepseek_llm(void) { run_vocab("deepseek-llm"); }
static void test_deepseek_coder(void) { run_vocab("deepseek-coder"); }

int main(void)
{
    MOE_TEST_RUN(test_llama_spm);
    MOE_TEST_RUN(test_qwen2);
    MOE_TEST_RUN(test_llama_bpe);
    MOE_TEST_RUN(test_gpt2);
    MOE_TEST_RUN(test_deepseek_llm);
    MOE_TEST_RUN(test_deepseek_coder);
    return moe_test_exit_code();
}
