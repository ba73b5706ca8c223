/* CUDA backend entry points visible to C code.
 *
 * Built into libmoe when meson's `cuda` feature is on; otherwise the
 * functions exist and return MOE_EUNSUPPORTED, so callers need no #ifdef.
 */
#ifndef MOE_KERNELS_CUDA_H
#define MOE_KERNELS_CUDA_H

#include <stddef.h>

#include "common/error.h"

#ifdef __cplusplus
extern "C" {
#endif

struct moe_cuda_device {
    int    index;
    char   name[256];
    int    cc_major, cc_minor;   /* compute capability */
    size_t total_mem, free_mem;  /* bytes, from cudaMemGetInfo */
    int    n_sm;
};

/* Whether this libmoe was built with the CUDA backend. */
int moe_cuda_built(void);

/* Lists up to `max` devices into out; returns how many exist (>= 0), or a
 * negative code. No driver or no device is 0 devices, not an error. */
int moe_cuda_probe(struct moe_cuda_device *out, int max, struct moe_diag *diag);

/* Runs a small kernel on device `dev` and checks its result on the host:
 * proves the toolchain, driver and architecture list agree. */
int moe_cuda_selftest(int dev, struct moe_diag *diag);

/* Copy rates of a device, measured now (bytes per second): host to device
 * from page-locked and from ordinary memory, device to host into
 * page-locked memory, and device to device counting the bytes read and
 * written (the HBM rate a memory-bound kernel can reach). Each is the best
 * of a few cudaMemcpy of `bytes` after a warm-up. */
struct moe_cuda_rates {
    double h2d_pinned, h2d_pageable, d2h_pinned, d2d;
    size_t bytes;
};
int moe_cuda_measure_rates(int dev, size_t bytes, struct moe_cuda_rates *out, struct moe_diag *diag);

struct moe_backend;
/* The CUDA backend on device `dev` (kernels/backend.h; every pointer an op
 * takes is device memory, except those the table marks "host" and the
 * router's gating bias, which is host memory: the top-k runs on the host).
 * MOE_EUNSUPPORTED without CUDA or without a device. */
int moe_backend_cuda_create(struct moe_backend **out, int dev, struct moe_diag *diag);

#ifdef __cplusplus
}
#endif

#endif
