/* How many CUDA devices there are, asked in a child process.
 *
 * tests/harness.c runs every case in a forked child, and CUDA cannot be
 * used in a child forked after the parent initialized it (cudaGetDeviceCount
 * is enough to initialize it). So the parent asks a child of its own, and
 * every case opens its backends itself. */
#ifndef MOE_TESTS_GPU_PROBE_IMPL_H
#define MOE_TESTS_GPU_PROBE_IMPL_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kernels/cuda.h"

/* MOE_GPU_STAND_IN=cpu: the gpu tests run with the CPU backend in the GPU's
 * place (the CPU backend taking the device data path: upload_weights,
 * staged expert loads, events). Proves the tests' own logic and
 * tools/gpu_check.sh's plumbing on a machine without a GPU (its
 * --dry-run); it proves nothing about CUDA, and the tests say so. */
static inline int moe_test_gpu_stand_in(void)
{
    const char *v = getenv("MOE_GPU_STAND_IN");
    return v != NULL && strcmp(v, "cpu") == 0;
}

/* >= 0 devices (capped at 100); 0 when the probe fails or crashes. */
static inline int moe_test_cuda_devices(void)
{
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0)
        return 0;
    if (pid == 0) {
        struct moe_cuda_device dev[1];
        int n = moe_cuda_probe(dev, 1, NULL);
        _exit(n < 0 ? 0 : n > 100 ? 100 : n);
    }
    int st = 0;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 0;
}

#endif
