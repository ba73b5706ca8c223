// What the CUDA backend's translation units share: the backend context, the
// error mapping and the launchers each .cu file provides. Private to
// kernels/cuda. C++ (nvcc) only.
#ifndef MOE_KERNELS_CUDA_CUDA_IMPL_H
#define MOE_KERNELS_CUDA_CUDA_IMPL_H

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/backend.h"

namespace moecu {

// Timing of the copy stream: a pair of events around each upload, from a
// ring; a slot still in flight when its turn comes again leaves that upload
// untimed rather than making the host wait.
constexpr int COPY_TIMERS = 256;

struct copy_timer {
    cudaEvent_t start, end;
    size_t bytes;
    bool pending;                  // recorded, not yet added to the totals
};

struct cuda_ctx {
    int device;
    int n_sm;
    cudaStream_t stream;           // compute: every op, in call order
    cudaStream_t copy;             // upload_async (expert slots), H2D only
    pthread_mutex_t copy_mu;       // the timers and the totals below
    copy_timer timers[COPY_TIMERS];
    int next_timer;
    uint64_t uploads, upload_bytes, timed, timed_bytes;
    double busy_s;
    cublasHandle_t blas;
    struct moe_backend *host;      // CPU backend for the router's top-k
    void *tile;                    // dequantized weight rows (f16) for cuBLAS
    size_t tile_bytes;
    void *act;                     // converted / quantized activations
    size_t act_bytes;
    float *part;                   // split-K attention partials
    size_t part_bytes;
    int32_t *dev_ints;             // positions and ids too long to pass inline
    size_t dev_ints_cap;
    float *dev_floats;             // rope's frequency divisors too long to pass inline
    size_t dev_floats_cap;
    uint16_t *gelu_table;          // geglu: the CPU backend's fp16 GELU table, 65536 entries
    float *host_logits;            // pinned, router logits
    size_t host_logits_cap;
    bool fatal;
};

// cudaError_t to a moe code, with the CUDA message on stderr (ops have no
// diag). A sticky error marks the context fatal: later ops fail at once.
int check(cuda_ctx *c, cudaError_t e, const char *what);

// Small host integer arrays (positions, row ids) travel inside the kernel's
// parameters, so an op does not have to wait for a copy before it returns
// (the host array may change right after). Longer ones go through
// dev_ints with a synchronous copy.
constexpr int INLINE_INTS = 256;

struct ints_arg {
    const int32_t *p;              // device copy, or NULL: use v
    int32_t v[INLINE_INTS];
#ifdef __CUDACC__
    __device__ __forceinline__ int32_t operator[](int64_t i) const { return p ? p[i] : v[i]; }
#endif
};

// The same for small host float arrays (rope's freq_factors).
struct floats_arg {
    const float *p;                // device copy, or NULL: use v
    float v[INLINE_INTS];
#ifdef __CUDACC__
    __device__ __forceinline__ float operator[](int64_t i) const { return p ? p[i] : v[i]; }
#endif
};

// Fills `out` from host[0..n): inline when n <= INLINE_INTS, else copied to
// the device (the stream is synchronized before returning).
int make_ints(cuda_ctx *c, const int32_t *host, int64_t n, ints_arg *out);
// The same with host2[0..n2) after host[0..n) (attention: positions, then
// the block table).
int make_ints2(cuda_ctx *c, const int32_t *host, int64_t n, const int32_t *host2, int64_t n2,
               ints_arg *out);

// Fills `out` from host[0..n) as make_ints does (dev_floats).
int make_floats(cuda_ctx *c, const float *host, int64_t n, floats_arg *out);

// Decode GEMV (kernels/cuda/matvec.cu): y[t][o] = w[o] . x[t] (+ bias) for
// n_tok <= MV_MAX_TOK tokens with the activations in the CPU backend's
// formats. MOE_EUNSUPPORTED when w's type has no GEMV kernel (the caller
// then takes the cuBLAS path); MOE_ELIMIT when the activation workspace
// from reserve() is too small.
constexpr int MV_MAX_TOK = 8;
int matvec(cuda_ctx *c, float *y, const struct moe_weight *w, const float *bias, const float *x,
           int64_t n_tok);

// Activations to f16 (bf16 = false) or bf16 rows of `stride` elements.
int convert_act(cuda_ctx *c, void *dst, int64_t stride, const float *x, int64_t n_tok, int64_t n_in,
                bool bf16);

// Attention (kernels/cuda/attention.cu): split-K flash decoding when few
// (token, head) pairs would leave the device idle, one block per pair
// otherwise.
int attention(cuda_ctx *c, float *out, const float *q, int64_t n_tok, const int32_t *host_pos,
              const struct moe_attn_params *ap);

// qwen35moe's delta-net ops (kernels/cuda/ssm.cu), as the table's
// ssm_conv and gated_delta_net.
int ssm_conv(cuda_ctx *c, float *y, const float *x, float *state, const float *w, int64_t n_tok, int n_ch,
             int d_conv);
int gated_delta_net(cuda_ctx *c, float *out, const float *qkv, const float *z, const float *beta,
                    const float *alpha, float *state, int64_t n_tok, const struct moe_gdn_params *p);

unsigned grid_for(int64_t n, int threads = 256);

} // namespace moecu

#endif
