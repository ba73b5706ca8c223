/* moectl cache-sim: replay a routing trace against a global expert cache.
 *
 *   moectl cache-sim --trace FILE [--capacity N | --capacity-pct P]
 *                    [--policy lru|lfu|layer|predict|belady] [--sweep P1,P2,...] [--plot OUT.svg]
 *                    [--prefetch none|history|oracle] [--prefetch-depth D] [--per-layer]
 *                    [--lookahead H] [--warm-from FILE [--warm preload|seed]]
 *   moectl cache-sim --lanes ...   (client/lanesim.c: copy, CPU or both per miss)
 *
 * One line per policy and capacity:
 *   policy=P capacity=N accesses=A hits=H hit_rate=X
 * and with --prefetch, on every policy but Belady (the demand-paging
 * optimum, printed without prefetch):
 *   ... prefetch=K depth=D issued=I used=U wasted=W dropped=R loads=L
 * (cache/sim.h: what the simulated prefetch does). With --per-layer, after
 * each of those lines one per MoE layer:
 *   layer=L accesses=A hits=H hit_rate=X slots=S
 * S the mean number of the layer's experts cached (cache/sim.h).
 * --lookahead H (an oracle, cache/sim.h) protects from eviction the experts
 * the next H visits of their layer use; the lines of every policy but Belady
 * then end with `lookahead=H`.
 * --warm-from FILE replays a warm restart (cache/sim.h, model/warm.c): FILE,
 * a trace of the same model, is run first with the same policy and
 * capacity; what the engine would have saved from it (each expert's uses,
 * `predict`'s transition counts) preloads the most used experts and, with
 * `--warm seed` (the default, what moed does), seeds the policy; `--warm
 * preload` only preloads. The lines of every policy but Belady (cold: the
 * optimum from an empty cache) then end with `warm=MODE`.
 * Every policy (Belady included) when --policy is not given. --sweep takes
 * capacities in percent of all (layer, expert) keys; --plot writes hit rate
 * vs capacity per policy as an SVG.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache/sim.h"
#include "client/cli.h"

#define MAX_POINTS 64

static void usage(FILE *f)
{
    fprintf(f, "usage: moectl cache-sim --trace FILE [--capacity N | --capacity-pct P]\n"
               "                        [--policy lru|lfu|layer|predict|belady] [--sweep P1,P2,...]"
               " [--plot OUT.svg]\n"
               "                        [--prefetch none|history|oracle] [--prefetch-depth D] [--per-layer]\n"
               "                        [--lookahead H] [--warm-from FILE [--warm preload|seed]]\n"
               "       moectl cache-sim --lanes --help   (miss lanes under hardware profiles)\n");
}

static int write_svg(const char *path, const int *pct, int n_pts, const double rates[][MAX_POINTS],
                     const int *pols, int n_pol)
{
    FILE *f = fopen(path, "w");
    if (f == NULL)
        return -errno;
    static const char *const colors[] = { "#1f77b4", "#ff7f0e", "#2ca02c", "#000000", "#d62728" };
    const int W = 640, H = 420, L = 60, R = 150, T = 30, B = 50;
    const double xmax = pct[n_pts - 1] > 0 ? pct[n_pts - 1] : 1;
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
               "font-family=\"sans-serif\" font-size=\"12\">\n", W, H);
    fprintf(f, "<rect width=\"%d\" height=\"%d\" fill=\"white\"/>\n", W, H);
    fprintf(f, "<text x=\"%d\" y=\"18\">expert cache hit rate vs capacity</text>\n", L);
    /* axes and grid */
    for (int i = 0; i <= 10; i += 2) {
        double y = T + (H - T - B) * (1.0 - i / 10.0);
        fprintf(f, "<line x1=\"%d\" x2=\"%d\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>"
                   "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%.1f</text>\n",
                L, W - R, y, y, L - 6, y + 4, i / 10.0);
    }
    for (int i = 0; i < n_pts; i++) {
        double x = L + (W - L - R) * pct[i] / xmax;
        fprintf(f, "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%d%%</text>\n", x, H - B + 18, pct[i]);
    }
    fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">capacity (%% of experts)</text>\n",
            (L + W - R) / 2, H - 10);
    fprintf(f, "<line x1=\"%d\" x2=\"%d\" y1=\"%d\" y2=\"%d\" stroke=\"black\"/>\n", L, W - R, H - B, H - B);
    fprintf(f, "<line x1=\"%d\" x2=\"%d\" y1=\"%d\" y2=\"%d\" stroke=\"black\"/>\n", L, L, T, H - B);
    for (int p = 0; p < n_pol; p++) {
        fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\"%s points=\"",
                colors[pols[p] % 5], pols[p] == MOE_POLICY_BELADY ? " stroke-dasharray=\"6,4\"" : "");
        for (int i = 0; i < n_pts; i++)
            fprintf(f, "%.1f,%.1f ", L + (W - L - R) * pct[i] / xmax, T + (H - T - B) * (1.0 - rates[p][i]));
        fprintf(f, "\"/>\n<text x=\"%d\" y=\"%d\" fill=\"%s\">%s</text>\n", W - R + 10, T + 20 + 18 * p,
                colors[pols[p] % 5], moe_policy_name((enum moe_policy_kind)pols[p]));
    }
    fprintf(f, "</svg>\n");
    return fclose(f) == 0 ? 0 : -errno;
}

int moectl_cachesim_main(int argc, char **argv)
{
    const char *trace_path = NULL, *plot = NULL, *sweep = NULL, *warm_path = NULL;
    int warm_seed = 1;
    long capacity = -1;
    double cap_pct = -1;
    int policy = -1, per_layer = 0, lookahead = 0;
    struct moe_sim_prefetch pf = { MOE_SIM_PREFETCH_NONE, 1 };
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--lanes") == 0)
            return moectl_cachesim_lanes_main(argc, argv);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(a, "--per-layer") == 0) {
            per_layer = 1;
        } else if (strcmp(a, "--lookahead") == 0 && v) {
            errno = 0;
            const long h = strtol(v, &end, 10);
            if (errno || *end || end == v || h < 1 || h > 1000000) {
                fprintf(stderr, "moectl: --lookahead '%s': expected a number of visits, 1-1000000\n", v);
                return 2;
            }
            lookahead = (int)h;
            i++;
        } else if (strcmp(a, "--warm-from") == 0 && v) {
            warm_path = v;
            i++;
        } else if (strcmp(a, "--warm") == 0 && v) {
            if (strcmp(v, "seed") != 0 && strcmp(v, "preload") != 0) {
                fprintf(stderr, "moectl: --warm '%s': expected preload or seed\n", v);
                return 2;
            }
            warm_seed = strcmp(v, "seed") == 0;
            i++;
        } else if (strcmp(a, "--trace") == 0 && v) {
            trace_path = v;
            i++;
        } else if (strcmp(a, "--capacity") == 0 && v) {
            errno = 0;
            capacity = strtol(v, &end, 10);
            if (errno || *end || end == v || capacity < 1 || capacity > (1L << 30)) {
                fprintf(stderr, "moectl: --capacity '%s': expected a positive number of experts\n", v);
                return 2;
            }
            i++;
        } else if (strcmp(a, "--capacity-pct") == 0 && v) {
            cap_pct = strtod(v, &end);
            if (*end || end == v || !(cap_pct > 0 && cap_pct <= 100)) {
                fprintf(stderr, "moectl: --capacity-pct '%s': expected a percentage in (0, 100]\n", v);
                return 2;
            }
            i++;
        } else if (strcmp(a, "--policy") == 0 && v) {
            if ((policy = moe_policy_from_name(v)) < 0) {
                fprintf(stderr, "moectl: --policy '%s': expected lru, lfu, layer, predict or belady\n", v);
                return 2;
            }
            i++;
        } else if (strcmp(a, "--prefetch") == 0 && v) {
            const int k = moe_sim_prefetch_from_name(v);
            if (k < 0) {
                fprintf(stderr, "moectl: --prefetch '%s': expected none, history or oracle (gate needs"
                                " hidden states, which a trace does not have)\n", v);
                return 2;
            }
            pf.kind = (enum moe_sim_prefetch_kind)k;
            i++;
        } else if (strcmp(a, "--prefetch-depth") == 0 && v) {
            errno = 0;
            const long dv = strtol(v, &end, 10);
            if (errno || *end || end == v || dv < 1 || dv > 64) {
                fprintf(stderr, "moectl: --prefetch-depth '%s': expected a number of layers, 1-64\n", v);
                return 2;
            }
            pf.depth = (int)dv;
            i++;
        } else if (strcmp(a, "--sweep") == 0 && v) {
            sweep = v;
            i++;
        } else if (strcmp(a, "--plot") == 0 && v) {
            plot = v;
            i++;
        } else {
            fprintf(stderr, "moectl: cache-sim: unknown or incomplete option '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (trace_path == NULL || (capacity < 0 && cap_pct < 0 && sweep == NULL)) {
        fprintf(stderr, "moectl: cache-sim needs --trace and a capacity (--capacity, --capacity-pct"
                        " or --sweep)\n");
        usage(stderr);
        return 2;
    }
    int pct[MAX_POINTS], n_pts = 0;
    if (sweep) {
        const char *p = sweep;
        while (*p && n_pts < MAX_POINTS) {
            char *end;
            long v = strtol(p, &end, 10);
            if (end == p || v < 1 || v > 100 || (*end != ',' && *end != '\0')) {
                fprintf(stderr, "moectl: --sweep '%s': expected percentages like 5,10,25,50\n", sweep);
                return 2;
            }
            pct[n_pts++] = (int)v;
            p = *end ? end + 1 : end;
        }
    }
    struct moe_trace t;
    struct moe_diag d = { 0 };
    if (moe_trace_load(&t, trace_path, &d)) {
        fprintf(stderr, "moectl: %s\n", d.msg);
        return 1;
    }
    struct moe_trace wt = { 0 };
    if (warm_path != NULL) {
        if (moe_trace_load(&wt, warm_path, &d)) {
            fprintf(stderr, "moectl: %s\n", d.msg);
            moe_trace_free(&t);
            return 1;
        }
        if (wt.n_layer != t.n_layer || wt.n_expert != t.n_expert || wt.n_expert_used != t.n_expert_used) {
            fprintf(stderr, "moectl: --warm-from %s: %d layers x %d experts (top-%d), the trace %s has"
                            " %d x %d (top-%d): not the same model\n", warm_path, wt.n_layer, wt.n_expert,
                    wt.n_expert_used, trace_path, t.n_layer, t.n_expert, t.n_expert_used);
            moe_trace_free(&wt);
            moe_trace_free(&t);
            return 2;
        }
    }
    const long n_keys = (long)t.n_layer * t.n_expert;
    uint32_t *w_uses = NULL, *w_trans = NULL, *w_follows = NULL;
    double w_stats[MOE_POLICY_STATS];
    if (warm_path != NULL) {
        w_uses = calloc((size_t)n_keys, sizeof(uint32_t));
        w_follows = calloc((size_t)n_keys, sizeof(uint32_t));
        w_trans = calloc((size_t)n_keys * (size_t)t.n_expert, sizeof(uint32_t));
        if (!w_uses || !w_follows || !w_trans) {
            fprintf(stderr, "moectl: cache-sim: out of memory\n");
            free(w_uses);
            free(w_follows);
            free(w_trans);
            moe_trace_free(&wt);
            moe_trace_free(&t);
            return 1;
        }
    }
    int caps[MAX_POINTS], n_caps = 0;
    if (n_pts) {
        for (int i = 0; i < n_pts; i++)
            caps[n_caps++] = (int)(n_keys * pct[i] / 100 > 0 ? n_keys * pct[i] / 100 : 1);
    } else {
        caps[n_caps++] = capacity > 0 ? (int)capacity : (int)(n_keys * cap_pct / 100.0 > 1 ? n_keys * cap_pct / 100.0 : 1);
        pct[0] = (int)(100.0 * caps[0] / n_keys + 0.5);
        n_pts = 1;
    }
    int pols[MOE_POLICY_COUNT], n_pol = 0;
    if (policy >= 0)
        pols[n_pol++] = policy;
    else
        for (int p = 0; p < MOE_POLICY_COUNT; p++)
            pols[n_pol++] = p;
    static double rates[MOE_POLICY_COUNT][MAX_POINTS];
    struct moe_policy_params prm;
    moe_policy_defaults(&prm);
    int rc = 0;
    struct moe_sim_layer *layers = NULL;
    if (per_layer && (layers = calloc((size_t)t.n_layer, sizeof(*layers))) == NULL) {
        fprintf(stderr, "moectl: cache-sim: out of memory\n");
        moe_trace_free(&t);
        return 1;
    }
    for (int c = 0; c < n_caps && rc == 0; c++) {
        for (int p = 0; p < n_pol; p++) {
            struct moe_sim_result r;
            const int with_pf = pf.kind != MOE_SIM_PREFETCH_NONE && pols[p] != MOE_POLICY_BELADY;
            const int la = pols[p] != MOE_POLICY_BELADY ? lookahead : 0;
            const int warm = warm_path != NULL && pols[p] != MOE_POLICY_BELADY;
            struct moe_sim_opts so = { .policy = (enum moe_policy_kind)pols[p], .capacity = caps[c],
                                       .params = &prm, .prefetch = with_pf ? pf : (struct moe_sim_prefetch){ 0 },
                                       .lookahead = la };
            int e = 0;
            if (warm) {
                /* the previous run, and what moed saves at its end */
                so.out_uses = w_uses;
                so.out_trans = w_trans;
                so.out_follows = w_follows;
                so.out_stats = w_stats;
                memset(w_stats, 0, sizeof(w_stats));
                e = moe_cache_sim(&wt, &so, &r);
                so.out_uses = so.out_trans = so.out_follows = NULL;
                so.out_stats = NULL;
                so.warm_stats = pols[p] == MOE_POLICY_PREDICT ? w_stats : NULL;
                so.warm_uses = w_uses;
                so.warm_trans = w_trans;
                so.warm_follows = w_follows;
                so.warm_seed = warm_seed;
            }
            so.per_layer = layers;
            if (e == 0)
                e = moe_cache_sim(&t, &so, &r);
            if (e) {
                fprintf(stderr, "moectl: cache-sim: %s: %s\n", trace_path,
                        e == -ENOMEM ? "out of memory" : "the trace's sizes do not allow this simulation");
                rc = 1;
                break;
            }
            rates[p][c] = r.hit_rate;
            printf("policy=%s capacity=%d accesses=%lld hits=%lld hit_rate=%.4f",
                   moe_policy_name((enum moe_policy_kind)pols[p]), caps[c], (long long)r.accesses,
                   (long long)r.hits, r.hit_rate);
            if (with_pf)
                printf(" prefetch=%s depth=%d issued=%lld used=%lld wasted=%lld dropped=%lld loads=%lld",
                       moe_sim_prefetch_name(pf.kind), pf.depth, (long long)r.pf_issued,
                       (long long)r.pf_used, (long long)r.pf_wasted, (long long)r.pf_dropped,
                       (long long)r.loads);
            if (la)
                printf(" lookahead=%d", la);
            if (warm)
                printf(" warm=%s", warm_seed ? "seed" : "preload");
            printf("\n");
            for (int l = 0; layers && l < t.n_layer; l++)
                printf("layer=%d accesses=%lld hits=%lld hit_rate=%.4f slots=%.2f\n", l,
                       (long long)layers[l].accesses, (long long)layers[l].hits,
                       layers[l].accesses ? (double)layers[l].hits / (double)layers[l].accesses : 0.0,
                       layers[l].slots);
        }
    }
    if (rc == 0 && plot) {
        int e = write_svg(plot, pct, n_pts, (const double(*)[MAX_POINTS])rates, pols, n_pol);
        if (e) {
            fprintf(stderr, "moectl: %s: %s\n", plot, strerror(-e));
            rc = 1;
        }
    }
    free(layers);
    free(w_uses);
    free(w_trans);
    free(w_follows);
    moe_trace_free(&wt);
    moe_trace_free(&t);
    return rc;
}
