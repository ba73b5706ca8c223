/* common/opt.h and the engine's option table (model/options.c): sizes with
 * K/M/G/T, keys with '-' or '_' and aliases, bounds, enums parsed into
 * their values, defaults within their own bounds, messages naming the key. */
#include <errno.h>
#include <stdint.h>
#include <string.h>

#include "cache/policy.h"
#include "common/opt.h"
#include "model/options.h"
#include "tests/harness.h"

static void test_sizes(void)
{
    int64_t v;
    CHECK(moe_opt_parse_size("4096", &v) == 0 && v == 4096);
    CHECK(moe_opt_parse_size("12G", &v) == 0 && v == 12LL << 30);
    CHECK(moe_opt_parse_size("1.5g", &v) == 0 && v == 3LL << 29);
    CHECK(moe_opt_parse_size("2GiB", &v) == 0 && v == 2LL << 30);
    CHECK(moe_opt_parse_size("64kb", &v) == 0 && v == 64 << 10);
    CHECK(moe_opt_parse_size("1T", &v) == 0 && v == 1LL << 40);
    const char *bad[] = { "", "-5", "+5", " 5", "12Q", "1GG", "1iB", "nan", "inf", "1e30", "5 " };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        CHECK_MSG(moe_opt_parse_size(bad[i], &v) != 0, "'%s' accepted", bad[i]);
}

static void test_engine_table(void)
{
    size_t n;
    const struct moe_opt *t = moe_model_opt_table(&n);
    CHECK(n >= 10);
    struct moe_model_opts o;
    moe_model_opts_defaults(&o);
    CHECK_INT(o.n_ctx, ==, 4096);
    CHECK_INT(o.cache_policy, ==, MOE_POLICY_PREDICT);
    CHECK_INT(o.prefetch, ==, MOE_PREFETCH_AUTO);   /* the plan chooses gate or none (model/plan.c) */
    CHECK_INT(o.prefetch_depth, ==, 0);
    CHECK_INT(o.backend, ==, MOE_BACKEND_CPU);
    CHECK(moe_model_opts_check(&o, NULL) == 0);
    /* every row: findable by key and with dashes; unique names */
    for (size_t i = 0; i < n; i++) {
        char dashed[64];
        snprintf(dashed, sizeof(dashed), "%s", t[i].name);
        for (char *c = dashed; *c; c++)
            if (*c == '_')
                *c = '-';
        CHECK(moe_opt_find(t, n, t[i].name) == &t[i]);
        CHECK(moe_opt_find(t, n, dashed) == &t[i]);
        CHECK(t[i].help != NULL && t[i].help[0]);
        for (size_t j = 0; j < i; j++)
            CHECK(strcmp(t[i].name, t[j].name) != 0);
    }
    CHECK(moe_opt_find(t, n, "ctx") == moe_opt_find(t, n, "ctx_size"));
    CHECK(moe_opt_find(t, n, "nope") == NULL);
    struct moe_diag d = { 0 };
    CHECK(moe_model_opts_set(&o, "cache-bytes", "12G", &d) == 0 && o.cache_bytes == 12ULL << 30);
    CHECK(moe_model_opts_set(&o, "cache_policy", "predict", &d) == 0 &&
          o.cache_policy == MOE_POLICY_PREDICT);
    CHECK(moe_model_opts_set(&o, "prefetch", "history", &d) == 0 && o.prefetch == MOE_PREFETCH_HISTORY);
    CHECK(moe_model_opts_set(&o, "kv_f16", "on", &d) == 0 && o.kv_type == MOE_KV_F16);
    CHECK(moe_model_opts_set(&o, "kv-f16", "false", &d) == 0 && o.kv_type == MOE_KV_F32);
    CHECK(moe_model_opts_set(&o, "kv_type", "q8_0", &d) == 0 && o.kv_type == MOE_KV_Q8_0);
    CHECK_INT(moe_model_opts_set(&o, "kv_type", "q4_0", &d), ==, -EINVAL);
    CHECK_MSG(strstr(d.msg, "kv_type") && strstr(d.msg, "f32|f16|q8_0'") == NULL &&
              strstr(d.msg, "one of f32|f16|q8_0") && !strstr(d.msg, "yes"), "%s", d.msg);
    memset(&d, 0, sizeof(d));
    moe_model_opts_defaults(&o);
    CHECK_INT(o.kv_type, ==, MOE_KV_F16);
    CHECK_INT(moe_model_opts_set(&o, "prefetch_depth", "9", &d), ==, -ERANGE);
    CHECK_MSG(strstr(d.msg, "prefetch_depth") && strstr(d.msg, "0..8"), "%s", d.msg);
    memset(&d, 0, sizeof(d));
    CHECK_INT(moe_model_opts_set(&o, "cache_policy", "belady", &d), ==, -EINVAL);
    CHECK_MSG(strstr(d.msg, "lru|lfu|layer|predict"), "%s", d.msg);
    memset(&d, 0, sizeof(d));
    CHECK_INT(moe_model_opts_set(&o, "bogus", "1", &d), ==, -EINVAL);
    CHECK_MSG(strstr(d.msg, "bogus"), "%s", d.msg);
    /* values set directly are held to the same table */
    o.cache_policy = MOE_POLICY_BELADY;
    CHECK(moe_model_opts_check(&o, NULL) != 0);
    o.cache_policy = MOE_POLICY_LRU;
    o.prefetch_depth = 9;
    CHECK(moe_model_opts_check(&o, NULL) != 0);
    /* format round-trips */
    moe_model_opts_defaults(&o);
    for (size_t i = 0; i < n; i++) {
        char text[64];
        moe_opt_format(&t[i], &o, text, sizeof(text));
        struct moe_model_opts o2;
        moe_model_opts_defaults(&o2);
        CHECK_MSG(moe_opt_set(&t[i], &o2, text, &d) == 0, "%s = %s: %s", t[i].name, text, d.msg);
        char again[64];
        moe_opt_format(&t[i], &o2, again, sizeof(again));
        CHECK_STR(again, text);
    }
}

int main(void)
{
    MOE_TEST_RUN(test_sizes);
    MOE_TEST_RUN(test_engine_table);
    return moe_test_exit_code();
}
