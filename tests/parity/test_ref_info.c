/* `moectl info` on every shared/ref model and vocabulary.
 *
 * --json prints the dims that shared/ref/README.md lists (the expected
 * values below are that table: the golden), and the sizes agree with the
 * tensor bytes computed independently from manifest.json (ne and the ggml
 * type sizes): dense + expert = all, per layer, per type, bytes_per_expert =
 * the largest layer's expert bytes / n_expert. Vocab-only files are
 * described, not refused. A missing, truncated, foreign or inconsistent
 * file exits 1 with `moectl: ` and a message naming the file; bad usage
 * exits 2; nothing ends in a signal. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>

#include "common/dtype.h"
#include "tests/harness.h"

struct want {
    const char *model, *arch;
    int n_embd, n_head, n_head_kv, n_layer, n_expert, n_expert_used, n_ff_exp, n_vocab;
    int head_dim;             /* per head as the file states it (MLA: key_length) */
    int n_rot;
    int q_lora_rank, kv_lora_rank, n_layer_dense_lead, n_expert_shared, sliding_window;
    int key_length_mla, value_length_mla;   /* qk_nope + qk_rope, v_head_dim */
    double rope_base, rms_eps;              /* rms_eps 0: the README does not say */
    int gating;                             /* expert_gating_func (0: absent) */
    double weights_scale;                   /* 0: absent */
};

/* shared/ref/README.md, "Models". Where the README is silent (deepseek2's
 * n_head_kv, its MLA head dims as llama.cpp's converter writes them), the
 * value is what llama.cpp's layout implies: one latent KV head, key =
 * kv_lora_rank + qk_rope = 40, value = kv_lora_rank = 32. */
static const struct want table[] = {
    { "tiny-mixtral", "llama", 64, 4, 2, 4, 8, 2, 128, 8000, 16, 16, 0, 0, 0, 0, 0, 0, 0,
      1e6, 1e-5, 0, 0 },
    { "tiny-qwen3moe", "qwen3moe", 256, 4, 2, 4, 16, 4, 256, 4096, 64, 64, 0, 0, 0, 0, 0, 0, 0,
      1e6, 1e-6, 0, 0 },
    { "tiny-deepseek2", "deepseek2", 64, 4, 1, 3, 8, 2, 64, 4096, 40, 8, 32, 32, 1, 1, 0, 24, 16,
      1e4, 0, 2, 2.5 },
    { "tiny-gptoss", "gpt-oss", 64, 4, 2, 2, 8, 2, 64, 4096, 16, 16, 0, 0, 0, 0, 16, 0, 0,
      150000, 0, 0, 0 },
};

/* Runs `$MOECTL args`, stdout into out (stderr too with merge); returns the
 * exit status, or 128 + signal. */
static int run(const char *args, int merge, char *out, size_t cap)
{
    char cmd[8192];
    snprintf(cmd, sizeof(cmd), "%s %s%s", getenv("MOECTL"), args, merge ? " 2>&1" : " 2>/dev/null");
    return moe_test_run_cmd(cmd, out, cap);
}

static char outbuf[1 << 20];

static json_t *run_info_json(const char *path)
{
    char args[4200];
    snprintf(args, sizeof(args), "info --json '%s'", path);
    if (run(args, 0, outbuf, sizeof(outbuf)) != 0)
        return NULL;
    return json_loads(outbuf, 0, NULL);
}

#define GETI(o, k) ((long long)json_integer_value(json_object_get((o), (k))))
#define GETR(o, k) (json_real_value(json_object_get((o), (k))))

static long long tensor_bytes(json_t *tj)
{
    const struct moe_dtype_info *di =
        moe_dtype_info((uint32_t)moe_dtype_from_name(json_string_value(json_object_get(tj, "type"))));
    if (di == NULL)
        return -1;
    json_t *ne = json_object_get(tj, "ne");
    long long bytes = (long long)json_integer_value(json_array_get(ne, 0)) / di->block_size * di->type_size;
    for (size_t i = 1; i < json_array_size(ne); i++)
        bytes *= (long long)json_integer_value(json_array_get(ne, i));
    return bytes;
}

static void test_dims_and_sizes(void)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    char path[4096];
    snprintf(path, sizeof(path), "%s/manifest.json", ref);
    json_t *man = json_load_file(path, 0, NULL);
    CHECK(man != NULL);
    int n_files = 0;
    for (size_t w = 0; w < sizeof(table) / sizeof(table[0]); w++) {
        const struct want *e = &table[w];
        json_t *variants = json_object_get(json_object_get(json_object_get(man, "models"), e->model),
                                           "variants");
        CHECK_MSG(json_object_size(variants) > 0, "%s: no variants in manifest.json", e->model);
        const char *vname;
        json_t *vj;
        json_object_foreach(variants, vname, vj) {
            snprintf(path, sizeof(path), "%s/models/%s", ref, json_string_value(json_object_get(vj, "file")));
            json_t *o = run_info_json(path);
            CHECK_MSG(o != NULL, "moectl info --json %s failed", path);
            CHECK_STR(json_string_value(json_object_get(o, "arch")), e->arch);
            CHECK(json_is_true(json_object_get(o, "arch_known")));
            CHECK(json_is_true(json_object_get(o, "engine_supported")));
            CHECK_STR(json_string_value(json_object_get(o, "file_type_name")), vname);
            CHECK_INT(GETI(o, "file_type"), ==, GETI(vj, "general.file_type"));
            CHECK_INT(GETI(o, "file_bytes"), ==, GETI(vj, "bytes"));
            CHECK_INT(GETI(o, "gguf_version"), ==, 3);
            CHECK_INT(GETI(o, "n_embd"), ==, e->n_embd);
            CHECK_INT(GETI(o, "n_head"), ==, e->n_head);
            CHECK_INT(GETI(o, "n_head_kv"), ==, e->n_head_kv);
            CHECK_INT(GETI(o, "head_dim"), ==, e->head_dim);
            CHECK_INT(GETI(o, "n_rot"), ==, e->n_rot);
            CHECK_INT(GETI(o, "n_layer"), ==, e->n_layer);
            CHECK_INT(GETI(o, "n_ctx_train"), ==, 256);
            CHECK_INT(GETI(o, "n_expert"), ==, e->n_expert);
            CHECK_INT(GETI(o, "n_expert_used"), ==, e->n_expert_used);
            CHECK_INT(GETI(o, "n_ff_exp"), ==, e->n_ff_exp);
            CHECK_INT(GETI(o, "n_vocab"), ==, e->n_vocab);
            CHECK_INT(GETI(o, "q_lora_rank"), ==, e->q_lora_rank);
            CHECK_INT(GETI(o, "kv_lora_rank"), ==, e->kv_lora_rank);
            CHECK_INT(GETI(o, "key_length_mla"), ==, e->key_length_mla);
            CHECK_INT(GETI(o, "value_length_mla"), ==, e->value_length_mla);
            CHECK_INT(GETI(o, "n_layer_dense_lead"), ==, e->n_layer_dense_lead);
            CHECK_INT(GETI(o, "n_expert_shared"), ==, e->n_expert_shared);
            CHECK_INT(GETI(o, "sliding_window"), ==, e->sliding_window);
            CHECK_INT(GETI(o, "expert_gating_func"), ==, e->gating);
            CHECK_NEAR(GETR(o, "expert_weights_scale"), e->weights_scale, 1e-6);
            CHECK_NEAR(GETR(o, "rope_freq_base"), e->rope_base, 1e-3);
            if (e->rms_eps > 0)
                CHECK_NEAR(GETR(o, "rms_eps"), e->rms_eps, e->rms_eps * 1e-6);

            /* sizes, recomputed from the manifest */
            long long total = 0, expert = 0, layer[16] = { 0 };
            long long type_bytes[MOE_DTYPE_COUNT] = { 0 }, type_count[MOE_DTYPE_COUNT] = { 0 };
            const char *tname;
            json_t *tj;
            json_t *types = json_object_get(vj, "tensor_types");
            CHECK_INT(GETI(o, "n_tensors"), ==, (long long)json_object_size(types));
            json_object_foreach(types, tname, tj) {
                const long long bytes = tensor_bytes(tj);
                CHECK_MSG(bytes > 0, "%s: %s: unknown type", path, tname);
                const int t = moe_dtype_from_name(json_string_value(json_object_get(tj, "type")));
                type_bytes[t] += bytes;
                type_count[t]++;
                total += bytes;
                int l = -1, off = 0;
                if (sscanf(tname, "blk.%d.%n", &l, &off) == 1 && off > 0 &&
                    strstr(tname + off, "_exps.") != NULL) {
                    CHECK(l >= 0 && l < 16);
                    expert += bytes;
                    layer[l] += bytes;
                }
            }
            CHECK_INT(GETI(o, "tensor_bytes"), ==, total);
            CHECK_INT(GETI(o, "dense_bytes") + GETI(o, "expert_bytes"), ==, total);
            CHECK_INT(GETI(o, "expert_bytes"), ==, expert);
            json_t *le = json_object_get(o, "layer_expert_bytes");
            CHECK_INT(json_array_size(le), ==, e->n_layer);
            long long max = 0, sum = 0;
            int moe_layers = 0;
            for (int l = 0; l < e->n_layer; l++) {
                CHECK_INT(json_integer_value(json_array_get(le, (size_t)l)), ==, layer[l]);
                /* the README: leading dense layers have no experts, the rest do */
                CHECK_MSG((layer[l] == 0) == (l < e->n_layer_dense_lead), "%s: layer %d", path, l);
                if (layer[l] == 0)
                    continue;
                CHECK_INT(layer[l] % e->n_expert, ==, 0);
                moe_layers++;
                sum += layer[l] / e->n_expert;
                if (layer[l] / e->n_expert > max)
                    max = layer[l] / e->n_expert;
            }
            CHECK_INT(GETI(o, "n_moe_layers"), ==, moe_layers);
            CHECK_INT(moe_layers, ==, e->n_layer - e->n_layer_dense_lead);
            CHECK_INT(GETI(o, "bytes_per_expert"), ==, max);
            CHECK_INT(GETI(o, "bytes_per_expert_avg"), ==, sum / moe_layers);
            CHECK_INT(GETI(o, "token_working_set_bytes"), ==,
                      (long long)moe_layers * e->n_expert_used * max);
            /* bytes by type */
            json_t *bt = json_object_get(o, "bytes_by_type");
            int n_types = 0;
            for (int t = 0; t < MOE_DTYPE_COUNT; t++) {
                if (type_count[t] == 0)
                    continue;
                n_types++;
                json_t *be = json_object_get(bt, moe_dtype_name((uint32_t)t));
                CHECK_MSG(be != NULL, "%s: bytes_by_type lacks %s", path, moe_dtype_name((uint32_t)t));
                CHECK_INT(GETI(be, "tensors"), ==, type_count[t]);
                CHECK_INT(GETI(be, "bytes"), ==, type_bytes[t]);
            }
            CHECK_INT(json_object_size(bt), ==, n_types);
            json_decref(o);

            /* the text form works too and carries the sizing lines */
            char args[4200];
            snprintf(args, sizeof(args), "info '%s'", path);
            CHECK_INT(run(args, 1, outbuf, sizeof(outbuf)), ==, 0);
            CHECK_MSG(strstr(outbuf, e->arch) && strstr(outbuf, "bytes/expert:") &&
                      strstr(outbuf, "token working set:") && strstr(outbuf, vname),
                      "%s: text output:\n%s", path, outbuf);
            n_files++;
        }
    }
    CHECK_INT(n_files, ==, 10);
    json_decref(man);
}

static void test_vocab_files(void)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    static const char *const vocabs[] = { "llama-spm", "qwen2", "llama-bpe", "gpt-2",
                                          "deepseek-llm", "deepseek-coder" };
    for (size_t i = 0; i < sizeof(vocabs) / sizeof(vocabs[0]); i++) {
        char path[4096];
        snprintf(path, sizeof(path), "%s/tokenizer/tokenizer-%s.json", ref, vocabs[i]);
        json_t *tj = json_load_file(path, 0, NULL);
        CHECK_MSG(tj != NULL, "%s", path);
        snprintf(path, sizeof(path), "%s/vocab/ggml-vocab-%s.gguf", ref, vocabs[i]);
        json_t *o = run_info_json(path);
        CHECK_MSG(o != NULL, "moectl info --json %s failed", path);
        CHECK_INT(GETI(o, "n_tensors"), ==, 0);
        CHECK_INT(GETI(o, "n_vocab"), ==, GETI(tj, "n_tokens"));
        CHECK_INT(GETI(o, "dense_bytes") + GETI(o, "expert_bytes") + GETI(o, "bytes_per_expert"), ==, 0);
        CHECK(json_string_length(json_object_get(o, "tokenizer_model")) > 0);
        CHECK(!json_is_true(json_object_get(o, "engine_supported")));
        json_decref(o);
        char args[4200];
        snprintf(args, sizeof(args), "info '%s'", path);
        CHECK_INT(run(args, 1, outbuf, sizeof(outbuf)), ==, 0);
        CHECK_MSG(strstr(outbuf, "vocabulary:") != NULL, "%s", outbuf);
        json_decref(tj);
    }
}

/* A copy of src with the u32 value of metadata key `key` replaced. */
static int patch_u32(const char *src, const char *dst, const char *key, uint32_t v)
{
    size_t len;
    uint8_t *b = moe_test_read_file(src, &len);
    if (b == NULL)
        return -1;
    const size_t kl = strlen(key);
    int rc = -1;
    for (size_t i = 8; i + kl + 8 <= len; i++) {
        uint64_t n;
        memcpy(&n, b + i - 8, 8);
        if (n != kl || memcmp(b + i, key, kl) != 0)
            continue;
        uint32_t type;
        memcpy(&type, b + i + kl, 4);
        if (type != 4 /* GGUF UINT32 */)
            break;
        memcpy(b + i + kl + 4, &v, 4);
        FILE *f = fopen(dst, "wb");
        if (f != NULL) {
            rc = fwrite(b, 1, len, f) == len ? 0 : -1;
            if (fclose(f) != 0)
                rc = -1;
        }
        break;
    }
    free(b);
    return rc;
}

static void test_errors(void)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    char out[8192], args[8192], file[4096];
    /* missing file: exit 1, the message names it, nothing on stdout */
    CHECK_INT(run("info /nonexistent/x.gguf", 1, out, sizeof(out)), ==, 1);
    CHECK_MSG(strncmp(out, "moectl: ", 8) == 0 && strstr(out, "/nonexistent/x.gguf"), "%s", out);
    CHECK_INT(run("info --json /nonexistent/x.gguf", 0, out, sizeof(out)), ==, 1);
    CHECK_STR(out, "");
    /* truncated copies: inside the tensor data, and inside the metadata */
    static const long cuts[] = { 500000, 3000, 100, 10 };
    for (size_t i = 0; i < sizeof(cuts) / sizeof(cuts[0]); i++) {
        snprintf(file, sizeof(file), "%s/trunc%zu.gguf", moe_test_tmpdir(), i);
        snprintf(args, sizeof(args), "head -c %ld %s/models/tiny-gptoss-F32.gguf > %s", cuts[i], ref, file);
        CHECK(system(args) == 0);
        snprintf(args, sizeof(args), "info --json %s", file);
        CHECK_INT(run(args, 1, out, sizeof(out)), ==, 1);
        snprintf(args, sizeof(args), "trunc%zu.gguf", i);
        CHECK_MSG(strncmp(out, "moectl: ", 8) == 0 && strstr(out, args) != NULL, "%s", out);
    }
    /* not a GGUF at all; a directory */
    snprintf(args, sizeof(args), "info %s/manifest.json", ref);
    CHECK_INT(run(args, 1, out, sizeof(out)), ==, 1);
    CHECK_MSG(strstr(out, "manifest.json") != NULL, "%s", out);
    snprintf(args, sizeof(args), "info %s", moe_test_tmpdir());
    CHECK_INT(run(args, 1, out, sizeof(out)), ==, 1);
    /* well-formed GGUF, inconsistent hyper-parameters */
    snprintf(file, sizeof(file), "%s/topk.gguf", moe_test_tmpdir());
    snprintf(args, sizeof(args), "%s/models/tiny-mixtral-F32.gguf", ref);
    CHECK(patch_u32(args, file, "llama.expert_used_count", 9) == 0);
    snprintf(args, sizeof(args), "info %s", file);
    CHECK_INT(run(args, 1, out, sizeof(out)), ==, 1);
    CHECK_MSG(strstr(out, "topk.gguf") && strstr(out, "llama.expert_used_count"), "%s", out);
    snprintf(file, sizeof(file), "%s/kvheads.gguf", moe_test_tmpdir());
    snprintf(args, sizeof(args), "%s/models/tiny-mixtral-F32.gguf", ref);
    CHECK(patch_u32(args, file, "llama.attention.head_count_kv", 3) == 0);
    snprintf(args, sizeof(args), "info --json %s", file);
    CHECK_INT(run(args, 1, out, sizeof(out)), ==, 1);
    CHECK_MSG(strstr(out, "kvheads.gguf") && strstr(out, "head_count_kv"), "%s", out);
    snprintf(file, sizeof(file), "%s/embd.gguf", moe_test_tmpdir());
    snprintf(args, sizeof(args), "%s/models/tiny-qwen3moe-Q8_0.gguf", ref);
    CHECK(patch_u32(args, file, "qwen3moe.embedding_length", 128) == 0);
    snprintf(args, sizeof(args), "info %s", file);
    CHECK_INT(run(args, 1, out, sizeof(out)), ==, 1);
    CHECK_MSG(strstr(out, "embd.gguf") && strstr(out, "token_embd.weight"), "%s", out);
    /* usage errors exit 2 */
    CHECK_INT(run("info", 1, out, sizeof(out)), ==, 2);
    CHECK_INT(run("info --bogus x", 1, out, sizeof(out)), ==, 2);
    CHECK_MSG(strstr(out, "--bogus") != NULL, "%s", out);
    CHECK_INT(run("info a.gguf b.gguf", 1, out, sizeof(out)), ==, 2);
    CHECK_INT(run("nosuchcommand", 1, out, sizeof(out)), ==, 2);
    CHECK_MSG(strstr(out, "nosuchcommand") != NULL, "%s", out);
    CHECK_INT(run("--bogus", 1, out, sizeof(out)), ==, 2);
    CHECK_INT(run("", 1, out, sizeof(out)), ==, 2);
    /* help and version */
    CHECK_INT(run("--help", 1, out, sizeof(out)), ==, 0);
    CHECK_MSG(strstr(out, "info") != NULL, "%s", out);
    CHECK_INT(run("info --help", 1, out, sizeof(out)), ==, 0);
    CHECK_INT(run("--version", 1, out, sizeof(out)), ==, 0);
    CHECK_MSG(strncmp(out, "moectl ", 7) == 0, "%s", out);
}

int main(void)
{
    MOE_TEST_RUN(test_dims_and_sizes);
    MOE_TEST_RUN(test_vocab_files);
    MOE_TEST_RUN(test_errors);
    return moe_test_exit_code();
}
