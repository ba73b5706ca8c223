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

#include "common/alloc.h"
#include "common/buf.h"
#include "common/fault.h"
#include "daemon/api.h"
#include "daemon/config.h"
#include "daemon/engine.h"
#include "daemon/log.h"
#include "daemon/server.h"
#include "model/model.h"
#include "model/plan.h"

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

static double mib(uint64_t b)
{
    return (double)b / 1048576.0;
}

/* The memory plan (model/plan.h), from the model's header before anything
 * is loaded: printed as one table to `out`, and refused (MOE_ELIMIT, the
 * message naming the terms) when it needs more than the host's memory or,
 * on a GPU, more than the device's free memory (RELIABILITY.md row 19). */
static int plan_check(const struct moed_config *cfg, FILE *out, struct moe_diag *d)
{
    struct moe_model_opts o = cfg->engine;
    o.n_seqs = cfg->max_seqs;
    struct moe_model_plan p;
    int rc = moe_model_plan(cfg->model, &o, &p, d);
    if (rc)
        return rc;
    const bool cuda = o.backend == MOE_BACKEND_CUDA;
    struct moe_buf b;
    moe_buf_init(&b, 0);
    if ((rc = moe_model_plan_format(&p, &b)) == 0)
        fprintf(out, "memory plan (backend: %s):\n%s", cuda ? "cuda" : "cpu", b.data);
    moe_buf_free(&b);
    if (rc)
        return moe_diag_set(d, rc, "memory plan: %s", moe_strerror(rc));
    const long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    const uint64_t ram = pages > 0 && psz > 0 ? (uint64_t)pages * (uint64_t)psz : 0;
    if (!cuda)
        return moe_model_plan_fits(&p, o.backend, ram, NULL, d);
    struct moe_device_memory dev;
    if ((rc = moe_model_device_memory(o.backend, &dev, d)))
        return rc;
    fprintf(out, "device: %s, %.0f MiB free of %.0f; the plan needs %.0f MiB\n", dev.name,
            mib(dev.free_bytes), mib(dev.total_bytes), mib(moe_model_plan_device_bytes(&p)));
    return moe_model_plan_fits(&p, o.backend, ram, &dev, d);
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
    if (a.keys_mdoc) {
        moed_config_keys_mdoc(stdout);
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
    /* the socket's lock first: a second moed on the same socket is refused
     * before it loads anything (RELIABILITY.md row 9) */
    if (!a.check_only && moed_server_lock(srv, &d) != 0) {
        fprintf(stderr, "moed: %s\n", d.msg);
        moed_server_free(srv);
        return 1;
    }
    struct moed_engine *eng = NULL;
    if (plan_check(&cfg, a.check_only ? stdout : stderr, &d) != 0) {
        fprintf(stderr, "moed: %s\n", d.msg);
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
        moed_engine_free(eng);
        moed_server_free(srv);
        return 0;
    }
    struct moed_api *api = moed_api_new(srv, eng);
    if (api == NULL || moed_engine_start(eng, &d) != 0) {
        fprintf(stderr, "moed: %s\n", api ? d.msg : "out of memory");
        moed_api_free(api);
        moed_engine_free(eng);
        moed_server_free(srv);
        return 1;
    }
    /* test hook (common/fault.h): fail the Nth allocation from here on */
    moe_fault_arm_alloc();
    int rc = moed_server_run(srv, moed_api_model_id(api), &moed_api_handlers, api, &d);
    if (rc)
        fprintf(stderr, "moed: %s\n", d.msg);
    /* the engine thread has stopped: the warm-start statistics are final */
    moed_engine_stop(eng);
    struct moe_diag wd = { 0 };
    if (moe_model_warm_save(moed_engine_model(eng), &wd) != 0)
        LOG_W("%s", wd.msg);
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
