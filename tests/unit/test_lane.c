/* cache/lane.h: the per-miss lane rule at its boundaries, the rates'
 * EWMAs, the governor's fallback to a fixed mode, the reuse estimate. */
#include <errno.h>
#include <stdlib.h>

#include "cache/lane.h"
#include "harness.h"

static const uint64_t MB4 = 4u << 20;

/* rates where only cpu_bps and link_bps matter at one token */
static void rates_simple(struct moe_lane_rates *r, double cpu, double link)
{
    *r = (struct moe_lane_rates){ .cpu_bps = cpu, .cpu_tok_bps = 1e18, .link_bps = link,
                                  .disk_bps = 1e9, .dev_bps = 1e15, .dev_tok_bps = 1e18 };
}

static void test_names(void)
{
    for (int i = 0; i < MOE_MISS_LANE_COUNT; i++)
        CHECK_INT(moe_miss_lane_from_name(moe_miss_lane_name((enum moe_miss_lane)i)), ==, i);
    CHECK_INT(moe_miss_lane_from_name("gpu"), ==, -1);
    CHECK_STR(moe_miss_lane_name((enum moe_miss_lane)7), "?");
}

static void test_fixed_modes(void)
{
    struct moe_lane_state st;
    struct moe_lane_miss m[3] = { { MB4, 1, true, 100 }, { MB4, 64, true, 0 }, { MB4, 1, false, 5 } };
    uint8_t c[3];
    moe_lane_init(&st, MOE_MISS_LANE_COPY, NULL);
    moe_lane_decide(&st, NULL, m, 3, c);
    for (int i = 0; i < 3; i++)
        CHECK_INT(c[i], ==, MOE_LANE_COPY);
    moe_lane_init(&st, MOE_MISS_LANE_CPU, NULL);
    moe_lane_decide(&st, NULL, m, 3, c);
    for (int i = 0; i < 3; i++)
        CHECK_INT(c[i], ==, MOE_LANE_CPU);
    CHECK_U64(st.n_cpu, ==, 3);
    CHECK_INT(moe_lane_current(&st), ==, MOE_MISS_LANE_CPU);
}

/* One miss at one token, no reuse: the faster lane, the CPU on a tie. */
static void test_boundary_one_token(void)
{
    struct moe_lane_state st;
    struct moe_lane_rates r;
    struct moe_lane_miss m = { MB4, 1, true, 0 };
    uint8_t c;
    /* copy: S / link + S / dev = S / 25e9 + S / 1e15 */
    const double g = (double)MB4 / 25e9 + (double)MB4 / 1e15;
    const double cpu_tie = (double)MB4 / g;
    rates_simple(&r, cpu_tie * 1.001, 25e9);
    moe_lane_init(&st, MOE_MISS_LANE_AUTO, &r);
    moe_lane_decide(&st, NULL, &m, 1, &c);
    CHECK_INT(c, ==, MOE_LANE_CPU);
    rates_simple(&r, cpu_tie * 0.999, 25e9);
    moe_lane_init(&st, MOE_MISS_LANE_AUTO, &r);
    moe_lane_decide(&st, NULL, &m, 1, &c);
    CHECK_INT(c, ==, MOE_LANE_COPY);
    /* the desktop: DDR5 60 GB/s against PCIe 4.0 25 GB/s: the CPU */
    rates_simple(&r, 60e9, 25e9);
    moe_lane_init(&st, MOE_MISS_LANE_AUTO, &r);
    moe_lane_decide(&st, NULL, &m, 1, &c);
    CHECK_INT(c, ==, MOE_LANE_CPU);
}

/* Many tokens make the CPU compute-bound: the copy lane takes the expert. */
static void test_prefill_copies(void)
{
    struct moe_lane_state st;
    moe_lane_init(&st, MOE_MISS_LANE_AUTO, NULL);    /* the desktop defaults */
    struct moe_lane_miss m = { MB4, 1, true, 0 };
    uint8_t c;
    moe_lane_decide(&st, NULL, &m, 1, &c);
    CHECK_INT(c, ==, MOE_LANE_CPU);
    m.n_tokens = 64;
    moe_lane_decide(&st, NULL, &m, 1, &c);
    CHECK_INT(c, ==, MOE_LANE_COPY);
    /* the boundary in tokens: CPU n S / cpu_tok = S / link + dev */
    const struct moe_lane_rates *r = &st.r;
    const double g1 = moe_lane_link_s(r, MB4) + moe_lane_dev_s(r, MB4, 1);
    int n_tie = 1;
    while (moe_lane_cpu_s(r, MB4, n_tie) + r->cpu_sync_s <=
           g1 + moe_lane_dev_s(r, MB4, n_tie) - moe_lane_dev_s(r, MB4, 1))
        n_tie++;
    m.n_tokens = n_tie - 1;
    moe_lane_decide(&st, NULL, &m, 1, &c);
    CHECK_INT(c, ==, MOE_LANE_CPU);
    m.n_tokens = n_tie;
    moe_lane_decide(&st, NULL, &m, 1, &c);
    CHECK_INT(c, ==, MOE_LANE_COPY);
}

/* Equal lanes split equal misses in half; a lane made twice as fast takes
 * two thirds; the hits' device time counts against the copy lane. */
static void test_balance(void)
{
    struct moe_lane_state st;
    struct moe_lane_rates r;
    struct moe_lane_miss m[12];
    uint8_t c[12];
    for (int i = 0; i < 12; i++)
        m[i] = (struct moe_lane_miss){ MB4, 1, true, 0 };
    rates_simple(&r, 20e9, 20e9);
    moe_lane_init(&st, MOE_MISS_LANE_AUTO, &r);
    moe_lane_decide(&st, NULL, m, 12, c);
    int copies = 0;
    for (int i = 0; i < 12; i++)
        copies += c[i] == MOE_LANE_COPY;
    CHECK_INT(copies, ==, 6);
    rates_simple(&r, 20e9, 40e9);
    moe_lane_init(&st, MOE_MISS_LANE_AUTO, &r);
    moe_lane_decide(&st, NULL, m, 12, c);
    copies = 0;
    for (int i = 0; i < 12; i++)
        copies += c[i] == MOE_LANE_COPY;
    CHECK_INT(copies, ==, 8);
    /* the device busy with hits for longer than all the copies: CPU only
     * until the CPU lane would end later than the device */
    rates_simple(&r, 20e9, 20e9);
    r.dev_bps = 1e9;    /* hits: 1e9 B at 1 GB/s = 1 s; a copied expert adds S/dev */
    moe_lane_init(&st, MOE_MISS_LANE_AUTO, &r);
    struct moe_lane_step step = { .hit_bytes = 1000000000 };
    moe_lane_decide(&st, &step, m, 12, c);
    for (int i = 0; i < 12; i++)
        CHECK_INT(c[i], ==, MOE_LANE_CPU);  /* 12 x 0.21 ms on the CPU < 1 s */
}

/* Background uploads: with reuse and an idle link a CPU-lane miss is also
 * copied; not below reuse_min, not when the link's queue is full; the best
 * saving per link second first. */
static void test_background(void)
{
    struct moe_lane_state st;
    struct moe_lane_rates r;
    rates_simple(&r, 60e9, 25e9);
    struct moe_lane_miss m[2] = { { MB4, 1, true, 3.0 }, { MB4, 1, true, 0.2 } };
    uint8_t c[2];
    moe_lane_init(&st, MOE_MISS_LANE_AUTO, &r);
    st.bg_horizon = 10;
    moe_lane_decide(&st, NULL, m, 2, c);
    CHECK_INT(c[0], ==, MOE_LANE_COPY | MOE_LANE_CPU);
    CHECK_INT(c[1], ==, MOE_LANE_CPU);             /* reuse 0.2 < reuse_min 1 */
    CHECK_U64(st.n_both, ==, 1);
    /* the link busy for a second: no room */
    struct moe_lane_step step = { .link_busy_s = 1.0, .link_busy_known = true };
    moe_lane_decide(&st, &step, m, 2, c);
    CHECK_INT(c[0], ==, MOE_LANE_CPU);
    /* room for one upload only: the larger reuse goes */
    m[1].expected_reuse = 8.0;
    st.bg_horizon = 0.5;
    st.token_s = 0.4e-3;   /* the queue may hold 0.2 ms: one 0.17 ms upload */
    step.link_busy_s = 0;
    moe_lane_decide(&st, &step, m, 2, c);
    CHECK_INT(c[0], ==, MOE_LANE_CPU);
    CHECK_INT(c[1], ==, MOE_LANE_COPY | MOE_LANE_CPU);
    /* what a copy would evict is worth more: nothing is uploaded */
    step.evict_reuse = 9.0;
    moe_lane_decide(&st, &step, m, 2, c);
    CHECK_INT(c[0], ==, MOE_LANE_CPU);
    CHECK_INT(c[1], ==, MOE_LANE_CPU);
}

/* A copy that is faster now still loses when it evicts a more useful
 * expert: the victim's lost hits are charged to the copy. */
static void test_evict_cost(void)
{
    struct moe_lane_state st;
    struct moe_lane_rates r;
    rates_simple(&r, 20e9, 40e9);   /* copy 0.1 ms, CPU 0.21 ms */
    moe_lane_init(&st, MOE_MISS_LANE_AUTO, &r);
    struct moe_lane_miss m = { MB4, 1, true, 0.0 };
    struct moe_lane_step step = { .link_busy_known = true };
    uint8_t c;
    moe_lane_decide(&st, &step, &m, 1, &c);
    CHECK_INT(c, ==, MOE_LANE_COPY);
    /* victim worth 1 hit: 0.21 ms of CPU later, more than the 0.1 ms won */
    step.evict_reuse = 1.0;
    moe_lane_decide(&st, &step, &m, 1, &c);
    CHECK_INT(c, ==, MOE_LANE_CPU);
    /* the miss as useful as the victim: no charge */
    m.expected_reuse = 1.0;
    moe_lane_decide(&st, &step, &m, 1, &c);
    CHECK_INT(c, ==, MOE_LANE_COPY);
}

/* An expert not in the host tier pays the disk read in both lanes: at
 * equal rates the balance holds and nothing breaks. */
static void test_disk(void)
{
    struct moe_lane_state st;
    struct moe_lane_rates r;
    rates_simple(&r, 60e9, 25e9);
    moe_lane_init(&st, MOE_MISS_LANE_AUTO, &r);
    struct moe_lane_miss m = { MB4, 1, false, 0 };
    uint8_t c;
    moe_lane_decide(&st, NULL, &m, 1, &c);
    CHECK_INT(c, ==, MOE_LANE_CPU);
    CHECK_NEAR(moe_lane_disk_s(&st.r, MB4), (double)MB4 / 1e9, 1e-12);
}

static void test_observe(void)
{
    struct moe_lane_state st;
    moe_lane_init(&st, MOE_MISS_LANE_AUTO, NULL);
    for (int i = 0; i < 100; i++) {
        moe_lane_observe_cpu(&st, MB4, MB4, (double)MB4 / 20e9);      /* memory-bound */
        moe_lane_observe_link(&st, MB4, (double)MB4 / 3e9);
        moe_lane_observe_disk(&st, MB4, (double)MB4 / 2e9);
        moe_lane_observe_dev(&st, MB4, MB4, (double)MB4 / 500e9);
    }
    CHECK_NEAR(st.r.cpu_bps / 20e9, 1.0, 1e-6);
    CHECK_NEAR(st.r.link_bps / 3e9, 1.0, 1e-6);
    CHECK_NEAR(st.r.disk_bps / 2e9, 1.0, 1e-6);
    CHECK_NEAR(st.r.dev_bps / 500e9, 1.0, 1e-6);
    for (int i = 0; i < 100; i++)
        moe_lane_observe_sync(&st, 50e-6);
    CHECK_NEAR(st.r.cpu_sync_s, 50e-6, 1e-12);
    /* 64 tokens at 40e9 byte-tokens/s: compute-bound, the other rate moves */
    for (int i = 0; i < 100; i++)
        moe_lane_observe_cpu(&st, MB4, 64 * MB4, 64.0 * MB4 / 40e9);
    CHECK_NEAR(st.r.cpu_tok_bps / 40e9, 1.0, 1e-6);
    CHECK_NEAR(st.r.cpu_bps / 20e9, 1.0, 1e-6);
    /* nothing measured: ignored */
    moe_lane_observe_link(&st, 0, 1.0);
    moe_lane_observe_link(&st, MB4, 0);
    CHECK_NEAR(st.r.link_bps / 3e9, 1.0, 1e-6);
    /* a slow link measured makes the rule stop copying */
    struct moe_lane_miss m = { MB4, 8, true, 0 };
    uint8_t c;
    moe_lane_decide(&st, NULL, &m, 1, &c);
    CHECK_INT(c, ==, MOE_LANE_CPU);
}

/* Feeds decode steps whose time depends on the arm running. */
static void run_gov(struct moe_lane_state *st, const double t[3], int steps)
{
    for (int i = 0; i < steps; i++)
        moe_lane_observe_step(st, t[moe_lane_current(st)], 1);
}

static void test_governor_falls_back(void)
{
    struct moe_lane_state st;
    moe_lane_init(&st, MOE_MISS_LANE_AUTO, NULL);
    CHECK_INT(moe_lane_current(&st), ==, MOE_MISS_LANE_AUTO);
    /* auto 10% slower than cpu: falls back to cpu after the first probes */
    const double t[3] = { 1.1, 3.0, 1.0 };
    run_gov(&st, t, 2 * MOE_LANE_GOV_PROBE + 3 * MOE_LANE_GOV_PROBE);
    CHECK_INT(moe_lane_current(&st), ==, MOE_MISS_LANE_CPU);
    CHECK_INT(st.gov.best, ==, MOE_MISS_LANE_CPU);
    CHECK_U64(st.gov.switches, ==, 1);
    /* the copy probe, 3x slower, stopped early */
    CHECK_U64(st.gov.steps[MOE_MISS_LANE_COPY], ==, MOE_LANE_GOV_EARLY);
    /* over a long run the time stays within a few percent of cpu's */
    struct moe_lane_state s2;
    moe_lane_init(&s2, MOE_MISS_LANE_AUTO, NULL);
    double total = 0;
    for (int i = 0; i < 5000; i++) {
        const double dt = t[moe_lane_current(&s2)];
        total += dt;
        moe_lane_observe_step(&s2, dt, 1);
    }
    CHECK_MSG(total < 5000 * 1.0 * 1.05, "5000 steps took %.1f, cpu alone 5000", total);
    /* prefill steps neither count nor move the phase */
    const int left = s2.gov.left;
    moe_lane_observe_step(&s2, 100.0, 32);
    CHECK_INT(s2.gov.left, ==, left);
}

static void test_governor_keeps_auto(void)
{
    struct moe_lane_state st;
    moe_lane_init(&st, MOE_MISS_LANE_AUTO, NULL);
    /* a fixed mode within the margin does not take over */
    const double t[3] = { 1.0, 1.5, 0.99 };
    run_gov(&st, t, 2 * MOE_LANE_GOV_PROBE + 3 * MOE_LANE_GOV_PROBE);
    CHECK_INT(moe_lane_current(&st), ==, MOE_MISS_LANE_AUTO);
    CHECK_INT(st.gov.exploit_len, ==, 2 * MOE_LANE_GOV_EXPLOIT_MIN);
    /* the window doubles while auto wins, up to the maximum */
    run_gov(&st, t, 20000);
    CHECK_INT(st.gov.exploit_len, ==, MOE_LANE_GOV_EXPLOIT_MAX);
    const uint64_t probes = st.gov.steps[MOE_MISS_LANE_COPY] + st.gov.steps[MOE_MISS_LANE_CPU];
    CHECK_MSG(probes * 100 < 20000 * 3, "%llu probe steps of 20000", (unsigned long long)probes);
    /* a fixed setting is left alone by the governor */
    moe_lane_init(&st, MOE_MISS_LANE_COPY, NULL);
    run_gov(&st, t, 100);
    CHECK_INT(moe_lane_current(&st), ==, MOE_MISS_LANE_COPY);
    CHECK_U64(st.gov.steps[MOE_MISS_LANE_COPY], ==, 100);
}

/* The model rules out probing copy-only when it predicts it far slower. */
static void test_governor_skips(void)
{
    struct moe_lane_state st;
    struct moe_lane_rates r;
    rates_simple(&r, 60e9, 1e9);                /* an eGPU link */
    moe_lane_init(&st, MOE_MISS_LANE_AUTO, &r);
    struct moe_lane_miss m[2] = { { MB4, 1, true, 0 }, { MB4, 1, true, 0 } };
    uint8_t c[2];
    const double t[3] = { 1.0, 30.0, 1.05 };
    for (int i = 0; i < 300; i++) {
        moe_lane_decide(&st, NULL, m, 2, c);
        const enum moe_miss_lane arm = moe_lane_current(&st);
        CHECK_INT(c[0], ==, arm == MOE_MISS_LANE_COPY ? MOE_LANE_COPY : MOE_LANE_CPU);
        moe_lane_observe_step(&st, t[arm], 1);
    }
    CHECK_U64(st.gov.steps[MOE_MISS_LANE_COPY], ==, 0);
    CHECK(st.gov.probes_skipped >= 2);
    CHECK(st.gov.steps[MOE_MISS_LANE_CPU] > 0);   /* cpu is within reach: probed */
}

static void test_reuse(void)
{
    struct moe_lane_reuse ru;
    CHECK_INT(moe_lane_reuse_init(&ru, 0, 8, 2, 4), ==, -EINVAL);
    CHECK_INT(moe_lane_reuse_init(&ru, 2, 8, 2, 8), ==, 0);
    /* prior: p = 2/8, inserted per visit 2 x 6/8 = 1.5, 4 slots per layer */
    CHECK_NEAR(moe_lane_reuse_expect(&ru, 0, 3), 0.25 * 4 / 1.5, 1e-6);
    const int32_t ids[2] = { 1, 5 };
    for (int i = 0; i < 50; i++)
        moe_lane_reuse_visit(&ru, 0, ids, 2, 0);
    /* always used, never a miss: the cap-free estimate grows large */
    CHECK(moe_lane_reuse_expect(&ru, 0, 1) > 100);
    CHECK(moe_lane_reuse_expect(&ru, 0, 3) < 0.05 * moe_lane_reuse_expect(&ru, 0, 1));
    /* the marginal expert of a 4-slot layer: 2 used always, the rest rare */
    CHECK(moe_lane_reuse_victim(&ru, 0) < moe_lane_reuse_expect(&ru, 0, 3) + 1e-9);
    /* under auto few misses are inserted: the stay, so the reuse, grows */
    const double before = moe_lane_reuse_expect(&ru, 1, 2);
    moe_lane_reuse_visit(&ru, 1, ids, 2, 2);
    const double all_in = moe_lane_reuse_expect(&ru, 1, 2);
    moe_lane_reuse_inserted(&ru, 1, 0);
    CHECK(moe_lane_reuse_expect(&ru, 1, 2) > all_in);
    CHECK(before > 0);
    /* seeded from counts: expert 7 of layer 1 in every token, 6 never */
    uint32_t uses[16] = { 0 };
    uses[8 + 7] = 100;
    uses[8 + 0] = 100;
    moe_lane_reuse_seed(&ru, uses);
    CHECK(ru.p[8 + 7] > 0.99f);
    CHECK(ru.p[8 + 6] < 0.01f);
    CHECK(ru.p[1] > 0.5f);   /* layer 0 without counts keeps its own */
    CHECK(moe_lane_reuse_expect(&ru, 0, 1) <= MOE_LANE_REUSE_CAP);
    /* out of range: 0, ignored */
    CHECK_NEAR(moe_lane_reuse_expect(&ru, 2, 0), 0, 0);
    CHECK_NEAR(moe_lane_reuse_expect(&ru, 0, 8), 0, 0);
    const int32_t bad[2] = { -1, 99 };
    moe_lane_reuse_visit(&ru, 1, bad, 2, 2);
    moe_lane_reuse_visit(&ru, 7, ids, 2, 2);
    moe_lane_reuse_free(&ru);
    moe_lane_reuse_free(&ru);
    moe_lane_reuse_free(NULL);
}

int main(void)
{
    MOE_TEST_RUN(test_names);
    MOE_TEST_RUN(test_fixed_modes);
    MOE_TEST_RUN(test_boundary_one_token);
    MOE_TEST_RUN(test_prefill_copies);
    MOE_TEST_RUN(test_balance);
    MOE_TEST_RUN(test_background);
    MOE_TEST_RUN(test_evict_cost);
    MOE_TEST_RUN(test_disk);
    MOE_TEST_RUN(test_observe);
    MOE_TEST_RUN(test_governor_falls_back);
    MOE_TEST_RUN(test_governor_keeps_auto);
    MOE_TEST_RUN(test_governor_skips);
    MOE_TEST_RUN(test_reuse);
    return moe_test_exit_code();
}
