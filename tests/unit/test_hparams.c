/* model/hparams on in-memory GGUFs built byte by byte here (neither
 * io/gguf_writer nor another test's helpers): what load reads and defaults, what validate, check_tensors and check_supported refuse and
 * with which message, tensor classification and the cache sizing numbers. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "io/gguf.h"
#include "model/hparams.h"
#include "tests/harness.h"

/* ---- bytes ------------------------------------------------------------- */

struct gb {
    uint8_t *p;
    size_t len, cap;
};

static void gb_bytes(struct gb *b, const void *src, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->len + n)
            cap *= 2;
        uint8_t *np = realloc(b->p, cap);
        if (np == NULL)
            abort(); /* test code */
        b->p = np;
        b->cap = cap;
    }
    if (n)
        memcpy(b->p + b->len, src, n);
    b->len += n;
}

/* GGUF is little-endian, as are the hosts we build for. */
static void gb_u8(struct gb *b, uint8_t v) { gb_bytes(b, &v, 1); }
static void gb_u32(struct gb *b, uint32_t v) { gb_bytes(b, &v, 4); }
static void gb_u64(struct gb *b, uint64_t v) { gb_bytes(b, &v, 8); }
static void gb_f32(struct gb *b, float v) { gb_bytes(b, &v, 4); }

static void gb_str(struct gb *b, const char *s)
{
    gb_u64(b, strlen(s));
    gb_bytes(b, s, strlen(s));
}

static void gb_pad(struct gb *b, size_t align)
{
    while (b->len % align)
        gb_u8(b, 0);
}

/* ---- a GGUF made of a list of keys and F32 tensors ---------------------- */

enum kv_kind { KV_U32, KV_I32, KV_F32, KV_STR, KV_BOOL, KV_STRARR };

struct kv {
    char key[96];
    enum kv_kind kind;
    uint32_t u;
    int32_t i;
    float f;
    const char *s;
};

struct tensor {
    char name[64];
    uint32_t n_dims;
    uint64_t ne[4];
};

struct spec {
    int n_kv, n_t;
    struct kv kv[48];
    struct tensor t[32];
};

static struct kv *spec_kv(struct spec *s, const char *key)
{
    for (int i = 0; i < s->n_kv; i++)
        if (strcmp(s->kv[i].key, key) == 0)
            return &s->kv[i];
    MOE_ASSERT(s->n_kv < (int)(sizeof(s->kv) / sizeof(s->kv[0])));
    struct kv *k = &s->kv[s->n_kv++];
    memset(k, 0, sizeof(*k));
    snprintf(k->key, sizeof(k->key), "%s", key);
    return k;
}

static void set_u32(struct spec *s, const char *key, uint32_t v)
{
    struct kv *k = spec_kv(s, key);
    k->kind = KV_U32;
    k->u = v;
}

static void set_i32(struct spec *s, const char *key, int32_t v)
{
    struct kv *k = spec_kv(s, key);
    k->kind = KV_I32;
    k->i = v;
}

static void set_f32(struct spec *s, const char *key, float v)
{
    struct kv *k = spec_kv(s, key);
    k->kind = KV_F32;
    k->f = v;
}

static void set_str(struct spec *s, const char *key, const char *v)
{
    struct kv *k = spec_kv(s, key);
    k->kind = KV_STR;
    k->s = v;
}

static void set_bool(struct spec *s, const char *key, bool v)
{
    struct kv *k = spec_kv(s, key);
    k->kind = KV_BOOL;
    k->u = v;
}

/* An array of n strings "t0", "t1", ... */
static void set_tokens(struct spec *s, const char *key, uint32_t n)
{
    struct kv *k = spec_kv(s, key);
    k->kind = KV_STRARR;
    k->u = n;
}

static void del_kv(struct spec *s, const char *key)
{
    for (int i = 0; i < s->n_kv; i++)
        if (strcmp(s->kv[i].key, key) == 0) {
            memmove(&s->kv[i], &s->kv[i + 1], (size_t)(s->n_kv - i - 1) * sizeof(s->kv[0]));
            s->n_kv--;
            return;
        }
}

static struct tensor *find_t(struct spec *s, const char *name)
{
    for (int i = 0; i < s->n_t; i++)
        if (strcmp(s->t[i].name, name) == 0)
            return &s->t[i];
    return NULL;
}

static void add_t(struct spec *s, const char *name, uint32_t n_dims, uint64_t a, uint64_t b, uint64_t c)
{
    MOE_ASSERT(s->n_t < (int)(sizeof(s->t) / sizeof(s->t[0])));
    struct tensor *t = &s->t[s->n_t++];
    snprintf(t->name, sizeof(t->name), "%s", name);
    t->n_dims = n_dims;
    t->ne[0] = a;
    t->ne[1] = n_dims > 1 ? b : 1;
    t->ne[2] = n_dims > 2 ? c : 1;
    t->ne[3] = 1;
}

static void del_t(struct spec *s, const char *name)
{
    struct tensor *t = find_t(s, name);
    MOE_ASSERT(t != NULL);
    memmove(t, t + 1, (size_t)(s->n_t - (t - s->t) - 1) * sizeof(*t));
    s->n_t--;
}

static uint64_t t_bytes(const struct tensor *t)
{
    return t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3] * 4;
}

static void build(struct gb *b, const struct spec *s)
{
    memset(b, 0, sizeof(*b));
    gb_bytes(b, "GGUF", 4);
    gb_u32(b, 3);
    gb_u64(b, (uint64_t)s->n_t);
    gb_u64(b, (uint64_t)s->n_kv);
    for (int i = 0; i < s->n_kv; i++) {
        const struct kv *k = &s->kv[i];
        gb_str(b, k->key);
        switch (k->kind) {
        case KV_U32: gb_u32(b, MOE_GGUF_UINT32); gb_u32(b, k->u); break;
        case KV_I32: gb_u32(b, MOE_GGUF_INT32); gb_u32(b, (uint32_t)k->i); break;
        case KV_F32: gb_u32(b, MOE_GGUF_FLOAT32); gb_f32(b, k->f); break;
        case KV_STR: gb_u32(b, MOE_GGUF_STRING); gb_str(b, k->s); break;
        case KV_BOOL: gb_u32(b, MOE_GGUF_BOOL); gb_u8(b, (uint8_t)k->u); break;
        case KV_STRARR:
            gb_u32(b, MOE_GGUF_ARRAY);
            gb_u32(b, MOE_GGUF_STRING);
            gb_u64(b, k->u);
            for (uint32_t j = 0; j < k->u; j++) {
                char tok[16];
                snprintf(tok, sizeof(tok), "t%u", j);
                gb_str(b, tok);
            }
            break;
        }
    }
    uint64_t off = 0;
    for (int i = 0; i < s->n_t; i++) {
        const struct tensor *t = &s->t[i];
        gb_str(b, t->name);
        gb_u32(b, t->n_dims);
        for (uint32_t d = 0; d < t->n_dims; d++)
            gb_u64(b, t->ne[d]);
        gb_u32(b, MOE_DTYPE_F32);
        gb_u64(b, off);
        off += (t_bytes(t) + 31) / 32 * 32;
    }
    gb_pad(b, 32);
    for (int i = 0; i < s->n_t; i++) {
        const uint64_t n = t_bytes(&s->t[i]);
        for (uint64_t j = 0; j < n; j++)
            gb_u8(b, 0);
        gb_pad(b, 32);
    }
}

/* A small Mixtral-layout model: n_embd 8, 2 heads (1 kv), 2 layers, 4
 * experts top-2, FFN 16, vocab 10. */
#define E 8
#define F 16
#define X 4
#define V 10

static void base(struct spec *s)
{
    memset(s, 0, sizeof(*s));
    set_str(s, "general.architecture", "llama");
    set_str(s, "general.name", "unit");
    set_u32(s, "general.file_type", 0);
    set_u32(s, "llama.context_length", 64);
    set_u32(s, "llama.embedding_length", E);
    set_u32(s, "llama.block_count", 2);
    set_u32(s, "llama.feed_forward_length", F);
    set_u32(s, "llama.attention.head_count", 2);
    set_u32(s, "llama.attention.head_count_kv", 1);
    set_f32(s, "llama.attention.layer_norm_rms_epsilon", 1e-5f);
    set_f32(s, "llama.rope.freq_base", 10000.0f);
    set_u32(s, "llama.expert_count", X);
    set_u32(s, "llama.expert_used_count", 2);
    set_u32(s, "llama.vocab_size", V);
    set_str(s, "tokenizer.ggml.model", "llama");
    add_t(s, "token_embd.weight", 2, E, V, 0);
    for (int l = 0; l < 2; l++) {
        char n[64];
        snprintf(n, sizeof(n), "blk.%d.attn_norm.weight", l);
        add_t(s, n, 1, E, 0, 0);
        snprintf(n, sizeof(n), "blk.%d.attn_q.weight", l);
        add_t(s, n, 2, E, E, 0);
        snprintf(n, sizeof(n), "blk.%d.ffn_gate_inp.weight", l);
        add_t(s, n, 2, E, X, 0);
        snprintf(n, sizeof(n), "blk.%d.ffn_gate_exps.weight", l);
        add_t(s, n, 3, E, F, X);
        snprintf(n, sizeof(n), "blk.%d.ffn_up_exps.weight", l);
        add_t(s, n, 3, E, F, X);
        snprintf(n, sizeof(n), "blk.%d.ffn_down_exps.weight", l);
        add_t(s, n, 3, F, E, X);
    }
    add_t(s, "output_norm.weight", 1, E, 0, 0);
    add_t(s, "output.weight", 2, E, V, 0);
}

struct opened {
    struct gb b;
    struct moe_gguf *g;
};

static int open_spec(struct opened *o, const struct spec *s, struct moe_diag *d)
{
    build(&o->b, s);
    o->g = NULL;
    return moe_gguf_open_mem(&o->g, o->b.p, o->b.len, "unit.gguf", d);
}

static void close_spec(struct opened *o)
{
    moe_gguf_close(o->g);
    free(o->b.p);
}

/* load + validate + check_tensors: the first error, with its message in d. */
static int run_all(const struct spec *s, struct moe_hparams *hp, struct moe_diag *d)
{
    struct opened o;
    int rc = open_spec(&o, s, d);
    if (rc == 0)
        rc = moe_hparams_load(hp, o.g, d);
    if (rc == 0)
        rc = moe_hparams_validate(hp, o.g, d);
    if (rc == 0)
        rc = moe_hparams_check_tensors(hp, o.g, d);
    close_spec(&o);
    return rc;
}

#define CHECK_HAS(msg, sub) CHECK_MSG(strstr((msg), (sub)) != NULL, "'%s' not in '%s'", (sub), (msg))

/* ---- cases ------------------------------------------------------------- */

static void test_base_model(void)
{
    struct spec s;
    base(&s);
    struct opened o;
    struct moe_diag d = { 0 };
    CHECK_MSG(open_spec(&o, &s, &d) == 0, "%s", d.msg);
    struct moe_hparams hp;
    CHECK_MSG(moe_hparams_load(&hp, o.g, &d) == 0, "%s", d.msg);
    CHECK_STR(hp.arch, "llama");
    CHECK_STR(hp.name, "unit");
    CHECK_INT(hp.n_embd, ==, E);
    CHECK_INT(hp.n_layer, ==, 2);
    CHECK_INT(hp.n_head, ==, 2);
    CHECK_INT(hp.n_head_kv, ==, 1);
    CHECK_INT(hp.head_dim, ==, E / 2);    /* default n_embd / n_head */
    CHECK_INT(hp.head_dim_v, ==, E / 2);
    CHECK_INT(hp.n_rot, ==, E / 2);
    CHECK_INT(hp.n_expert, ==, X);
    CHECK_INT(hp.n_expert_used, ==, 2);
    CHECK_INT(hp.n_ff_exp, ==, F);        /* llama: feed_forward_length */
    CHECK_INT(hp.n_vocab, ==, V);
    CHECK_INT(hp.n_ctx_train, ==, 64);
    CHECK(hp.is_moe);
    CHECK_NEAR(hp.rms_eps, 1e-5, 1e-12);
    CHECK_NEAR(hp.rope_freq_base, 10000.0, 0);
    CHECK_STR(hp.tokenizer_model, "llama");
    CHECK_MSG(moe_hparams_validate(&hp, o.g, &d) == 0, "%s", d.msg);
    CHECK_MSG(moe_hparams_check_tensors(&hp, o.g, &d) == 0, "%s", d.msg);
    CHECK_MSG(moe_hparams_check_supported(&hp, "unit.gguf", &d) == 0, "%s", d.msg);

    struct moe_sizes *sz = malloc(sizeof(*sz));
    CHECK(sz != NULL);
    moe_sizes_compute(sz, o.g, &hp);
    const uint64_t exp_layer = 3ull * E * F * X * 4;
    uint64_t total = 0;
    for (int i = 0; i < s.n_t; i++)
        total += t_bytes(&s.t[i]);
    CHECK_U64(sz->total_bytes, ==, total);
    CHECK_U64(sz->expert_bytes, ==, 2 * exp_layer);
    CHECK_U64(sz->dense_bytes, ==, total - 2 * exp_layer);
    CHECK_U64(sz->layer_expert_bytes[0], ==, exp_layer);
    CHECK_U64(sz->layer_expert_bytes[1], ==, exp_layer);
    CHECK_INT(sz->n_moe_layers, ==, 2);
    CHECK_INT(sz->n_layers_seen, ==, 2);
    CHECK_INT(sz->n_expert_tensors, ==, 6);
    CHECK_U64(sz->bytes_per_expert, ==, exp_layer / X);
    CHECK_U64(sz->bytes_per_expert_avg, ==, exp_layer / X);
    CHECK_U64(sz->token_working_set, ==, 2ull * 2 * (exp_layer / X));
    CHECK_INT(sz->tensors_by_type[MOE_DTYPE_F32], ==, s.n_t);
    CHECK_U64(sz->bytes_by_type[MOE_DTYPE_F32], ==, total);
    free(sz);
    close_spec(&o);
}

static void test_defaults_and_fallbacks(void)
{
    struct spec s;
    struct moe_hparams hp;
    struct moe_diag d = { 0 };
    /* expert_feed_forward_length wins over feed_forward_length */
    base(&s);
    set_u32(&s, "llama.feed_forward_length", 99);
    set_u32(&s, "llama.expert_feed_forward_length", F);
    CHECK_MSG(run_all(&s, &hp, &d) == 0, "%s", d.msg);
    CHECK_INT(hp.n_ff_exp, ==, F);
    CHECK_INT(hp.n_ff, ==, 99);
    /* n_vocab: the tokens array when vocab_size is absent */
    base(&s);
    del_kv(&s, "llama.vocab_size");
    set_tokens(&s, "tokenizer.ggml.tokens", V);
    CHECK_MSG(run_all(&s, &hp, &d) == 0, "%s", d.msg);
    CHECK_INT(hp.n_vocab, ==, V);
    /* ... else token_embd's ne[1] */
    base(&s);
    del_kv(&s, "llama.vocab_size");
    CHECK_MSG(run_all(&s, &hp, &d) == 0, "%s", d.msg);
    CHECK_INT(hp.n_vocab, ==, V);
    /* explicit key/value lengths and rope dims; MLA and gpt-oss keys */
    base(&s);
    set_u32(&s, "llama.attention.key_length", 6);
    set_u32(&s, "llama.attention.value_length", 5);
    set_u32(&s, "llama.rope.dimension_count", 2);
    set_u32(&s, "llama.attention.sliding_window", 16);
    set_u32(&s, "llama.attention.q_lora_rank", 3);
    set_u32(&s, "llama.attention.kv_lora_rank", 7);
    set_u32(&s, "llama.attention.key_length_mla", 9);
    set_u32(&s, "llama.attention.value_length_mla", 11);
    set_u32(&s, "llama.expert_shared_count", 1);
    set_u32(&s, "llama.expert_gating_func", 2);
    set_f32(&s, "llama.expert_weights_scale", 2.5f);
    set_bool(&s, "llama.expert_weights_norm", true);
    set_str(&s, "llama.rope.scaling.type", "yarn");
    set_f32(&s, "llama.rope.scaling.factor", 40.0f);
    set_u32(&s, "llama.rope.scaling.original_context_length", 4096);
    set_f32(&s, "llama.rope.scaling.yarn_log_multiplier", 0.1f);
    CHECK_MSG(run_all(&s, &hp, &d) == 0, "%s", d.msg);
    CHECK_INT(hp.head_dim, ==, 6);
    CHECK_INT(hp.head_dim_v, ==, 5);
    CHECK_INT(hp.n_rot, ==, 2);
    CHECK_INT(hp.sliding_window, ==, 16);
    CHECK_INT(hp.q_lora_rank, ==, 3);
    CHECK_INT(hp.kv_lora_rank, ==, 7);
    CHECK_INT(hp.key_length_mla, ==, 9);
    CHECK_INT(hp.value_length_mla, ==, 11);
    CHECK_INT(hp.n_expert_shared, ==, 1);
    CHECK_INT(hp.n_ff_shexp, ==, F);      /* shared count x n_ff_exp */
    CHECK_INT(hp.expert_gating_func, ==, 2);
    CHECK_NEAR(hp.expert_weights_scale, 2.5, 0);
    CHECK(hp.expert_weights_norm);
    CHECK_STR(hp.rope_scaling_type, "yarn");
    CHECK_NEAR(hp.rope_scaling_factor, 40.0, 0);
    CHECK_INT(hp.rope_scaling_orig_ctx, ==, 4096);
    CHECK_NEAR(hp.rope_yarn_log_mul, 0.1, 1e-7);
}

static void test_missing_keys(void)
{
    static const char *const required[] = {
        "llama.embedding_length", "llama.block_count", "llama.attention.head_count",
        "llama.expert_used_count",
    };
    for (size_t i = 0; i < sizeof(required) / sizeof(required[0]); i++) {
        struct spec s;
        base(&s);
        del_kv(&s, required[i]);
        struct moe_hparams hp;
        struct moe_diag d = { 0 };
        CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
        CHECK_HAS(d.msg, "unit.gguf");
        CHECK_HAS(d.msg, required[i]);
    }
    /* a MoE architecture needs expert_count; llama without it is dense
     * (validate passes the keys, check_tensors sees the expert tensors) */
    struct spec s;
    base(&s);
    set_str(&s, "general.architecture", "qwen3moe");
    for (int i = 0; i < s.n_kv; i++)
        if (strncmp(s.kv[i].key, "llama.", 6) == 0) {
            char k[96];
            snprintf(k, sizeof(k), "qwen3moe.%s", s.kv[i].key + 6);
            snprintf(s.kv[i].key, sizeof(s.kv[i].key), "%s", k);
        }
    struct moe_hparams hp;
    struct moe_diag d = { 0 };
    CHECK_MSG(run_all(&s, &hp, &d) == 0, "%s", d.msg);
    del_kv(&s, "qwen3moe.expert_count");
    del_kv(&s, "qwen3moe.expert_used_count");
    moe_diag_clear(&d);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "missing key 'qwen3moe.expert_count'");
    base(&s);
    del_kv(&s, "llama.expert_count");
    del_kv(&s, "llama.expert_used_count");
    moe_diag_clear(&d);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "blk.0.ffn_gate_exps.weight");
    CHECK_HAS(d.msg, "expert_count");
    /* deepseek2 (MLA) needs kv_lora_rank */
    base(&s);
    set_str(&s, "general.architecture", "deepseek2");
    for (int i = 0; i < s.n_kv; i++)
        if (strncmp(s.kv[i].key, "llama.", 6) == 0) {
            char k[96];
            snprintf(k, sizeof(k), "deepseek2.%s", s.kv[i].key + 6);
            snprintf(s.kv[i].key, sizeof(s.kv[i].key), "%s", k);
        }
    moe_diag_clear(&d);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "deepseek2.attention.kv_lora_rank");
    set_u32(&s, "deepseek2.attention.kv_lora_rank", 4);
    moe_diag_clear(&d);
    CHECK_MSG(run_all(&s, &hp, &d) == 0, "%s", d.msg);
    /* expert FFN width: neither key */
    base(&s);
    del_kv(&s, "llama.feed_forward_length");
    moe_diag_clear(&d);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "expert_feed_forward_length");
}

static void test_bad_values(void)
{
    struct spec s;
    struct moe_hparams hp;
    struct moe_diag d = { 0 };
    /* top-k above the expert count: load already refuses */
    base(&s);
    set_u32(&s, "llama.expert_used_count", X + 1);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "unit.gguf");
    CHECK_HAS(d.msg, "'llama.expert_used_count' = 5 exceeds 'llama.expert_count' = 4");
    /* heads not a multiple of kv heads */
    base(&s);
    set_u32(&s, "llama.attention.head_count", 4);
    set_u32(&s, "llama.attention.head_count_kv", 3);
    moe_diag_clear(&d);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "'llama.attention.head_count' = 4 is not a multiple of"
                     " 'llama.attention.head_count_kv' = 3");
    /* kv heads above heads */
    base(&s);
    set_u32(&s, "llama.attention.head_count_kv", 4);
    moe_diag_clear(&d);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "head_count_kv' = 4 exceeds");
    /* zero where it would divide */
    static const char *const nonzero[] = {
        "llama.embedding_length", "llama.attention.head_count", "llama.attention.head_count_kv",
        "llama.expert_used_count", "llama.block_count",
    };
    for (size_t i = 0; i < sizeof(nonzero) / sizeof(nonzero[0]); i++) {
        base(&s);
        set_u32(&s, nonzero[i], 0);
        moe_diag_clear(&d);
        CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
        CHECK_HAS(d.msg, nonzero[i]);
    }
    /* caps: over DIM_CAP at load, over the expert cap at validate */
    base(&s);
    set_u32(&s, "llama.embedding_length", 1u << 30);
    moe_diag_clear(&d);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "'llama.embedding_length' = 1073741824, expected at most");
    base(&s);
    set_u32(&s, "llama.expert_count", 1u << 20);
    moe_diag_clear(&d);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "'llama.expert_count' = 1048576, expected at most 65536");
    base(&s);
    set_u32(&s, "llama.block_count", 5000);
    moe_diag_clear(&d);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "'llama.block_count' = 5000, expected at most 4096");
    /* leading dense layers cannot exceed the layers, or leave none MoE */
    base(&s);
    set_u32(&s, "llama.leading_dense_block_count", 2);
    moe_diag_clear(&d);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "leading_dense_block_count");
    /* expert groups must divide the experts */
    base(&s);
    set_u32(&s, "llama.expert_group_count", 3);
    set_u32(&s, "llama.expert_group_used_count", 1);
    moe_diag_clear(&d);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "expert_group_count");
    /* rope dims above the head dim */
    base(&s);
    set_u32(&s, "llama.rope.dimension_count", 8);
    moe_diag_clear(&d);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "'llama.rope.dimension_count' = 8 exceeds the head dim 4");
    /* non-finite / negative floats */
    base(&s);
    set_f32(&s, "llama.rope.freq_base", -1.0f);
    moe_diag_clear(&d);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "llama.rope.freq_base");
    base(&s);
    set_f32(&s, "llama.attention.layer_norm_rms_epsilon", 2.0f);
    moe_diag_clear(&d);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "layer_norm_rms_epsilon");
}

static void test_wrong_types(void)
{
    struct spec s;
    struct moe_hparams hp;
    struct moe_diag d = { 0 };
    /* a string where a count belongs */
    base(&s);
    set_str(&s, "llama.block_count", "two");
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "llama.block_count");
    /* a negative integer for a count */
    base(&s);
    set_i32(&s, "llama.expert_count", -4);
    moe_diag_clear(&d);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "llama.expert_count");
    /* an integer type that fits is fine */
    base(&s);
    set_i32(&s, "llama.expert_count", X);
    moe_diag_clear(&d);
    CHECK_MSG(run_all(&s, &hp, &d) == 0, "%s", d.msg);
    CHECK_INT(hp.n_expert, ==, X);
    /* a string for a float, an integer for the architecture, a float for a bool */
    base(&s);
    set_str(&s, "llama.rope.freq_base", "1e4");
    moe_diag_clear(&d);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "llama.rope.freq_base");
    base(&s);
    set_u32(&s, "general.architecture", 1);
    moe_diag_clear(&d);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "general.architecture");
    base(&s);
    set_f32(&s, "llama.expert_weights_norm", 1.0f);
    moe_diag_clear(&d);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "llama.expert_weights_norm");
}

static void test_tensors_disagree(void)
{
    struct spec s;
    struct moe_hparams hp;
    struct moe_diag d = { 0 };
    /* token_embd must be [n_embd, n_vocab] */
    base(&s);
    find_t(&s, "token_embd.weight")->ne[1] = V + 1;
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "unit.gguf: tensor 'token_embd.weight' has shape [8, 11], expected"
                     " [n_embd 8, n_vocab 10]");
    base(&s);
    del_t(&s, "token_embd.weight");
    moe_diag_clear(&d);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "missing tensor 'token_embd.weight'");
    /* expert tensors' last dim is n_expert */
    base(&s);
    find_t(&s, "blk.1.ffn_up_exps.weight")->ne[2] = X - 1;
    moe_diag_clear(&d);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "'blk.1.ffn_up_exps.weight' has shape [8, 16, 3], expected its last dim"
                     " to be n_expert 4");
    /* ... biases too */
    base(&s);
    add_t(&s, "blk.0.ffn_down_exps.bias", 2, E, X + 1, 0);
    moe_diag_clear(&d);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "blk.0.ffn_down_exps.bias");
    /* expert widths */
    base(&s);
    find_t(&s, "blk.0.ffn_down_exps.weight")->ne[0] = F * 2;
    moe_diag_clear(&d);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "'blk.0.ffn_down_exps.weight' has shape [32, 8, 4], expected"
                     " [n_ff_exp 16, n_embd 8, n_expert 4]");
    /* router */
    base(&s);
    find_t(&s, "blk.0.ffn_gate_inp.weight")->ne[1] = X * 2;
    moe_diag_clear(&d);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "blk.0.ffn_gate_inp.weight");
    /* a layer beyond block_count */
    base(&s);
    add_t(&s, "blk.7.attn_norm.weight", 1, E, 0, 0);
    moe_diag_clear(&d);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "'blk.7.attn_norm.weight' is in layer 7, but 'llama.block_count' = 2");
    /* a MoE model without expert tensors */
    base(&s);
    for (int l = 0; l < 2; l++)
        for (int k = 0; k < 3; k++) {
            static const char *const w[] = { "gate", "up", "down" };
            char n[64];
            snprintf(n, sizeof(n), "blk.%d.ffn_%s_exps.weight", l, w[k]);
            del_t(&s, n);
        }
    moe_diag_clear(&d);
    CHECK_INT(run_all(&s, &hp, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "no expert tensors");
    /* tied output (no output.weight) is fine */
    base(&s);
    del_t(&s, "output.weight");
    moe_diag_clear(&d);
    CHECK_MSG(run_all(&s, &hp, &d) == 0, "%s", d.msg);
}

static void test_supported(void)
{
    struct spec s;
    struct moe_hparams hp;
    struct moe_diag d = { 0 };
    struct opened o;
    /* an unknown architecture loads and validates (info describes it)... */
    base(&s);
    set_str(&s, "general.architecture", "mamba");
    CHECK_MSG(open_spec(&o, &s, &d) == 0, "%s", d.msg);
    CHECK_MSG(moe_hparams_load(&hp, o.g, &d) == 0, "%s", d.msg);
    CHECK_STR(hp.arch, "mamba");
    CHECK_INT(hp.n_embd, ==, 0); /* its keys are llama.*: not read */
    CHECK_MSG(moe_hparams_validate(&hp, o.g, &d) == 0, "%s", d.msg);
    close_spec(&o);
    /* ...but the supported check refuses it, listing the supported ones */
    CHECK_INT(moe_hparams_check_supported(&hp, "unit.gguf", &d), ==, MOE_EUNSUPPORTED);
    CHECK_HAS(d.msg, "unit.gguf: architecture 'mamba' is not supported; supported: ");
    CHECK_INT(moe_arch_desc_count(), >=, 6);
    for (size_t i = 0; i < moe_arch_desc_count(); i++) {
        const struct moe_arch_desc *a = moe_arch_desc_at(i);
        CHECK(a != NULL);
        CHECK(moe_arch_desc_find(a->name) == a);
        if (a->engine_supported)
            CHECK_HAS(d.msg, a->name);
    }
    CHECK(moe_arch_desc_at(moe_arch_desc_count()) == NULL);
    static const char *const six[] = { "llama", "qwen2moe", "qwen3moe", "olmoe", "deepseek2", "gpt-oss" };
    for (size_t i = 0; i < 6; i++)
        CHECK_MSG(moe_arch_desc_find(six[i]) != NULL, "%s", six[i]);
    CHECK(moe_arch_desc_find("gpt2") == NULL);
    CHECK(moe_arch_desc_find(NULL) == NULL);
    CHECK(!moe_arch_desc_find("llama")->always_moe);
    CHECK(moe_arch_desc_find("deepseek2")->mla);
    CHECK(moe_arch_desc_find("glm4moe")->sel_bias && moe_arch_desc_find("glm4moe")->always_moe);
    /* the list, also into a small buffer (truncated, terminated) */
    char list[256], small[8];
    moe_hparams_supported_archs(list, sizeof(list));
    CHECK_HAS(list, "qwen3moe");
    CHECK_HAS(list, "gpt-oss");
    moe_hparams_supported_archs(small, sizeof(small));
    CHECK_INT(strlen(small), <, sizeof(small));
    /* dense llama is refused as dense */
    base(&s);
    del_kv(&s, "llama.expert_count");
    del_kv(&s, "llama.expert_used_count");
    CHECK_MSG(open_spec(&o, &s, &d) == 0, "%s", d.msg);
    CHECK_MSG(moe_hparams_load(&hp, o.g, &d) == 0, "%s", d.msg);
    close_spec(&o);
    CHECK(!hp.is_moe);
    moe_diag_clear(&d);
    CHECK_INT(moe_hparams_check_supported(&hp, "unit.gguf", &d), ==, MOE_EUNSUPPORTED);
    CHECK_HAS(d.msg, "dense");
    /* no architecture at all */
    base(&s);
    del_kv(&s, "general.architecture");
    CHECK_MSG(open_spec(&o, &s, &d) == 0, "%s", d.msg);
    CHECK_MSG(moe_hparams_load(&hp, o.g, &d) == 0, "%s", d.msg);
    moe_diag_clear(&d);
    CHECK_INT(moe_hparams_validate(&hp, o.g, &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "missing key 'general.architecture'");
    close_spec(&o);
    moe_diag_clear(&d);
    CHECK_INT(moe_hparams_check_supported(&hp, "unit.gguf", &d), ==, MOE_EFORMAT);
    CHECK_HAS(d.msg, "general.architecture");
}

static void test_vocab_only(void)
{
    /* tokenizer metadata, a dense arch's keys, no tensors: load and the
     * tensor check pass, sizes are all 0 */
    struct spec s;
    memset(&s, 0, sizeof(s));
    set_str(&s, "general.architecture", "gpt2");
    set_u32(&s, "gpt2.embedding_length", 768);
    set_f32(&s, "gpt2.attention.layer_norm_epsilon", 1e-5f);
    set_str(&s, "tokenizer.ggml.model", "gpt2");
    set_str(&s, "tokenizer.ggml.pre", "gpt-2");
    set_tokens(&s, "tokenizer.ggml.tokens", 300);
    struct opened o;
    struct moe_diag d = { 0 };
    CHECK_MSG(open_spec(&o, &s, &d) == 0, "%s", d.msg);
    struct moe_hparams hp;
    CHECK_MSG(moe_hparams_load(&hp, o.g, &d) == 0, "%s", d.msg);
    CHECK_INT(hp.n_vocab, ==, 300);
    CHECK_NEAR(hp.norm_eps, 1e-5, 1e-12);
    CHECK_STR(hp.tokenizer_pre, "gpt-2");
    CHECK_MSG(moe_hparams_check_tensors(&hp, o.g, &d) == 0, "%s", d.msg);
    struct moe_sizes *sz = malloc(sizeof(*sz));
    CHECK(sz != NULL);
    moe_sizes_compute(sz, o.g, &hp);
    CHECK_U64(sz->total_bytes, ==, 0);
    CHECK_U64(sz->bytes_per_expert, ==, 0);
    CHECK_INT(sz->n_moe_layers, ==, 0);
    free(sz);
    close_spec(&o);
    /* no keys at all */
    memset(&s, 0, sizeof(s));
    CHECK_MSG(open_spec(&o, &s, &d) == 0, "%s", d.msg);
    CHECK_MSG(moe_hparams_load(&hp, o.g, &d) == 0, "%s", d.msg);
    CHECK_STR(hp.arch, "");
    CHECK_INT(hp.n_vocab, ==, 0);
    close_spec(&o);
}

static void test_classification(void)
{
    static const struct { const char *name; bool expert; int layer; } cases[] = {
        { "blk.0.ffn_gate_exps.weight", true, 0 },
        { "blk.12.ffn_down_exps.weight", true, 12 },
        { "blk.3.ffn_up_exps.bias", true, 3 },          /* gpt-oss expert biases */
        { "blk.3.ffn_gate_up_exps.weight", true, 3 },
        { "blk.0.ffn_gate_shexp.weight", false, 0 },    /* shared experts are dense */
        { "blk.0.ffn_down_shexp.weight", false, 0 },
        { "blk.0.ffn_gate_inp_shexp.weight", false, 0 },
        { "blk.0.ffn_gate_inp.weight", false, 0 },      /* router */
        { "blk.1.exp_probs_b.bias", false, 1 },         /* selection bias */
        { "blk.1.ffn_gate.weight", false, 1 },          /* deepseek2 dense layer */
        { "token_embd.weight", false, -1 },
        { "output.weight", false, -1 },
        { "ffn_gate_exps.weight", false, -1 },
        { "blk.x.ffn_up_exps.weight", false, -1 },
        { "blk..ffn_up_exps.weight", false, -1 },
        { "blk.-1.ffn_up_exps.weight", false, -1 },
        { "blk. 1.ffn_up_exps.weight", false, -1 },
        { "blk.+1.ffn_up_exps.weight", false, -1 },
        { "blk.1", false, -1 },
        { "blk.4096.ffn_up_exps.weight", false, -1 },   /* past MOE_MAX_LAYERS */
        { "blk.4095.ffn_up_exps.weight", true, 4095 },
        { "blk.1.ffn_up_exps", false, 1 },              /* no '.' after _exps */
        { "", false, -1 },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        CHECK_MSG(moe_tensor_is_expert(cases[i].name) == cases[i].expert, "'%s'", cases[i].name);
        CHECK_MSG(moe_tensor_layer(cases[i].name) == cases[i].layer, "'%s': %d", cases[i].name,
                  moe_tensor_layer(cases[i].name));
    }
}

static void test_sizes_uneven_layers(void)
{
    /* gpt-oss style: expert biases count as expert bytes; a wider layer
     * sets bytes_per_expert (the slot size), the average is below it */
    struct spec s;
    base(&s);
    add_t(&s, "blk.1.ffn_gate_exps.bias", 2, F, X, 0);
    add_t(&s, "blk.1.ffn_up_exps.bias", 2, F, X, 0);
    add_t(&s, "blk.1.ffn_down_exps.bias", 2, E, X, 0);
    add_t(&s, "blk.1.ffn_gate_shexp.weight", 2, E, F, 0);
    struct opened o;
    struct moe_diag d = { 0 };
    CHECK_MSG(open_spec(&o, &s, &d) == 0, "%s", d.msg);
    struct moe_hparams hp;
    CHECK_MSG(moe_hparams_load(&hp, o.g, &d) == 0, "%s", d.msg);
    CHECK_MSG(moe_hparams_check_tensors(&hp, o.g, &d) == 0, "%s", d.msg);
    struct moe_sizes *sz = malloc(sizeof(*sz));
    CHECK(sz != NULL);
    moe_sizes_compute(sz, o.g, &hp);
    const uint64_t l0 = 3ull * E * F * X * 4, l1 = l0 + (2ull * F + E) * X * 4;
    CHECK_U64(sz->layer_expert_bytes[0], ==, l0);
    CHECK_U64(sz->layer_expert_bytes[1], ==, l1);
    CHECK_U64(sz->expert_bytes, ==, l0 + l1);
    CHECK_U64(sz->bytes_per_expert, ==, l1 / X);
    CHECK_U64(sz->bytes_per_expert_avg, ==, (l0 / X + l1 / X) / 2);
    CHECK_U64(sz->total_bytes, ==, sz->dense_bytes + sz->expert_bytes);
    CHECK_INT(sz->n_expert_tensors, ==, 9);
    free(sz);
    close_spec(&o);
}

static void test_file_type_names(void)
{
    CHECK_STR(moe_file_type_name(0), "F32");
    CHECK_STR(moe_file_type_name(1), "F16");
    CHECK_STR(moe_file_type_name(2), "Q4_0");
    CHECK_STR(moe_file_type_name(7), "Q8_0");
    CHECK_STR(moe_file_type_name(15), "Q4_K_M");
    CHECK_STR(moe_file_type_name(38), "MXFP4_MOE");
    CHECK_STR(moe_file_type_name(1024 + 15), "Q4_K_M");
    CHECK(moe_file_type_name(4) == NULL);   /* removed Q4_1_SOME_F16 */
    CHECK(moe_file_type_name(999) == NULL);
}

/* Every row the engine runs states the rules the forward pass reads: a
 * gating function, the FFN norm's name, distinct names and enums, and the
 * clamped SwiGLU's constants where it is used. */
static void test_arch_rows_complete(void)
{
    for (size_t i = 0; i < moe_arch_desc_count(); i++) {
        const struct moe_arch_desc *a = moe_arch_desc_at(i);
        if (!a->engine_supported)
            continue;
        CHECK_MSG(a->gating == MOE_GATING_SOFTMAX || a->gating == MOE_GATING_SIGMOID ||
                  a->gating == MOE_GATING_SOFTMAX_TOPK, "%s: gating %d", a->name, (int)a->gating);
        CHECK_MSG(a->rope_mode == MOE_ROPE_NORM || a->rope_mode == MOE_ROPE_NEOX, "%s", a->name);
        CHECK_MSG(a->ffn_norm != NULL && a->ffn_norm[0], "%s: no FFN norm name", a->name);
        CHECK_MSG(!a->swiglu_oai || (a->swiglu_alpha > 0.0f && a->swiglu_limit > 0.0f), "%s", a->name);
        CHECK_MSG(!(a->qk_norm && a->qk_norm_full), "%s: two q/k norms", a->name);
        for (size_t j = 0; j < i; j++) {
            CHECK(strcmp(moe_arch_desc_at(j)->name, a->name) != 0);
            CHECK(moe_arch_desc_at(j)->arch != a->arch);
        }
    }
}

int main(void)
{
    MOE_TEST_RUN(test_base_model);
    MOE_TEST_RUN(test_defaults_and_fallbacks);
    MOE_TEST_RUN(test_missing_keys);
    MOE_TEST_RUN(test_bad_values);
    MOE_TEST_RUN(test_wrong_types);
    MOE_TEST_RUN(test_tensors_disagree);
    MOE_TEST_RUN(test_supported);
    MOE_TEST_RUN(test_vocab_only);
    MOE_TEST_RUN(test_classification);
    MOE_TEST_RUN(test_sizes_uneven_layers);
    MOE_TEST_RUN(test_file_type_names);
    MOE_TEST_RUN(test_arch_rows_complete);
    return moe_test_exit_code();
}
