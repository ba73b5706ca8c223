/* The CPU backend's delta-net ops (kernels/backend.h: ssm_conv,
 * gated_delta_net), in their own file beside backend_cpu.c. Single-threaded:
 * the recurrence is O(n_v D^2) per token, small beside the projections.
 * Same contract as the table's entries. */
#ifndef MOE_KERNELS_CPU_OPS_SSM_H
#define MOE_KERNELS_CPU_OPS_SSM_H

#include <stdint.h>

#include "kernels/backend.h"

int moe_cpu_ssm_conv(struct moe_backend *be, float *y, const float *x, float *state, const float *w,
                     int64_t n_tok, int n_ch, int d_conv);
int moe_cpu_gated_delta_net(struct moe_backend *be, float *out, float *qkv, const float *z,
                            const float *beta, const float *alpha, float *state, int64_t n_tok,
                            const struct moe_gdn_params *p);

#endif
