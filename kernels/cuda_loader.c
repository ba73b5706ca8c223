/* The CUDA backend's entry points in libmoe: they load the CUDA module
 * (libmoe-cuda.so, which links the CUDA runtime and cuBLAS) the first time
 * one is called, so that a process on the CPU backend never maps those
 * libraries (about 200 MB of resident memory for cuBLAS alone).
 *
 * The module calls back into libmoe (diagnostics, the log hook, the dtype
 * table, the CPU backend it uses for host-side steps): the programs export
 * their symbols (-rdynamic), and this file names those the module needs so
 * that a static link keeps them. Where the module is: $MOE_CUDA_MODULE,
 * else the build tree's copy, else the installed one. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "common/dtype.h"
#include "common/log.h"
#include "kernels/backend.h"
#include "kernels/cuda.h"
#include "kernels/cuda/module.h"

/* What the module resolves from the program (kept by the static link). */
void *const moe_cuda_host_symbols[] = {
    (void *)moe_diag_set, (void *)moe_log, (void *)moe_dtype_info, (void *)moe_backend_cpu_create,
    (void *)moe_backend_destroy,
};

static pthread_once_t once = PTHREAD_ONCE_INIT;
static const struct moe_cuda_module *mod;
static char why[512];

static void load(void)
{
    const char *env = getenv("MOE_CUDA_MODULE");
    const char *paths[3] = { env && env[0] ? env : NULL,
#ifdef MOE_CUDA_MODULE_BUILD
                             MOE_CUDA_MODULE_BUILD,
#else
                             NULL,
#endif
#ifdef MOE_CUDA_MODULE_INSTALL
                             MOE_CUDA_MODULE_INSTALL,
#else
                             NULL,
#endif
    };
    snprintf(why, sizeof(why), "this build has no CUDA backend (meson -Dcuda=enabled)");
    for (int i = 0; i < 3; i++) {
        if (paths[i] == NULL)
            continue;
        void *h = dlopen(paths[i], RTLD_NOW | RTLD_LOCAL);
        if (h == NULL) {
            snprintf(why, sizeof(why), "cannot load the CUDA module %s: %s", paths[i], dlerror());
            if (i == 0)
                return;   /* an explicit path that fails is the answer */
            continue;
        }
        const struct moe_cuda_module *(*get)(void) =
            (const struct moe_cuda_module *(*)(void))dlsym(h, "moe_cuda_module_get");
        const struct moe_cuda_module *m = get ? get() : NULL;
        if (m == NULL || m->abi != MOE_CUDA_MODULE_ABI) {
            snprintf(why, sizeof(why), "%s: not a CUDA module of this build (ABI %d, expected %d)",
                     paths[i], m ? m->abi : -1, MOE_CUDA_MODULE_ABI);
            dlclose(h);
            continue;
        }
        mod = m;   /* never closed: kernels and their state live until exit */
        return;
    }
}

static const struct moe_cuda_module *module(void)
{
    pthread_once(&once, load);
    return mod;
}

int moe_cuda_built(void)
{
    return module() != NULL;
}

int moe_cuda_probe(struct moe_cuda_device *out, int max, struct moe_diag *diag)
{
    const struct moe_cuda_module *m = module();
    if (m == NULL) {
        (void)diag;   /* no module: no device, which is not an error */
        return 0;
    }
    return m->probe(out, max, diag);
}

int moe_cuda_selftest(int dev, struct moe_diag *diag)
{
    const struct moe_cuda_module *m = module();
    return m ? m->selftest(dev, diag) : moe_diag_set(diag, MOE_EUNSUPPORTED, "device %d: %s", dev, why);
}

int moe_cuda_measure_rates(int dev, size_t bytes, struct moe_cuda_rates *out, struct moe_diag *diag)
{
    const struct moe_cuda_module *m = module();
    return m ? m->measure_rates(dev, bytes, out, diag)
             : moe_diag_set(diag, MOE_EUNSUPPORTED, "device %d: %s", dev, why);
}

int moe_backend_cuda_create(struct moe_backend **out, int dev, struct moe_diag *diag)
{
    *out = NULL;
    const struct moe_cuda_module *m = module();
    return m ? m->backend_create(out, dev, diag)
             : moe_diag_set(diag, MOE_EUNSUPPORTED, "device %d: %s", dev, why);
}
