/* The generator (MOE_GEN) against shared/ref's models:
 * - same tensor names in the same order, same shapes (the vocabulary
 *   dimension excepted: the vocabulary is built in), same per-tensor types
 *   as llama-quantize chose in the ref variant of that type;
 * - same metadata keys in the same order with the same value types (and
 *   array element types); token arrays differ in content only;
 * - its F16/Q8_0/Q4_0 files are its F32 file quantized (same seed), which
 *   with test_quant's bit-exactness makes them what llama-quantize would
 *   write from that F32 file;
 * - the engine loads and runs every variant;
 * - the same arguments give identical bytes, whatever the thread count;
 * - bad usage exits 2 with no file left, I/O errors exit 1. */
#include <math.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "io/gguf.h"
#include "kernels/cpu/quant.h"
#include "common/dtype.h"
#include "model/model.h"
#include "tests/harness.h"

static int gen(const char *args, const char *out)
{
    char cmd[8192];
    snprintf(cmd, sizeof(cmd), "%s %s --quiet -o '%s' 2>/dev/null", getenv("MOE_GEN"), args, out);
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

static int is_vocab_tensor(const char *name)
{
    return strcmp(name, "token_embd.weight") == 0 || strcmp(name, "output.weight") == 0;
}

static void gen_path(char *buf, size_t n, const char *preset, const char *type)
{
    snprintf(buf, n, "%s/%s-%s.gguf", moe_test_tmpdir(), preset, type);
}

/* Generates preset/type (once per test program) and returns its path. */
static const char *generated(const char *preset, const char *type)
{
    static char paths[16][4096];
    static int n;
    char p[4096];
    gen_path(p, sizeof(p), preset, type);
    for (int i = 0; i < n; i++)
        if (strcmp(paths[i], p) == 0)
            return paths[i];
    char args[256];
    snprintf(args, sizeof(args), "--preset %s --type %s", preset, type);
    if (gen(args, p) != 0 || n == 16)
        return NULL;
    snprintf(paths[n], sizeof(paths[n]), "%s", p);
    return paths[n++];
}

static void run_engine(const char *path)
{
    struct moe_model *m;
    struct moe_diag d = { 0 };
    struct moe_model_opts o = { .n_threads = 2, .n_ctx = 64 };
    CHECK_MSG(moe_model_load(&m, path, &o, &d) == 0, "%s", d.msg);
    struct moe_seq *s;
    if (moe_seq_create(&s, m, &d) != 0) {
        moe_model_free(m);
        CHECK_MSG(0, "%s", d.msg);
    }
    int32_t toks[4] = { 1, 10, 20, 30 };
    int nv = moe_model_cfg(m)->n_vocab, finite = 1;
    float *lg = malloc((size_t)nv * sizeof(float));
    int rc = lg ? moe_model_forward(m, s, toks, 4, lg, false, NULL, NULL, &d) : -1;
    for (int i = 0; rc == 0 && i < nv; i++)
        finite &= isfinite(lg[i]) ? 1 : 0;
    free(lg);
    moe_seq_free(s);
    moe_model_free(m);
    CHECK_MSG(rc == 0, "%s: forward: %s", path, d.msg);
    CHECK_MSG(finite, "%s: non-finite logits", path);
}

static void compare(const char *preset, const char *type, const char *ref_file)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    const char *out = generated(preset, type);
    CHECK_MSG(out != NULL, "moe-gen --preset %s --type %s failed", preset, type);
    char rpath[4096];
    snprintf(rpath, sizeof(rpath), "%s/models/%s", ref, ref_file);
    struct moe_gguf *g, *r;
    struct moe_diag d = { 0 };
    CHECK_MSG(moe_gguf_open(&g, out, &d) == 0, "%s", d.msg);
    if (moe_gguf_open(&r, rpath, &d) != 0) {
        moe_gguf_close(g);
        CHECK_MSG(0, "%s", d.msg);
    }
    int bad = 0;
    if (moe_gguf_n_tensors(g) != moe_gguf_n_tensors(r)) {
        MOE_FAIL_AT("%s %s: %llu tensors, ref %llu", preset, type, (unsigned long long)moe_gguf_n_tensors(g),
                    (unsigned long long)moe_gguf_n_tensors(r));
        bad = 1;
    }
    for (uint64_t i = 0; !bad && i < moe_gguf_n_tensors(r); i++) {
        const struct moe_gguf_tensor *rt = moe_gguf_tensor_at(r, i), *gt = moe_gguf_tensor_at(g, i);
        if (strcmp(gt->name, rt->name) != 0) {
            MOE_FAIL_AT("%s %s: tensor #%llu is %s, ref %s", preset, type, (unsigned long long)i, gt->name,
                        rt->name);
            bad = 1;
            break;
        }
        if (gt->n_dims != rt->n_dims || gt->dtype != rt->dtype) {
            MOE_FAIL_AT("%s %s: %s: %u dims %s, ref %u dims %s", preset, type, rt->name, gt->n_dims,
                        moe_dtype_name(gt->dtype), rt->n_dims, moe_dtype_name(rt->dtype));
            bad = 1;
        }
        for (int k = 0; k < 4 && !bad; k++)
            if (gt->ne[k] != rt->ne[k] && !(k == 1 && is_vocab_tensor(rt->name))) {
                MOE_FAIL_AT("%s %s: %s ne[%d] %llu, ref %llu", preset, type, rt->name, k,
                            (unsigned long long)gt->ne[k], (unsigned long long)rt->ne[k]);
                bad = 1;
            }
    }
    if (!bad && moe_gguf_n_kv(g) != moe_gguf_n_kv(r)) {
        MOE_FAIL_AT("%s %s: %llu keys, ref %llu", preset, type, (unsigned long long)moe_gguf_n_kv(g),
                    (unsigned long long)moe_gguf_n_kv(r));
        bad = 1;
    }
    for (uint64_t i = 0; !bad && i < moe_gguf_n_kv(r); i++) {
        const struct moe_gguf_kv *rk = moe_gguf_kv_at(r, i), *gk = moe_gguf_kv_at(g, i);
        if (strcmp(gk->key, rk->key) != 0) {
            MOE_FAIL_AT("%s %s: key #%llu is %s, ref %s", preset, type, (unsigned long long)i, gk->key, rk->key);
            bad = 1;
        } else if (gk->value.type != rk->value.type ||
                   (rk->value.type == MOE_GGUF_ARRAY && gk->value.v.arr.elem_type != rk->value.v.arr.elem_type)) {
            MOE_FAIL_AT("%s %s: key %s has type %s, ref %s", preset, type, rk->key,
                        moe_gguf_type_name(gk->value.type), moe_gguf_type_name(rk->value.type));
            bad = 1;
        }
    }
    /* the values that describe the model agree (the vocabulary aside) */
    static const char *same[] = { "general.architecture", "general.file_type", "general.quantization_version",
                                  "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template",
                                  "tokenizer.ggml.add_bos_token" };
    for (size_t i = 0; !bad && i < sizeof(same) / sizeof(same[0]); i++) {
        const struct moe_gguf_kv *rk = moe_gguf_find_kv(r, same[i]), *gk = moe_gguf_find_kv(g, same[i]);
        if (rk == NULL)
            continue;
        int eq = rk->value.type == MOE_GGUF_STRING
                     ? rk->value.v.str.len == gk->value.v.str.len &&
                           memcmp(rk->value.v.str.ptr, gk->value.v.str.ptr, rk->value.v.str.len) == 0
                     : rk->value.v.u64 == gk->value.v.u64;
        if (!eq) {
            MOE_FAIL_AT("%s %s: %s differs from the ref", preset, type, same[i]);
            bad = 1;
        }
    }
    char arch[64], key[128];
    struct moe_gguf_str a;
    if (!bad && moe_gguf_get_str(r, "general.architecture", &a, &d) == 0) {
        snprintf(arch, sizeof(arch), "%.*s", (int)a.len, a.ptr);
        static const char *dims[] = { "context_length", "embedding_length", "block_count", "feed_forward_length",
                                      "expert_feed_forward_length", "attention.head_count",
                                      "attention.head_count_kv", "attention.key_length", "rope.dimension_count",
                                      "expert_count", "expert_used_count" };
        for (size_t i = 0; i < sizeof(dims) / sizeof(dims[0]) && !bad; i++) {
            snprintf(key, sizeof(key), "%s.%s", arch, dims[i]);
            uint64_t x, y;
            if (moe_gguf_get_u64(r, key, &x, NULL) == 0 && (moe_gguf_get_u64(g, key, &y, NULL) != 0 || x != y)) {
                MOE_FAIL_AT("%s %s: %s differs from the ref", preset, type, key);
                bad = 1;
            }
        }
    }
    moe_gguf_close(r);
    moe_gguf_close(g);
    if (!bad)
        run_engine(out);
}

static void test_mixtral_f32(void) { compare("tiny-mixtral", "F32", "tiny-mixtral-F32.gguf"); }
static void test_mixtral_f16(void) { compare("tiny-mixtral", "F16", "tiny-mixtral-F16.gguf"); }
static void test_mixtral_q8_0(void) { compare("tiny-mixtral", "Q8_0", "tiny-mixtral-Q8_0.gguf"); }
/* llama-quantize's Q4_0 keeps attn_k/attn_v in Q8_0 (8 experts) and falls
 * back from Q6_K to Q8_0 for output.weight (rows of 64) */
static void test_mixtral_q4_0(void) { compare("tiny-mixtral", "Q4_0", "tiny-mixtral-Q4_0.gguf"); }
static void test_qwen3moe_f16(void) { compare("tiny-qwen3moe", "F16", "tiny-qwen3moe-F16.gguf"); }
static void test_qwen3moe_q8_0(void) { compare("tiny-qwen3moe", "Q8_0", "tiny-qwen3moe-Q8_0.gguf"); }

/* Variants without a ref file: the types follow the rules in moe-gen.c. */
static void test_other_types(void)
{
    static const struct { const char *preset, *type; } v[] = {
        { "tiny-qwen3moe", "Q4_0" }, { "tiny-qwen3moe", "BF16" }, { "tiny-qwen3moe", "F32" },
        { "tiny-mixtral", "BF16" },
    };
    for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
        const char *out = generated(v[i].preset, v[i].type);
        CHECK_MSG(out != NULL, "moe-gen --preset %s --type %s failed", v[i].preset, v[i].type);
        struct moe_gguf *g;
        struct moe_diag d = { 0 };
        CHECK_MSG(moe_gguf_open(&g, out, &d) == 0, "%s", d.msg);
        const int want = moe_dtype_from_name(v[i].type);
        int bad = 0, prev_layer = -2;
        for (uint64_t k = 0; k < moe_gguf_n_tensors(g) && !bad; k++) {
            const struct moe_gguf_tensor *t = moe_gguf_tensor_at(g, k);
            int expect = want;
            if (t->n_dims == 1 || strstr(t->name, "ffn_gate_inp"))
                expect = MOE_DTYPE_F32;
            else if (want == MOE_DTYPE_Q4_0 && strcmp(t->name, "output.weight") == 0)
                expect = t->ne[0] % 256 == 0 ? MOE_DTYPE_Q6_K : MOE_DTYPE_Q8_0; /* 16 experts: attn_k/attn_v stay Q4_0 */
            if ((int)t->dtype != expect) {
                MOE_FAIL_AT("%s %s: %s is %s, expected %s", v[i].preset, v[i].type, t->name,
                            moe_dtype_name(t->dtype), moe_dtype_name((uint32_t)expect));
                bad = 1;
            }
            /* F32 in model order, others in llama.cpp's loader order */
            int layer = -1;
            sscanf(t->name, "blk.%d.", &layer);
            if (want != MOE_DTYPE_F32 && layer < prev_layer) {
                MOE_FAIL_AT("%s %s: %s out of loader order", v[i].preset, v[i].type, t->name);
                bad = 1;
            }
            prev_layer = layer;
        }
        uint64_t ft = 99;
        if (!bad && (moe_gguf_get_u64(g, "general.file_type", &ft, NULL) != 0 ||
                     ft != (uint64_t)(want == MOE_DTYPE_F32 ? 0 : want == MOE_DTYPE_Q4_0 ? 2 : 32))) {
            MOE_FAIL_AT("%s %s: general.file_type %llu", v[i].preset, v[i].type, (unsigned long long)ft);
            bad = 1;
        }
        if (!bad && want == MOE_DTYPE_F32) {
            CHECK(strcmp(moe_gguf_tensor_at(g, 0)->name, "token_embd.weight") == 0);
            CHECK(strcmp(moe_gguf_kv_at(g, 2)->key, "general.file_type") == 0);
            CHECK(moe_gguf_find_kv(g, "general.quantization_version") == NULL);
        }
        moe_gguf_close(g);
        if (bad)
            return;
        run_engine(out);
    }
}

/* The quantized files of a seed are its F32 file quantized, tensor by
 * tensor (the same weights whatever the type and tensor order). */
static void check_quantized_from_f32(const char *preset, const char *type)
{
    const char *pf = generated(preset, "F32"), *pq = generated(preset, type);
    CHECK(pf != NULL && pq != NULL);
    struct moe_gguf *f, *q;
    struct moe_diag d = { 0 };
    CHECK_MSG(moe_gguf_open(&f, pf, &d) == 0, "%s", d.msg);
    if (moe_gguf_open(&q, pq, &d) != 0) {
        moe_gguf_close(f);
        CHECK_MSG(0, "%s", d.msg);
    }
    int bad = moe_gguf_map(f, &d) != 0 || moe_gguf_map(q, &d) != 0, compared = 0;
    uint8_t *buf = NULL;
    for (uint64_t i = 0; !bad && i < moe_gguf_n_tensors(q); i++) {
        const struct moe_gguf_tensor *tq = moe_gguf_tensor_at(q, i);
        const struct moe_gguf_tensor *tf = moe_gguf_find_tensor(f, tq->name);
        if (tf == NULL || tf->dtype != MOE_DTYPE_F32 || tf->n_elements != tq->n_elements) {
            MOE_FAIL_AT("%s: %s missing or not F32 in the F32 file", preset, tq->name);
            bad = 1;
            break;
        }
        buf = realloc(buf, tq->size);
        size_t rb = moe_dtype_row_bytes(tq->dtype, tq->ne[0], NULL);
        const float *src = moe_gguf_tensor_data(f, tf);
        for (uint64_t r = 0; buf && r < tq->n_elements / tq->ne[0]; r++)
            moe_quantize_row(tq->dtype, src + r * tq->ne[0], buf + r * rb, (int64_t)tq->ne[0]);
        if (buf == NULL || memcmp(buf, moe_gguf_tensor_data(q, tq), tq->size) != 0) {
            MOE_FAIL_AT("%s %s: %s is not the F32 tensor quantized", preset, type, tq->name);
            bad = 1;
        }
        compared++;
    }
    free(buf);
    moe_gguf_close(f);
    moe_gguf_close(q);
    CHECK(!bad && compared > 20);
}

static void test_quantized_from_f32(void)
{
    check_quantized_from_f32("tiny-mixtral", "F16");
    check_quantized_from_f32("tiny-mixtral", "Q8_0");
    check_quantized_from_f32("tiny-mixtral", "Q4_0");
    check_quantized_from_f32("tiny-qwen3moe", "Q4_0");
    check_quantized_from_f32("tiny-qwen3moe", "BF16");
}

static int same_file(const char *a, const char *b)
{
    size_t la = 0, lb = 0;
    char *x = moe_test_read_file(a, &la), *y = moe_test_read_file(b, &lb);
    int same = x && y && la == lb && memcmp(x, y, la) == 0;
    free(x);
    free(y);
    return same;
}

static void test_deterministic(void)
{
    char a[4096], b[4096];
    snprintf(a, sizeof(a), "%s/det-a.gguf", moe_test_tmpdir());
    snprintf(b, sizeof(b), "%s/det-b.gguf", moe_test_tmpdir());
    CHECK_INT(gen("--preset tiny-qwen3moe --type Q4_0 --seed 9 --threads 1", a), ==, 0);
    CHECK_INT(gen("--preset tiny-qwen3moe --type Q4_0 --seed 9 --threads 3", b), ==, 0);
    CHECK_MSG(same_file(a, b), "1 and 3 threads give different files");
    CHECK_INT(gen("--seed 9 --type Q4_0 --preset tiny-qwen3moe", b), ==, 0);
    CHECK_MSG(same_file(a, b), "flag order changes the file");
    CHECK_INT(gen("--preset tiny-qwen3moe --type Q4_0 --seed 10", b), ==, 0);
    CHECK_MSG(!same_file(a, b), "seeds 9 and 10 give the same file");
    /* flags override the preset wherever they stand; --n-vocab pads */
    CHECK_INT(gen("--n-layer 2 --n-vocab 1000 --preset tiny-qwen3moe", a), ==, 0);
    struct moe_gguf *g;
    struct moe_diag d = { 0 };
    CHECK_MSG(moe_gguf_open(&g, a, &d) == 0, "%s", d.msg);
    uint64_t nl = 0, eos = 0;
    const struct moe_gguf_value *toks = NULL;
    CHECK(moe_gguf_get_u64(g, "qwen3moe.block_count", &nl, &d) == 0 && nl == 2);
    CHECK(moe_gguf_get_arr(g, "tokenizer.ggml.tokens", MOE_GGUF_STRING, &toks, &d) == 0 && toks->v.arr.n == 1000);
    CHECK(moe_gguf_get_u64(g, "tokenizer.ggml.eos_token_id", &eos, &d) == 0 && eos == 997);
    const struct moe_gguf_str *s = toks->v.arr.data;
    CHECK(s[997].len == 13 && memcmp(s[997].ptr, "<|endoftext|>", 13) == 0);
    CHECK(s[999].len == 10 && memcmp(s[999].ptr, "<|im_end|>", 10) == 0);
    CHECK(moe_gguf_find_tensor(g, "token_embd.weight")->ne[1] == 1000);
    moe_gguf_close(g);
}

/* --residual-gain scales exactly the matrices that write into the residual
 * stream (F32, gain 0.5: a power of two, so exactly half) and nothing else */
static void test_residual_gain(void)
{
    char a[4096], b[4096];
    snprintf(a, sizeof(a), "%s/gain1.gguf", moe_test_tmpdir());
    snprintf(b, sizeof(b), "%s/gain05.gguf", moe_test_tmpdir());
    CHECK_INT(gen("--preset tiny-mixtral --type F32", a), ==, 0);
    CHECK_INT(gen("--preset tiny-mixtral --type F32 --residual-gain 0.5", b), ==, 0);
    struct moe_diag d = { 0 };
    struct moe_gguf *ga = NULL, *gb = NULL;
    CHECK_MSG(moe_gguf_open(&ga, a, &d) == 0 && moe_gguf_open(&gb, b, &d) == 0, "%s", d.msg);
    int halved = 0, same = 0;
    for (uint64_t i = 0; i < moe_gguf_n_tensors(ga); i++) {
        const struct moe_gguf_tensor *ta = moe_gguf_tensor_at(ga, i);
        const struct moe_gguf_tensor *tb = moe_gguf_find_tensor(gb, ta->name);
        CHECK(tb != NULL && tb->size == ta->size && ta->dtype == MOE_DTYPE_F32);
        float *x = malloc(ta->size), *y = malloc(ta->size);
        CHECK(moe_gguf_pread(ga, ta, 0, x, ta->size, &d) == 0 && moe_gguf_pread(gb, tb, 0, y, tb->size, &d) == 0);
        const int residual = strstr(ta->name, "attn_output") != NULL || strstr(ta->name, "ffn_down") != NULL;
        int ok = 1;
        for (uint64_t k = 0; k < ta->n_elements; k++)
            ok &= residual ? y[k] == 0.5f * x[k] : y[k] == x[k];
        CHECK_MSG(ok, "%s: not %s", ta->name, residual ? "halved" : "unchanged");
        halved += residual;
        same += !residual;
        free(x);
        free(y);
    }
    CHECK(halved == 2 * 4 && same > 0); /* attn_output and ffn_down_exps of 4 layers */
    moe_gguf_close(ga);
    moe_gguf_close(gb);
    unlink(a);
    unlink(b);
}

static void test_usage_errors(void)
{
    char out[4096], tmp[4200];
    snprintf(out, sizeof(out), "%s/bad.gguf", moe_test_tmpdir());
    snprintf(tmp, sizeof(tmp), "%s.tmp", out);
    static const char *bad[] = {
        "--preset nope", "--n-head 5 --n-head-kv 2 --head-dim 16 --n-embd 80", "--n-expert 4 --n-expert-used 5",
        "--type Q4_K", "--n-embd 12x", "--n-embd", "--bogus", "--n-vocab 10", "--arch qwen3moe --n-vocab 100",
        "--n-head 4 --head-dim 32" /* llama: 4 x 32 != 64 */, "--head-dim 15", "--threads 0", "--seed -1",
        "--arch gptoss", "--n-layer 0", "--residual-gain 0", "--residual-gain x", "--residual-gain 17",
        "--residual-gain nan", "--residual-gain",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        CHECK_MSG(gen(bad[i], out) == 2, "'%s' should exit 2", bad[i]);
    char cmd[8192];
    snprintf(cmd, sizeof(cmd), "%s --preset tiny-mixtral 2>/dev/null", getenv("MOE_GEN")); /* no -o */
    int st = system(cmd);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 2);
    CHECK(access(out, F_OK) != 0 && access(tmp, F_OK) != 0);
    /* qwen3moe allows n_head x head_dim != n_embd (key_length is stored) */
    CHECK_INT(gen("--arch qwen3moe --n-embd 128 --n-head 4 --head-dim 64 --n-layer 1", out), ==, 0);
    unlink(out);
    CHECK_INT(gen("--preset tiny-mixtral", "/nonexistent-dir/x.gguf"), ==, 1);
}

int main(void)
{
    if (getenv("MOE_GEN") == NULL) {
        fprintf(stderr, "MOE_GEN not set\n");
        return 1;
    }
    MOE_TEST_RUN(test_mixtral_f32);
    MOE_TEST_RUN(test_mixtral_f16);
    MOE_TEST_RUN(test_mixtral_q8_0);
    MOE_TEST_RUN(test_mixtral_q4_0);
    MOE_TEST_RUN(test_qwen3moe_f16);
    MOE_TEST_RUN(test_qwen3moe_q8_0);
    MOE_TEST_RUN(test_other_types);
    MOE_TEST_RUN(test_quantized_from_f32);
    MOE_TEST_RUN(test_deterministic);
    MOE_TEST_RUN(test_usage_errors);
    MOE_TEST_RUN(test_residual_gain);
    return moe_test_exit_code();
}
