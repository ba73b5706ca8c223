/* gpu-bench: the measurements tools/gpu_check.sh's benchmark is made of,
 * each printed as one JSON object on stdout (tools/gpu/bench.py runs them
 * and writes the report).
 *
 *   gpu-bench rates [--bytes N]
 *       copy rates of device 0 now: H2D from page-locked and ordinary
 *       memory, D2H, D2D (read + write counted: the HBM rate)
 *   gpu-bench disk FILE [--seconds S] [--threads N]
 *       O_DIRECT reads of FILE in 1 MiB blocks, N threads striding from
 *       the start (ordinary reads where O_DIRECT is refused)
 *   gpu-bench run --model PATH [--backend cuda|cpu] [--budget PCT]
 *       [--prefetch none|gate] [--miss-lane auto|copy|cpu] [--host-pct P]
 *       [--prompt N] [--warmup N] [--decode N] [--threads N] [--ctx N]
 *       one decode benchmark: a prompt of N tokens, `warmup` greedy steps
 *       untimed, then `decode` greedy steps timed one by one; without
 *       --budget a GGUF runs with every expert resident in backend memory.
 *       --backend cpu runs the CPU backend on the device data path
 *       (upload_weights): the dry run of the plumbing, no GPU figure.
 *
 * The run's split of a decode step: stall is the time the engine waited
 * for expert loads (disk read and decode; the cache hands a slot out as
 * soon as its upload is queued), compute is the rest of the step, upload is
 * the copy stream's busy time (overlapped with both, measured with CUDA
 * events around each copy). Bytes: loaded from the store (disk), hits of
 * the host-RAM tier, uploaded into slots (both). hbm_bytes_per_token is
 * what one decode step must read from device memory with every expert
 * resident: the dense weights except the token embeddings (one row), the
 * top-k experts of every MoE layer, and the KV cache up to the position.
 * The hybrid lanes (--miss-lane, doc/cache.md): per token, the missed
 * experts computed on the CPU, copied, or both, and the engine's time
 * computing the CPU lane and waiting for copies. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "io/gguf.h"
#include "kernels/cuda.h"
#include "model/model.h"
#include "model/options.h"
#include "model/plan.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int usage(void)
{
    fprintf(stderr, "usage: gpu-bench rates [--bytes N]\n"
                    "       gpu-bench disk FILE [--seconds S] [--threads N]\n"
                    "       gpu-bench run --model PATH [--backend cuda|cpu] [--budget PCT]\n"
                    "                     [--prefetch none|gate] [--miss-lane auto|copy|cpu]\n"
                    "                     [--host-pct P] [--prompt N]\n"
                    "                     [--warmup N] [--decode N] [--threads N] [--ctx N]\n");
    return 2;
}

static int num(const char *v, double lo, double hi, double *out)
{
    char *end;
    double x = v ? strtod(v, &end) : 0;
    if (v == NULL || end == v || *end || !(x >= lo && x <= hi)) {
        fprintf(stderr, "gpu-bench: '%s': expected a number in %g..%g\n", v ? v : "", lo, hi);
        return -1;
    }
    *out = x;
    return 0;
}

/* ---- rates ------------------------------------------------------------- */

static int cmd_rates(int argc, char **argv)
{
    double bytes = 256.0 * (1 << 20);
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--bytes") == 0 && i + 1 < argc) {
            if (num(argv[++i], 1 << 20, 1e11, &bytes))
                return 2;
        } else {
            return usage();
        }
    }
    struct moe_cuda_rates r;
    struct moe_diag d = { 0 };
    int rc = moe_cuda_measure_rates(0, (size_t)bytes, &r, &d);
    if (rc) {
        printf("{\"error\": \"%s\"}\n", d.msg);
        return 1;
    }
    struct moe_cuda_device dev[1];
    int n = moe_cuda_probe(dev, 1, &d);
    printf("{\"device\": \"%s\", \"sm\": \"%d%d\", \"n_sm\": %d, \"mem_mib\": %zu, \"bytes\": %zu,"
           " \"h2d_pinned_gbs\": %.3f, \"h2d_pageable_gbs\": %.3f, \"d2h_pinned_gbs\": %.3f,"
           " \"d2d_gbs\": %.3f}\n", n > 0 ? dev[0].name : "?", n > 0 ? dev[0].cc_major : 0,
           n > 0 ? dev[0].cc_minor : 0, n > 0 ? dev[0].n_sm : 0, n > 0 ? dev[0].total_mem >> 20 : 0,
           r.bytes, r.h2d_pinned / 1e9, r.h2d_pageable / 1e9, r.d2h_pinned / 1e9, r.d2d / 1e9);
    return 0;
}

/* ---- disk ------------------------------------------------------------------ */

#define BLOCK (1u << 20)

struct disk_job {
    int fd, id, n;
    uint64_t size;
    double until;
    _Atomic uint64_t *total;
};

static void *disk_thread(void *arg)
{
    struct disk_job *j = arg;
    void *buf = NULL;
    if (posix_memalign(&buf, 4096, BLOCK) != 0)
        return NULL;
    uint64_t blocks = j->size / BLOCK;
    for (uint64_t b = (uint64_t)j->id; blocks && now_s() < j->until; b += (uint64_t)j->n) {
        ssize_t r = pread(j->fd, buf, BLOCK, (off_t)((b % blocks) * BLOCK));
        if (r <= 0)
            break;
        *j->total += (uint64_t)r;
    }
    free(buf);
    return NULL;
}

static int cmd_disk(int argc, char **argv)
{
    if (argc < 1)
        return usage();
    const char *path = argv[0];
    double secs = 3, threads = 8;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--seconds") == 0 && i + 1 < argc) {
            if (num(argv[++i], 0.1, 600, &secs))
                return 2;
        } else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
            if (num(argv[++i], 1, 64, &threads))
                return 2;
        } else {
            return usage();
        }
    }
    int direct = 1;
    int fd = open(path, O_RDONLY | O_DIRECT);
    if (fd < 0) {
        direct = 0;
        fd = open(path, O_RDONLY);
    }
    if (fd < 0) {
        printf("{\"error\": \"%s: %s\"}\n", path, strerror(errno));
        return 1;
    }
    const uint64_t size = (uint64_t)lseek(fd, 0, SEEK_END);
    _Atomic uint64_t total = 0;
    pthread_t th[64];
    struct disk_job jobs[64];
    const int n = (int)threads;
    const double t0 = now_s();
    for (int i = 0; i < n; i++) {
        jobs[i] = (struct disk_job){ fd, i, n, size, t0 + secs, &total };
        pthread_create(&th[i], NULL, disk_thread, &jobs[i]);
    }
    for (int i = 0; i < n; i++)
        pthread_join(th[i], NULL);
    const double dt = now_s() - t0;
    close(fd);
    printf("{\"file\": \"%s\", \"direct\": %s, \"threads\": %d, \"bytes\": %" PRIu64 ", \"seconds\": %.3f,"
           " \"disk_gbs\": %.3f}\n", path, direct ? "true" : "false", n, (uint64_t)total, dt,
           (double)total / dt / 1e9);
    return 0;
}

/* ---- run ---------------------------------------------------------------------- */

static int argmax(const float *v, int n)
{
    int b = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[b])
            b = i;
    return b;
}

static int cmd_run(int argc, char **argv)
{
    const char *model = NULL, *backend = "cuda", *prefetch = "none", *lane = "auto";
    double budget = -1, host_pct = 0, prompt = 8, warmup = 4, decode = 16, threads = 4, ctx = 256;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int bad = 0;
        if (strcmp(a, "--model") == 0 && v)
            model = v;
        else if (strcmp(a, "--backend") == 0 && v)
            backend = v;
        else if (strcmp(a, "--prefetch") == 0 && v)
            prefetch = v;
        else if (strcmp(a, "--miss-lane") == 0 && v)
            lane = v;
        else if (strcmp(a, "--budget") == 0)
            bad = num(v, 0.01, 100, &budget);
        else if (strcmp(a, "--host-pct") == 0)
            bad = num(v, 0, 1000, &host_pct);
        else if (strcmp(a, "--prompt") == 0)
            bad = num(v, 1, 4096, &prompt);
        else if (strcmp(a, "--warmup") == 0)
            bad = num(v, 0, 4096, &warmup);
        else if (strcmp(a, "--decode") == 0)
            bad = num(v, 1, 4096, &decode);
        else if (strcmp(a, "--threads") == 0)
            bad = num(v, 1, 256, &threads);
        else if (strcmp(a, "--ctx") == 0)
            bad = num(v, 16, 1 << 20, &ctx);
        else
            return usage();
        if (bad)
            return 2;
        i++;
    }
    if (model == NULL || prompt + warmup + decode + 1 > ctx)
        return usage();
    struct moe_model_opts o;
    moe_model_opts_defaults(&o);
    o.n_threads = (int)threads;
    o.n_ctx = (int)ctx;
    struct moe_diag d = { 0 };
    const int stand_in = strcmp(backend, "cpu") == 0;
    if (moe_model_opts_set(&o, "backend", backend, &d) || moe_model_opts_set(&o, "prefetch", prefetch, &d) ||
        moe_model_opts_set(&o, "miss_lane", lane, &d)) {
        fprintf(stderr, "gpu-bench: %s\n", d.msg);
        return 2;
    }
    o.upload_weights = stand_in;
    o.prefetch_always = strcmp(prefetch, "none") != 0;
    /* the budget in experts, from the plan of the same file */
    struct moe_model_plan p;
    if (moe_model_plan(model, &o, &p, &d) != 0) {
        fprintf(stderr, "gpu-bench: %s\n", d.msg);
        return 1;
    }
    const int all = p.n_moe_layers * p.n_expert;
    int slots = 0;
    if (budget > 0) {
        slots = (int)lround(budget / 100.0 * all);
        if (slots < p.min_slots)
            slots = p.min_slots;
        o.cache_experts = slots;
    }
    if (host_pct > 0)
        o.host_bytes = (uint64_t)(host_pct / 100.0 * (double)p.expert_bytes);
    if (moe_model_plan(model, &o, &p, &d) != 0) {
        fprintf(stderr, "gpu-bench: %s\n", d.msg);
        return 1;
    }
    const double t_load = now_s();
    struct moe_model *m;
    if (moe_model_load(&m, model, &o, &d) != 0) {
        printf("{\"error\": \"load: %s\"}\n", d.msg);
        return 1;
    }
    const double load_s = now_s() - t_load;
    const struct moe_model_cfg *cfg = moe_model_cfg(m);
    const int V = cfg->n_vocab;
    /* what a resident decode step reads: dense weights but one row of the
     * token embeddings, k experts per MoE layer, the KV cache so far */
    const struct moe_gguf_tensor *emb = moe_gguf_find_tensor(moe_model_gguf(m), "token_embd.weight");
    const uint64_t emb_bytes = emb ? emb->size : 0;
    const double expert_one = all ? (double)p.expert_bytes / all : 0;
    const double kv_pos = prompt + warmup + decode / 2;
    const double hbm = (double)(p.dense_bytes - emb_bytes) + (emb ? (double)emb->size / (double)emb->ne[1] : 0) +
                       (double)p.n_moe_layers * p.n_expert_used * expert_one +
                       (double)p.kv_bytes_per_seq * kv_pos / p.n_ctx;
    float *logits = malloc((size_t)V * sizeof(float));
    int32_t *tok = malloc((size_t)prompt * sizeof(int32_t));
    struct moe_seq *s = NULL;
    int rc = logits && tok ? moe_seq_create(&s, m, &d) : -ENOMEM;
    for (int i = 0; i < (int)prompt; i++)
        tok[i] = (int32_t)((100 + 37 * i) % (V > 200 ? V - 100 : V));
    const double t0 = now_s();
    if (rc == 0)
        rc = moe_model_forward(m, s, tok, (int64_t)prompt, logits, false, NULL, NULL, &d);
    const double prefill_s = now_s() - t0;
    int32_t t = rc == 0 ? argmax(logits, V) : 0;
    for (int i = 0; rc == 0 && i < (int)warmup; i++) {
        rc = moe_model_forward(m, s, &t, 1, logits, false, NULL, NULL, &d);
        t = argmax(logits, V);
    }
    struct moe_cache_stats c0 = { 0 }, c1 = { 0 };
    const bool cached = moe_model_cache_stats(m, &c0);
    double dec_s = 0, step_min = 1e30, step_max = 0;
    uint32_t hash = 2166136261u;
    for (int i = 0; rc == 0 && i < (int)decode; i++) {
        const double a = now_s();
        rc = moe_model_forward(m, s, &t, 1, logits, false, NULL, NULL, &d);
        const double dt = now_s() - a;
        dec_s += dt;
        step_min = fmin(step_min, dt);
        step_max = fmax(step_max, dt);
        t = argmax(logits, V);
        hash = (hash ^ (uint32_t)t) * 16777619u;
    }
    if (cached)
        moe_model_cache_stats(m, &c1);
    if (rc != 0) {
        printf("{\"error\": \"forward: %s\"}\n", d.msg);
    } else {
        const double n = decode;
        const uint64_t hits = c1.hits - c0.hits, misses = c1.misses - c0.misses;
        /* misses the CPU lane computed never reached the cache: accesses too */
        const uint64_t lane_cpu = c1.lane_cpu - c0.lane_cpu + c1.lane_both - c0.lane_both;
        const uint64_t host_hits = c1.host_hits - c0.host_hits, acc = hits + misses + lane_cpu;
        const double up_s = c1.upload_s - c0.upload_s;
        const uint64_t up_tb = c1.upload_timed_bytes - c0.upload_timed_bytes;
        const double stall = c1.stall_s - c0.stall_s;
        printf("{\"model\": \"%s\", \"arch\": \"%s\", \"backend\": \"%s\", \"budget_pct\": %.1f,"
               " \"slots\": %d, \"experts\": %d, \"slot_bytes\": %zu, \"prefetch\": \"%s\","
               " \"host_pct\": %.1f, \"host_bytes\": %" PRIu64 ", \"n_layer\": %d, \"n_moe_layers\": %d,"
               " \"n_expert\": %d, \"n_expert_used\": %d, \"dense_bytes\": %" PRIu64 ","
               " \"expert_bytes\": %" PRIu64 ", \"hbm_bytes_per_token\": %.0f, \"load_s\": %.3f,"
               " \"prompt\": %d, \"prefill_s\": %.4f, \"warmup\": %d, \"decode\": %d, \"decode_s\": %.4f,"
               " \"s_per_token\": %.6f, \"tok_s\": %.3f, \"step_min_s\": %.6f, \"step_max_s\": %.6f,"
               " \"stall_s_per_token\": %.6f, \"compute_s_per_token\": %.6f,"
               " \"upload_s_per_token\": %.6f, \"upload_bytes_per_token\": %.0f,"
               " \"upload_gbs\": %.3f, \"disk_bytes_per_token\": %.0f, \"host_tier_bytes_per_token\": %.0f,"
               " \"hits\": %" PRIu64 ", \"misses\": %" PRIu64 ", \"host_hits\": %" PRIu64 ","
               " \"hit_rate_gpu\": %.4f, \"hit_rate_host\": %.4f, \"miss_rate_disk\": %.4f,"
               " \"uploads\": %" PRIu64 ", \"uploads_timed\": %" PRIu64 ", \"upload_host_waits\": %" PRIu64 ","
               " \"prefetch_issued\": %" PRIu64 ", \"prefetch_used\": %" PRIu64 ", \"miss_lane\": \"%s\","
               " \"lane_cpu_per_token\": %.3f, \"lane_copy_per_token\": %.3f, \"lane_both_per_token\": %.3f,"
               " \"lane_cpu_bytes_per_token\": %.0f, \"lane_cpu_s_per_token\": %.6f,"
               " \"lane_copy_wait_s_per_token\": %.6f, \"lane_steps_auto\": %" PRIu64 ","
               " \"lane_steps_copy\": %" PRIu64 ", \"lane_steps_cpu\": %" PRIu64 ", \"tokens_hash\": \"%08x\"}\n",
               model, cfg->arch_name,
               backend, budget > 0 ? budget : 100.0, slots, all, p.slot_bytes, prefetch, host_pct,
               o.host_bytes, cfg->n_layer, p.n_moe_layers, p.n_expert, p.n_expert_used, p.dense_bytes,
               p.expert_bytes, hbm, load_s, (int)prompt, prefill_s, (int)warmup, (int)decode, dec_s, dec_s / n,
               n / dec_s, step_min, step_max, stall / n, (dec_s - stall) / n, up_s / n,
               (double)(c1.upload_bytes - c0.upload_bytes) / n, up_s > 0 ? (double)up_tb / up_s / 1e9 : 0.0,
               (double)(c1.bytes_loaded - c0.bytes_loaded) / n, (double)host_hits * (double)p.slot_bytes / n,
               hits, misses, host_hits, acc ? (double)hits / acc : 1.0, acc ? (double)host_hits / acc : 0.0,
               acc ? (double)(misses - host_hits + lane_cpu) / acc : 0.0, c1.uploads - c0.uploads,
               c1.uploads_timed - c0.uploads_timed, c1.upload_host_waits - c0.upload_host_waits,
               c1.prefetch_issued - c0.prefetch_issued, c1.prefetch_used - c0.prefetch_used, lane,
               (double)(c1.lane_cpu - c0.lane_cpu) / n, (double)(c1.lane_copy - c0.lane_copy) / n,
               (double)(c1.lane_both - c0.lane_both) / n, (double)(c1.lane_cpu_bytes - c0.lane_cpu_bytes) / n,
               (c1.lane_cpu_s - c0.lane_cpu_s) / n, (c1.lane_copy_wait_s - c0.lane_copy_wait_s) / n,
               c1.lane_steps_auto - c0.lane_steps_auto, c1.lane_steps_copy - c0.lane_steps_copy,
               c1.lane_steps_cpu - c0.lane_steps_cpu, hash);
    }
    free(logits);
    free(tok);
    moe_seq_free(s);
    moe_model_free(m);
    return rc ? 1 : 0;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return usage();
    if (strcmp(argv[1], "rates") == 0)
        return cmd_rates(argc - 2, argv + 2);
    if (strcmp(argv[1], "disk") == 0)
        return cmd_disk(argc - 2, argv + 2);
    if (strcmp(argv[1], "run") == 0)
        return cmd_run(argc - 2, argv + 2);
    return usage();
}
