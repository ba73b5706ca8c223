/* cache/lanesim.h and `moectl cache-sim --lanes`: the fixed modes do what
 * they say, the faster lane wins at the extremes and auto follows it, the
 * replay is deterministic, the trace's byte lines are read, and the
 * command prints a row per profile and mode. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache/lanesim.h"
#include "common/buf.h"
#include "harness.h"

enum { NL = 4, NE = 16, NK = 2 };

/* 6 prompt tokens layer-major, then 150 decode tokens; experts skewed
 * towards low ids (a fixed LCG). */
static int make_trace(struct moe_trace *t)
{
    struct moe_buf b;
    moe_buf_init(&b, 0);
    uint32_t x = 12345;
    int rc = moe_buf_printf(&b, "# moe_trace v1 n_layer=%d n_expert=%d n_expert_used=%d\n", NL, NE, NK);
    int tok = 0;
    for (int l = 0; l < NL; l++)
        for (int i = 0; i < 6; i++) {
            x = x * 1103515245u + 12345u;
            const int a = (int)((x >> 16) % 5), c = 5 + (int)((x >> 8) % 11);
            rc |= moe_buf_printf(&b, "%d %d %d:0.6 %d:0.4\n", i, l, a, c);
        }
    tok = 6;
    for (int s = 0; s < 150; s++, tok++)
        for (int l = 0; l < NL; l++) {
            x = x * 1103515245u + 12345u;
            const int a = (int)((x >> 16) % 4), c = 4 + (int)((x >> 8) % 12);
            rc |= moe_buf_printf(&b, "%d %d %d:0.6 %d:0.4\n", tok, l, a, c);
        }
    struct moe_diag d = { 0 };
    if (rc == 0)
        rc = moe_trace_parse(t, b.data, b.len, "synthetic", &d);
    if (rc)
        fprintf(stderr, "  trace: %d %s\n", rc, d.msg);
    moe_buf_free(&b);
    return rc;
}

static uint64_t eb[NL], db[NL];

static struct moe_lanesim_opts opts(enum moe_miss_lane mode, struct moe_lane_rates hw)
{
    for (int l = 0; l < NL; l++) {
        eb[l] = 4u << 20;
        db[l] = 16u << 20;
    }
    return (struct moe_lanesim_opts){ .policy = MOE_POLICY_LAYER, .capacity = 12, .hw = hw, .mode = mode,
                                      .expert_bytes = eb, .dense_bytes = db, .warm = true,
                                      .reuse_min = -1, .bg_horizon = -1 };
}

static void test_fixed_modes(void)
{
    struct moe_trace t;
    CHECK_INT(make_trace(&t), ==, 0);
    const struct moe_lanesim_profile *p = moe_lanesim_profile_find("desktop");
    CHECK(p != NULL);
    struct moe_lanesim_opts o = opts(MOE_MISS_LANE_COPY, p->hw);
    struct moe_lanesim_result rc, ru;
    CHECK_INT(moe_lanesim_run(&t, &o, &rc), ==, 0);
    CHECK_INT(rc.n_cpu + rc.n_both, ==, 0);
    CHECK_INT(rc.n_copy, ==, rc.misses);
    CHECK_INT(rc.hits + rc.misses, >, 0);
    CHECK_INT(rc.decode_tokens, ==, 150);
    CHECK_INT(rc.prefill_tokens, ==, 6);
    CHECK_NEAR(rc.prefill_s + rc.decode_s, rc.total_s, 1e-9);
    o.mode = MOE_MISS_LANE_CPU;
    CHECK_INT(moe_lanesim_run(&t, &o, &ru), ==, 0);
    CHECK_INT(ru.n_copy + ru.n_both, ==, 0);
    CHECK_INT(ru.n_cpu, ==, ru.misses);
    CHECK(ru.link_busy_s == 0);
    /* the same replay twice: the same figures */
    struct moe_lanesim_result r2;
    o.mode = MOE_MISS_LANE_AUTO;
    CHECK_INT(moe_lanesim_run(&t, &o, &ru), ==, 0);
    CHECK_INT(moe_lanesim_run(&t, &o, &r2), ==, 0);
    CHECK(ru.total_s == r2.total_s);
    CHECK_INT(ru.n_both, ==, r2.n_both);
    /* lanes that cannot overlap take at least as long, in every mode */
    for (int mode = 0; mode < MOE_MISS_LANE_COUNT; mode++) {
        struct moe_lanesim_result a, b;
        struct moe_lanesim_opts so = opts((enum moe_miss_lane)mode, p->hw);
        so.no_governor = true;
        CHECK_INT(moe_lanesim_run(&t, &so, &a), ==, 0);
        so.serial = true;
        CHECK_INT(moe_lanesim_run(&t, &so, &b), ==, 0);
        CHECK_MSG(b.total_s >= a.total_s * (1 - 1e-9), "%s: serial %.6f s < overlapped %.6f s",
                  moe_miss_lane_name((enum moe_miss_lane)mode), b.total_s, a.total_s);
        if (mode == MOE_MISS_LANE_CPU)
            CHECK_INT(b.misses, ==, a.misses);
    }
    /* bad options */
    o.capacity = 0;
    CHECK_INT(moe_lanesim_run(&t, &o, &r2), ==, -EINVAL);
    o = opts(MOE_MISS_LANE_AUTO, p->hw);
    o.policy = MOE_POLICY_BELADY;
    CHECK_INT(moe_lanesim_run(&t, &o, &r2), ==, -EINVAL);
    o = opts(MOE_MISS_LANE_AUTO, p->hw);
    o.hw.link_bps = 0;
    CHECK_INT(moe_lanesim_run(&t, &o, &r2), ==, -EINVAL);
    moe_trace_free(&t);
}

/* At a slow link the CPU lane wins, at a slow CPU the copy lane; auto is
 * within 5% of the winner both times. */
static void test_extremes(void)
{
    struct moe_trace t;
    CHECK_INT(make_trace(&t), ==, 0);
    const struct moe_lane_rates slow_link = { .cpu_bps = 60e9, .cpu_tok_bps = 400e9, .link_bps = 0.5e9,
                                              .disk_bps = 5e9, .dev_bps = 1e12, .dev_tok_bps = 10e12,
                                              .cpu_sync_s = 20e-6 };
    const struct moe_lane_rates slow_cpu = { .cpu_bps = 2e9, .cpu_tok_bps = 4e9, .link_bps = 50e9,
                                             .disk_bps = 5e9, .dev_bps = 1e12, .dev_tok_bps = 10e12,
                                             .cpu_sync_s = 20e-6 };
    const struct moe_lane_rates *hw[2] = { &slow_link, &slow_cpu };
    for (int k = 0; k < 2; k++) {
        struct moe_lanesim_result r[MOE_MISS_LANE_COUNT];
        for (int m = 0; m < MOE_MISS_LANE_COUNT; m++) {
            const struct moe_lanesim_opts o = opts((enum moe_miss_lane)m, *hw[k]);
            CHECK_INT(moe_lanesim_run(&t, &o, &r[m]), ==, 0);
        }
        const int win = k == 0 ? MOE_MISS_LANE_CPU : MOE_MISS_LANE_COPY;
        const int lose = k == 0 ? MOE_MISS_LANE_COPY : MOE_MISS_LANE_CPU;
        CHECK_MSG(r[win].total_s < r[lose].total_s, "profile %d: %s %.6f s, %s %.6f s", k,
                  moe_miss_lane_name((enum moe_miss_lane)win), r[win].total_s,
                  moe_miss_lane_name((enum moe_miss_lane)lose), r[lose].total_s);
        CHECK_MSG(r[MOE_MISS_LANE_AUTO].total_s <= 1.05 * r[win].total_s,
                  "profile %d: auto %.6f s, best fixed %.6f s", k, r[MOE_MISS_LANE_AUTO].total_s,
                  r[win].total_s);
    }
    moe_trace_free(&t);
}

static void test_read_bytes(void)
{
    const char *txt = "# route_trace v1\n# layer=0 expert_bytes=4336640 dense_bytes=44191236\n"
                      "# layer=2 expert_bytes=3593216 dense_bytes=7\n# layer=9 expert_bytes=5\n"
                      "# layer=1 dense_bytes=3\n0,0,0,0,0,1,0.5,0,4336640\n";
    uint64_t e[3] = { 1, 1, 1 }, d[3] = { 0, 0, 0 };
    CHECK_INT(moe_lanesim_read_bytes(txt, strlen(txt), 3, e, d), ==, 2);
    CHECK_U64(e[0], ==, 4336640);
    CHECK_U64(e[1], ==, 1);
    CHECK_U64(e[2], ==, 3593216);
    CHECK_U64(d[0], ==, 44191236);
    CHECK_U64(d[1], ==, 3);
    CHECK_U64(d[2], ==, 7);
}

static void test_moectl(void)
{
    const char *moectl = getenv("MOECTL"), *src = getenv("MOE_SOURCE_ROOT");
    if (moectl == NULL || src == NULL)
        MOE_SKIP("MOECTL or MOE_SOURCE_ROOT not set");
    static char out[65536], cmd[4096];
    snprintf(cmd, sizeof(cmd), "%s cache-sim --lanes --trace %s/tests/fixtures/demo/demo-moe.trace"
             " --capacity-pct 25 --policy predict 2>&1", moectl, src);
    CHECK_INT(moe_test_run_cmd(cmd, out, sizeof(out)), ==, 0);
    static const char *const prof[3] = { "desktop", "server", "egpu" };
    for (int p = 0; p < 3; p++) {
        char want[64];
        for (int m = 0; m < MOE_MISS_LANE_COUNT; m++) {
            snprintf(want, sizeof(want), "profile=%s mode=%s ms_per_token=", prof[p],
                     moe_miss_lane_name((enum moe_miss_lane)m));
            CHECK_MSG(strstr(out, want) != NULL, "no '%s' in:\n%s", want, out);
        }
        snprintf(want, sizeof(want), "profile=%s best_fixed=", prof[p]);
        const char *s = strstr(out, want);
        CHECK_MSG(s != NULL, "no '%s' in:\n%s", want, out);
        /* auto within 5% of the better fixed mode on the demo trace */
        const char *a = strstr(s, "auto_vs_best=");
        CHECK(a != NULL);
        const double pct = strtod(a + strlen("auto_vs_best="), NULL);
        CHECK_MSG(pct <= 5.0, "%s: auto %+.1f%% from the best fixed mode", prof[p], pct);
    }
    /* custom rates rename the profile; bad input is a usage error */
    snprintf(cmd, sizeof(cmd), "%s cache-sim --lanes --trace %s/tests/fixtures/demo/demo-moe.trace"
             " --capacity 8 --profile egpu --link-gbps 3 --miss-lane copy 2>&1", moectl, src);
    CHECK_INT(moe_test_run_cmd(cmd, out, sizeof(out)), ==, 0);
    CHECK_MSG(strstr(out, "profile=egpu+custom mode=copy") != NULL, "%s", out);
    CHECK(strstr(out, "mode=cpu") == NULL);
    snprintf(cmd, sizeof(cmd), "%s cache-sim --lanes --trace %s/tests/fixtures/demo/demo-moe.trace"
             " --capacity 8 --profile laptop 2>&1", moectl, src);
    CHECK_INT(moe_test_run_cmd(cmd, out, sizeof(out)), ==, 2);
    CHECK_MSG(strstr(out, "--profile") != NULL, "%s", out);
    snprintf(cmd, sizeof(cmd), "%s cache-sim --lanes --trace %s/tests/fixtures/demo/demo-moe.trace"
             " --capacity 8 --policy belady 2>&1", moectl, src);
    CHECK_INT(moe_test_run_cmd(cmd, out, sizeof(out)), ==, 2);
    snprintf(cmd, sizeof(cmd), "%s cache-sim --lanes --trace /nonexistent --capacity 8 2>&1", moectl);
    CHECK_INT(moe_test_run_cmd(cmd, out, sizeof(out)), ==, 1);
    CHECK_MSG(strstr(out, "/nonexistent") != NULL, "%s", out);
}

int main(void)
{
    MOE_TEST_RUN(test_fixed_modes);
    MOE_TEST_RUN(test_extremes);
    MOE_TEST_RUN(test_read_bytes);
    MOE_TEST_RUN(test_moectl);
    return moe_test_exit_code();
}
