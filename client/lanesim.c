/* moectl cache-sim --lanes: predicted time per token of the miss-lane
 * modes (cache/lanesim.h) under hardware profiles.
 *
 *   moectl cache-sim --lanes --trace FILE (--capacity N | --capacity-pct P)
 *       [--policy lru|lfu|layer|predict] [--profile desktop,server,egpu]
 *       [--miss-lane auto|copy|cpu|all] [--cold] [--no-governor] [--uncalibrated] [--no-overlap]
 *       [--host-pct P] [--expert-bytes B] [--dense-bytes B]
 *       [--cpu-gbps X] [--cpu-tok-gbps X] [--link-gbps X] [--disk-gbps X]
 *       [--dev-gbps X] [--dev-tok-gbps X] [--sync-us X] [--reuse-min R] [--bg-horizon F]
 *
 * One line per profile and mode:
 *   profile=P mode=M ms_per_token=T decode_ms_per_token=D prefill_ms_per_token=F
 *   hit_rate=H copy=C cpu=U both=B link_busy_s=L cpu_busy_s=Q [gov=a/c/u]
 * and per profile when all three modes ran:
 *   profile=P best_fixed=M auto_vs_best=+X% decode_auto_vs_best=+Y%
 * Rate flags (GB/s, sync in microseconds) change the chosen profiles'
 * figures and name them "custom". Expert and dense bytes come from the
 * trace's "# layer=L expert_bytes=B dense_bytes=D" lines (the route_trace
 * CSV has them), else --expert-bytes (default 4 MiB) and --dense-bytes
 * (default 0) for every layer.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache/lanesim.h"
#include "client/cli.h"
#include "common/alloc.h"
#include "common/buf.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: moectl cache-sim --lanes --trace FILE (--capacity N | --capacity-pct P)\n"
               "         [--policy lru|lfu|layer|predict] [--profile desktop,server,egpu]\n"
               "         [--miss-lane auto|copy|cpu|all] [--cold] [--no-governor] [--uncalibrated] [--no-overlap]\n"
               "         [--host-pct P] [--expert-bytes B] [--dense-bytes B]\n"
               "         [--cpu-gbps X] [--cpu-tok-gbps X] [--link-gbps X] [--disk-gbps X]\n"
               "         [--dev-gbps X] [--dev-tok-gbps X] [--sync-us X] [--reuse-min R] [--bg-horizon F]\n");
}

static int parse_pos(const char *flag, const char *v, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    const double x = strtod(v, &end);
    if (errno || *end || end == v || !(x >= lo && x <= hi)) {
        fprintf(stderr, "moectl: %s '%s': expected a number in [%g, %g]\n", flag, v, lo, hi);
        return -1;
    }
    *out = x;
    return 0;
}

static void print_row(const char *prof, enum moe_miss_lane mode, const struct moe_lanesim_result *r)
{
    const int64_t tok = r->prefill_tokens + r->decode_tokens;
    const int64_t acc = r->hits + r->misses;
    printf("profile=%s mode=%s ms_per_token=%.4f decode_ms_per_token=%.4f prefill_ms_per_token=%.4f"
           " hit_rate=%.4f copy=%lld cpu=%lld both=%lld link_busy_s=%.4f cpu_busy_s=%.4f",
           prof, moe_miss_lane_name(mode), tok ? 1e3 * r->total_s / (double)tok : 0,
           r->decode_tokens ? 1e3 * r->decode_s / (double)r->decode_tokens : 0,
           r->prefill_tokens ? 1e3 * r->prefill_s / (double)r->prefill_tokens : 0,
           acc ? (double)r->hits / (double)acc : 0, (long long)r->n_copy, (long long)r->n_cpu,
           (long long)r->n_both, r->link_busy_s, r->cpu_busy_s);
    if (mode == MOE_MISS_LANE_AUTO)
        printf(" gov=%llu/%llu/%llu", (unsigned long long)r->gov_steps[0],
               (unsigned long long)r->gov_steps[1], (unsigned long long)r->gov_steps[2]);
    printf("\n");
}

int moectl_cachesim_lanes_main(int argc, char **argv)
{
    const char *trace_path = NULL, *prof_list = "desktop,server,egpu";
    long capacity = -1;
    double cap_pct = -1, host_pct = -1, expert_b = 4194304, dense_b = 0;
    int policy = MOE_POLICY_LAYER, only_mode = -1;
    bool cold = false, no_gov = false, uncal = false, serial = false;
    /* overrides: cpu, cpu_tok, link, disk, dev, dev_tok (GB/s), sync (us) */
    double ov[7] = { -1, -1, -1, -1, -1, -1, -1 };
    double reuse_min = -1, bg_horizon = -1;
    static const char *const ov_flags[7] = { "--cpu-gbps", "--cpu-tok-gbps", "--link-gbps", "--disk-gbps",
                                             "--dev-gbps", "--dev-tok-gbps", "--sync-us" };
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int ovi = -1;
        for (int k = 0; k < 7; k++)
            if (strcmp(a, ov_flags[k]) == 0)
                ovi = k;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(a, "--lanes") == 0) {
            continue;
        } else if (strcmp(a, "--cold") == 0) {
            cold = true;
        } else if (strcmp(a, "--no-governor") == 0) {
            no_gov = true;
        } else if (strcmp(a, "--uncalibrated") == 0) {
            uncal = true;
        } else if (strcmp(a, "--no-overlap") == 0) {
            serial = true;
        } else if (v == NULL) {
            fprintf(stderr, "moectl: cache-sim --lanes: unknown or incomplete option '%s'\n", a);
            usage(stderr);
            return 2;
        } else if (ovi >= 0) {
            if (parse_pos(a, v, ovi == 6 ? 0 : 1e-3, ovi == 6 ? 1e6 : 1e6, &ov[ovi]))
                return 2;
            i++;
        } else if (strcmp(a, "--trace") == 0) {
            trace_path = v;
            i++;
        } else if (strcmp(a, "--capacity") == 0) {
            double x;
            if (parse_pos(a, v, 1, 1 << 30, &x))
                return 2;
            capacity = (long)x;
            i++;
        } else if (strcmp(a, "--capacity-pct") == 0) {
            if (parse_pos(a, v, 1e-6, 100, &cap_pct))
                return 2;
            i++;
        } else if (strcmp(a, "--host-pct") == 0) {
            if (parse_pos(a, v, 1e-6, 100, &host_pct))
                return 2;
            i++;
        } else if (strcmp(a, "--expert-bytes") == 0) {
            if (parse_pos(a, v, 1, 1e12, &expert_b))
                return 2;
            i++;
        } else if (strcmp(a, "--dense-bytes") == 0) {
            if (parse_pos(a, v, 0, 1e13, &dense_b))
                return 2;
            i++;
        } else if (strcmp(a, "--reuse-min") == 0) {
            if (parse_pos(a, v, 0, 1e6, &reuse_min))
                return 2;
            i++;
        } else if (strcmp(a, "--bg-horizon") == 0) {
            if (parse_pos(a, v, 0, 1e6, &bg_horizon))
                return 2;
            i++;
        } else if (strcmp(a, "--policy") == 0) {
            policy = moe_policy_from_name(v);
            if (policy < 0 || policy == MOE_POLICY_BELADY) {
                fprintf(stderr, "moectl: --policy '%s': expected lru, lfu, layer or predict (belady needs"
                                " the future, which the lanes cannot use)\n", v);
                return 2;
            }
            i++;
        } else if (strcmp(a, "--profile") == 0) {
            prof_list = v;
            i++;
        } else if (strcmp(a, "--miss-lane") == 0) {
            if (strcmp(v, "all") != 0 && (only_mode = moe_miss_lane_from_name(v)) < 0) {
                fprintf(stderr, "moectl: --miss-lane '%s': expected auto, copy, cpu or all\n", v);
                return 2;
            }
            i++;
        } else {
            fprintf(stderr, "moectl: cache-sim --lanes: unknown option '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (trace_path == NULL || (capacity < 0 && cap_pct < 0)) {
        fprintf(stderr, "moectl: cache-sim --lanes needs --trace and --capacity or --capacity-pct\n");
        usage(stderr);
        return 2;
    }
    /* the profiles, checked before the trace is read */
    const struct moe_lanesim_profile *sel[8];
    int n_sel = 0;
    for (const char *p = prof_list; *p;) {
        const char *c = strchr(p, ',');
        const size_t len = c ? (size_t)(c - p) : strlen(p);
        char name[32];
        if (len == 0 || len >= sizeof(name) || n_sel == 8) {
            fprintf(stderr, "moectl: --profile '%s': expected names like desktop,server,egpu\n", prof_list);
            return 2;
        }
        memcpy(name, p, len);
        name[len] = '\0';
        if ((sel[n_sel++] = moe_lanesim_profile_find(name)) == NULL) {
            fprintf(stderr, "moectl: --profile '%s': unknown (desktop, server or egpu)\n", name);
            return 2;
        }
        p = c ? c + 1 : p + len;
    }
    struct moe_buf text;
    moe_buf_init(&text, (size_t)1 << 31);
    struct moe_trace t;
    struct moe_diag d = { 0 };
    int e = moe_buf_read_file(&text, trace_path);
    if (e) {
        fprintf(stderr, "moectl: %s: %s\n", trace_path, e == MOE_ELIMIT ? "too large" : strerror(-e));
        moe_buf_free(&text);
        return 1;
    }
    if (moe_trace_parse(&t, text.data ? text.data : "", text.len, trace_path, &d)) {
        fprintf(stderr, "moectl: %s\n", d.msg);
        moe_buf_free(&text);
        return 1;
    }
    int rc = 1;
    uint64_t *eb = moe_malloc((size_t)t.n_layer * sizeof(uint64_t));
    uint64_t *db = moe_malloc((size_t)t.n_layer * sizeof(uint64_t));
    if (!eb || !db) {
        fprintf(stderr, "moectl: out of memory\n");
        goto out;
    }
    for (int l = 0; l < t.n_layer; l++) {
        eb[l] = (uint64_t)expert_b;
        db[l] = (uint64_t)dense_b;
    }
    const int from_trace = moe_lanesim_read_bytes(text.data ? text.data : "", text.len, t.n_layer, eb, db);
    const long n_keys = (long)t.n_layer * t.n_expert;
    const int cap = capacity > 0 ? (int)(capacity < n_keys ? capacity : n_keys)
                                 : (int)(n_keys * cap_pct / 100.0 >= 1 ? n_keys * cap_pct / 100.0 : 1);
    const int host_cap = host_pct > 0 ? (int)(n_keys * host_pct / 100.0 >= 1 ? n_keys * host_pct / 100.0 : 1) : 0;
    double mean_eb = 0, sum_db = 0;
    for (int l = 0; l < t.n_layer; l++) {
        mean_eb += (double)eb[l] / t.n_layer;
        sum_db += (double)db[l];
    }
    printf("# lanes trace=%s layers=%d experts=%d policy=%s capacity=%d (%.1f%%) expert_bytes=%.0f%s"
           " dense_bytes_per_token=%.0f start=%s host=%s governor=%s rates=%s%s\n",
           trace_path, t.n_layer, t.n_expert, moe_policy_name((enum moe_policy_kind)policy), cap,
           100.0 * cap / n_keys, mean_eb, from_trace ? " (trace)" : "", sum_db, cold ? "cold" : "warm",
           host_cap ? "partial" : "all", no_gov ? "off" : "on", uncal ? "defaults" : "calibrated", serial ? " lanes=serial" : "");
    struct moe_policy_params prm;
    moe_policy_defaults(&prm);
    const bool custom = ov[0] > 0 || ov[1] > 0 || ov[2] > 0 || ov[3] > 0 || ov[4] > 0 || ov[5] > 0 || ov[6] >= 0;
    for (int p = 0; p < n_sel; p++) {
        struct moe_lane_rates hw = sel[p]->hw;
        double *f[6] = { &hw.cpu_bps, &hw.cpu_tok_bps, &hw.link_bps, &hw.disk_bps, &hw.dev_bps, &hw.dev_tok_bps };
        for (int k = 0; k < 6; k++)
            if (ov[k] > 0)
                *f[k] = ov[k] * 1e9;
        if (ov[6] >= 0)
            hw.cpu_sync_s = ov[6] * 1e-6;
        char pname[48];
        snprintf(pname, sizeof(pname), "%s%s", sel[p]->name, custom ? "+custom" : "");
        struct moe_lanesim_result res[MOE_MISS_LANE_COUNT];
        bool ran[MOE_MISS_LANE_COUNT] = { false, false, false };
        /* fixed modes first, auto last, so the summary follows */
        static const int order[3] = { MOE_MISS_LANE_COPY, MOE_MISS_LANE_CPU, MOE_MISS_LANE_AUTO };
        for (int k = 0; k < 3; k++) {
            const int mode = order[k];
            if (only_mode >= 0 && mode != only_mode)
                continue;
            const struct moe_lanesim_opts so = {
                .policy = (enum moe_policy_kind)policy, .capacity = cap, .params = &prm, .hw = hw,
                .mode = (enum moe_miss_lane)mode, .expert_bytes = eb, .dense_bytes = db,
                .host_capacity = host_cap, .warm = !cold, .no_governor = no_gov, .uncalibrated = uncal, .serial = serial,
                .reuse_min = reuse_min, .bg_horizon = bg_horizon,
            };
            e = moe_lanesim_run(&t, &so, &res[mode]);
            if (e) {
                fprintf(stderr, "moectl: cache-sim --lanes: %s: %s\n", trace_path,
                        e == -ENOMEM ? "out of memory" : "the trace's sizes do not allow this simulation");
                goto out;
            }
            ran[mode] = true;
            print_row(pname, (enum moe_miss_lane)mode, &res[mode]);
        }
        if (ran[0] && ran[1] && ran[2]) {
            const int best = res[MOE_MISS_LANE_COPY].total_s <= res[MOE_MISS_LANE_CPU].total_s
                                 ? MOE_MISS_LANE_COPY : MOE_MISS_LANE_CPU;
            const double dec_best = res[1].decode_s < res[2].decode_s ? res[1].decode_s : res[2].decode_s;
            printf("profile=%s best_fixed=%s auto_vs_best=%+.1f%% decode_auto_vs_best=%+.1f%%\n", pname,
                   moe_miss_lane_name((enum moe_miss_lane)best),
                   100.0 * (res[0].total_s / res[best].total_s - 1),
                   dec_best > 0 ? 100.0 * (res[0].decode_s / dec_best - 1) : 0.0);
        }
    }
    rc = 0;
out:
    moe_free(eb);
    moe_free(db);
    moe_trace_free(&t);
    moe_buf_free(&text);
    return rc;
}
