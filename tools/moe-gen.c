/* moe-gen: writes random-weight MoE models as GGUF, for tests and
 * benchmarks that need nothing from outside the repository.
 *
 *   moe-gen --preset tiny-mixtral|tiny-qwen3moe|demo|bench-4g [options] -o OUT.gguf
 *   moe-gen --arch llama|qwen3moe --n-embd N ... -o OUT.gguf
 *
 * Files use the tensor names, shapes and metadata keys of the shared/ref
 * models of the same architecture (tests/parity/test_gen_vs_ref.c checks
 * this), with a small built-in vocabulary: SentencePiece-style for `llama`
 * and byte-level BPE (merges learned from a built-in text) for `qwen3moe`.
 *
 * Weights: every matrix ~ N(0, (gain / sqrt(fan_in))^2) with gain 1 (3 for
 * the router), embeddings ~ N(0, 1), norm weights 1 + 0.1 N(0, 1), as in
 * shared/ref/gen_tiny_moe.py. Normal values come from a sum of four uniforms
 * (Irwin-Hall), which is plenty for random weights and keeps a 4 GB model
 * to seconds. The same arguments give a byte-identical file: each tensor
 * has its own PRNG stream derived from the seed and the tensor's index.
 * Memory stays at one row per tensor, whatever the model size.
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "io/gguf_writer.h"
#include "kernels/cpu/quant.h"
#include "kernels/dtype.h"

struct spec {
    const char *arch;       /* "llama" or "qwen3moe" */
    int n_embd, n_layer, n_head, n_head_kv, head_dim, n_expert, n_expert_used, n_ff_exp;
    int n_vocab;            /* 0: the built-in vocabulary's size */
    int n_ctx;
    uint32_t type;
    uint64_t seed;
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
    /* Mixtral-shaped, ~3.8 GB in Q4_0, for I/O, cache and engine benchmarks */
    { "bench-4g", { "llama", 2048, 16, 16, 4, 128, 8, 2, 8192, 32000, 4096, MOE_DTYPE_Q4_0, 7 } },
};

/* ---- PRNG ------------------------------------------------------------ */

struct rng {
    uint64_t s[4];
};

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void rng_seed(struct rng *r, uint64_t seed, uint64_t stream)
{
    uint64_t x = seed ^ (stream * 0xd1342543de82ef95ull);
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&x);
}

static inline uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static inline uint64_t rng_next(struct rng *r)
{
    uint64_t *s = r->s;
    const uint64_t out = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return out;
}

/* Approximately N(0, 1): the sum of four 16-bit uniforms, centred and
 * scaled to unit variance (Irwin-Hall, n = 4). */
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

struct vocab {
    char **tok;
    size_t *len;
    int32_t *type;
    float *score;
    int n, cap;
    char **merges;
    int n_merges;
    int bos, eos, unk, pad;
};

static int vocab_add(struct vocab *v, const char *s, size_t len, int32_t type, float score)
{
    if (v->n == v->cap) {
        int cap = v->cap ? v->cap * 2 : 1024;
        char **t = realloc(v->tok, (size_t)cap * sizeof(char *));
        size_t *l = realloc(v->len, (size_t)cap * sizeof(size_t));
        int32_t *ty = realloc(v->type, (size_t)cap * sizeof(int32_t));
        float *sc = realloc(v->score, (size_t)cap * sizeof(float));
        if (t)
            v->tok = t;
        if (l)
            v->len = l;
        if (ty)
            v->type = ty;
        if (sc)
            v->score = sc;
        if (!t || !l || !ty || !sc)
            return -ENOMEM;
        v->cap = cap;
    }
    for (int i = 0; i < v->n; i++)
        if (v->len[i] == len && memcmp(v->tok[i], s, len) == 0)
            return 1; /* already there */
    char *c = malloc(len + 1);
    if (c == NULL)
        return -ENOMEM;
    memcpy(c, s, len);
    c[len] = '\0';
    v->tok[v->n] = c;
    v->len[v->n] = len;
    v->type[v->n] = type;
    v->score[v->n] = score;
    v->n++;
    return 0;
}

enum { TT_NORMAL = 1, TT_UNKNOWN = 2, TT_CONTROL = 3, TT_BYTE = 6 };

/* SentencePiece-style: <unk> <s> </s>, the 256 byte-fallback tokens, then
 * "▁word" pieces and characters from the corpus, scored by order. */
static int vocab_spm(struct vocab *v, int n_vocab)
{
    int rc = vocab_add(v, "<unk>", 5, TT_UNKNOWN, 0.0f);
    rc |= vocab_add(v, "<s>", 3, TT_CONTROL, 0.0f);
    rc |= vocab_add(v, "</s>", 4, TT_CONTROL, 0.0f);
    v->unk = 0;
    v->bos = 1;
    v->eos = 2;
    v->pad = -1;
    for (int b = 0; b < 256; b++) {
        char s[8];
        snprintf(s, sizeof(s), "<0x%02X>", b);
        rc |= vocab_add(v, s, 6, TT_BYTE, 0.0f);
    }
    const char *p = corpus;
    float score = -1.0f;
    while (*p && rc >= 0) {
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
        int r = vocab_add(v, piece, n + 3, TT_NORMAL, score);
        if (r == 0)
            score -= 1.0f;
        rc = r < 0 ? r : 0;
        for (size_t i = 0; i < n && rc >= 0; i++) {
            r = vocab_add(v, w + i, 1, TT_NORMAL, score);
            if (r == 0)
                score -= 1.0f;
            rc = r < 0 ? r : 0;
        }
    }
    for (int i = 0; v->n < n_vocab && rc >= 0; i++) {
        char s[32];
        int n = snprintf(s, sizeof(s), "\xe2\x96\x81x%d", i);
        rc = vocab_add(v, s, (size_t)n, TT_NORMAL, score--);
        rc = rc < 0 ? rc : 0;
    }
    return rc < 0 ? rc : 0;
}

/* GPT-2's byte-to-unicode mapping: printable bytes map to themselves, the
 * others to U+0100 onwards in byte order. Returns the UTF-8 length. */
static int byte_char(int b, char *out)
{
    int cp;
    if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255)) {
        cp = b;
    } else {
        int k = 0;
        for (int x = 0; x < b; x++)
            if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174 && x <= 255)))
                k++;
        cp = 256 + k;
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

/* Byte-level BPE: 256 byte tokens, then merges learned greedily from the
 * corpus (most frequent adjacent pair first, ties by the pair's text), then
 * the ChatML control tokens. */
static int vocab_bpe(struct vocab *v, int n_vocab)
{
    int rc = 0;
    for (int b = 0; b < 256 && rc >= 0; b++) {
        char s[4];
        int n = byte_char(b, s);
        rc = vocab_add(v, s, (size_t)n, TT_NORMAL, 0.0f);
    }
    /* words: leading space as its mapped char (U+0120 'Ġ') */
    enum { MAXW = 512, MAXS = 48 };
    static struct sym words[MAXW][MAXS];
    static int wlen[MAXW];
    int nw = 0;
    const char *p = corpus;
    while (*p && nw < MAXW) {
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
        for (const char *c = w; c < p && k < MAXS; c++, k++)
            words[nw][k].len = byte_char((unsigned char)*c, words[nw][k].s);
        wlen[nw++] = k;
    }
    const int n_control = 3, target = n_vocab > 0 ? n_vocab - n_control : 256 + 400;
    v->merges = calloc((size_t)(target > 256 ? target : 1), sizeof(char *));
    if (v->merges == NULL)
        return -ENOMEM;
    while (v->n < target && rc >= 0) {
        /* count pairs (quadratic but tiny) */
        int best_c = 0;
        char best[128] = "";
        int bl = 0, br = 0;
        for (int i = 0; i < nw; i++)
            for (int j = 0; j + 1 < wlen[i]; j++) {
                const struct sym *a = &words[i][j], *b = &words[i][j + 1];
                if (a->len + b->len >= (int)sizeof(words[0][0].s))
                    continue;
                char key[128];
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
        rc = vocab_add(v, merged, (size_t)(bl + br), TT_NORMAL, 0.0f);
        if (rc < 0)
            break;
        v->merges[v->n_merges++] = strdup(best);
        /* apply the merge */
        for (int i = 0; i < nw; i++)
            for (int j = 0; j + 1 < wlen[i]; j++) {
                struct sym *a = &words[i][j], *b = &words[i][j + 1];
                if (a->len == bl && b->len == br && memcmp(a->s, best, (size_t)bl) == 0 &&
                    memcmp(b->s, best + bl + 1, (size_t)br) == 0) {
                    memcpy(a->s + a->len, b->s, (size_t)b->len);
                    a->len += b->len;
                    memmove(&words[i][j + 1], &words[i][j + 2], (size_t)(wlen[i] - j - 2) * sizeof(struct sym));
                    wlen[i]--;
                }
            }
        rc = 0;
    }
    for (int i = 0; v->n < target && rc >= 0; i++) {
        char s[32];
        int n = snprintf(s, sizeof(s), "\xc4\xa0x%d", i);
        rc = vocab_add(v, s, (size_t)n, TT_NORMAL, 0.0f);
        rc = rc < 0 ? rc : 0;
    }
    v->eos = v->n;
    rc |= vocab_add(v, "<|endoftext|>", 13, TT_CONTROL, 0.0f);
    rc |= vocab_add(v, "<|im_start|>", 12, TT_CONTROL, 0.0f);
    rc |= vocab_add(v, "<|im_end|>", 10, TT_CONTROL, 0.0f);
    v->bos = v->eos;
    v->pad = v->eos;
    v->unk = -1;
    return rc < 0 ? rc : 0;
}

/* ---- tensors --------------------------------------------------------- */

enum init { INIT_MATRIX, INIT_ROUTER, INIT_EMBED, INIT_NORM };

struct tensor {
    char name[64];
    uint32_t n_dims;
    uint64_t ne[3];
    uint32_t type;
    enum init init;
};

static int n_tensors;
static struct tensor tensors[4096];

static void add_tensor(const char *name, uint32_t n_dims, uint64_t ne0, uint64_t ne1, uint64_t ne2,
                       uint32_t type, enum init init)
{
    struct tensor *t = &tensors[n_tensors++];
    snprintf(t->name, sizeof(t->name), "%s", name);
    t->n_dims = n_dims;
    t->ne[0] = ne0;
    t->ne[1] = ne1;
    t->ne[2] = ne2;
    const struct moe_dtype_info *di = moe_dtype_info(type);
    if (n_dims == 1 || init == INIT_ROUTER || init == INIT_NORM) {
        type = MOE_DTYPE_F32; /* as llama-quantize: 1-D tensors and routers stay F32 */
    } else if (ne0 % di->block_size != 0) {
        fprintf(stderr, "moe-gen: %s: row of %" PRIu64 " is not a multiple of the %s block size %u:"
                " kept as F32\n", name, ne0, di->name, di->block_size);
        type = MOE_DTYPE_F32;
    }
    t->type = type;
    t->init = init;
}

static void build_tensors(const struct spec *s, int n_vocab)
{
    const uint64_t E = (uint64_t)s->n_embd, hd = (uint64_t)s->head_dim;
    const uint64_t qd = (uint64_t)s->n_head * hd, kvd = (uint64_t)s->n_head_kv * hd;
    const uint64_t F = (uint64_t)s->n_ff_exp, X = (uint64_t)s->n_expert;
    const int qwen = strcmp(s->arch, "qwen3moe") == 0;
    char n[64];
    n_tensors = 0;
    add_tensor("token_embd.weight", 2, E, (uint64_t)n_vocab, 1, s->type, INIT_EMBED);
    for (int l = 0; l < s->n_layer; l++) {
#define T(suffix) (snprintf(n, sizeof(n), "blk.%d." suffix, l), n)
        add_tensor(T("attn_norm.weight"), 1, E, 1, 1, s->type, INIT_NORM);
        add_tensor(T("attn_q.weight"), 2, E, qd, 1, s->type, INIT_MATRIX);
        add_tensor(T("attn_k.weight"), 2, E, kvd, 1, s->type, INIT_MATRIX);
        add_tensor(T("attn_v.weight"), 2, E, kvd, 1, s->type, INIT_MATRIX);
        if (qwen) {
            add_tensor(T("attn_q_norm.weight"), 1, hd, 1, 1, s->type, INIT_NORM);
            add_tensor(T("attn_k_norm.weight"), 1, hd, 1, 1, s->type, INIT_NORM);
        }
        add_tensor(T("attn_output.weight"), 2, qd, E, 1, s->type, INIT_MATRIX);
        add_tensor(T("ffn_norm.weight"), 1, E, 1, 1, s->type, INIT_NORM);
        add_tensor(T("ffn_gate_inp.weight"), 2, E, X, 1, s->type, INIT_ROUTER);
        add_tensor(T("ffn_gate_exps.weight"), 3, E, F, X, s->type, INIT_MATRIX);
        add_tensor(T("ffn_up_exps.weight"), 3, E, F, X, s->type, INIT_MATRIX);
        add_tensor(T("ffn_down_exps.weight"), 3, F, E, X, s->type, INIT_MATRIX);
#undef T
    }
    add_tensor("output_norm.weight", 1, E, 1, 1, s->type, INIT_NORM);
    add_tensor("output.weight", 2, E, (uint64_t)n_vocab, 1, s->type, INIT_MATRIX);
}

static uint32_t file_type_of(uint32_t t)
{
    switch (t) {
    case MOE_DTYPE_F32: return 0;
    case MOE_DTYPE_F16: return 1;
    case MOE_DTYPE_Q4_0: return 2;
    case MOE_DTYPE_Q8_0: return 7;
    case MOE_DTYPE_BF16: return 32;
    default: return 0;
    }
}

static const char chatml[] =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

static int write_model(const struct spec *s, const char *out, int quiet)
{
    struct vocab v = { 0 };
    const int qwen = strcmp(s->arch, "qwen3moe") == 0;
    int rc = qwen ? vocab_bpe(&v, s->n_vocab) : vocab_spm(&v, s->n_vocab);
    if (rc) {
        fprintf(stderr, "moe-gen: out of memory building the vocabulary\n");
        return 1;
    }
    if (s->n_vocab > 0 && v.n != s->n_vocab) {
        fprintf(stderr, "moe-gen: --n-vocab %d is smaller than the built-in vocabulary (%d tokens)\n",
                s->n_vocab, v.n);
        return 2;
    }
    build_tensors(s, v.n);

    struct moe_diag d = { 0 };
    struct moe_gguf_writer *w;
    if (moe_gguf_writer_create(&w, out, &d)) {
        fprintf(stderr, "moe-gen: %s\n", d.msg);
        return 1;
    }
    char key[128], name[96];
    const char *a = s->arch;
#define K(suffix) (snprintf(key, sizeof(key), "%s." suffix, a), key)
    snprintf(name, sizeof(name), "moe-gen-%s-seed%" PRIu64, a, s->seed);
    moe_gguf_writer_add_str(w, "general.architecture", a);
    moe_gguf_writer_add_str(w, "general.name", name);
    if (!qwen)
        moe_gguf_writer_add_u32(w, "general.file_type", file_type_of(s->type));
    moe_gguf_writer_add_u32(w, K("context_length"), (uint32_t)s->n_ctx);
    moe_gguf_writer_add_u32(w, K("embedding_length"), (uint32_t)s->n_embd);
    moe_gguf_writer_add_u32(w, K("block_count"), (uint32_t)s->n_layer);
    moe_gguf_writer_add_u32(w, K("feed_forward_length"), (uint32_t)(qwen ? 4 * s->n_ff_exp : s->n_ff_exp));
    if (qwen)
        moe_gguf_writer_add_u32(w, K("expert_feed_forward_length"), (uint32_t)s->n_ff_exp);
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
        moe_gguf_writer_add_u32(w, K("vocab_size"), (uint32_t)v.n);
#undef K
    moe_gguf_writer_add_str(w, "tokenizer.ggml.model", qwen ? "gpt2" : "llama");
    moe_gguf_writer_add_str(w, "tokenizer.ggml.pre", qwen ? "qwen2" : "default");
    moe_gguf_writer_add_str_arr(w, "tokenizer.ggml.tokens", (uint64_t)v.n, (const char *const *)v.tok, v.len);
    moe_gguf_writer_add_arr(w, "tokenizer.ggml.token_type", MOE_GGUF_INT32, (uint64_t)v.n, v.type);
    if (qwen) {
        moe_gguf_writer_add_str_arr(w, "tokenizer.ggml.merges", (uint64_t)v.n_merges,
                                    (const char *const *)v.merges, NULL);
        moe_gguf_writer_add_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)v.bos);
        moe_gguf_writer_add_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)v.eos);
        moe_gguf_writer_add_u32(w, "tokenizer.ggml.padding_token_id", (uint32_t)v.pad);
        moe_gguf_writer_add_str(w, "tokenizer.chat_template", chatml);
        if (s->type != MOE_DTYPE_F32)
            moe_gguf_writer_add_u32(w, "general.quantization_version", 2);
        moe_gguf_writer_add_u32(w, "general.file_type", file_type_of(s->type));
    } else {
        moe_gguf_writer_add_arr(w, "tokenizer.ggml.scores", MOE_GGUF_FLOAT32, (uint64_t)v.n, v.score);
        moe_gguf_writer_add_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)v.bos);
        moe_gguf_writer_add_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)v.eos);
        moe_gguf_writer_add_u32(w, "tokenizer.ggml.unknown_token_id", (uint32_t)v.unk);
        moe_gguf_writer_add_bool(w, "tokenizer.ggml.add_bos_token", true);
        moe_gguf_writer_add_bool(w, "tokenizer.ggml.add_eos_token", false);
        if (s->type != MOE_DTYPE_F32)
            moe_gguf_writer_add_u32(w, "general.quantization_version", 2);
    }
    uint64_t total = 0;
    for (int i = 0; i < n_tensors; i++) {
        uint64_t sz = 0;
        moe_gguf_writer_add_tensor(w, tensors[i].name, tensors[i].n_dims, tensors[i].ne, tensors[i].type, &sz);
        total += sz;
    }
    moe_gguf_writer_begin_data(w);

    uint64_t max_row = 0;
    for (int i = 0; i < n_tensors; i++)
        if (tensors[i].ne[0] > max_row)
            max_row = tensors[i].ne[0];
    float *row = malloc(max_row * sizeof(float));
    uint8_t *q = malloc(max_row * sizeof(float));
    if (row == NULL || q == NULL) {
        fprintf(stderr, "moe-gen: out of memory\n");
        moe_gguf_writer_abort(w);
        return 1;
    }
    uint64_t done = 0, next_report = 0;
    const int tty = !quiet && isatty(STDERR_FILENO);
    for (int i = 0; i < n_tensors && !moe_gguf_writer_error(w); i++) {
        const struct tensor *t = &tensors[i];
        struct rng r;
        rng_seed(&r, s->seed, (uint64_t)i);
        const uint64_t rows = t->ne[1] * t->ne[2];
        const float gain = t->init == INIT_ROUTER ? 3.0f : 1.0f;
        const float scale = t->init == INIT_EMBED ? 1.0f : gain / sqrtf((float)t->ne[0]);
        const size_t rb = moe_dtype_row_bytes(t->type, t->ne[0], NULL);
        for (uint64_t rr = 0; rr < rows; rr++) {
            for (uint64_t j = 0; j < t->ne[0]; j++)
                row[j] = t->init == INIT_NORM ? 1.0f + 0.1f * rng_normal(&r) : scale * rng_normal(&r);
            moe_quantize_row(t->type, row, q, (int64_t)t->ne[0]);
            if (moe_gguf_writer_write(w, q, rb))
                break;
            done += rb;
            if (tty && done >= next_report) {
                fprintf(stderr, "\rmoe-gen: %5.1f%% of %.2f GiB", 100.0 * (double)done / (double)total,
                        (double)total / (1 << 30));
                next_report = done + (total >> 8);
            }
        }
    }
    if (tty)
        fprintf(stderr, "\n");
    free(row);
    free(q);
    for (int i = 0; i < v.n; i++)
        free(v.tok[i]);
    for (int i = 0; i < v.n_merges; i++)
        free(v.merges[i]);
    free(v.tok);
    free(v.len);
    free(v.type);
    free(v.score);
    free(v.merges);
    if (moe_gguf_writer_finish(w, &d)) {
        fprintf(stderr, "moe-gen: %s\n", d.msg);
        return 1;
    }
    if (!quiet)
        fprintf(stderr, "moe-gen: wrote %s: %s, %d tensors, %.2f MiB of weights, %d-token vocabulary\n",
                out, s->arch, n_tensors, (double)total / (1 << 20), v.n);
    return 0;
}

/* ---- command line ---------------------------------------------------- */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: moe-gen [--preset NAME] [--arch llama|qwen3moe] [--type F32|F16|BF16|Q8_0|Q4_0]\n"
            "               [--seed N] [--n-embd N] [--n-layer N] [--n-head N] [--n-head-kv N]\n"
            "               [--head-dim N] [--n-expert N] [--n-expert-used N] [--n-ff-exp N]\n"
            "               [--n-vocab N] [--ctx N] [--quiet] -o OUT.gguf\n"
            "presets (flags after --preset override its values):");
    for (size_t i = 0; i < sizeof(presets) / sizeof(presets[0]); i++)
        fprintf(f, " %s", presets[i].name);
    fprintf(f, "\n");
}

static int parse_num(const char *flag, const char *v, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long x = v ? strtol(v, &end, 10) : 0;
    if (v == NULL || errno || end == v || *end || x < lo || x > hi) {
        fprintf(stderr, "moe-gen: %s '%s': expected an integer in %ld..%ld\n", flag, v ? v : "",
                lo, hi);
        return -1;
    }
    *out = x;
    return 0;
}

int main(int argc, char **argv)
{
    struct spec s = presets[0].s;
    const char *out = NULL;
    int quiet = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        long x = 0;
        struct { const char *flag; int *dst; long lo, hi; } nums[] = {
            { "--n-embd", &s.n_embd, 32, 65536 }, { "--n-layer", &s.n_layer, 1, 256 },
            { "--n-head", &s.n_head, 1, 1024 }, { "--n-head-kv", &s.n_head_kv, 1, 1024 },
            { "--head-dim", &s.head_dim, 2, 1024 }, { "--n-expert", &s.n_expert, 1, 1024 },
            { "--n-expert-used", &s.n_expert_used, 1, 1024 }, { "--n-ff-exp", &s.n_ff_exp, 32, 1 << 20 },
            { "--n-vocab", &s.n_vocab, 0, 1 << 22 }, { "--ctx", &s.n_ctx, 1, 1 << 24 },
        };
        int matched = 0;
        for (size_t k = 0; k < sizeof(nums) / sizeof(nums[0]); k++) {
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
            size_t k = 0;
            while (k < sizeof(presets) / sizeof(presets[0]) && strcmp(presets[k].name, v) != 0)
                k++;
            if (k == sizeof(presets) / sizeof(presets[0])) {
                fprintf(stderr, "moe-gen: unknown preset '%s'\n", v);
                usage(stderr);
                return 2;
            }
            s = presets[k].s;
            i++;
        } else if (strcmp(a, "--arch") == 0 && v) {
            if (strcmp(v, "llama") != 0 && strcmp(v, "qwen3moe") != 0) {
                fprintf(stderr, "moe-gen: --arch '%s': expected llama or qwen3moe\n", v);
                return 2;
            }
            s.arch = strcmp(v, "llama") == 0 ? "llama" : "qwen3moe";
            i++;
        } else if (strcmp(a, "--type") == 0 && v) {
            int t = moe_dtype_from_name(v);
            if (t < 0 || !moe_quantize_supported((uint32_t)t)) {
                fprintf(stderr, "moe-gen: --type '%s': expected F32, F16, BF16, Q8_0 or Q4_0\n", v);
                return 2;
            }
            s.type = (uint32_t)t;
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
    if (s.n_expert_used > s.n_expert) {
        fprintf(stderr, "moe-gen: --n-expert-used %d exceeds --n-expert %d\n", s.n_expert_used, s.n_expert);
        return 2;
    }
    if (s.head_dim % 2 != 0) {
        fprintf(stderr, "moe-gen: --head-dim %d must be even (RoPE rotates pairs)\n", s.head_dim);
        return 2;
    }
    return write_model(&s, out, quiet);
}
