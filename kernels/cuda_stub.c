/* The CUDA entry points of a libmoe built without CUDA. */
#include <stddef.h>

#include "kernels/cuda.h"

int moe_cuda_built(void)
{
    return 0;
}

int moe_cuda_probe(struct moe_cuda_device *out, int max, struct moe_diag *diag)
{
    (void)out;
    (void)max;
    (void)diag;
    return 0;
}

int moe_cuda_selftest(int dev, struct moe_diag *diag)
{
    return moe_diag_set(diag, MOE_EUNSUPPORTED,
                        "device %d: this build has no CUDA backend (meson -Dcuda=enabled)", dev);
}

int moe_cuda_measure_rates(int dev, size_t bytes, struct moe_cuda_rates *out, struct moe_diag *diag)
{
    (void)bytes;
    (void)out;
    return moe_diag_set(diag, MOE_EUNSUPPORTED,
                        "device %d: this build has no CUDA backend (meson -Dcuda=enabled)", dev);
}

int moe_backend_cuda_create(struct moe_backend **out, int dev, struct moe_diag *diag)
{
    *out = NULL;
    return moe_diag_set(diag, MOE_EUNSUPPORTED,
                        "device %d: this build has no CUDA backend (meson -Dcuda=enabled)", dev);
}
