/* moe-gen: writes random-weight MoE models as GGUF, for tests and
 * benchmarks that need nothing from outside the repository.
 *
 *   moe-gen --preset tiny-mixtral|tiny-qwen3moe|demo|bench-4g [options] -o OUT.gguf
 *   moe-gen --arch llama|qwen3moe --n-embd N ... -o OUT.gguf
 *
 * Layout: the files look like shared/ref's models of the same architecture
 * (tests/parity/test_gen_vs_ref.c checks this): the same tensor names and
 * shapes, the same metadata keys with the same value types, in the same
 * order. --type F32 gives the layout of an F32 master as gen_tiny_moe.py
 * writes it (tensors in model order, general.file_type third); other types
 * give the layout llama-quantize writes (tensors sorted by layer, then by
 * name; general.quantization_version and general.file_type last), with the
 * per-tensor types llama-quantize picks (see tensor_type()).
 *
 * Vocabulary: built in. `llama`: SentencePiece style; `qwen3moe`: byte-level
 * BPE with merges learned from a built-in text and ChatML control tokens.
 *
 * Weights: every matrix ~ N(0, (gain / sqrt(fan_in))^2) with gain 1 (3 for
 * the router; --residual-gain G for attn_output and ffn_down*, the matrices
 * that write into the residual stream), embeddings ~ N(0, 1), norm weights 1 + 0.1 N(0, 1), as in
 * shared/ref/gen_tiny_moe.py. Normal values come from a sum of four 16-bit
 * uniforms (Irwin-Hall), plenty for random weights and cheap. Every row has
 * its own xoshiro256** stream keyed by (seed, tensor, row), so the output
 * does not depend on the thread count, and the F32 and quantized files of
 * one seed hold the same weights (a Q8_0 file is the F32 file quantized).
 *
 * Memory: rows are generated in batches of at most BATCH_BYTES of output by
 * worker threads while the main thread writes the previous batch; no tensor
 * is ever held whole.
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/alloc.h"
#include "common/buf.h"
#include "common/rng.h"
#include "io/gguf_writer.h"
#include "kernels/cpu/quant.h"
#include "common/dtype.h"

#define BATCH_BYTES (16u << 20)
#define MAX_THREADS 16
#define MAX_LAYERS 256

struct spec {
    const char *arch;       /* "llama" or "qwen3moe" */
    int n_embd, n_layer, n_head, n_head_kv, head_dim, n_expert, n_expert_used, n_ff_exp;
    int n_vocab;            /* 0: the built-in vocabulary's size */
    int n_ctx;
    uint32_t type;          /* the file's main weight type */
    uint64_t seed;
    float residual_gain;    /* gain of attn_output and ffn_down*; 0 = 1 */
    int mix;                /* enum mix: llama-quantize's per-tensor rules */
};

/* The file types with per-tensor rules (llama_ftype names): --type takes
 * these names beside the plain types F32, F16, BF16, Q8_0 and Q4_0. */
enum mix { MIX_NONE, MIX_Q4_K_M, MIX_Q5_K_M, MIX_Q6_K, MIX_MXFP4_MOE };

static const struct {
    const char *name;
    int mix;
    uint32_t type;          /* the default type of the mix */
    uint32_t ftype;         /* general.file_type (llama_ftype) */
} mixes[] = {
    { "Q4_K_M", MIX_Q4_K_M, MOE_DTYPE_Q4_K, 15 },
    { "Q5_K_M", MIX_Q5_K_M, MOE_DTYPE_Q5_K, 17 },
    { "Q6_K", MIX_Q6_K, MOE_DTYPE_Q6_K, 18 },
    { "MXFP4_MOE", MIX_MXFP4_MOE, MOE_DTYPE_MXFP4, 38 },
};

static const struct {
    const char *name;
    struct spec s;
} presets[] = {
    /* dims of shared/ref's tiny models (shared/ref/README.md) */
    { "tiny-mixtral", { "llama", 64, 4, 4, 2, 16, 8, 2, 128, 0, 256, MOE_DTYPE_F32, 1237 } },
    { "tiny-qwen3moe", { "qwen3moe", 256, 4, 4, 2, 64, 16, 4, 256, 0, 256, MOE_DTYPE_F16, 1234 } },
    /* the README quick start's model: small, but every part of the engine runs */
    { "demo", { "llama", 256, 4, 8, 4, 32, 8, 2, 512, 0, 1024, MOE_DTYPE_Q8_0, 1 } },
    /* Mixtral-shaped, ~3.9 GB in Q4_0, for I/O, cache and engine benchmarks */
    { "bench-4g", { "llama", 2048, 16, 16, 4, 128, 8, 2, 8192, 32000, 4096, MOE_DTYPE_Q4_0, 7 } },
    /* Qwen3-30B-A3B's shape (2048 embd, 32/4 heads of 128, 128 experts of
     * 768, top-8) with 6 of its 48 layers and a 32000-token vocabulary (the
     * real 151936 would make the output matrix a third of a 6-layer decode
     * step instead of a seventh of the real one), Q4_K_M as users run it */
    { "qwen3-30b-a3b", { "qwen3moe", 2048, 6, 32, 4, 128, 128, 8, 768, 32000, 4096, MOE_DTYPE_Q4_K, 11, 0,
                         MIX_Q4_K_M } },
    /* gpt-oss-20b's shape (2880 embd, 64/8 heads of 64, 32 experts of 2880,
     * top-4) with 4 of its 24 layers, a 32000-token vocabulary, MXFP4
     * experts and Q8_0 elsewhere as llama-quantize's MXFP4_MOE; written as
     * qwen3moe (no biases, sinks or sliding window: the matrices are what
     * the CPU kernels see) */
    { "gpt-oss-20b", { "qwen3moe", 2880, 4, 64, 8, 64, 32, 4, 2880, 32000, 4096, MOE_DTYPE_MXFP4, 13, 0,
                       MIX_MXFP4_MOE } },
};
#define N_PRESETS (sizeof(presets) / sizeof(presets[0]))

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL) {
        fprintf(stderr, "moe-gen: out of memory (%zu bytes)\n", n);
        exit(1);
    }
    return p;
}

/* moe_array_grow or exit: a generator has nobody to hand an error to.
 * The arrays it grows are freed with moe_free. */
static void xgrow(void **p, size_t *cap, size_t need, size_t elem)
{
    if (moe_array_grow(p, cap, need, elem, 0) != 0) {
        fprintf(stderr, "moe-gen: out of memory (%zu x %zu bytes)\n", need, elem);
        exit(1);
    }
}

/* ---- PRNG ------------------------------------------------------------ */

struct rng {
    uint64_t s[4];
};

/* One stream per (seed, tensor, row): the key is unique for a given seed
 * (tensor < 2^24, row < 2^40) and splitmix64 spreads it over the state. */
static void rng_seed(struct rng *r, uint64_t seed, uint64_t tensor, uint64_t row)
{
    uint64_t x = seed;
    uint64_t k = moe_splitmix64(&x) ^ (tensor << 40) ^ row;
    for (int i = 0; i < 4; i++)
        r->s[i] = moe_splitmix64(&k);
}

static inline uint64_t rng_next(struct rng *r)
{
    return moe_xoshiro256ss(r->s);
}

/* Approximately N(0, 1): the sum of four 16-bit uniforms, centred and
 * scaled to unit variance (Irwin-Hall, n = 4; bounded at +-3.46). */
static inline float rng_normal(struct rng *r)
{
    uint64_t v = rng_next(r);
    uint32_t sum = (uint32_t)(v & 0xffff) + (uint32_t)((v >> 16) & 0xffff) +
                   (uint32_t)((v >> 32) & 0xffff) + (uint32_t)(v >> 48);
    /* mean 4 * 32767.5, variance 4 * (65536^2 - 1) / 12 */
    return ((float)sum - 131070.0f) * (1.0f / 37837.2f);
}

/* ---- built-in vocabularies ------------------------------------------ */

static const char corpus[] =
    "the quick brown fox jumps over the lazy dog . a mixture of experts model routes each token "
    "to a few experts in every layer , and the router decides which experts see the token . "
    "experts that are not used for a token do not need to be in memory , so a cache of experts "
    "on the gpu can serve a model that is much larger than the gpu . when an expert is missing "
    "it is read from the disk , decompressed and copied to the device while other experts are "
    "computed . hello world ! this is a test of the tokenizer and of the model . what is the "
    "time ? it is ten o clock in the morning and the sun is shining on the water . numbers like "
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 and words like cache , memory , layer , token , expert , "
    "router , prefetch , latency , bandwidth , compute , decode , prefill and sample appear in "
    "the text many times : cache cache memory memory token token expert expert layer layer .";

enum { TT_NORMAL = 1, TT_UNKNOWN = 2, TT_CONTROL = 3, TT_BYTE = 6 }; /* llama_token_type */

struct vocab {
    char **tok;
    size_t *len;
    int32_t *type;
    float *score;
    int n;
    size_t cap;             /* of tok, len, type and score alike */
    int *hash;              /* open addressing over token ids, -1 empty */
    size_t hash_cap;
    char **merges;
    int n_merges;
    size_t cap_merges;
    int bos, eos, unk, pad;
};

static uint64_t hash_bytes(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++)
        h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
    return h;
}

static int vocab_find(const struct vocab *v, const char *s, size_t len)
{
    if (v->hash_cap == 0)
        return -1;
    for (size_t i = hash_bytes(s, len) & (v->hash_cap - 1);; i = (i + 1) & (v->hash_cap - 1)) {
        int id = v->hash[i];
        if (id < 0)
            return -1;
        if (v->len[id] == len && memcmp(v->tok[id], s, len) == 0)
            return id;
    }
}

static void hash_insert(struct vocab *v, int id)
{
    size_t i = hash_bytes(v->tok[id], v->len[id]) & (v->hash_cap - 1);
    while (v->hash[i] >= 0)
        i = (i + 1) & (v->hash_cap - 1);
    v->hash[i] = id;
}

/* Appends a token; returns its id, or -1 when it is already there. */
static int vocab_add(struct vocab *v, const char *s, size_t len, int32_t type, float score)
{
    if (vocab_find(v, s, len) >= 0)
        return -1;
    /* the four arrays grow together, to the capacity the first one gets */
    size_t c_tok = v->cap, c_len = v->cap, c_type = v->cap, c_score = v->cap;
    xgrow((void **)&v->tok, &c_tok, (size_t)v->n + 1, sizeof(char *));
    xgrow((void **)&v->len, &c_len, c_tok, sizeof(size_t));
    xgrow((void **)&v->type, &c_type, c_tok, sizeof(int32_t));
    xgrow((void **)&v->score, &c_score, c_tok, sizeof(float));
    v->cap = c_tok;
    if ((size_t)(v->n + 1) * 2 > v->hash_cap) {
        free(v->hash);
        v->hash_cap = v->hash_cap ? v->hash_cap * 2 : 4096;
        v->hash = xmalloc(v->hash_cap * sizeof(int));
        for (size_t i = 0; i < v->hash_cap; i++)
            v->hash[i] = -1;
        for (int i = 0; i < v->n; i++)
            hash_insert(v, i);
    }
    char *c = xmalloc(len + 1);
    memcpy(c, s, len);
    c[len] = '\0';
    int id = v->n++;
    v->tok[id] = c;
    v->len[id] = len;
    v->type[id] = type;
    v->score[id] = score;
    hash_insert(v, id);
    return id;
}

static void vocab_free(struct vocab *v)
{
    for (int i = 0; i < v->n; i++)
        free(v->tok[i]);
    for (int i = 0; i < v->n_merges; i++)
        free(v->merges[i]);
    moe_free(v->tok);
    moe_free(v->len);
    moe_free(v->type);
    moe_free(v->score);
    free(v->hash);
    moe_free(v->merges);
}

/* Pads with generated pieces "<prefix>x0", "<prefix>x1", ... up to n
 * tokens, skipping any that happen to exist. */
static void vocab_pad(struct vocab *v, int n, const char *prefix, float *score)
{
    for (int i = 0; v->n < n; i++) {
        char s[48];
        int len = snprintf(s, sizeof(s), "%sx%d", prefix, i);
        if (vocab_add(v, s, (size_t)len, TT_NORMAL, score ? *score : 0.0f) >= 0 && score)
            *score -= 1.0f;
    }
}

/* SentencePiece-style, as llama's tokenizer.ggml.model "llama": <unk>,
 * <s>, </s>, the 256 byte-fallback tokens <0x00>..<0xFF> (type BYTE), then
 * "▁word" pieces and single characters from the corpus in order of first
 * appearance, scored -1, -2, ... (earlier = preferred). */
static int vocab_spm(struct vocab *v, int n_vocab)
{
    vocab_add(v, "<unk>", 5, TT_UNKNOWN, 0.0f);
    vocab_add(v, "<s>", 3, TT_CONTROL, 0.0f);
    vocab_add(v, "</s>", 4, TT_CONTROL, 0.0f);
    v->unk = 0;
    v->bos = 1;
    v->eos = 2;
    v->pad = -1;
    for (int b = 0; b < 256; b++) {
        char s[8];
        snprintf(s, sizeof(s), "<0x%02X>", b);
        vocab_add(v, s, 6, TT_BYTE, 0.0f);
    }
    float score = -1.0f;
    for (const char *p = corpus; *p;) {
        while (*p == ' ')
            p++;
        const char *w = p;
        while (*p && *p != ' ')
            p++;
        if (p == w)
            break;
        char piece[64];
        size_t n = (size_t)(p - w) < 40 ? (size_t)(p - w) : 40;
        memcpy(piece, "\xe2\x96\x81", 3); /* U+2581, SentencePiece's space */
        memcpy(piece + 3, w, n);
        if (vocab_add(v, piece, n + 3, TT_NORMAL, score) >= 0)
            score -= 1.0f;
        for (size_t i = 0; i < n; i++)
            if (vocab_add(v, w + i, 1, TT_NORMAL, score) >= 0)
                score -= 1.0f;
    }
    if (n_vocab > 0 && n_vocab < v->n)
        return v->n;
    vocab_pad(v, n_vocab, "\xe2\x96\x81", &score);
    return 0;
}

/* GPT-2's byte-to-unicode mapping: the printable bytes ! .. ~, ¡ .. ¬,
 * ® .. ÿ stand for themselves; the others map to U+0100 onwards in byte
 * order. */
static int byte_printable(int b)
{
    return (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
}

/* UTF-8 of byte b's stand-in character; returns its length. */
static int byte_char(int b, char *out)
{
    int cp = b;
    if (!byte_printable(b)) {
        cp = 256;
        for (int x = 0; x < b; x++)
            cp += !byte_printable(x);
    }
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    out[0] = (char)(0xc0 | (cp >> 6));
    out[1] = (char)(0x80 | (cp & 0x3f));
    return 2;
}

struct sym {
    char s[64];
    int len;
};

enum { MAX_WORDS = 512, MAX_SYMS = 48, MAX_MERGES = 1000 };

/* Byte-level BPE, as tokenizer.ggml.model "gpt2" (pre "qwen2"): the 256
 * byte tokens in GPT-2's id order (the printable ones first, so '!' is 0
 * and 'Ġ' 220, as in GPT-2 and Qwen2), then the merges learned on the
 * corpus split GPT-2 style (a word keeps its leading space, 'Ġ'): most
 * frequent adjacent pair first, ties broken by the pair's text, until no
 * pair occurs twice; then generated pieces up to --n-vocab; then the ChatML
 * control tokens <|endoftext|> (BOS, EOS and padding), <|im_start|> and
 * <|im_end|>. */
static int vocab_bpe(struct vocab *v, int n_vocab)
{
    for (int pass = 0; pass < 2; pass++)
        for (int b = 0; b < 256; b++)
            if (byte_printable(b) == (pass == 0)) {
                char s[4];
                int n = byte_char(b, s);
                vocab_add(v, s, (size_t)n, TT_NORMAL, 0.0f);
            }
    static struct sym words[MAX_WORDS][MAX_SYMS];
    static int wlen[MAX_WORDS];
    int nw = 0;
    for (const char *p = corpus; *p && nw < MAX_WORDS;) {
        int first = p == corpus;
        while (*p == ' ')
            p++;
        const char *w = p;
        while (*p && *p != ' ')
            p++;
        if (p == w)
            break;
        int k = 0;
        if (!first) {
            words[nw][k].len = byte_char(' ', words[nw][k].s);
            k++;
        }
        for (const char *c = w; c < p && k < MAX_SYMS; c++, k++)
            words[nw][k].len = byte_char((unsigned char)*c, words[nw][k].s);
        wlen[nw++] = k;
    }
    const int n_control = 3;
    const int limit = n_vocab > 0 ? n_vocab - n_control : 256 + MAX_MERGES;
    while (v->n < limit && v->n_merges < MAX_MERGES) {
        /* count every distinct adjacent pair (quadratic, but the corpus is
         * tiny) and keep the best */
        int best_c = 0, bl = 0, br = 0;
        char best[160] = "";
        for (int i = 0; i < nw; i++)
            for (int j = 0; j + 1 < wlen[i]; j++) {
                const struct sym *a = &words[i][j], *b = &words[i][j + 1];
                if (a->len + b->len >= (int)sizeof(a->s))
                    continue;
                char key[160];
                snprintf(key, sizeof(key), "%.*s %.*s", a->len, a->s, b->len, b->s);
                int c = 0;
                for (int i2 = 0; i2 < nw; i2++)
                    for (int j2 = 0; j2 + 1 < wlen[i2]; j2++)
                        c += words[i2][j2].len == a->len && words[i2][j2 + 1].len == b->len &&
                             memcmp(words[i2][j2].s, a->s, (size_t)a->len) == 0 &&
                             memcmp(words[i2][j2 + 1].s, b->s, (size_t)b->len) == 0;
                if (c > best_c || (c == best_c && strcmp(key, best) < 0)) {
                    best_c = c;
                    snprintf(best, sizeof(best), "%s", key);
                    bl = a->len;
                    br = b->len;
                }
            }
        if (best_c < 2)
            break;
        char merged[128];
        memcpy(merged, best, (size_t)bl);
        memcpy(merged + bl, best + bl + 1, (size_t)br);
        vocab_add(v, merged, (size_t)(bl + br), TT_NORMAL, 0.0f);
        xgrow((void **)&v->merges, &v->cap_merges, (size_t)v->n_merges + 1, sizeof(char *));
        size_t ml = strlen(best);
        v->merges[v->n_merges] = xmalloc(ml + 1);
        memcpy(v->merges[v->n_merges++], best, ml + 1);
        for (int i = 0; i < nw; i++)
            for (int j = 0; j + 1 < wlen[i]; j++) {
                struct sym *a = &words[i][j], *b = &words[i][j + 1];
                if (a->len == bl && b->len == br && memcmp(a->s, best, (size_t)bl) == 0 &&
                    memcmp(b->s, best + bl + 1, (size_t)br) == 0) {
                    memcpy(a->s + a->len, b->s, (size_t)b->len);
                    a->len += b->len;
                    memmove(&words[i][j + 1], &words[i][j + 2],
                            (size_t)(wlen[i] - j - 2) * sizeof(struct sym));
                    wlen[i]--;
                }
            }
    }
    if (n_vocab > 0 && n_vocab - n_control < v->n)
        return v->n + n_control;
    vocab_pad(v, n_vocab - n_control, "\xc4\xa0", NULL); /* 'Ġ' */
    v->eos = vocab_add(v, "<|endoftext|>", 13, TT_CONTROL, 0.0f);
    vocab_add(v, "<|im_start|>", 12, TT_CONTROL, 0.0f);
    vocab_add(v, "<|im_end|>", 10, TT_CONTROL, 0.0f);
    v->bos = v->eos;
    v->pad = v->eos;
    v->unk = -1;
    return 0;
}

/* Qwen's ChatML template, as in shared/ref's tiny-qwen3moe. */
static const char chatml[] =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/* ---- tensors --------------------------------------------------------- */

enum init { INIT_MATRIX, INIT_ROUTER, INIT_EMBED, INIT_NORM };

struct tensor {
    char name[64];
    uint32_t n_dims;
    uint64_t ne[3];
    uint32_t type;
    enum init init;
    int stream;             /* index in model order: keys the PRNG */
    int layer;              /* -1 outside blk.N */
};

struct model {
    struct tensor t[MAX_LAYERS * 16 + 8];
    int n;
    int quiet;
};

/* llama-quant.cpp: use_more_bits, the layers that Q4_K_M and Q5_K_M give
 * more bits (the first and last eighth and every third in between). */
static int use_more_bits(int i_layer, int n_layers)
{
    return i_layer < n_layers / 8 || i_layer >= 7 * n_layers / 8 || (i_layer - n_layers / 8) % 3 == 2;
}

/* The type llama-quantize gives a tensor for the file types offered here
 * (llama_tensor_get_type; observable in shared/ref/models/quant-*.log and
 * manifest.json; tests/parity/test_quant_llama.py compares whole files):
 *  - 1-D tensors and the router (ffn_gate_inp) are never quantized: F32;
 *  - F16/BF16/Q8_0: every other tensor in that type;
 *  - Q4_0: attn_k and attn_v go to Q8_0 when the model has exactly 8
 *    experts (llama.cpp's Mixtral rule); output.weight gets Q6_K, or Q8_0
 *    when its rows are not a multiple of 256;
 *  - Q4_K_M / Q5_K_M: Q4_K / Q5_K; output.weight Q6_K; attn_v and
 *    ffn_down Q6_K in the layers use_more_bits() picks; with exactly 8
 *    experts attn_k and attn_v Q8_0 and (Q4_K_M) attn_output Q5_K;
 *  - Q6_K: every matrix Q6_K (attn_k/attn_v Q8_0 with 8 experts);
 *  - MXFP4_MOE: the expert matrices (3-D) MXFP4, every other matrix Q8_0.
 * A row length that is not a multiple of the block size falls back to F32
 * (llama-quantize would pick another type), with a warning. */
static uint32_t tensor_type(const struct spec *s, struct model *m, const char *name, uint32_t n_dims,
                            uint64_t ne0, enum init init)
{
    uint32_t t = s->type;
    if (t == MOE_DTYPE_F32 || n_dims < 2 || init == INIT_ROUTER || init == INIT_NORM)
        return MOE_DTYPE_F32;
    int layer = -1;
    if (sscanf(name, "blk.%d.", &layer) != 1)
        layer = -1;
    const int attn_kv = strstr(name, ".attn_k.") || strstr(name, ".attn_v.");
    if (t == MOE_DTYPE_Q4_0) {
        if (strcmp(name, "output.weight") == 0)
            t = ne0 % 256 == 0 ? MOE_DTYPE_Q6_K : MOE_DTYPE_Q8_0;
        else if (s->n_expert == 8 && attn_kv)
            t = MOE_DTYPE_Q8_0;
    } else if (s->mix == MIX_Q4_K_M || s->mix == MIX_Q5_K_M || s->mix == MIX_Q6_K) {
        if (strcmp(name, "output.weight") == 0)
            t = MOE_DTYPE_Q6_K;
        else if (s->mix != MIX_Q6_K && (strstr(name, ".attn_v.") || strstr(name, ".ffn_down")) &&
                 use_more_bits(layer, s->n_layer))
            t = MOE_DTYPE_Q6_K;
        else if (s->mix == MIX_Q4_K_M && s->n_expert == 8 && strstr(name, ".attn_output."))
            t = MOE_DTYPE_Q5_K;
        if (s->n_expert == 8 && attn_kv)
            t = MOE_DTYPE_Q8_0;
    } else if (s->mix == MIX_MXFP4_MOE) {
        t = n_dims == 3 ? MOE_DTYPE_MXFP4 : MOE_DTYPE_Q8_0;
    }
    (void)m;
    const struct moe_dtype_info *di = moe_dtype_info(t);
    if (ne0 % di->block_size != 0) {
        fprintf(stderr, "moe-gen: warning: %s: rows of %" PRIu64 " are not a multiple of the %s block size %u:"
                        " written as F32\n", name, ne0, di->name, di->block_size);
        t = MOE_DTYPE_F32;
    }
    return t;
}

static void add_tensor(const struct spec *s, struct model *m, int layer, const char *name, uint32_t n_dims,
                       uint64_t ne0, uint64_t ne1, uint64_t ne2, enum init init)
{
    struct tensor *t = &m->t[m->n];
    if (layer >= 0)
        snprintf(t->name, sizeof(t->name), "blk.%d.%s", layer, name);
    else
        snprintf(t->name, sizeof(t->name), "%s", name);
    t->n_dims = n_dims;
    t->ne[0] = ne0;
    t->ne[1] = ne1;
    t->ne[2] = ne2;
    t->init = init;
    t->stream = m->n;
    t->layer = layer;
    t->type = tensor_type(s, m, t->name, n_dims, ne0, init);
    m->n++;
}

/* llama.cpp's model loader order (llama_model_loader's weight map): by
 * layer, tensors outside blk.N first, then by name. llama-quantize writes
 * tensors in this order. */
static int cmp_loader_order(const void *pa, const void *pb)
{
    const struct tensor *a = pa, *b = pb;
    if (a->layer != b->layer)
        return a->layer < b->layer ? -1 : 1;
    return strcmp(a->name, b->name);
}

/* Model order as gen_tiny_moe.py writes its F32 masters. */
static void build_tensors(const struct spec *s, struct model *m, int n_vocab)
{
    const uint64_t E = (uint64_t)s->n_embd, hd = (uint64_t)s->head_dim;
    const uint64_t qd = (uint64_t)s->n_head * hd, kvd = (uint64_t)s->n_head_kv * hd;
    const uint64_t F = (uint64_t)s->n_ff_exp, X = (uint64_t)s->n_expert;
    const int qwen = strcmp(s->arch, "qwen3moe") == 0;
    m->n = 0;
    add_tensor(s, m, -1, "token_embd.weight", 2, E, (uint64_t)n_vocab, 1, INIT_EMBED);
    for (int l = 0; l < s->n_layer; l++) {
        add_tensor(s, m, l, "attn_norm.weight", 1, E, 1, 1, INIT_NORM);
        add_tensor(s, m, l, "attn_q.weight", 2, E, qd, 1, INIT_MATRIX);
        add_tensor(s, m, l, "attn_k.weight", 2, E, kvd, 1, INIT_MATRIX);
        add_tensor(s, m, l, "attn_v.weight", 2, E, kvd, 1, INIT_MATRIX);
        if (qwen) {
            add_tensor(s, m, l, "attn_q_norm.weight", 1, hd, 1, 1, INIT_NORM);
            add_tensor(s, m, l, "attn_k_norm.weight", 1, hd, 1, 1, INIT_NORM);
        }
        add_tensor(s, m, l, "attn_output.weight", 2, qd, E, 1, INIT_MATRIX);
        add_tensor(s, m, l, "ffn_norm.weight", 1, E, 1, 1, INIT_NORM);
        add_tensor(s, m, l, "ffn_gate_inp.weight", 2, E, X, 1, INIT_ROUTER);
        add_tensor(s, m, l, "ffn_gate_exps.weight", 3, E, F, X, INIT_MATRIX);
        add_tensor(s, m, l, "ffn_up_exps.weight", 3, E, F, X, INIT_MATRIX);
        add_tensor(s, m, l, "ffn_down_exps.weight", 3, F, E, X, INIT_MATRIX);
    }
    add_tensor(s, m, -1, "output_norm.weight", 1, E, 1, 1, INIT_NORM);
    add_tensor(s, m, -1, "output.weight", 2, E, (uint64_t)n_vocab, 1, INIT_MATRIX);
    if (s->type != MOE_DTYPE_F32)
        qsort(m->t, (size_t)m->n, sizeof(m->t[0]), cmp_loader_order);
}

/* general.file_type: llama_ftype values */
static uint32_t file_type_of(const struct spec *s)
{
    for (size_t i = 0; i < sizeof(mixes) / sizeof(mixes[0]); i++)
        if (mixes[i].mix == s->mix && s->mix != MIX_NONE)
            return mixes[i].ftype;
    switch (s->type) {
    case MOE_DTYPE_F16: return 1;   /* MOSTLY_F16 */
    case MOE_DTYPE_Q4_0: return 2;  /* MOSTLY_Q4_0 */
    case MOE_DTYPE_Q8_0: return 7;  /* MOSTLY_Q8_0 */
    case MOE_DTYPE_BF16: return 32; /* MOSTLY_BF16 */
    default: return 0;              /* ALL_F32 */
    }
}

static void add_metadata(struct moe_gguf_writer *w, const struct spec *s, const struct vocab *v,
                         const char *name)
{
    const int qwen = strcmp(s->arch, "qwen3moe") == 0;
    const int master = s->type == MOE_DTYPE_F32;
    char key[128];
#define K(suffix) (snprintf(key, sizeof(key), "%s." suffix, s->arch), key)
    moe_gguf_writer_add_str(w, "general.architecture", s->arch);
    moe_gguf_writer_add_str(w, "general.name", name);
    if (master)
        moe_gguf_writer_add_u32(w, "general.file_type", 0);
    moe_gguf_writer_add_u32(w, K("context_length"), (uint32_t)s->n_ctx);
    moe_gguf_writer_add_u32(w, K("embedding_length"), (uint32_t)s->n_embd);
    moe_gguf_writer_add_u32(w, K("block_count"), (uint32_t)s->n_layer);
    if (qwen) {
        /* as gen_tiny_moe.py: the dense-equivalent FFN width of the used experts */
        moe_gguf_writer_add_u32(w, K("feed_forward_length"), (uint32_t)(s->n_ff_exp * s->n_expert_used));
        moe_gguf_writer_add_u32(w, K("expert_feed_forward_length"), (uint32_t)s->n_ff_exp);
    } else {
        moe_gguf_writer_add_u32(w, K("feed_forward_length"), (uint32_t)s->n_ff_exp);
    }
    moe_gguf_writer_add_u32(w, K("attention.head_count"), (uint32_t)s->n_head);
    moe_gguf_writer_add_u32(w, K("attention.head_count_kv"), (uint32_t)s->n_head_kv);
    if (qwen) {
        moe_gguf_writer_add_u32(w, K("attention.key_length"), (uint32_t)s->head_dim);
        moe_gguf_writer_add_u32(w, K("attention.value_length"), (uint32_t)s->head_dim);
    }
    moe_gguf_writer_add_f32(w, K("attention.layer_norm_rms_epsilon"), qwen ? 1e-6f : 1e-5f);
    moe_gguf_writer_add_f32(w, K("rope.freq_base"), 1e6f);
    if (!qwen)
        moe_gguf_writer_add_u32(w, K("rope.dimension_count"), (uint32_t)s->head_dim);
    moe_gguf_writer_add_u32(w, K("expert_count"), (uint32_t)s->n_expert);
    moe_gguf_writer_add_u32(w, K("expert_used_count"), (uint32_t)s->n_expert_used);
    if (!qwen)
        moe_gguf_writer_add_u32(w, K("vocab_size"), (uint32_t)v->n);
#undef K
    moe_gguf_writer_add_str(w, "tokenizer.ggml.model", qwen ? "gpt2" : "llama");
    moe_gguf_writer_add_str(w, "tokenizer.ggml.pre", qwen ? "qwen2" : "default");
    moe_gguf_writer_add_str_arr(w, "tokenizer.ggml.tokens", (uint64_t)v->n, (const char *const *)v->tok, v->len);
    moe_gguf_writer_add_arr(w, "tokenizer.ggml.token_type", MOE_GGUF_INT32, (uint64_t)v->n, v->type);
    if (qwen) {
        moe_gguf_writer_add_str_arr(w, "tokenizer.ggml.merges", (uint64_t)v->n_merges,
                                    (const char *const *)v->merges, NULL);
        moe_gguf_writer_add_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)v->bos);
        moe_gguf_writer_add_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)v->eos);
        moe_gguf_writer_add_u32(w, "tokenizer.ggml.padding_token_id", (uint32_t)v->pad);
        moe_gguf_writer_add_str(w, "tokenizer.chat_template", chatml);
    } else {
        moe_gguf_writer_add_arr(w, "tokenizer.ggml.scores", MOE_GGUF_FLOAT32, (uint64_t)v->n, v->score);
        moe_gguf_writer_add_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)v->bos);
        moe_gguf_writer_add_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)v->eos);
        moe_gguf_writer_add_u32(w, "tokenizer.ggml.unknown_token_id", (uint32_t)v->unk);
        moe_gguf_writer_add_bool(w, "tokenizer.ggml.add_bos_token", true);
        moe_gguf_writer_add_bool(w, "tokenizer.ggml.add_eos_token", false);
    }
    if (!master) {
        /* llama-quantize sets these last (replacing the master's file_type) */
        moe_gguf_writer_add_u32(w, "general.quantization_version", 2);
        moe_gguf_writer_add_u32(w, "general.file_type", file_type_of(s));
    }
}

/* ---- row generation on worker threads --------------------------------- */

/* One batch: rows [row0, row0 + n_rows) of tensor t into out. Each worker
 * takes a contiguous share of the rows. */
struct batch {
    const struct tensor *t;
    uint64_t row0, n_rows;
    size_t row_bytes;
    uint8_t *out;
};

struct pool {
    pthread_mutex_t mu;
    pthread_cond_t work, done;
    pthread_t th[MAX_THREADS];
    int n_threads;
    uint64_t epoch;         /* bumped for every batch */
    int busy;               /* workers still on the current batch */
    int stop;
    struct batch b;
    uint64_t seed;
    float residual_gain;
    size_t max_row;
};

static void gen_rows(const struct pool *p, const struct batch *b, uint64_t r0, uint64_t r1, float *row)
{
    const struct tensor *t = b->t;
    const uint64_t n = t->ne[0];
    /* matrices that add to the residual stream: a small gain makes each layer
     * change the hidden state a little, as in trained models, so that a
     * layer's router applied to the previous layer's output predicts its
     * choice (what speculative gating relies on) */
    const int residual = strstr(t->name, "attn_output") != NULL || strstr(t->name, "ffn_down") != NULL;
    const float gain = t->init == INIT_ROUTER ? 3.0f : residual && p->residual_gain > 0.0f ? p->residual_gain : 1.0f;
    const float scale = t->init == INIT_EMBED ? 1.0f : gain / sqrtf((float)n);
    for (uint64_t r = r0; r < r1; r++) {
        struct rng g;
        rng_seed(&g, p->seed, (uint64_t)t->stream, b->row0 + r);
        if (t->init == INIT_NORM)
            for (uint64_t j = 0; j < n; j++)
                row[j] = 1.0f + 0.1f * rng_normal(&g);
        else
            for (uint64_t j = 0; j < n; j++)
                row[j] = scale * rng_normal(&g);
        moe_quantize_row(t->type, row, b->out + r * b->row_bytes, (int64_t)n);
    }
}

struct worker_arg {
    struct pool *p;
    int index;
};

static void *worker_main(void *arg)
{
    struct worker_arg *wa = arg;
    struct pool *p = wa->p;
    float *row = xmalloc(p->max_row * sizeof(float));
    uint64_t seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->stop && p->epoch == seen)
            pthread_cond_wait(&p->work, &p->mu);
        if (p->stop)
            break;
        seen = p->epoch;
        struct batch b = p->b;
        pthread_mutex_unlock(&p->mu);
        uint64_t per = (b.n_rows + (uint64_t)p->n_threads - 1) / (uint64_t)p->n_threads;
        uint64_t r0 = per * (uint64_t)wa->index, r1 = r0 + per;
        if (r1 > b.n_rows)
            r1 = b.n_rows;
        if (r0 < r1)
            gen_rows(p, &b, r0, r1, row);
        pthread_mutex_lock(&p->mu);
        if (--p->busy == 0)
            pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    free(row);
    return NULL;
}

static void pool_start(struct pool *p, const struct batch *b)
{
    pthread_mutex_lock(&p->mu);
    p->b = *b;
    p->busy = p->n_threads;
    p->epoch++;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->mu);
}

static void pool_wait(struct pool *p)
{
    pthread_mutex_lock(&p->mu);
    while (p->busy > 0)
        pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

static const char *type_name(const struct spec *s)
{
    for (size_t i = 0; i < sizeof(mixes) / sizeof(mixes[0]); i++)
        if (mixes[i].mix == s->mix && s->mix != MIX_NONE)
            return mixes[i].name;
    return moe_dtype_name(s->type);
}

/* ---- the file ---------------------------------------------------------- */

static int write_model(const struct spec *s, const char *out, const char *label, int n_threads, int quiet)
{
    struct vocab v = { 0 };
    const int qwen = strcmp(s->arch, "qwen3moe") == 0;
    int need = qwen ? vocab_bpe(&v, s->n_vocab) : vocab_spm(&v, s->n_vocab);
    if (need > 0) {
        fprintf(stderr, "moe-gen: --n-vocab %d is smaller than the built-in vocabulary (%d tokens)\n",
                s->n_vocab, need);
        vocab_free(&v);
        return 2;
    }
    static struct model m;
    m.quiet = quiet;
    build_tensors(s, &m, v.n);

    struct moe_diag d = { 0 };
    struct moe_gguf_writer *w;
    if (moe_gguf_writer_create(&w, out, &d)) {
        fprintf(stderr, "moe-gen: %s\n", d.msg);
        vocab_free(&v);
        return 1;
    }
    char name[96];
    snprintf(name, sizeof(name), "moe-gen-%s-seed%" PRIu64, label, s->seed);
    add_metadata(w, s, &v, name);
    uint64_t total = 0;
    size_t max_row = 0, max_rb = 0;
    for (int i = 0; i < m.n; i++) {
        const struct tensor *t = &m.t[i];
        uint64_t sz = 0;
        moe_gguf_writer_add_tensor(w, t->name, t->n_dims, t->ne, t->type, &sz);
        total += sz;
        size_t rb = moe_dtype_row_bytes(t->type, t->ne[0], NULL);
        if (t->ne[0] > max_row)
            max_row = (size_t)t->ne[0];
        if (rb > max_rb)
            max_rb = rb;
    }
    moe_gguf_writer_begin_data(w);

    /* two batch buffers: workers fill one while this thread writes the other */
    const size_t buf_bytes = max_rb > BATCH_BYTES ? max_rb : BATCH_BYTES;
    uint8_t *buf[2] = { xmalloc(buf_bytes), xmalloc(buf_bytes) };
    static struct pool p;
    struct worker_arg wa[MAX_THREADS];
    pthread_mutex_init(&p.mu, NULL);
    pthread_cond_init(&p.work, NULL);
    pthread_cond_init(&p.done, NULL);
    p.n_threads = n_threads;
    p.seed = s->seed;
    p.residual_gain = s->residual_gain;
    p.max_row = max_row;
    for (int i = 0; i < n_threads; i++) {
        wa[i] = (struct worker_arg){ &p, i };
        if (pthread_create(&p.th[i], NULL, worker_main, &wa[i]) != 0) {
            fprintf(stderr, "moe-gen: cannot start thread %d\n", i);
            exit(1);
        }
    }
    uint64_t done = 0, next_report = 0;
    const int tty = !quiet && isatty(STDERR_FILENO);
    struct batch pending = { 0 };
    int have_pending = 0, cur = 0;
    for (int i = 0; i <= m.n && !moe_gguf_writer_error(w); i++) {
        const struct tensor *t = i < m.n ? &m.t[i] : NULL;
        const uint64_t rows = t ? t->ne[1] * t->ne[2] : 0;
        const size_t rb = t ? moe_dtype_row_bytes(t->type, t->ne[0], NULL) : 0;
        const uint64_t per_batch = t ? (buf_bytes / rb) : 0;
        uint64_t r = 0;
        do {
            /* start the next batch (if any), then write the one before it */
            struct batch b = { 0 };
            if (t) {
                b = (struct batch){ t, r, rows - r < per_batch ? rows - r : per_batch, rb, buf[cur] };
                r += b.n_rows;
            }
            if (have_pending)
                pool_wait(&p);
            if (t)
                pool_start(&p, &b);
            if (have_pending) {
                size_t n = (size_t)(pending.n_rows * pending.row_bytes);
                if (moe_gguf_writer_write(w, pending.out, n))
                    break;
                done += n;
                if (tty && done >= next_report) {
                    fprintf(stderr, "\rmoe-gen: %5.1f%% of %.2f GiB", 100.0 * (double)done / (double)total,
                            (double)total / (1 << 30));
                    next_report = done + (total >> 8);
                }
            }
            pending = b;
            have_pending = t != NULL;
            cur ^= 1;
        } while (t && r < rows);
    }
    if (have_pending)
        pool_wait(&p);
    pthread_mutex_lock(&p.mu);
    p.stop = 1;
    pthread_cond_broadcast(&p.work);
    pthread_mutex_unlock(&p.mu);
    for (int i = 0; i < n_threads; i++)
        pthread_join(p.th[i], NULL);
    if (tty)
        fprintf(stderr, "\n");
    free(buf[0]);
    free(buf[1]);
    int n_vocab = v.n;
    vocab_free(&v);
    if (moe_gguf_writer_finish(w, &d)) {
        fprintf(stderr, "moe-gen: %s\n", d.msg);
        return 1;
    }
    if (!quiet)
        fprintf(stderr, "moe-gen: wrote %s: %s %s, %d tensors, %.2f MiB of weights, %d-token vocabulary\n",
                out, s->arch, type_name(s), m.n, (double)total / (1 << 20), n_vocab);
    return 0;
}

/* ---- command line ---------------------------------------------------- */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: moe-gen [--preset NAME] [--arch llama|qwen3moe]\n"
            "               [--type F32|F16|BF16|Q8_0|Q4_0|Q4_K_M|Q5_K_M|Q6_K|MXFP4_MOE]\n"
            "               [--seed N] [--n-embd N] [--n-layer N] [--n-head N] [--n-head-kv N]\n"
            "               [--head-dim N] [--n-expert N] [--n-expert-used N] [--n-ff-exp N]\n"
            "               [--n-vocab N] [--ctx N] [--residual-gain G] [--threads N] [--quiet]\n"
            "               -o OUT.gguf\n"
            "A preset gives every value; other flags override it wherever they stand.\n"
            "Without --preset, --arch llama starts from tiny-mixtral, --arch qwen3moe from\n"
            "tiny-qwen3moe. presets:");
    for (size_t i = 0; i < N_PRESETS; i++)
        fprintf(f, " %s", presets[i].name);
    fprintf(f, "\n");
}

static int parse_num(const char *flag, const char *v, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long x = v ? strtol(v, &end, 10) : 0;
    if (v == NULL || errno || end == v || *end || x < lo || x > hi) {
        fprintf(stderr, "moe-gen: %s '%s': expected an integer in %ld..%ld\n", flag, v ? v : "", lo, hi);
        return -1;
    }
    *out = x;
    return 0;
}

static int find_preset(const char *name)
{
    for (size_t k = 0; k < N_PRESETS; k++)
        if (strcmp(presets[k].name, name) == 0)
            return (int)k;
    return -1;
}

int main(int argc, char **argv)
{
    /* pass 1: the base values (--preset, else --arch's tiny model) */
    int base = 0;
    const char *label = NULL;
    for (int i = 1; i + 1 < argc; i++) {
        if (strcmp(argv[i], "--preset") == 0) {
            base = find_preset(argv[i + 1]);
            if (base < 0) {
                fprintf(stderr, "moe-gen: unknown preset '%s'\n", argv[i + 1]);
                usage(stderr);
                return 2;
            }
            label = argv[i + 1];
        }
    }
    if (label == NULL) {
        for (int i = 1; i + 1 < argc; i++)
            if (strcmp(argv[i], "--arch") == 0 && strcmp(argv[i + 1], "qwen3moe") == 0)
                base = find_preset("tiny-qwen3moe");
    }
    struct spec s = presets[base].s;
    const char *out = NULL;
    int quiet = 0;
    long n_threads = sysconf(_SC_NPROCESSORS_ONLN);
    if (n_threads < 1)
        n_threads = 1;
    if (n_threads > MAX_THREADS)
        n_threads = MAX_THREADS;
    /* pass 2: everything */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        long x = 0;
        const struct { const char *flag; int *dst; long lo, hi; } nums[] = {
            { "--n-embd", &s.n_embd, 32, 65536 }, { "--n-layer", &s.n_layer, 1, MAX_LAYERS },
            { "--n-head", &s.n_head, 1, 1024 }, { "--n-head-kv", &s.n_head_kv, 1, 1024 },
            { "--head-dim", &s.head_dim, 2, 1024 }, { "--n-expert", &s.n_expert, 1, 1024 },
            { "--n-expert-used", &s.n_expert_used, 1, 1024 }, { "--n-ff-exp", &s.n_ff_exp, 1, 1 << 20 },
            { "--n-vocab", &s.n_vocab, 0, 1 << 22 }, { "--ctx", &s.n_ctx, 1, 1 << 24 },
        };
        int matched = 0;
        for (size_t k = 0; k < sizeof(nums) / sizeof(nums[0]) && !matched; k++) {
            if (strcmp(a, nums[k].flag) == 0) {
                if (parse_num(a, v, nums[k].lo, nums[k].hi, &x))
                    return 2;
                *nums[k].dst = (int)x;
                i++;
                matched = 1;
            }
        }
        if (matched)
            continue;
        if (strcmp(a, "--preset") == 0 && v) {
            i++; /* applied in pass 1 */
        } else if (strcmp(a, "--arch") == 0 && v) {
            if (strcmp(v, "llama") != 0 && strcmp(v, "qwen3moe") != 0) {
                fprintf(stderr, "moe-gen: --arch '%s': expected llama or qwen3moe\n", v);
                return 2;
            }
            s.arch = strcmp(v, "llama") == 0 ? "llama" : "qwen3moe";
            i++;
        } else if (strcmp(a, "--type") == 0 && v) {
            int t = -1, mix = MIX_NONE;
            for (size_t k = 0; k < sizeof(mixes) / sizeof(mixes[0]); k++)
                if (strcmp(v, mixes[k].name) == 0) {
                    t = (int)mixes[k].type;
                    mix = mixes[k].mix;
                }
            if (mix == MIX_NONE) {
                t = moe_dtype_from_name(v);
                if (t != MOE_DTYPE_F32 && t != MOE_DTYPE_F16 && t != MOE_DTYPE_BF16 && t != MOE_DTYPE_Q8_0 &&
                    t != MOE_DTYPE_Q4_0)
                    t = -1;
            }
            if (t < 0) {
                fprintf(stderr, "moe-gen: --type '%s': expected F32, F16, BF16, Q8_0, Q4_0, Q4_K_M, Q5_K_M, "
                                "Q6_K or MXFP4_MOE\n", v);
                return 2;
            }
            s.type = (uint32_t)t;
            s.mix = mix;
            i++;
        } else if (strcmp(a, "--seed") == 0 && v) {
            char *end;
            errno = 0;
            unsigned long long sd = strtoull(v, &end, 10);
            if (errno || end == v || *end || v[0] == '-') {
                fprintf(stderr, "moe-gen: --seed '%s': expected a non-negative integer\n", v);
                return 2;
            }
            s.seed = sd;
            i++;
        } else if (strcmp(a, "--residual-gain") == 0 && v) {
            char *end;
            const double g = strtod(v, &end);
            if (end == v || *end || !(g > 0.0 && g <= 16.0)) {
                fprintf(stderr, "moe-gen: --residual-gain '%s': expected a number in (0, 16]\n", v);
                return 2;
            }
            s.residual_gain = (float)g;
            i++;
        } else if (strcmp(a, "--threads") == 0) {
            if (parse_num(a, v, 1, MAX_THREADS, &n_threads))
                return 2;
            i++;
        } else if (strcmp(a, "-o") == 0 && v) {
            out = v;
            i++;
        } else if (strcmp(a, "--quiet") == 0) {
            quiet = 1;
        } else if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        } else {
            fprintf(stderr, "moe-gen: unknown or incomplete option '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (out == NULL) {
        fprintf(stderr, "moe-gen: missing -o OUT.gguf\n");
        usage(stderr);
        return 2;
    }
    if (s.n_head % s.n_head_kv != 0) {
        fprintf(stderr, "moe-gen: --n-head %d is not a multiple of --n-head-kv %d\n", s.n_head, s.n_head_kv);
        return 2;
    }
    if (s.head_dim % 2 != 0) {
        fprintf(stderr, "moe-gen: --head-dim %d must be even (RoPE rotates pairs)\n", s.head_dim);
        return 2;
    }
    if (strcmp(s.arch, "llama") == 0 && s.n_head * s.head_dim != s.n_embd) {
        /* llama files carry no key_length: llama.cpp derives the head size
         * as n_embd / n_head */
        fprintf(stderr, "moe-gen: --arch llama needs --n-head x --head-dim = --n-embd (%d x %d = %d, not %d)\n",
                s.n_head, s.head_dim, s.n_head * s.head_dim, s.n_embd);
        return 2;
    }
    if (s.n_expert_used > s.n_expert) {
        fprintf(stderr, "moe-gen: --n-expert-used %d exceeds --n-expert %d\n", s.n_expert_used, s.n_expert);
        return 2;
    }
    if (label == NULL)
        label = s.arch;
    return write_model(&s, out, label, (int)n_threads, quiet);
}
