/* moed: loads a model once and serves it over a Unix socket (HTTP/1.1,
 * OpenAI-compatible API) until SIGTERM. See doc/daemon.md and
 * doc/config.md. */
#include <dirent.h>
#include <jansson.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "cache/expert_cache.h"
#include "common/alloc.h"
#include "daemon/api.h"
#include "daemon/config.h"
#include "daemon/engine.h"
#include "daemon/log.h"
#include "daemon/server.h"
#include "io/expert_src.h"
#include "kernels/cuda.h"
#include "model/hparams.h"
#include "model/model.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: moed --model MODEL [--config FILE] [--KEY VALUE ...]\n"
            "       moed --check-config [--config FILE] [--KEY VALUE ...]\n"
            "       moed --help | --version\n"
            "\n"
            "Serves a Mixture-of-Experts model (GGUF or .moe pack) over a Unix socket with an\n"
            "OpenAI-compatible HTTP API. Every key of the config file is also a flag; flags\n"
            "override the file. SIGHUP reloads the [reloadable] keys; SIGTERM/SIGINT stop.\n"
            "\n"
            "  --config FILE              INI file ([moed] section or top-level keys)\n"
            "  --check-config             validate, print the effective config and the memory\n"
            "                             plan, and exit\n");
    moed_config_usage(f);
}

static double mib(uint64_t b) { return (double)b / 1048576.0; }

/* What the loaded model occupies, by component; false when the memory moed
 * reserves (KV caches, expert cache, host tier) exceeds the host's RAM. */
static bool print_plan(FILE *f, const struct moed_config *cfg, struct moed_engine *e)
{
    struct moe_model *m = moed_engine_model(e);
    const struct moe_model_cfg *mc = moe_model_cfg(m);
    struct moe_hparams hp;
    struct moe_sizes sz;
    memset(&sz, 0, sizeof(sz));
    if (moe_hparams_load(&hp, moe_model_gguf(m), NULL) == 0)
        moe_sizes_compute(&sz, moe_model_gguf(m), &hp);
    const uint64_t es = cfg->kv_f16 ? 2 : 4;
    const uint64_t kv_seq = (uint64_t)moed_engine_n_ctx(e) * (uint64_t)(mc->k_row + mc->v_row) * es *
                            (uint64_t)mc->n_layer;
    struct moe_cache_stats cs;
    uint64_t cache = 0;
    const bool cached = moe_model_cache_stats(m, &cs);
    if (cached)
        cache = (uint64_t)cs.n_slots * cs.slot_bytes;
    const uint64_t total = sz.dense_bytes + kv_seq * (uint64_t)cfg->max_seqs + cache +
                           (uint64_t)cfg->host_bytes;
    fprintf(f, "memory plan (backend: %s):\n", cfg->backend);
    fprintf(f, "  dense weights        %10.1f MiB\n", mib(sz.dense_bytes));
    fprintf(f, "  KV cache             %10.1f MiB  (%d sequences x %.1f MiB, ctx %d, %s)\n",
            mib(kv_seq * (uint64_t)cfg->max_seqs), cfg->max_seqs, mib(kv_seq), moed_engine_n_ctx(e),
            cfg->kv_f16 ? "f16" : "f32");
    if (cached)
        fprintf(f, "  expert cache         %10.1f MiB  (%d slots x %.2f MiB; experts total %.1f MiB,"
                " %.0f%% of them)\n", mib(cache), cs.n_slots, mib(cs.slot_bytes), mib(sz.expert_bytes),
                sz.expert_bytes ? 100.0 * (double)cache / (double)sz.expert_bytes : 0.0);
    else
        fprintf(f, "  experts (resident)   %10.1f MiB  (mapped from the file)\n", mib(sz.expert_bytes));
    fprintf(f, "  host tier            %10.1f MiB\n", mib((uint64_t)cfg->host_bytes));
    fprintf(f, "  total                %10.1f MiB%s\n", mib(total + (cached ? 0 : sz.expert_bytes)),
            cached ? "" : " (resident experts are page cache, not reserved)");
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    if (pages <= 0 || psz <= 0)
        return true;
    const uint64_t ram = (uint64_t)pages * (uint64_t)psz;
    fprintf(f, "  host memory          %10.1f MiB\n", mib(ram));
    const uint64_t reserved = kv_seq * (uint64_t)cfg->max_seqs + cache + (uint64_t)cfg->host_bytes;
    return reserved <= ram;
}

/* The CUDA backend's plan, before anything is allocated on the device:
 * dense weights + KV caches + expert cache + workspace against the device's
 * free memory (RELIABILITY.md row 19). Prints the plan; false (with the
 * components listed) when it does not fit or there is no device. */
static bool gpu_plan_fits(const struct moed_config *cfg)
{
    struct moe_cuda_device dev[4];
    struct moe_diag d = { 0 };
    int n = moe_cuda_probe(dev, 4, &d);
    if (n <= 0) {
        fprintf(stderr, "moed: backend cuda: no CUDA device%s%s\n", d.msg[0] ? ": " : "", d.msg);
        return false;
    }
    /* the toolchain, driver and architecture list agree (a tiny kernel) */
    if (moe_cuda_selftest(0, &d) != 0) {
        fprintf(stderr, "moed: backend cuda: %s\n", d.msg);
        return false;
    }
    struct moe_expert_src *src = NULL;
    struct moe_io_config io = { 0 };
    if (moe_expert_src_open(&src, cfg->model, &io, &d) != 0) {
        fprintf(stderr, "moed: %s\n", d.msg);
        return false;
    }
    struct moe_hparams hp;
    struct moe_sizes sz;
    memset(&sz, 0, sizeof(sz));
    bool ok = moe_hparams_load(&hp, moe_expert_src_gguf(src), &d) == 0;
    if (ok)
        moe_sizes_compute(&sz, moe_expert_src_gguf(src), &hp);
    const bool pack = moe_expert_src_is_pack(src);
    moe_expert_src_close(src);
    if (!ok) {
        fprintf(stderr, "moed: %s\n", d.msg);
        return false;
    }
    const uint64_t es = cfg->kv_f16 ? 2 : 4;
    const uint64_t row = hp.kv_lora_rank > 0 ? (uint64_t)hp.kv_lora_rank + hp.n_rot
                                             : (uint64_t)hp.n_head_kv * (hp.head_dim + hp.head_dim_v);
    const uint64_t kv = (uint64_t)cfg->ctx_size * row * es * hp.n_layer * (uint64_t)cfg->max_seqs;
    uint64_t cache;
    if (cfg->cache_bytes > 0)
        cache = (uint64_t)cfg->cache_bytes;
    else if (cfg->cache_experts > 0)
        cache = (uint64_t)cfg->cache_experts * sz.bytes_per_expert;
    else
        cache = sz.expert_bytes;   /* every expert on the device */
    (void)pack;
    const uint64_t work = (64ull << 20) + (uint64_t)cfg->batch_size * hp.n_embd * 4 * 24;
    const uint64_t total = sz.dense_bytes + kv + cache + work;
    const uint64_t free_b = dev[0].free_mem;
    fprintf(stderr, "GPU plan (%s, %.0f MiB free of %.0f):\n", dev[0].name, mib(free_b),
            mib(dev[0].total_mem));
    fprintf(stderr, "  dense weights %10.1f MiB\n  KV caches     %10.1f MiB (%d x ctx %d)\n"
            "  expert cache  %10.1f MiB\n  workspace     %10.1f MiB\n  total         %10.1f MiB\n",
            mib(sz.dense_bytes), mib(kv), cfg->max_seqs, cfg->ctx_size, mib(cache), mib(work),
            mib(total));
    if (total > free_b) {
        fprintf(stderr, "moed: the plan needs %.0f MiB of GPU memory, %.0f MiB are free: lower"
                " cache_bytes, max_seqs or ctx_size\n", mib(total), mib(free_b));
        return false;
    }
    return true;
}

/* Open file descriptors of this process. */
static int count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (d == NULL)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        n += e->d_name[0] != '.';
    closedir(d);
    return n - 1;   /* the directory's own fd */
}

int main(int argc, char **argv)
{
    struct moed_config cfg;
    struct moed_args a;
    struct moe_diag d = { 0 };
    /* before any JSON exists: jansson allocates through the same hook as
     * the rest of moed, so allocation-failure tests reach it too */
    json_set_alloc_funcs(moe_malloc, moe_free);
    moed_config_defaults(&cfg);
    if (moed_config_from_args(&cfg, argc, argv, &a, &d) != 0) {
        fprintf(stderr, "moed: %s\n", d.msg);
        return 2;
    }
    if (a.help) {
        usage(stdout);
        return 0;
    }
    if (a.version) {
        printf("moed %s\n", MOE_VERSION);
        return 0;
    }
    if (moed_config_validate(&cfg, &d) != 0) {
        fprintf(stderr, "moed: %s\n", d.msg);
        return 2;
    }
    moed_log_set_level(cfg.log_level);
    moed_log_capture_library();
    signal(SIGPIPE, SIG_IGN);   /* write errors come back as EPIPE */

    const int fds0 = count_fds();
    struct moed_server *srv = moed_server_new(&cfg, argc, argv);
    if (srv == NULL) {
        fprintf(stderr, "moed: out of memory\n");
        return 1;
    }
    struct moed_engine *eng = NULL;
    if (strcmp(cfg.backend, "cuda") == 0 && !gpu_plan_fits(&cfg)) {
        moed_server_free(srv);
        return 1;
    }
    if (!a.check_only)
        LOG_I("loading %s", cfg.model);
    if (moed_engine_create(&eng, &cfg, moed_server_wake, srv, &d) != 0) {
        fprintf(stderr, "moed: %s\n", d.msg);
        moed_server_free(srv);
        return 1;
    }
    if (a.check_only) {
        moed_config_print(&cfg, stdout);
        bool fits = print_plan(stdout, &cfg, eng);
        if (!fits)
            fprintf(stderr, "moed: the KV caches, expert cache and host tier above exceed the host's"
                    " memory: lower max_seqs, ctx_size, cache_bytes or host_bytes\n");
        moed_engine_free(eng);
        moed_server_free(srv);
        return fits ? 0 : 1;
    }
    if (!print_plan(stderr, &cfg, eng)) {
        fprintf(stderr, "moed: the KV caches, expert cache and host tier above exceed the host's"
                " memory: lower max_seqs, ctx_size, cache_bytes or host_bytes\n");
        moed_engine_free(eng);
        moed_server_free(srv);
        return 1;
    }
    struct moed_api *api = moed_api_new(srv, eng);
    if (api == NULL || moed_engine_start(eng, &d) != 0) {
        fprintf(stderr, "moed: %s\n", api ? d.msg : "out of memory");
        moed_api_free(api);
        moed_engine_free(eng);
        moed_server_free(srv);
        return 1;
    }
    int rc = moed_server_run(srv, moed_api_model_id(api), &moed_api_handlers, api, &d);
    if (rc)
        fprintf(stderr, "moed: %s\n", d.msg);
    moed_engine_free(eng);
    moed_api_free(api);
    moed_server_free(srv);
    uv_library_shutdown();   /* libuv's process-wide signal pipe */
    /* everything opened since start must be closed (RELIABILITY.md row 21) */
    const int fds1 = count_fds();
    if (fds0 >= 0 && fds1 > fds0) {
        LOG_E("shutdown: %d file descriptors left open (%d at start)", fds1, fds0);
        rc = 1;
    }
    return rc ? 1 : 0;
}
