/* The table the CUDA module (libmoe-cuda.so) hands to libmoe's loader
 * (kernels/cuda_loader.c): one entry per CUDA entry point of kernels/cuda.h.
 * The ABI number changes whenever this table or anything it passes changes
 * shape, so a stale module is refused instead of called. C/C++ clean. */
#ifndef MOE_KERNELS_CUDA_MODULE_H
#define MOE_KERNELS_CUDA_MODULE_H

#include <stddef.h>

#include "common/error.h"
#include "kernels/cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_CUDA_MODULE_ABI 5

struct moe_backend;

struct moe_cuda_module {
    int abi;
    int (*probe)(struct moe_cuda_device *out, int max, struct moe_diag *diag);
    int (*selftest)(int dev, struct moe_diag *diag);
    int (*measure_rates)(int dev, size_t bytes, struct moe_cuda_rates *out, struct moe_diag *diag);
    int (*backend_create)(struct moe_backend **out, int dev, struct moe_diag *diag);
};

/* Exported by the module. */
const struct moe_cuda_module *moe_cuda_module_get(void);

#ifdef __cplusplus
}
#endif

#endif
