/* Row dot products of the CPU backend. Each weight type's activations are
 * first converted to the type moe_dtype_vec_dot_type() names
 * (kernels/blocks.h): F32, F16 or BF16 rounding for the float types, Q8_0,
 * Q8_1 or Q8_K blocks for the quantized ones, as ggml's CPU backend does.
 *
 * Quantizing the activations the same way matters for parity: the rounding of
 * the activations, not only of the weights, decides the result.
 *
 * Usage: moe_vecdot_act_bytes() sizes a buffer for one activation row;
 * moe_vecdot_quantize_act() fills it once per row; moe_vecdot() is then
 * called for every weight row. Rows are arrays of blocks.h's structs (or of
 * floats, halves) and must be aligned like their elements: 4 bytes for F32
 * and Q8_K, 2 for the other types but MXFP4, as GGUF tensors, pack slices
 * and the backend's scratch are. None of them allocates; all are
 * thread-safe.
 */
#ifndef MOE_KERNELS_CPU_VECDOT_H
#define MOE_KERNELS_CPU_VECDOT_H

#include <stddef.h>
#include <stdint.h>

/* Whether weights of type t can be multiplied. */
int moe_vecdot_supported(uint32_t t);

/* Bytes of one activation row of n elements for weight type t (0 if t is
 * unsupported or n is not a multiple of its block size). */
size_t moe_vecdot_act_bytes(uint32_t t, int64_t n);

/* Converts a float row x[n] into the activation format of weight type t. */
void moe_vecdot_quantize_act(uint32_t t, const float *x, void *act, int64_t n);

/* Dot product of one weight row of type t with a prepared activation row. */
float moe_vecdot(uint32_t t, const void *w, const void *act, int64_t n);

/* The dot products of one weight row with n_rows (1..MOE_VECDOT_MAX_ROWS)
 * activation rows act + r * act_stride, into out[r]: each the same float
 * moe_vecdot gives (the same operations in the same order), but the
 * weight row's blocks are unpacked once for all rows where a kernel for
 * its type exists (prefill: several tokens per weight row). */
#define MOE_VECDOT_MAX_ROWS 4
void moe_vecdot_rows(uint32_t t, const void *w, const void *act, size_t act_stride, int64_t n, int n_rows,
                     float *out);

/* y[i] += a * x[i] for i < n, x of type t (F16 or F32), rounded after the
 * multiply and after the add (no fused multiply-add) on every path, so the
 * SIMD paths give the scalar loop's floats exactly. */
void moe_vec_axpy(uint32_t t, float *y, float a, const void *x, int64_t n);

/* Which implementation runs: "avx512vnni", "avx2" or "scalar" (the best
 * the CPU and OS support). MOE_CPU_SIMD=avx2 or =scalar in the environment
 * caps it (tests compare the paths). */
const char *moe_vecdot_impl(void);

#endif
