/* Every chat template in shared/ref/templates rendered over every message
 * list in tests/fixtures/chat, by model/jinja and by Python's jinja2 in
 * transformers' environment (tests/parity/jinja_ref.py, which uses
 * shared/ref/templates/render.py): the outputs must be byte-identical, or
 * both must raise the template's exception with the same message, or both
 * must fail otherwise. Skips (77) without python3 + jinja2, except with
 * CI=true. */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "common/alloc.h"
#include "common/error.h"
#include "model/jinja.h"
#include "tests/harness.h"

struct tally { int same, same_raise, both_error, differ; };

static char *dump(json_t *j)
{
    return json_is_null(j) || j == NULL ? NULL : json_dumps(j, JSON_COMPACT | JSON_ENCODE_ANY);
}

/* 0 when C and Python agree on this template and fixture */
static int compare_one(const struct moe_jinja *t, const char *tname, const char *fname, json_t *fix, json_t *ref,
                       long long clock, struct tally *n)
{
    struct moe_jinja_opts o;
    moe_jinja_opts_default(&o);
    o.clock = clock;
    char *msgs = dump(json_object_get(fix, "messages")), *tools = dump(json_object_get(fix, "tools"));
    json_t *vars = json_object_get(fix, "vars");
    char *extra = json_object_size(vars) ? dump(vars) : NULL;
    const char *status = json_string_value(json_object_get(ref, "status"));
    const char *want = json_string_value(json_object_get(ref, "output"));
    char *out = NULL;
    size_t len = 0;
    struct moe_jinja_err err = { 0 };
    int rc = t ? moe_jinja_render_chat(t, msgs, tools, json_is_true(json_object_get(fix, "add_generation_prompt")),
                                       json_string_value(json_object_get(ref, "bos")),
                                       json_string_value(json_object_get(ref, "eos")), extra, &o, &out, &len, &err)
               : MOE_EFORMAT;
    int bad = 0;
    if (strcmp(status, "OK") == 0) {
        bad = rc != 0 || len != strlen(want) || memcmp(out, want, len) != 0;
        n->same += !bad;
    } else if (strcmp(status, "RAISE") == 0) {
        bad = rc == 0 || err.kind != MOE_JINJA_RAISE || strcmp(err.msg, want) != 0;
        n->same_raise += !bad;
    } else {
        bad = rc == 0 || err.kind == MOE_JINJA_RAISE;
        n->both_error += !bad;
    }
    if (bad && n->differ++ < 10) {
        fprintf(stderr, "  %s / %s: jinja2 %s", tname, fname, status);
        if (strcmp(status, "OK") != 0)
            fprintf(stderr, " (%s)", want);
        if (rc == 0)
            fprintf(stderr, "; C rendered:\n----\n%s\n---- jinja2:\n%s\n----\n", out, strcmp(status, "OK") ? "" : want);
        else
            fprintf(stderr, "; C: line %d: %s\n", err.line, err.msg);
    }
    moe_free(out);
    free(msgs);
    free(tools);
    free(extra);
    return bad;
}

static json_t *load_fixtures(const char *dir)
{
    char cmd[4096], list[65536];
    snprintf(cmd, sizeof(cmd), "ls %s/*.json", dir);
    if (moe_test_run_cmd(cmd, list, sizeof(list)) != 0)
        return NULL;
    json_t *all = json_object();
    for (char *p = strtok(list, "\n"); p; p = strtok(NULL, "\n")) {
        json_t *j = json_load_file(p, 0, NULL);
        const char *base = strrchr(p, '/') + 1;
        if (j == NULL) {
            json_decref(all);
            return NULL;
        }
        json_object_set_new(all, strndupa(base, strlen(base) - 5), j);
    }
    return all;
}

static void test_templates_match_jinja2(void)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref missing");
    const char *src = getenv("MOE_SOURCE_ROOT");
    CHECK(src != NULL);
    char cmd[8192], buf[256];
    bool ci = getenv("CI") && strcmp(getenv("CI"), "true") == 0;
    if (moe_test_run_cmd("python3 -c 'import jinja2' 2>/dev/null", buf, sizeof(buf)) != 0) {
        CHECK_MSG(!ci, "python3 with jinja2 is required in CI (tools/setup.sh installs it)");
        MOE_SKIP("python3 with jinja2 not available (pip install jinja2)");
    }
    char refjson[4096], fixdir[4096];
    snprintf(refjson, sizeof(refjson), "%s/jinja_ref.json", moe_test_tmpdir());
    snprintf(fixdir, sizeof(fixdir), "%s/tests/fixtures/chat", src);
    snprintf(cmd, sizeof(cmd), "python3 %s/tests/parity/jinja_ref.py %s/templates %s > %s", src, ref, fixdir,
             refjson);
    CHECK_INT(moe_test_run_cmd(cmd, buf, sizeof(buf)), ==, 0);
    json_error_t je;
    json_t *root = json_load_file(refjson, 0, &je);
    CHECK_MSG(root != NULL, "%s: %s", refjson, je.text);
    json_t *fixtures = load_fixtures(fixdir);
    CHECK(fixtures != NULL && json_object_size(fixtures) >= 15);
    long long clock = json_integer_value(json_object_get(root, "clock"));
    struct tally n = { 0 };
    const char *tname, *fname;
    json_t *cases, *r;
    int templates = 0;
    json_object_foreach(json_object_get(root, "renders"), tname, cases) {
        char path[4096];
        snprintf(path, sizeof(path), "%s/templates/%s", ref, tname);
        size_t len;
        char *text = moe_test_read_file(path, &len);
        struct moe_jinja *t = NULL;
        struct moe_jinja_err err;
        if (text == NULL || moe_jinja_compile(text, len, &t, &err) != 0)
            fprintf(stderr, "  %s: does not compile: line %d: %s\n", tname, err.line, err.msg);
        free(text);
        json_object_foreach(cases, fname, r) {
            compare_one(t, tname, fname, json_object_get(fixtures, fname), r, clock, &n);
        }
        moe_jinja_free(t);
        templates++;
    }
    printf("  %d templates x %zu message lists: %d identical, %d same raise_exception, %d error in both, "
           "%d differ\n", templates, json_object_size(fixtures), n.same, n.same_raise, n.both_error, n.differ);
    json_decref(root);
    json_decref(fixtures);
    CHECK_INT(templates, >=, 38);
    CHECK_INT(n.differ, ==, 0);
    CHECK_INT(n.same, >=, 500);
}

int main(void)
{
    MOE_TEST_RUN(test_templates_match_jinja2);
    return moe_test_exit_code();
}
