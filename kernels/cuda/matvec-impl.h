// The per-block arithmetic of the CUDA decode GEMV (kernels/cuda/matvec.cu),
// written as __host__ __device__ functions so that the same code is checked
// on a machine without a GPU (tests/gpu/test_gpu_lanes.cu runs it on the
// host, lane by lane, against the CPU backend's dot products).
//
// Activations are quantized exactly as the CPU backend does it
// (kernels/cpu/vecdot.c), into the type moe_dtype_vec_dot_type() names
// (Q8_0, Q8_1 or Q8_K); the integer dot products are therefore the CPU's,
// and only the order of the float sums differs. The device layout of a
// quantized activation row is not the CPU's packed blocks but separate
// arrays (struct mv_act) so that the int8 values load as aligned int4.
//
// Weight blocks are kernels/blocks.h's structs, read at the byte offsets of
// their fields (MOE_BLOCK_FIELD): a block staged in shared memory starts at
// any byte, so the fields cannot be loaded through a struct pointer.
//
// Private to kernels/cuda and its tests. C++ (nvcc) only.
#ifndef MOE_KERNELS_CUDA_MATVEC_IMPL_H
#define MOE_KERNELS_CUDA_MATVEC_IMPL_H

#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common/dtype.h"
#include "kernels/blocks.h"

#define MOE_HD __host__ __device__ __forceinline__
#ifdef __CUDA_ARCH__
#define MOE_UNROLL _Pragma("unroll")
#else
#define MOE_UNROLL
#endif

namespace moecu {

// ---- bit helpers (device intrinsics, host emulation) -----------------------

MOE_HD float bits_f32(uint32_t u)
{
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

MOE_HD uint32_t f32_bits(float f)
{
#ifdef __CUDA_ARCH__
    return __float_as_uint(f);
#else
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
#endif
}

MOE_HD float f16_at(const uint8_t *p)
{
    return __half2float(__ushort_as_half((unsigned short)(p[0] | p[1] << 8)));
}

// 4 bytes at any address (little-endian). On the device p is shared memory
// padded by at least 4 bytes: two aligned words and a funnel shift.
MOE_HD uint32_t ld32(const uint8_t *p)
{
#ifdef __CUDA_ARCH__
    const uintptr_t a = (uintptr_t)p;
    const uint32_t *w = (const uint32_t *)(a & ~(uintptr_t)3);
    return __funnelshift_r(w[0], w[1], (unsigned)(a & 3) * 8);
#else
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
#endif
}

// Signed 4 x int8 dot product plus c.
MOE_HD int dp4a(uint32_t a, uint32_t b, int c)
{
#ifdef __CUDA_ARCH__
    return __dp4a((int)a, (int)b, c);
#else
    for (int i = 0; i < 4; i++)
        c += (int)(int8_t)(a >> 8 * i) * (int)(int8_t)(b >> 8 * i);
    return c;
#endif
}

// Per-byte a - b, wrapping.
MOE_HD uint32_t vsub4(uint32_t a, uint32_t b)
{
#ifdef __CUDA_ARCH__
    return __vsub4(a, b);
#else
    uint32_t r = 0;
    for (int i = 0; i < 4; i++)
        r |= (uint32_t)(uint8_t)((a >> 8 * i) - (b >> 8 * i)) << 8 * i;
    return r;
#endif
}

// Byte i of the result = byte (s >> 4i) & 7 of the 8 bytes y:x.
MOE_HD uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s)
{
#ifdef __CUDA_ARCH__
    return __byte_perm(x, y, s);
#else
    const uint64_t v = (uint64_t)y << 32 | x;
    uint32_t r = 0;
    for (int i = 0; i < 4; i++)
        r |= (uint32_t)(uint8_t)(v >> 8 * ((s >> 4 * i) & 7)) << 8 * i;
    return r;
#endif
}

// Four 4-bit codes (the low nibble of each byte of q) looked up in a table
// of 16 signed bytes given as 4 little-endian words.
MOE_HD uint32_t lut16(uint32_t q, uint32_t t0, uint32_t t1, uint32_t t2, uint32_t t3)
{
    // selector nibbles: the low 3 bits of each code
    const uint32_t s = (q & 7) | (q >> 4 & 0x70) | (q >> 8 & 0x700) | (q >> 12 & 0x7000);
    const uint32_t lo = byte_perm(t0, t1, s), hi = byte_perm(t2, t3, s);
    // bit 3 of each code picks hi: spread it to a byte mask
    const uint32_t b3 = (q >> 3) & 0x01010101u;
    const uint32_t m = b3 * 0xffu;
    return (lo & ~m) | (hi & m);
}

// Four codes looked up in IQ4_NL's or MXFP4's grid (kernels/blocks.h),
// whose words the grid macro spells out at compile time.
MOE_HD uint32_t lut_iq4nl(uint32_t q)
{
    return lut16(q, MOE_IQ4NL_GRID(MOE_GRID_WORD));
}

MOE_HD uint32_t lut_mxfp4(uint32_t q)
{
    return lut16(q, MOE_MXFP4_GRID(MOE_GRID_WORD));
}

// ---- activation formats ------------------------------------------------------
//
// `act` below is the activation type, moe_dtype_vec_dot_type() of the
// weight type: MOE_DTYPE_Q8_0, _Q8_1 or _Q8_K.

// Quantized activations of n_tok rows of n_in elements (n_in a multiple of
// the block; every array row-major by token).
struct mv_act {
    const int8_t *q;        // [n_tok][n_in]
    const float *d;         // [n_tok][n_in / 32] (Q8_0, Q8_1) or [n_tok][n_in / 256] (Q8_K)
    const float *s;         // [n_tok][n_in / 32]: f16(d * sum q) (Q8_1)
    const int32_t *sum16;   // [n_tok][n_in / 16]: sums of q over 16 (Q8_K)
    int64_t n_in;
};

// Bytes of the quantized activations of n_tok rows (each array 256-aligned).
inline size_t act_q_bytes(int act, int64_t n_tok, int64_t n_in)
{
    const size_t a = 256;
    auto up = [a](size_t v) { return (v + a - 1) / a * a; };
    size_t b = up((size_t)(n_tok * n_in));
    if (act == MOE_DTYPE_Q8_0 || act == MOE_DTYPE_Q8_1)
        b += up((size_t)(n_tok * (n_in / MOE_QK8_0)) * 4) * (act == MOE_DTYPE_Q8_1 ? 2 : 1);
    if (act == MOE_DTYPE_Q8_K)
        b += up((size_t)(n_tok * (n_in / MOE_QK_K)) * 4) + up((size_t)(n_tok * (n_in / 16)) * 4);
    return b;
}

// Carves the arrays of act_q_bytes() out of base (256-aligned).
inline mv_act act_q_layout(int act, void *base, int64_t n_tok, int64_t n_in)
{
    const size_t a = 256;
    auto up = [a](size_t v) { return (v + a - 1) / a * a; };
    uint8_t *p = (uint8_t *)base;
    mv_act r = { nullptr, nullptr, nullptr, nullptr, n_in };
    r.q = (const int8_t *)p;
    p += up((size_t)(n_tok * n_in));
    if (act == MOE_DTYPE_Q8_0 || act == MOE_DTYPE_Q8_1) {
        r.d = (const float *)p;
        p += up((size_t)(n_tok * (n_in / MOE_QK8_0)) * 4);
        if (act == MOE_DTYPE_Q8_1)
            r.s = (const float *)p;
    } else if (act == MOE_DTYPE_Q8_K) {
        r.d = (const float *)p;
        p += up((size_t)(n_tok * (n_in / MOE_QK_K)) * 4);
        r.sum16 = (const int32_t *)p;
    }
    return r;
}

// One Q8_0 / Q8_1 block of 32, as kernels/cpu/vecdot.c quant_q8_0/_1 does:
// id = 127/amax, q = round-half-even(x * id); d (and s) rounded to f16.
MOE_HD void quant_block_q8_0(const float *x, int8_t *q, float *d, float *s)
{
    float amax = 0.0f;
    for (int j = 0; j < MOE_QK8_0; j++)
        amax = fmaxf(amax, fabsf(x[j]));
    const float dd = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
    int sum = 0;
    for (int j = 0; j < MOE_QK8_0; j++) {
        const int v = (int)rintf(x[j] * id);
        q[j] = (int8_t)v;
        sum += (int8_t)v;
    }
    *d = __half2float(__float2half_rn(dd));
    if (s)
        *s = __half2float(__float2half_rn(dd * (float)sum));
}

// One Q8_K block of 256 (ggml's reference quantizer): scale -127/max where
// max is the signed value of largest magnitude (the first on ties).
MOE_HD void quant_block_q8_k(const float *x, int8_t *q, float *d, int32_t *sum16)
{
    float max = 0.0f, amax = 0.0f;
    for (int j = 0; j < MOE_QK_K; j++) {
        const float ax = fabsf(x[j]);
        if (ax > amax) {
            amax = ax;
            max = x[j];
        }
    }
    if (amax == 0.0f) {
        for (int j = 0; j < MOE_QK_K; j++)
            q[j] = 0;
        for (int j = 0; j < 16; j++)
            sum16[j] = 0;
        *d = 0.0f;
        return;
    }
    const float iscale = -127.0f / max;
    for (int j = 0; j < 16; j++) {
        int sum = 0;
        for (int l = 0; l < 16; l++) {
            int v = (int)rintf(iscale * x[16 * j + l]);
            v = v < 127 ? v : 127;
            q[16 * j + l] = (int8_t)v;
            sum += v;
        }
        sum16[j] = sum;
    }
    *d = 1.0f / iscale;
}

// ---- weight blocks ----------------------------------------------------------
//
// A block is split into LPB parts (one lane each); part `part` of block
// number `bi` of the row adds its share of the dot product with each of the
// nt activation rows into acc[]. b points at the block's bytes (shared
// memory on the device, padded by 4 bytes).

// The block struct of weight type T, BLK elements in TS bytes, split over
// LPB lanes.
template <uint32_t T> struct wtraits;
#define MOE_WTRAITS(T, S, QK, LPB_)                                               \
    template <> struct wtraits<T> {                                               \
        typedef struct S block;                                                   \
        enum { BLK = QK, TS = sizeof(struct S), LPB = LPB_ };                     \
    }
MOE_WTRAITS(MOE_DTYPE_Q4_0, moe_block_q4_0, MOE_QK4_0, 1);
MOE_WTRAITS(MOE_DTYPE_Q4_1, moe_block_q4_1, MOE_QK4_1, 1);
MOE_WTRAITS(MOE_DTYPE_Q5_0, moe_block_q5_0, MOE_QK5_0, 1);
MOE_WTRAITS(MOE_DTYPE_Q5_1, moe_block_q5_1, MOE_QK5_1, 1);
MOE_WTRAITS(MOE_DTYPE_Q8_0, moe_block_q8_0, MOE_QK8_0, 1);
MOE_WTRAITS(MOE_DTYPE_IQ4_NL, moe_block_iq4_nl, MOE_QK4_NL, 1);
MOE_WTRAITS(MOE_DTYPE_MXFP4, moe_block_mxfp4, MOE_QK_MXFP4, 1);
MOE_WTRAITS(MOE_DTYPE_Q2_K, moe_block_q2_k, MOE_QK_K, 4);
MOE_WTRAITS(MOE_DTYPE_Q3_K, moe_block_q3_k, MOE_QK_K, 4);
MOE_WTRAITS(MOE_DTYPE_Q4_K, moe_block_q4_k, MOE_QK_K, 4);
MOE_WTRAITS(MOE_DTYPE_Q5_K, moe_block_q5_k, MOE_QK_K, 4);
MOE_WTRAITS(MOE_DTYPE_Q6_K, moe_block_q6_k, MOE_QK_K, 4);
#undef MOE_WTRAITS

// The decode GEMV stages chunks of CB whole blocks of a row in a per-warp
// shared buffer of MV_SBUF bytes; lane l works on block (r * BPL + l / LPB)
// of the chunk, part l % LPB, for r < REP.
constexpr int MV_SBUF = 1792;   // 16 (misalignment) + chunk + 4 (ld32 pad)

template <uint32_t T> struct mvchunk {
    enum {
        BPL = 32 / wtraits<T>::LPB,                           // blocks per lane pass
        REP = BPL * wtraits<T>::TS <= 640 ? 2 : 1,            // passes per chunk
        CB = BPL * REP,                                       // blocks per chunk
    };
    static_assert(16 + CB * wtraits<T>::TS + 4 <= MV_SBUF, "chunk fits the staging buffer");
};

// Copies g[0..len) to sb + (g % 16), lanes 0..31 together: 16-byte loads
// where a whole aligned vector lies inside the range, bytes at the ragged
// ends (a row of 18-byte blocks has no useful alignment, and reading past
// the range could leave the allocation). Returns g % 16.
MOE_HD int stage(uint8_t *sb, const uint8_t *g, int len, int lane)
{
    const int head = (int)((uintptr_t)g & 15);
    const uint8_t *base = g - head;
    const int total = head + len, nvec = (total + 15) >> 4;
    for (int v = lane; v < nvec; v += 32) {
        const int o = v * 16;
        if (o >= head && o + 16 <= total) {
#ifdef __CUDA_ARCH__
            *(uint4 *)(sb + o) = __ldg((const uint4 *)(base + o));
#else
            memcpy(sb + o, base + o, 16);
#endif
        } else {
            for (int k = 0; k < 16; k++)
                if (o + k >= head && o + k < total)
                    sb[o + k] = base[o + k];
        }
    }
    return head;
}

// 32 int8 activations (16-byte aligned) as 8 words.
MOE_HD void load_act32(const int8_t *p, uint32_t v[8])
{
#ifdef __CUDA_ARCH__
    const uint4 a = ((const uint4 *)p)[0], b = ((const uint4 *)p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
#else
    memcpy(v, p, 32);
#endif
}

// sum of w[i] . a[i] over words [i0, i0 + n)
MOE_HD int dot_words(const uint32_t *w, const uint32_t *a, int i0, int n)
{
    int s = 0;
    for (int i = i0; i < i0 + n; i++)
        s = dp4a(w[i], a[i], s);
    return s;
}

// Field f of the block of type T at byte pointer b (any alignment).
#define MV_FIELD(f) MOE_BLOCK_FIELD(b, typename wtraits<T>::block, f)

// The 32 weights of a 32-block as 8 words of int8 (element order), and the
// float terms: result = dw * dx * isum (+ mw * s_x for the _1 types).
template <uint32_t T>
MOE_HD void unpack32(const uint8_t *b, uint32_t w[8], float *dw, float *mw)
{
    *mw = 0.0f;
    if constexpr (T == MOE_DTYPE_Q8_0) {
        *dw = f16_at(MV_FIELD(d));
        for (int i = 0; i < 8; i++)
            w[i] = ld32(MV_FIELD(qs) + 4 * i);
    } else if constexpr (T == MOE_DTYPE_Q4_0 || T == MOE_DTYPE_Q4_1) {
        *dw = f16_at(MV_FIELD(d));
        if constexpr (T == MOE_DTYPE_Q4_1)
            *mw = f16_at(MV_FIELD(m));
        for (int i = 0; i < 4; i++) {
            const uint32_t v = ld32(MV_FIELD(qs) + 4 * i);
            w[i] = v & 0x0f0f0f0fu;
            w[4 + i] = (v >> 4) & 0x0f0f0f0fu;
            if (T == MOE_DTYPE_Q4_0) {
                w[i] = vsub4(w[i], 0x08080808u);
                w[4 + i] = vsub4(w[4 + i], 0x08080808u);
            }
        }
    } else if constexpr (T == MOE_DTYPE_Q5_0 || T == MOE_DTYPE_Q5_1) {
        *dw = f16_at(MV_FIELD(d));
        if constexpr (T == MOE_DTYPE_Q5_1)
            *mw = f16_at(MV_FIELD(m));
        const uint32_t qh = ld32(MV_FIELD(qh));
        for (int i = 0; i < 4; i++) {
            const uint32_t v = ld32(MV_FIELD(qs) + 4 * i);
            uint32_t h0 = 0, h1 = 0;
            for (int k = 0; k < 4; k++) {
                h0 |= ((qh >> (4 * i + k)) & 1u) << (8 * k + 4);
                h1 |= ((qh >> (16 + 4 * i + k)) & 1u) << (8 * k + 4);
            }
            w[i] = (v & 0x0f0f0f0fu) | h0;
            w[4 + i] = ((v >> 4) & 0x0f0f0f0fu) | h1;
            if (T == MOE_DTYPE_Q5_0) {
                w[i] = vsub4(w[i], 0x10101010u);
                w[4 + i] = vsub4(w[4 + i], 0x10101010u);
            }
        }
    } else if constexpr (T == MOE_DTYPE_IQ4_NL || T == MOE_DTYPE_MXFP4) {
        if constexpr (T == MOE_DTYPE_IQ4_NL)
            *dw = f16_at(MV_FIELD(d));
        else
            *dw = moe_e8m0_half(*MV_FIELD(e));
        for (int i = 0; i < 4; i++) {
            const uint32_t v = ld32(MV_FIELD(qs) + 4 * i);
            if (T == MOE_DTYPE_IQ4_NL) {
                w[i] = lut_iq4nl(v & 0x0f0f0f0fu);
                w[4 + i] = lut_iq4nl((v >> 4) & 0x0f0f0f0fu);
            } else {
                w[i] = lut_mxfp4(v & 0x0f0f0f0fu);
                w[4 + i] = lut_mxfp4((v >> 4) & 0x0f0f0f0fu);
            }
        }
    }
}

// Q4_K, Q5_K: part p takes groups 2p (low nibbles) and 2p + 1 (high
// nibbles) of the 32 bytes qs[32p..]; Q5_K adds bits 2p and 2p + 1 of qh[l].
template <uint32_t T, int NT>
MOE_HD void dot_q45k(const uint8_t *b, int part, const mv_act &a, int64_t bi, int nt, float *acc)
{
    const int64_t n_in = a.n_in, nbk = n_in / MOE_QK_K, n16 = n_in / 16;
    const float d = f16_at(MV_FIELD(d)), dmin = f16_at(MV_FIELD(dmin));
    int sc0, m0, sc1, m1;
    moe_q4k_scale_min(2 * part, MV_FIELD(scales), &sc0, &m0);
    moe_q4k_scale_min(2 * part + 1, MV_FIELD(scales), &sc1, &m1);
    const uint8_t *qs = MV_FIELD(qs) + 32 * part;
    uint32_t w0[8], w1[8];
    for (int i = 0; i < 8; i++) {
        const uint32_t v = ld32(qs + 4 * i);
        w0[i] = v & 0x0f0f0f0fu;
        w1[i] = (v >> 4) & 0x0f0f0f0fu;
        if constexpr (T == MOE_DTYPE_Q5_K) {
            const uint32_t h = ld32(MV_FIELD(qh) + 4 * i);
            w0[i] |= ((h >> (2 * part)) & 0x01010101u) << 4;
            w1[i] |= ((h >> (2 * part + 1)) & 0x01010101u) << 4;
        }
    }
MOE_UNROLL
    for (int t = 0; t < NT; t++) {
        if (t < nt) {
            const int8_t *q = a.q + t * n_in + bi * MOE_QK_K + 64 * part;
            const int32_t *s16 = a.sum16 + t * n16 + bi * 16 + 4 * part;
            uint32_t x0[8], x1[8];
            load_act32(q, x0);
            load_act32(q + 32, x1);
            const int isum = sc0 * dot_words(w0, x0, 0, 8) + sc1 * dot_words(w1, x1, 0, 8);
            const int msum = m0 * (s16[0] + s16[1]) + m1 * (s16[2] + s16[3]);
            const float dx = a.d[t * nbk + bi];
            acc[t] += (d * dx) * (float)isum - (dmin * dx) * (float)msum;
        }
    }
}

// Q6_K: part p works on half n = p / 2 (128 elements); sel = p % 2 takes
// ql[32 sel..] with qh bits 2 sel (elements 32 sel + l) and 4 + 2 sel
// (elements 64 + 32 sel + l), l < 32.
template <uint32_t T, int NT>
MOE_HD void dot_q6k(const uint8_t *b, int part, const mv_act &a, int64_t bi, int nt, float *acc)
{
    const int64_t n_in = a.n_in, nbk = n_in / MOE_QK_K;
    const int n = part >> 1, sel = part & 1;
    const uint8_t *ql = MV_FIELD(ql) + 64 * n + 32 * sel, *qh = MV_FIELD(qh) + 32 * n;
    const int8_t *sc = (const int8_t *)MV_FIELD(scales) + 8 * n;
    const float d = f16_at(MV_FIELD(d));
    uint32_t w0[8], w1[8];
    for (int i = 0; i < 8; i++) {
        const uint32_t v = ld32(ql + 4 * i), h = ld32(qh + 4 * i);
        w0[i] = vsub4((v & 0x0f0f0f0fu) | ((h >> (2 * sel)) & 0x03030303u) << 4, 0x20202020u);
        w1[i] = vsub4(((v >> 4) & 0x0f0f0f0fu) | ((h >> (4 + 2 * sel)) & 0x03030303u) << 4,
                      0x20202020u);
    }
    const int s00 = sc[2 * sel], s01 = sc[2 * sel + 1], s10 = sc[4 + 2 * sel], s11 = sc[5 + 2 * sel];
MOE_UNROLL
    for (int t = 0; t < NT; t++) {
        if (t < nt) {
            const int8_t *q = a.q + t * n_in + bi * MOE_QK_K + 128 * n + 32 * sel;
            uint32_t x0[8], x1[8];
            load_act32(q, x0);
            load_act32(q + 64, x1);
            const int isum = s00 * dot_words(w0, x0, 0, 4) + s01 * dot_words(w0, x0, 4, 4) +
                             s10 * dot_words(w1, x1, 0, 4) + s11 * dot_words(w1, x1, 4, 4);
            acc[t] += (d * a.d[t * nbk + bi]) * (float)isum;
        }
    }
}

// Q2_K, Q3_K: part p works on half n = p / 2 (128 elements) and the shifts
// s = 2 (p % 2) and s + 1: elements 128 n + 32 s + l come from bits 2s of
// q[32 n + l], in the 16-element groups is = 8 n + 2 s + (l >= 16).
template <uint32_t T, int NT>
MOE_HD void dot_q23k(const uint8_t *b, int part, const mv_act &a, int64_t bi, int nt, float *acc)
{
    const int64_t n_in = a.n_in, nbk = n_in / MOE_QK_K, n16 = n_in / 16;
    const int n = part >> 1, s0 = 2 * (part & 1);
    const uint8_t *q2 = MV_FIELD(qs) + 32 * n;
    uint32_t w0[8], w1[8];
    for (int i = 0; i < 8; i++) {
        const uint32_t v = ld32(q2 + 4 * i);
        w0[i] = (v >> (2 * s0)) & 0x03030303u;
        w1[i] = (v >> (2 * s0 + 2)) & 0x03030303u;
        if constexpr (T == MOE_DTYPE_Q3_K) {
            // value = low bits - (hmask bit ? 0 : 4), hmask bit 4 n + s
            const uint32_t h = ld32(MV_FIELD(hmask) + 4 * i);
            w0[i] = vsub4(w0[i] | ((h >> (4 * n + s0)) & 0x01010101u) << 2, 0x04040404u);
            w1[i] = vsub4(w1[i] | ((h >> (4 * n + s0 + 1)) & 0x01010101u) << 2, 0x04040404u);
        }
    }
    int sc[4], mn[4];
    for (int g = 0; g < 4; g++) {
        const int is = 8 * n + 2 * s0 + g;   // g: (shift s0 + g / 2, half g % 2)
        if constexpr (T == MOE_DTYPE_Q2_K) {
            sc[g] = MV_FIELD(scales)[is] & 0xf;
            mn[g] = MV_FIELD(scales)[is] >> 4;
        } else {
            sc[g] = moe_q3k_scale(MV_FIELD(scales), is);
            mn[g] = 0;
        }
    }
MOE_UNROLL
    for (int t = 0; t < NT; t++) {
        if (t < nt) {
            const int8_t *q = a.q + t * n_in + bi * MOE_QK_K + 128 * n + 32 * s0;
            uint32_t x0[8], x1[8];
            load_act32(q, x0);
            load_act32(q + 32, x1);
            const int isum = sc[0] * dot_words(w0, x0, 0, 4) + sc[1] * dot_words(w0, x0, 4, 4) +
                             sc[2] * dot_words(w1, x1, 0, 4) + sc[3] * dot_words(w1, x1, 4, 4);
            const float dx = a.d[t * nbk + bi];
            if constexpr (T == MOE_DTYPE_Q2_K) {
                const int32_t *s16 = a.sum16 + t * n16 + bi * 16 + 8 * n + 2 * s0;
                const int msum = mn[0] * s16[0] + mn[1] * s16[1] + mn[2] * s16[2] + mn[3] * s16[3];
                acc[t] += (f16_at(MV_FIELD(d)) * dx) * (float)isum - (f16_at(MV_FIELD(dmin)) * dx) * (float)msum;
            } else {
                acc[t] += (f16_at(MV_FIELD(d)) * dx) * (float)isum;
            }
        }
    }
}

#undef MV_FIELD

// Block bi of the row, part `part` of it: adds its share of the dot
// product with each of the nt activation rows into acc[].
template <uint32_t T, int NT>
MOE_HD void dot_block(const uint8_t *b, int part, const mv_act &a, int64_t bi, int nt, float *acc)
{
    if constexpr (wtraits<T>::BLK == 32) {
        (void)part;
        const int64_t n_in = a.n_in, nb = n_in / 32;
        uint32_t w[8];
        float dw, mw;
        unpack32<T>(b, w, &dw, &mw);
MOE_UNROLL
        for (int t = 0; t < NT; t++) {
            if (t < nt) {
                uint32_t x[8];
                load_act32(a.q + t * n_in + bi * 32, x);
                const int isum = dot_words(w, x, 0, 8);
                acc[t] += (float)isum * (dw * a.d[t * nb + bi]);
                if (T == MOE_DTYPE_Q4_1 || T == MOE_DTYPE_Q5_1)
                    acc[t] += mw * a.s[t * nb + bi];
            }
        }
    } else if constexpr (T == MOE_DTYPE_Q4_K || T == MOE_DTYPE_Q5_K) {
        dot_q45k<T, NT>(b, part, a, bi, nt, acc);
    } else if constexpr (T == MOE_DTYPE_Q6_K) {
        dot_q6k<T, NT>(b, part, a, bi, nt, acc);
    } else if constexpr (T == MOE_DTYPE_Q2_K || T == MOE_DTYPE_Q3_K) {
        dot_q23k<T, NT>(b, part, a, bi, nt, acc);
    }
}

} // namespace moecu

#endif
