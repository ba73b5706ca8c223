/* moed: loads a model once and serves it over a Unix socket (HTTP/1.1,
 * OpenAI-compatible API) until SIGTERM. See doc/daemon.md and
 * doc/config.md. */
#include <dirent.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "cache/expert_cache.h"
#include "daemon/config.h"
#include "daemon/engine.h"
#include "daemon/log.h"
#include "daemon/server.h"
#include <uv.h>
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
    signal(SIGPIPE, SIG_IGN);   /* write errors come back as EPIPE */

    const int fds0 = count_fds();
    struct server *srv = moed_server_new(&cfg, argc, argv);
    if (srv == NULL) {
        fprintf(stderr, "moed: out of memory\n");
        return 1;
    }
    struct moed_engine *eng = NULL;
    if (!a.check_only)
        LOG_I("loading %s", cfg.model);
    if (moed_engine_create(&eng, &cfg, moed_server_notify, srv, &d) != 0) {
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
    if (moed_engine_start(eng, &d) != 0) {
        fprintf(stderr, "moed: %s\n", d.msg);
        moed_engine_free(eng);
        moed_server_free(srv);
        return 1;
    }
    int rc = moed_server_run(srv, eng, &d);
    if (rc)
        fprintf(stderr, "moed: %s\n", d.msg);
    moed_engine_free(eng);
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
