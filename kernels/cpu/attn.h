/* The CPU backend's attention for one (token, query head): scores of the
 * cached rows first..pos (the sliding window's), softmax with the optional
 * sink, then the value sums, as struct moe_attn_params (kernels/backend.h)
 * describes.
 *
 * Every float is the one the per-row formula gives on the running path
 * (moe_vecdot_impl): each score is moe_vecdot of the K row with q in K's
 * dot format, times the scale; each output element is out = out + p * v
 * over the rows in order (moe_vec_axpy's operations). The SIMD paths get
 * there faster: 16 (AVX-512) or 8 (AVX2) rows' dot accumulators are reduced
 * together, transposed, along the very addition tree of the one-row
 * reduction, and the output row stays in registers across the rows.
 * tests/unit/test_attn_cpu.c checks this bit for bit against the per-row
 * formula on every path. */
#ifndef MOE_KERNELS_CPU_ATTN_H
#define MOE_KERNELS_CPU_ATTN_H

#include <stddef.h>
#include <stdint.h>

struct moe_attn_params;

/* Worker scratch bytes moe_cpu_attn_head needs at position pos. */
size_t moe_cpu_attn_scratch(const struct moe_attn_params *ap, int32_t pos);

/* out[head_dim_v] = attention of q[head_dim] (query head h) over the rows
 * of positions up to pos; scratch is moe_cpu_attn_scratch bytes, 64-byte
 * aligned. */
void moe_cpu_attn_head(const struct moe_attn_params *ap, float *out, const float *q, int32_t pos, int h,
                       void *scratch);

/* The n_head / n_head_kv query heads of KV head kvh together (each K and V
 * row loaded once for all), every float moe_cpu_attn_head's: q and out are
 * the group's first head's rows, the others following. Scratch bytes at
 * position pos, or 0 where this does not apply (path, shape): then
 * moe_cpu_attn_head does each head. */
size_t moe_cpu_attn_group_scratch(const struct moe_attn_params *ap, int32_t pos);
void moe_cpu_attn_group(const struct moe_attn_params *ap, float *out, const float *q, int32_t pos, int kvh,
                        void *scratch);

#endif
