// Block-wide reductions shared by the CUDA kernels. Every thread of the
// block must call them (they synchronize); blockDim.x a multiple of 32,
// at most 1024; sh is __shared__ float[32]. Private to kernels/cuda.
#ifndef MOE_KERNELS_CUDA_REDUCE_IMPL_H
#define MOE_KERNELS_CUDA_REDUCE_IMPL_H

namespace moecu {

template <bool MAX>
__device__ __forceinline__ float block_reduce(float v, float *sh)
{
    for (int o = 16; o > 0; o >>= 1) {
        const float u = __shfl_xor_sync(0xffffffffu, v, o);
        v = MAX ? fmaxf(v, u) : v + u;
    }
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();   // sh may still be read from a previous call
    if (lane == 0)
        sh[wid] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : (MAX ? -INFINITY : 0.0f);
    for (int o = 16; o > 0; o >>= 1) {
        const float u = __shfl_xor_sync(0xffffffffu, v, o);
        v = MAX ? fmaxf(v, u) : v + u;
    }
    return v;
}

__device__ __forceinline__ float block_sum(float v, float *sh) { return block_reduce<false>(v, sh); }
__device__ __forceinline__ float block_max(float v, float *sh) { return block_reduce<true>(v, sh); }

} // namespace moecu

#endif
