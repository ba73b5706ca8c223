/* `moectl info --json` on every shared/ref model prints the dims that
 * shared/ref/README.md lists (the expected values below are that table),
 * and dense_bytes + expert_bytes equals the tensor bytes computed
 * independently from manifest.json. */
#include <jansson.h>
#include <stdlib.h>
#include <sys/wait.h>

#include "kernels/dtype.h"
#include "tests/harness.h"

struct want {
    const char *model;
    int n_embd, n_head, n_head_kv, n_layer, n_expert, n_expert_used, n_ff_exp, n_vocab;
    int q_lora_rank, kv_lora_rank, n_layer_dense_lead, n_expert_shared, sliding_window;
    const char *arch;
};

static const struct want table[] = {
    { "tiny-mixtral", 64, 4, 2, 4, 8, 2, 128, 8000, 0, 0, 0, 0, 0, "llama" },
    { "tiny-qwen3moe", 256, 4, 2, 4, 16, 4, 256, 4096, 0, 0, 0, 0, 0, "qwen3moe" },
    { "tiny-deepseek2", 64, 4, 1, 3, 8, 2, 64, 4096, 32, 32, 1, 1, 0, "deepseek2" },
    { "tiny-gptoss", 64, 4, 2, 2, 8, 2, 64, 4096, 0, 0, 0, 0, 16, "gpt-oss" },
};

static json_t *run_info(const char *path)
{
    char cmd[8192];
    snprintf(cmd, sizeof(cmd), "%s info --json '%s'", getenv("MOECTL"), path);
    FILE *p = popen(cmd, "r");
    if (p == NULL)
        return NULL;
    static char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof(buf) - 1, p);
    buf[n] = '\0';
    int st = pclose(p);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        return NULL;
    return json_loads(buf, 0, NULL);
}

#define GETI(o, k) ((long long)json_integer_value(json_object_get((o), (k))))

static void test_dims(void)
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
        const char *vname;
        json_t *vj;
        json_object_foreach(variants, vname, vj) {
            snprintf(path, sizeof(path), "%s/models/%s", ref, json_string_value(json_object_get(vj, "file")));
            json_t *o = run_info(path);
            CHECK_MSG(o != NULL, "moectl info --json %s failed", path);
            CHECK_STR(json_string_value(json_object_get(o, "arch")), e->arch);
            CHECK_INT(GETI(o, "n_embd"), ==, e->n_embd);
            CHECK_INT(GETI(o, "n_head"), ==, e->n_head);
            CHECK_INT(GETI(o, "n_head_kv"), ==, e->n_head_kv);
            CHECK_INT(GETI(o, "n_layer"), ==, e->n_layer);
            CHECK_INT(GETI(o, "n_expert"), ==, e->n_expert);
            CHECK_INT(GETI(o, "n_expert_used"), ==, e->n_expert_used);
            CHECK_INT(GETI(o, "n_ff_exp"), ==, e->n_ff_exp);
            CHECK_INT(GETI(o, "n_vocab"), ==, e->n_vocab);
            CHECK_INT(GETI(o, "q_lora_rank"), ==, e->q_lora_rank);
            CHECK_INT(GETI(o, "kv_lora_rank"), ==, e->kv_lora_rank);
            CHECK_INT(GETI(o, "n_layer_dense_lead"), ==, e->n_layer_dense_lead);
            CHECK_INT(GETI(o, "n_expert_shared"), ==, e->n_expert_shared);
            CHECK_INT(GETI(o, "sliding_window"), ==, e->sliding_window);
            /* sizes, recomputed from the manifest */
            long long total = 0, expert = 0;
            const char *tname;
            json_t *tj;
            json_t *types = json_object_get(vj, "tensor_types");
            CHECK_INT(GETI(o, "n_tensors"), ==, (long long)json_object_size(types));
            json_object_foreach(types, tname, tj) {
                const struct moe_dtype_info *di =
                    moe_dtype_info((uint32_t)moe_dtype_from_name(json_string_value(json_object_get(tj, "type"))));
                CHECK(di != NULL);
                json_t *ne = json_object_get(tj, "ne");
                long long bytes = (long long)json_integer_value(json_array_get(ne, 0)) / di->block_size * di->type_size;
                for (size_t i = 1; i < json_array_size(ne); i++)
                    bytes *= (long long)json_integer_value(json_array_get(ne, i));
                total += bytes;
                if (strstr(tname, "_exps.") != NULL)
                    expert += bytes;
            }
            CHECK_INT(GETI(o, "dense_bytes") + GETI(o, "expert_bytes"), ==, total);
            CHECK_INT(GETI(o, "expert_bytes"), ==, expert);
            const int moe_layers = e->n_layer - e->n_layer_dense_lead;
            /* every MoE layer has the same expert types here except Q4_K_M's mix */
            CHECK(GETI(o, "bytes_per_expert") * e->n_expert * moe_layers >= expert);
            CHECK(GETI(o, "bytes_per_expert_avg") * e->n_expert * moe_layers <= expert);
            CHECK_INT(GETI(o, "token_working_set_bytes"), ==,
                      (long long)moe_layers * e->n_expert_used * GETI(o, "bytes_per_expert"));
            json_decref(o);
            n_files++;
        }
    }
    CHECK_INT(n_files, ==, 10);
    json_decref(man);
}

static int run_status(const char *args, char *out, size_t cap)
{
    char cmd[8192];
    snprintf(cmd, sizeof(cmd), "%s %s 2>&1", getenv("MOECTL"), args);
    FILE *p = popen(cmd, "r");
    if (p == NULL)
        return -1;
    size_t n = fread(out, 1, cap - 1, p);
    out[n] = '\0';
    int st = pclose(p);
    return WIFSIGNALED(st) ? 128 + WTERMSIG(st) : WEXITSTATUS(st);
}

static void test_errors(void)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    char out[8192], args[8192], trunc[4096];
    CHECK_INT(run_status("info /nonexistent/x.gguf", out, sizeof(out)), ==, 1);
    CHECK(strstr(out, "/nonexistent/x.gguf") != NULL);
    snprintf(trunc, sizeof(trunc), "%s/trunc.gguf", moe_test_tmpdir());
    snprintf(args, sizeof(args), "head -c 500000 %s/models/tiny-gptoss-F32.gguf > %s", ref, trunc);
    CHECK(system(args) == 0);
    snprintf(args, sizeof(args), "info %s", trunc);
    CHECK_INT(run_status(args, out, sizeof(out)), ==, 1);
    CHECK_MSG(strstr(out, "trunc.gguf") != NULL && strstr(out, "tensor") != NULL, "%s", out);
    CHECK_INT(run_status("info", out, sizeof(out)), ==, 2);
    CHECK_INT(run_status("info --bogus x", out, sizeof(out)), ==, 2);
    CHECK_INT(run_status("nosuchcommand", out, sizeof(out)), ==, 2);
    CHECK_INT(run_status("--help", out, sizeof(out)), ==, 0);
}

int main(void)
{
    MOE_TEST_RUN(test_dims);
    MOE_TEST_RUN(test_errors);
    return moe_test_exit_code();
}
