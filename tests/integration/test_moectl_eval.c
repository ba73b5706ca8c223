/* moectl eval / run as a user runs them: output files and stdout compared
 * with the llama.cpp goldens, and bad input answered with exit 1 or 2 and a
 * message, never a signal or a half-written file. */
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/harness.h"

/* Runs a shell command with stderr merged into out. */
static int run_cmd(const char *cmd, char *out, size_t cap)
{
    char full[8200];
    snprintf(full, sizeof(full), "%s 2>&1", cmd);
    return moe_test_run_cmd(full, out, cap);
}

static const char *moectl(void)
{
    const char *p = getenv("MOECTL");
    return p ? p : "moectl";
}

/* Token list of a manifest sequence as "a,b,c". */
static int tokens_of(const char *ref, const char *model, const char *seq, char *buf, size_t cap,
                     int *n)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/manifest.json", ref);
    json_t *man = json_load_file(path, 0, NULL);
    if (man == NULL)
        return -1;
    json_t *a = json_object_get(json_object_get(json_object_get(json_object_get(man, "models"),
                                                                 model), "sequences"), seq);
    size_t len = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < json_array_size(a); i++)
        len += (size_t)snprintf(buf + len, cap - len, i ? ",%lld" : "%lld",
                                (long long)json_integer_value(json_array_get(a, i)));
    *n = (int)json_array_size(a);
    json_decref(man);
    return 0;
}

static void test_eval_matches_goldens(void)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    char toks[4096], cmd[8192], out[65536], lpath[4096], rpath[4096];
    int n = 0;
    CHECK(tokens_of(ref, "tiny-mixtral", "len7", toks, sizeof(toks), &n) == 0);
    snprintf(lpath, sizeof(lpath), "%s/logits.f32", moe_test_tmpdir());
    snprintf(rpath, sizeof(rpath), "%s/routing.txt", moe_test_tmpdir());
    snprintf(cmd, sizeof(cmd), "%s eval --model %s/models/tiny-mixtral-F32.gguf --tokens %s"
             " --logits %s --routing %s --threads 2 --kv-type f32", moectl(), ref, toks, lpath, rpath);
    int rc = run_cmd(cmd, out, sizeof(out));
    CHECK_MSG(rc == 0, "exit %d: %s", rc, out);

    size_t len = 0, glen = 0;
    float *got = moe_test_read_file(lpath, &len);
    char gpath[4096];
    snprintf(gpath, sizeof(gpath), "%s/goldens/tiny-mixtral-F32/len7.logits.f32", ref);
    float *want = moe_test_read_file(gpath, &glen);
    CHECK(got && want);
    CHECK_U64(len, ==, glen);
    double maxd = 0;
    for (size_t i = 0; i < len / 4; i++)
        maxd = fmax(maxd, fabs((double)got[i] - want[i]));
    CHECK_MSG(maxd <= 1e-4, "max |dlogit| %g", maxd);

    /* routing: n tokens x 4 layers, ids equal to llama.cpp's topk */
    snprintf(gpath, sizeof(gpath), "%s/goldens/tiny-mixtral-F32/len7.moe.json", ref);
    json_t *moe = json_load_file(gpath, 0, NULL);
    CHECK(moe != NULL);
    FILE *f = fopen(rpath, "r");
    CHECK(f != NULL);
    int lines = 0, tok, layer, id0, id1;
    float w0, w1;
    while (fscanf(f, "%d %d %d:%f %d:%f", &tok, &layer, &id0, &w0, &id1, &w1) == 6) {
        char key[64];
        snprintf(key, sizeof(key), "ffn_moe_topk-%d", layer);
        json_t *data = json_object_get(json_object_get(json_object_get(moe, "tensors"), key), "data");
        CHECK_INT(id0, ==, json_integer_value(json_array_get(data, (size_t)tok * 2)));
        CHECK_INT(id1, ==, json_integer_value(json_array_get(data, (size_t)tok * 2 + 1)));
        CHECK(w0 >= w1 && fabsf(w0 + w1 - 1.0f) < 1e-5f);
        lines++;
    }
    fclose(f);
    json_decref(moe);
    CHECK_INT(lines, ==, n * 4);
    free(got);
    free(want);
}

static void test_run_greedy(void)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    char toks[4096], cmd[8192], out[65536], want[1024] = "";
    int n = 0;
    CHECK(tokens_of(ref, "tiny-mixtral", "len7", toks, sizeof(toks), &n) == 0);
    /* the first 16 greedy ids; their margins are all above 1e-3 */
    char gpath[4096];
    snprintf(gpath, sizeof(gpath), "%s/goldens/tiny-mixtral-F32/len7.greedy.json", ref);
    json_t *g = json_load_file(gpath, 0, NULL);
    CHECK(g != NULL);
    size_t len = 0;
    for (size_t i = 0; i < 16; i++) {
        CHECK(json_real_value(json_array_get(json_object_get(g, "margin"), i)) > 1e-3);
        len += (size_t)snprintf(want + len, sizeof(want) - len, i ? " %lld" : "%lld",
                                (long long)json_integer_value(json_array_get(json_object_get(g, "ids"), i)));
    }
    json_decref(g);
    snprintf(cmd, sizeof(cmd), "%s run --model %s/models/tiny-mixtral-F32.gguf --tokens %s -n 16"
             " --threads 2 2>/dev/null", moectl(), ref, toks);
    int rc = run_cmd(cmd, out, sizeof(out));
    CHECK_MSG(rc == 0, "exit %d: %s", rc, out);
    out[strcspn(out, "\n")] = '\0';
    CHECK_STR(out, want);
    /* seeded sampling is reproducible */
    char out2[65536];
    snprintf(cmd, sizeof(cmd), "%s run --model %s/models/tiny-mixtral-F32.gguf --tokens %s -n 12"
             " --temp 0.8 --seed 5 --threads 2 2>/dev/null", moectl(), ref, toks);
    CHECK(run_cmd(cmd, out, sizeof(out)) == 0);
    CHECK(run_cmd(cmd, out2, sizeof(out2)) == 0);
    CHECK_STR(out, out2);
}

static void test_bad_input(void)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    char cmd[8192], out[65536], lpath[4096], model[4096];
    snprintf(model, sizeof(model), "%s/models/tiny-mixtral-Q4_0.gguf", ref);
    snprintf(lpath, sizeof(lpath), "%s/bad.f32", moe_test_tmpdir());
    struct { const char *args; int code; const char *needle; } cases[] = {
        { "eval --model %s --tokens 1,x,3 --logits %s", 2, "element 1" },
        { "eval --model %s --tokens 1,,3 --logits %s", 2, "element 1" },
        { "eval --model %s --tokens 1,-4 --logits %s", 2, "element 1" },
        { "eval --model %s --tokens 1,99999 --logits %s", 2, "element 1 is 99999" },
        { "eval --model %s --tokens 1 --logits %s --bogus", 2, "unknown option" },
        { "eval --model %s --logits %s", 2, "--tokens" },
        { "eval --model %s.missing --tokens 1 --logits %s", 1, "missing" },
        { "run --model %s --tokens 1 -n 5000 --threads 1 %s", 2, NULL },
        { "run --model %s --tokens 1 -n 2 --temp -1 --seed 1 %s", 2, "temperature" },
        { "run --model %s --tokens 1 -n 2 --cache-bytes 12Q %s", 2, "--cache-bytes" },
        { "run --model %s --tokens 1 -n 2 --cache-bytes -5 %s", 2, "--cache-bytes" },
        { "run --model %s --tokens 1 -n 2 --host-bytes 1x %s", 2, "--host-bytes" },
        { "run --model %s --tokens 1 -n 2 --cache-experts -1 %s", 2, "--cache-experts" },
        { "run --model %s --tokens 1 -n 2 --ctx-size 8 %s", 2, "--ctx-size" },
        { "run --model %s --tokens 1 -n 2 --ctx 8 %s", 2, "--ctx" },
        { "run --model %s --tokens 1 -n 2 --kv-f16=maybe %s", 2, "--kv-f16" },
        { "run --model %s --tokens 1 -n 2 --backend tpu %s", 2, "cpu|cuda" },
        { "run --model %s --tokens 1 -n 2 --cache-experts 1 %s", 1, "minimum" },
        /* the simulator's optimum is not an engine policy: refused by the flag */
        { "run --model %s --tokens 1 -n 2 --cache-experts 4 --cache-policy belady %s", 2, "lru|lfu" },
        { "run --model %s --tokens 1 -n 2 --prefetch sometimes %s", 2, "--prefetch" },
        { "run --model %s --tokens 1 -n 2 --prefetch-depth 9 %s", 2, "--prefetch-depth" },
        { "run --model %s --tokens 1 --prompt hi -n 2 %s", 2, "not both" },
        { "chat --model %s -n 2 %s", 2, "--prompt" },
        { "cache-sim --trace %s.missing --capacity 4 %s", 1, "missing" },
        { "cache-sim --trace %s --capacity 0 %s", 2, "--capacity" },
        { "cache-sim --trace %s --sweep 5,x %s", 2, "--sweep" },
        { "cache-sim --trace %s --capacity 4 --policy mru %s", 2, "--policy" },
        { "cache-sim --trace %s --capacity 4 --prefetch gate %s", 2, "--prefetch" },
        { "cache-sim --trace %s --capacity 4 --prefetch history --prefetch-depth 0 %s", 2, "--prefetch-depth" },
        { "cache-sim --trace %s --capacity 4 --prefetch history --prefetch-depth 99 %s", 2, "--prefetch-depth" },
        { "cache-sim --trace %s --capacity 4 --prefetch-depth x %s", 2, "--prefetch-depth" },
        { "cache-sim --trace %s --capacity 4 %s", 1, ".gguf:1: expected" }, /* not a trace */
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char args[4096];
        const int is_eval = strncmp(cases[i].args, "eval", 4) == 0;
        snprintf(args, sizeof(args), cases[i].args, model, is_eval ? lpath : "");
        snprintf(cmd, sizeof(cmd), "%s %s", moectl(), args);
        int rc = run_cmd(cmd, out, sizeof(out));
        CHECK_MSG(rc == cases[i].code, "'%s': exit %d, expected %d: %s", args, rc, cases[i].code, out);
        if (cases[i].needle)
            CHECK_MSG(strstr(out, cases[i].needle) != NULL, "'%s': message lacks '%s': %s", args,
                      cases[i].needle, out);
        struct stat st;
        CHECK_MSG(stat(lpath, &st) != 0, "'%s' left %s behind", args, lpath);
    }
    /* cache-sim --warm-from: a bad mode, a missing or foreign warm trace,
     * one of another model's shape; then a real warm replay */
    const char *root = getenv("MOE_SOURCE_ROOT");
    if (root != NULL) {
        char qwen[4096], goss[4096];
        snprintf(qwen, sizeof(qwen), "%s/tests/fixtures/traces/qwen.route.csv", root);
        snprintf(goss, sizeof(goss), "%s/tests/fixtures/traces/gptoss.route.csv", root);
        struct { const char *warm, *mode; int code; const char *needle; } w[] = {
            { qwen, "maybe", 2, "--warm 'maybe'" },
            { "/nonexistent/warm.csv", "seed", 1, "warm.csv" },
            { model, "seed", 1, ".gguf:1: expected" },
            { goss, "seed", 2, "not the same model" },
            { qwen, "preload", 0, "warm=preload" },
            { qwen, "seed", 0, "warm=seed" },
        };
        for (size_t i = 0; i < sizeof(w) / sizeof(w[0]); i++) {
            snprintf(cmd, sizeof(cmd), "%s cache-sim --trace %s --capacity 600 --policy predict --warm-from %s"
                     " --warm %s", moectl(), qwen, w[i].warm, w[i].mode);
            const int wrc = run_cmd(cmd, out, sizeof(out));
            CHECK_MSG(wrc == w[i].code && strstr(out, w[i].needle) != NULL, "'%s': exit %d, expected %d with"
                      " '%s': %s", cmd, wrc, w[i].code, w[i].needle, out);
        }
    }
    /* a truncated model: exit 1 naming the file */
    char trunc[4096];
    snprintf(trunc, sizeof(trunc), "%s/trunc.gguf", moe_test_tmpdir());
    snprintf(cmd, sizeof(cmd), "head -c 300000 %s > %s", model, trunc);
    CHECK(run_cmd(cmd, out, sizeof(out)) == 0);
    snprintf(cmd, sizeof(cmd), "%s eval --model %s --tokens 1,2 --logits %s", moectl(), trunc, lpath);
    int rc = run_cmd(cmd, out, sizeof(out));
    CHECK_MSG(rc == 1 && strstr(out, "trunc.gguf") != NULL, "exit %d: %s", rc, out);
}

/* --prompt: the text printed is the detokenization of the ids that
 * `run --tokens` generates from the prompt's ids (greedy, same model) */
static void test_prompt_text(void)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    char cmd[8192], ids[4096], gen[4096], text[8192], detok[8192], model[4096];
    snprintf(model, sizeof(model), "%s/models/tiny-qwen3moe-F16.gguf", ref);
    snprintf(cmd, sizeof(cmd), "%s tokenize --model %s 'The quick brown fox'", moectl(), model);
    CHECK(run_cmd(cmd, ids, sizeof(ids)) == 0);
    /* "[1, 2, 3]\n" -> "1,2,3" */
    char csv[4096];
    size_t k = 0;
    for (const char *p = ids; *p && k + 1 < sizeof(csv); p++)
        if ((*p >= '0' && *p <= '9') || *p == ',')
            csv[k++] = *p;
    csv[k] = '\0';
    CHECK(k > 0);
    snprintf(cmd, sizeof(cmd), "%s run --model %s --tokens %s -n 12 --threads 2 2>/dev/null", moectl(), model, csv);
    CHECK(run_cmd(cmd, gen, sizeof(gen)) == 0);
    gen[strcspn(gen, "\n")] = '\0';
    snprintf(cmd, sizeof(cmd), "%s run --model %s --prompt 'The quick brown fox' -n 12 --threads 2 2>/dev/null",
             moectl(), model);
    CHECK(run_cmd(cmd, text, sizeof(text)) == 0);
    snprintf(cmd, sizeof(cmd), "%s detokenize --model %s %s", moectl(), model, gen);
    CHECK(run_cmd(cmd, detok, sizeof(detok)) == 0);
    text[strcspn(text, "\n")] = '\0';
    detok[strcspn(detok, "\n")] = '\0';
    CHECK_MSG(strcmp(text, detok) == 0, "--prompt printed '%s', detokenized ids give '%s'", text, detok);
    /* chat: the model's ChatML template; a model without one: exit 2 naming the flag */
    snprintf(cmd, sizeof(cmd), "%s chat --model %s --prompt hi -n 4 --threads 2", moectl(), model);
    CHECK(run_cmd(cmd, text, sizeof(text)) == 0);
    snprintf(cmd, sizeof(cmd), "%s chat --model %s/models/tiny-mixtral-F32.gguf --prompt hi -n 4", moectl(), ref);
    int rc = run_cmd(cmd, text, sizeof(text));
    CHECK_MSG(rc == 2 && strstr(text, "--chat-template") != NULL, "exit %d: %s", rc, text);
    snprintf(cmd, sizeof(cmd), "%s chat --model %s/models/tiny-mixtral-F32.gguf --prompt hi -n 4"
             " --chat-template mistral-v1 --threads 2", moectl(), ref);
    CHECK(run_cmd(cmd, text, sizeof(text)) == 0);
    /* or with a Jinja template file (doc/templates.md) */
    snprintf(cmd, sizeof(cmd), "%s chat --model %s/models/tiny-mixtral-F32.gguf --prompt hi -n 4 --threads 2"
             " --chat-template-file %s/templates/mistral/mistral-common-v3_spm.jinja", moectl(), ref, ref);
    CHECK(run_cmd(cmd, text, sizeof(text)) == 0);
    snprintf(cmd, sizeof(cmd), "%s chat --model %s/models/tiny-mixtral-F32.gguf --prompt hi -n 4"
             " --chat-template-file /nonexistent.jinja", moectl(), ref);
    rc = run_cmd(cmd, text, sizeof(text));
    CHECK_MSG(rc == 1 && strstr(text, "/nonexistent.jinja") != NULL, "exit %d: %s", rc, text);
}

int main(void)
{
    MOE_TEST_RUN(test_eval_matches_goldens);
    MOE_TEST_RUN(test_run_greedy);
    MOE_TEST_RUN(test_bad_input);
    MOE_TEST_RUN(test_prompt_text);
    return moe_test_exit_code();
}
