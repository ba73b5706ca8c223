/* The CUDA backend against the CPU backend, op by op (DESIGN.md: gpu suite).
 *
 * matmul: every weight type x shapes whose rows are not a multiple of the
 * block, the GEMV chunk or the warps of a block, weight rows that start off
 * 16-byte alignment, 1..8 tokens (the GEMV kernels) and 9 and 33 tokens
 * (cuBLAS), with and without bias. get_rows for every type (also with more
 * ids than travel inline). rmsnorm, rope (normal, neox, YaRN, partial, many
 * tokens), kv_store and attention (f32/f16 caches, GQA, sliding window,
 * sinks, V narrower than K and inside the K rows as MLA does, split-K
 * decode at long contexts, prefill), router_topk (every gating rule),
 * swiglu, swiglu_oai, axpy, add, fill, gate_rows, copy_rows, gemma4's geglu,
 * scale, mul_rows and rope divisors, qwen35moe's ssm_conv and
 * gated_delta_net (state carried across calls), on sizes that
 * are not multiples of a block or a warp, one past a grid's stride. Every
 * device output has guard floats after it that must come back untouched.
 *
 * Tolerances (|gpu - reference| <= tol * sum |w_i x_i| for matmul; of the
 * largest reference value elsewhere):
 *   matmul, GEMV path and F32/F16/BF16 cuBLAS path: 2e-5 against the CPU
 *     backend (same activation rounding, only the float sum order differs);
 *   matmul, block types through cuBLAS (9+ tokens): 3e-3 against float64
 *     sums of the dequantized weights (f16 weights and activations);
 *   get_rows 1e-6; elementwise 1e-6 (geglu, scale, mul_rows: equal bits);
 *   rmsnorm 1e-5; rope 2e-5; delta-net ops 1e-4; attention
 *     2e-5 (f32 cache), 2e-3 (f16 cache: the CPU rounds probabilities to
 *     f16, the GPU's online softmax cannot); router ids and weights equal.
 *
 * Every case opens the backends itself: the harness forks per case and CUDA
 * does not survive a fork. Exits 77 without a CUDA device. */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
#include "kernels/cpu/dequant.h"
#include "kernels/cuda.h"
#include "common/dtype.h"
#include "kernels/fp16.h"
#include "tests/gpu/fill-impl.h"
#include "tests/gpu/probe-impl.h"
#include "tests/harness.h"

#define GUARD 64
#define GUARD_BITS 0x7fc0deadu

static struct moe_backend *cpu, *gpu;
static unsigned seed = 42;
static int quick;   /* MOE_GPU_QUICK: a subset, for compute-sanitizer */

static float frand(void)
{
    return moe_test_frand(&seed);
}

/* Opens both backends in this (forked) process; 0 or skip. */
static int open_backends(void)
{
    struct moe_diag d = { 0 };
    if (moe_backend_cpu_create(&cpu, 2, &d) != 0) {
        fprintf(stderr, "cpu backend: %s\n", d.msg);
        return -1;
    }
    if ((moe_test_gpu_stand_in() ? moe_backend_cpu_create(&gpu, 2, &d) : moe_backend_cuda_create(&gpu, 0, &d)) != 0) {
        fprintf(stderr, "cuda backend: %s\n", d.msg);
        return -1;
    }
    if (cpu->ops->reserve(cpu, 16 << 20, 8192 * 4 + 4096) != 0 ||
        gpu->ops->reserve(gpu, 16 << 20, 8192 * 4 + 4096) != 0) {
        fprintf(stderr, "reserve failed\n");
        return -1;
    }
    return 0;
}

static void close_backends(void)
{
    moe_backend_destroy(gpu);
    moe_backend_destroy(cpu);
    gpu = cpu = NULL;
}

#define OPEN() do { if (open_backends() != 0) { MOE_FAIL_AT("cannot open the backends"); return; } } while (0)

/* Device buffer of n floats + guard, from host (or all guard when NULL). */
static float *dev(const float *host, size_t n)
{
    float *d = gpu->ops->alloc(gpu, (n + GUARD) * sizeof(float));
    float *tmp = malloc((n + GUARD) * sizeof(float));
    if (d == NULL || tmp == NULL) {
        free(tmp);
        return d;
    }
    const uint32_t g = GUARD_BITS;
    for (size_t i = 0; i < n + GUARD; i++)
        memcpy(&tmp[i], &g, 4);
    if (host)
        memcpy(tmp, host, n * sizeof(float));
    gpu->ops->upload(gpu, d, tmp, (n + GUARD) * sizeof(float));
    free(tmp);
    return d;
}

/* Device copy of n bytes at offset `off` of a fresh allocation (returned
 * through base for freeing). */
static void *dev_bytes_at(const void *host, size_t n, size_t off, void **base)
{
    uint8_t *d = gpu->ops->alloc(gpu, n + off + 16);
    *base = d;
    if (d)
        gpu->ops->upload(gpu, d + off, host, n);
    return d ? d + off : NULL;
}

static void *dev_bytes(const void *host, size_t n)
{
    void *base;
    return dev_bytes_at(host, n, 0, &base);
}

/* Downloads n floats; 0, the op's error, or -1 when a guard float changed. */
static int back(float *host, const float *d, size_t n)
{
    float *tmp = malloc((n + GUARD) * sizeof(float));
    if (tmp == NULL)
        return -ENOMEM;
    int rc = gpu->ops->download(gpu, tmp, d, (n + GUARD) * sizeof(float));
    memcpy(host, tmp, n * sizeof(float));
    int bad = 0;
    for (size_t i = n; i < n + GUARD; i++) {
        uint32_t b;
        memcpy(&b, &tmp[i], 4);
        bad |= b != GUARD_BITS;
    }
    free(tmp);
    return rc ? rc : bad ? -1 : 0;
}

/* max |a - b| over max |b| */
static double max_rel(const float *a, const float *b, size_t n)
{
    double scale = 1e-6, d = 0;
    for (size_t i = 0; i < n; i++)
        scale = fmax(scale, fabs((double)b[i]));
    for (size_t i = 0; i < n; i++) {
        const double e = fabs((double)a[i] - (double)b[i]);
        d = e > d || e != e ? e : d;   /* a NaN counts as infinitely wrong */
    }
    return d != d ? INFINITY : d / scale;
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL)
        abort();
    return p;
}

/* ---- matmul and get_rows ------------------------------------------------ */

static const uint32_t types[] = {
    MOE_DTYPE_F32, MOE_DTYPE_F16, MOE_DTYPE_BF16, MOE_DTYPE_Q4_0, MOE_DTYPE_Q4_1, MOE_DTYPE_Q5_0,
    MOE_DTYPE_Q5_1, MOE_DTYPE_Q8_0, MOE_DTYPE_Q2_K, MOE_DTYPE_Q3_K, MOE_DTYPE_Q4_K, MOE_DTYPE_Q5_K,
    MOE_DTYPE_Q6_K, MOE_DTYPE_Q8_K, MOE_DTYPE_IQ4_NL, MOE_DTYPE_MXFP4,
};
#define N_TYPES (sizeof(types) / sizeof(types[0]))

static int is_float_type(uint32_t t)
{
    return t == MOE_DTYPE_F32 || t == MOE_DTYPE_F16 || t == MOE_DTYPE_BF16;
}

/* One type, one shape, every token count. Returns nonzero on failure. */
static int check_matmul(uint32_t t, int64_t n_in, int64_t n_out, size_t misalign)
{
    const struct moe_dtype_info *inf = moe_dtype_info(t);
    const char *name = inf->name;
    const size_t rb = (size_t)(n_in / inf->block_size) * inf->type_size;
    uint8_t *w = xmalloc(rb * (size_t)n_out);
    moe_test_fill_type(t, w, n_in * n_out, &seed);
    float *wf = xmalloc((size_t)(n_in * n_out) * sizeof(float));
    for (int64_t r = 0; r < n_out; r++)
        if (moe_dequantize_row(t, w + r * rb, wf + r * n_in, n_in) != 0) {
            MOE_FAIL_AT("%s: CPU dequantizer refused", name);
            free(w);
            free(wf);
            return 1;
        }
    void *wbase;
    struct moe_weight hw = { w, t, n_in, n_out, rb };
    struct moe_weight dw = hw;
    dw.data = dev_bytes_at(w, rb * (size_t)n_out, misalign, &wbase);
    const int cpu_ok = cpu->ops->supports(cpu, t);
    int bad = 0;
    const int64_t toks[] = { 1, 2, 3, 5, 8, 9, 33 };
    for (size_t k = 0; k < sizeof(toks) / sizeof(toks[0]) && !bad; k++) {
        const int64_t nt = toks[k];
        const int with_bias = k % 2 == 1;
        float *x = xmalloc((size_t)(nt * n_in) * sizeof(float));
        float *bias = xmalloc((size_t)n_out * sizeof(float));
        for (int64_t i = 0; i < nt * n_in; i++)
            x[i] = frand() * (i % 11 == 0 ? 3.0f : 1.0f);
        for (int64_t i = 0; i < n_out; i++)
            bias[i] = frand();
        float *dx = dev(x, (size_t)(nt * n_in)), *db = dev(bias, (size_t)n_out);
        float *dy = dev(NULL, (size_t)(nt * n_out));
        float *gy = xmalloc((size_t)(nt * n_out) * sizeof(float));
        float *cy = xmalloc((size_t)(nt * n_out) * sizeof(float));
        int rc = gpu->ops->matmul(gpu, dy, &dw, with_bias ? db : NULL, dx, nt);
        if (rc == 0)
            rc = back(gy, dy, (size_t)(nt * n_out));
        if (rc != 0) {
            MOE_FAIL_AT("%s n_in %lld n_out %lld tokens %lld: matmul %d (-1: guard overwritten)", name,
                        (long long)n_in, (long long)n_out, (long long)nt, rc);
            bad = 1;
        }
        /* the CPU's result where it computes this type and the GPU used the
         * same activation rounding; float64 sums otherwise */
        const int vs_cpu = cpu_ok && (nt <= 8 || is_float_type(t) || moe_test_gpu_stand_in());
        if (!bad && vs_cpu && cpu->ops->matmul(cpu, cy, &hw, with_bias ? bias : NULL, x, nt) != 0) {
            MOE_FAIL_AT("%s: CPU matmul failed", name);
            bad = 1;
        }
        const double tol = vs_cpu ? 2e-5 : 3e-3;
        for (int64_t tt = 0; tt < nt && !bad; tt++)
            for (int64_t o = 0; o < n_out && !bad; o++) {
                double s = with_bias ? bias[o] : 0.0, mag = fabs(s);
                for (int64_t i = 0; i < n_in; i++) {
                    const double p = (double)wf[o * n_in + i] * x[tt * n_in + i];
                    s += p;
                    mag += fabs(p);
                }
                const double ref = vs_cpu ? cy[tt * n_out + o] : s, got = gy[tt * n_out + o];
                if (!(fabs(got - ref) <= tol * mag + 1e-6)) {
                    MOE_FAIL_AT("%s n_in %lld n_out %lld misalign %zu tokens %lld%s: y[%lld][%lld] = %.9g,"
                                " %s %.9g (sum |w x| %.4g, tol %g)", name, (long long)n_in,
                                (long long)n_out, misalign, (long long)nt, with_bias ? " +bias" : "",
                                (long long)tt, (long long)o, got, vs_cpu ? "cpu" : "f64", ref, mag, tol);
                    bad = 1;
                }
            }
        gpu->ops->free(gpu, dx);
        gpu->ops->free(gpu, db);
        gpu->ops->free(gpu, dy);
        free(x);
        free(bias);
        free(gy);
        free(cy);
    }
    gpu->ops->free(gpu, wbase);
    free(w);
    free(wf);
    return bad;
}

static void test_matmul(void)
{
    OPEN();
    for (size_t ti = 0; ti < N_TYPES; ti++) {
        const uint32_t t = types[ti];
        const struct moe_dtype_info *inf = moe_dtype_info(t);
        if (quick && t != MOE_DTYPE_F32 && t != MOE_DTYPE_F16 && t != MOE_DTYPE_Q4_0 &&
            t != MOE_DTYPE_Q8_0 && t != MOE_DTYPE_Q4_K && t != MOE_DTYPE_Q6_K && t != MOE_DTYPE_MXFP4)
            continue;
        if (moe_test_gpu_stand_in() && !gpu->ops->supports(gpu, t))
            continue;   /* the CPU has no Q8_K weights */
        CHECK_MSG(gpu->ops->supports(gpu, t), "%s not supported", inf->name);
        /* rows: one block; a partial last GEMV chunk; many chunks. Row
         * counts: not multiples of 4 (rows per GEMV block). */
        int64_t shapes[3][2];
        if (is_float_type(t)) {
            int64_t s[3][2] = { { 333, 37 }, { 1000, 67 }, { 4104, 6 } };
            memcpy(shapes, s, sizeof(s));
        } else if (inf->block_size == 32) {
            int64_t s[3][2] = { { 32, 37 }, { 32 * 70, 67 }, { 32 * 131, 6 } };
            memcpy(shapes, s, sizeof(s));
        } else {
            int64_t s[3][2] = { { 256, 37 }, { 256 * 9, 67 }, { 256 * 17, 6 } };
            memcpy(shapes, s, sizeof(s));
        }
        for (int k = 0; k < 3; k++) {
            /* the middle shape starts its rows off 16-byte alignment (by
             * the type's own alignment for the float types) */
            const size_t mis = k != 1 ? 0 : t == MOE_DTYPE_F32 ? 4 : 2;
            if (check_matmul(t, shapes[k][0], shapes[k][1], mis))
                goto done;
        }
    }
done:
    close_backends();
}

static void test_get_rows(void)
{
    OPEN();
    for (size_t ti = 0; ti < N_TYPES; ti++) {
        const uint32_t t = types[ti];
        const struct moe_dtype_info *inf = moe_dtype_info(t);
        const int64_t n_in = inf->block_size == 256 ? 512 : inf->block_size == 32 ? 96 : 333;
        const int64_t n_out = 37;
        const size_t rb = (size_t)(n_in / inf->block_size) * inf->type_size;
        uint8_t *w = xmalloc(rb * (size_t)n_out);
        moe_test_fill_type(t, w, n_in * n_out, &seed);
        struct moe_weight dw = { NULL, t, n_in, n_out, rb };
        dw.data = dev_bytes(w, rb * (size_t)n_out);
        /* 5 ids inline; 300 through the device copy */
        for (int round = 0; round < 2; round++) {
            const int n = round == 0 ? 5 : 300;
            int32_t *ids = xmalloc((size_t)n * sizeof(int32_t));
            for (int i = 0; i < n; i++)
                ids[i] = i == 0 ? 0 : i == 1 ? 36 : (int32_t)(rand_r(&seed) % n_out);
            float *y = dev(NULL, (size_t)n * n_in);
            float *g = xmalloc((size_t)(n * n_in) * sizeof(float));
            float *ref = xmalloc((size_t)(n * n_in) * sizeof(float));
            for (int i = 0; i < n; i++)
                moe_dequantize_row(t, w + (size_t)ids[i] * rb, ref + i * n_in, n_in);
            CHECK(gpu->ops->get_rows(gpu, y, &dw, ids, n) == 0);
            CHECK_MSG(back(g, y, (size_t)(n * n_in)) == 0, "%s get_rows: error or guard", inf->name);
            for (int i = 0; i < n; i++)
                CHECK_MSG(max_rel(g + i * n_in, ref + i * n_in, (size_t)n_in) <= 1e-6,
                          "%s get_rows row %d: %g", inf->name, ids[i],
                          max_rel(g + i * n_in, ref + i * n_in, (size_t)n_in));
            gpu->ops->free(gpu, y);
            free(ids);
            free(g);
            free(ref);
        }
        gpu->ops->free(gpu, (void *)dw.data);
        free(w);
    }
    close_backends();
}

/* ---- elementwise ------------------------------------------------------------ */

static void test_elementwise(void)
{
    OPEN();
    /* 1, a warp and a bit, and one past the grid stride (65535 x 256) */
    const int64_t sizes[] = { 1, 1000, 65535 * 256 + 3 };
    for (size_t si = 0; si < 3; si++) {
        const int64_t n = sizes[si];
        float *a = xmalloc((size_t)n * 4), *b = xmalloc((size_t)n * 4);
        float *c1 = xmalloc((size_t)n * 4), *c2 = xmalloc((size_t)n * 4);
        for (int64_t i = 0; i < n; i++) {
            a[i] = frand() * 8;
            b[i] = frand() * 8;
        }
        for (int op = 0; op < 5; op++) {
            if (si == 2 && op != 3 && op != 4)
                continue;   /* the big size: one binary op and fill are enough */
            float *da = dev(a, (size_t)n), *db = dev(b, (size_t)n), *dy = dev(a, (size_t)n);
            memcpy(c1, a, (size_t)n * 4);
            int r1 = 0, r2 = 0;
            switch (op) {
            case 0:
                r1 = cpu->ops->swiglu(cpu, c1, a, b, n);
                r2 = gpu->ops->swiglu(gpu, dy, da, db, n);
                break;
            case 1:
                r1 = cpu->ops->swiglu_oai(cpu, c1, a, b, n, 1.702f, 7.0f);
                r2 = gpu->ops->swiglu_oai(gpu, dy, da, db, n, 1.702f, 7.0f);
                break;
            case 2:
                r1 = cpu->ops->axpy(cpu, c1, 0.37f, b, n);
                r2 = gpu->ops->axpy(gpu, dy, 0.37f, db, n);
                break;
            case 3:
                r1 = cpu->ops->add(cpu, c1, a, b, n);
                r2 = gpu->ops->add(gpu, dy, da, db, n);
                break;
            case 4:
                r1 = cpu->ops->fill(cpu, c1, -2.5f, n);
                r2 = gpu->ops->fill(gpu, dy, -2.5f, n);
                break;
            }
            CHECK(r1 == 0 && r2 == 0);
            CHECK_MSG(back(c2, dy, (size_t)n) == 0, "op %d n %lld: guard", op, (long long)n);
            CHECK_MSG(max_rel(c2, c1, (size_t)n) <= 1e-6, "op %d n %lld: %g", op, (long long)n,
                      max_rel(c2, c1, (size_t)n));
            gpu->ops->free(gpu, da);
            gpu->ops->free(gpu, db);
            gpu->ops->free(gpu, dy);
        }
        free(a);
        free(b);
        free(c1);
        free(c2);
    }
    /* add in place (y == a) */
    {
        float a[777], b[777], c[777], g[777];
        for (int i = 0; i < 777; i++) {
            a[i] = frand();
            b[i] = frand();
            c[i] = a[i] + b[i];
        }
        float *da = dev(a, 777), *db = dev(b, 777);
        CHECK(gpu->ops->add(gpu, da, da, db, 777) == 0);
        CHECK(back(g, da, 777) == 0);
        CHECK(max_rel(g, c, 777) == 0.0);
        gpu->ops->free(gpu, da);
        gpu->ops->free(gpu, db);
    }
    close_backends();
}

static void test_rows_ops(void)
{
    OPEN();
    /* gate_rows: 5 rows of 333 */
    {
        const int64_t R = 5, n = 333;
        float y[5 * 333], g[5], c1[5 * 333], c2[5 * 333];
        for (int i = 0; i < R * n; i++)
            y[i] = frand();
        for (int i = 0; i < R; i++)
            g[i] = frand() * 4;
        memcpy(c1, y, sizeof(y));
        float *dy = dev(y, (size_t)(R * n)), *dg = dev(g, (size_t)R);
        CHECK(cpu->ops->gate_rows(cpu, c1, g, R, n) == 0);
        CHECK(gpu->ops->gate_rows(gpu, dy, dg, R, n) == 0);
        CHECK(back(c2, dy, (size_t)(R * n)) == 0);
        CHECK_MSG(max_rel(c2, c1, (size_t)(R * n)) <= 1e-6, "gate_rows: %g", max_rel(c2, c1, (size_t)(R * n)));
        gpu->ops->free(gpu, dy);
        gpu->ops->free(gpu, dg);
    }
    /* copy_rows: gather, scatter, both, neither; 7 moves inline and 200
     * (400 indices) through the device copy */
    for (int mode = 0; mode < 4; mode++)
        for (int big = 0; big < 2; big++) {
            const int64_t n = big ? 200 : 7, len = 45, ss = 50, ds = 61, rows = 2 * n + 3;
            float *src = xmalloc((size_t)(rows * ss) * 4), *dst = xmalloc((size_t)(rows * ds) * 4);
            float *got = xmalloc((size_t)(rows * ds) * 4);
            int32_t *di = xmalloc((size_t)n * 4), *si = xmalloc((size_t)n * 4);
            for (int64_t i = 0; i < rows * ss; i++)
                src[i] = frand();
            for (int64_t i = 0; i < rows * ds; i++)
                dst[i] = frand();
            for (int64_t i = 0; i < n; i++) {
                di[i] = (int32_t)(rows - 1 - 2 * i);     /* distinct destination rows */
                si[i] = (int32_t)(rand_r(&seed) % rows);
            }
            const int32_t *hd = mode & 1 ? di : NULL, *hs = mode & 2 ? si : NULL;
            float *dsrc = dev(src, (size_t)(rows * ss)), *ddst = dev(dst, (size_t)(rows * ds));
            CHECK(cpu->ops->copy_rows(cpu, dst, ds, hd, src, ss, hs, n, len) == 0);
            CHECK(gpu->ops->copy_rows(gpu, ddst, ds, hd, dsrc, ss, hs, n, len) == 0);
            CHECK_MSG(back(got, ddst, (size_t)(rows * ds)) == 0, "copy_rows mode %d: guard", mode);
            CHECK_MSG(memcmp(got, dst, (size_t)(rows * ds) * 4) == 0, "copy_rows mode %d n %lld", mode,
                      (long long)n);
            gpu->ops->free(gpu, dsrc);
            gpu->ops->free(gpu, ddst);
            free(src);
            free(dst);
            free(got);
            free(di);
            free(si);
        }
    close_backends();
}

static void test_rmsnorm(void)
{
    OPEN();
    const int64_t shapes[4][2] = { { 3, 333 }, { 1, 4096 }, { 2, 7 }, { 70000, 8 } };
    for (int k = 0; k < 4; k++) {
        const int64_t rows = shapes[k][0], m = shapes[k][1];
        float *x = xmalloc((size_t)(rows * m) * 4), *w = xmalloc((size_t)m * 4);
        float *c1 = xmalloc((size_t)(rows * m) * 4), *c2 = xmalloc((size_t)(rows * m) * 4);
        for (int64_t i = 0; i < rows * m; i++)
            x[i] = frand() * 5;
        for (int64_t i = 0; i < m; i++)
            w[i] = frand();
        for (int withw = 0; withw < 2; withw++) {
            float *dx = dev(x, (size_t)(rows * m)), *dw = dev(w, (size_t)m), *dy = dev(NULL, (size_t)(rows * m));
            CHECK(cpu->ops->rmsnorm(cpu, c1, x, withw ? w : NULL, rows, m, 1e-5f) == 0);
            CHECK(gpu->ops->rmsnorm(gpu, dy, dx, withw ? dw : NULL, rows, m, 1e-5f) == 0);
            CHECK(back(c2, dy, (size_t)(rows * m)) == 0);
            CHECK_MSG(max_rel(c2, c1, (size_t)(rows * m)) <= 1e-5, "rmsnorm %lldx%lld: %g", (long long)rows,
                      (long long)m, max_rel(c2, c1, (size_t)(rows * m)));
            /* in place */
            CHECK(gpu->ops->rmsnorm(gpu, dx, dx, withw ? dw : NULL, rows, m, 1e-5f) == 0);
            CHECK(back(c2, dx, (size_t)(rows * m)) == 0);
            CHECK(max_rel(c2, c1, (size_t)(rows * m)) <= 1e-5);
            gpu->ops->free(gpu, dx);
            gpu->ops->free(gpu, dw);
            gpu->ops->free(gpu, dy);
        }
        free(x);
        free(w);
        free(c1);
        free(c2);
    }
    close_backends();
}

static void test_rope(void)
{
    OPEN();
    const struct moe_rope_params cases[5] = {
        { MOE_ROPE_NORM, 64, 10000.0f, 1.0f, 0.0f, 1.0f, { 0, 0 } },
        { MOE_ROPE_NEOX, 64, 1000000.0f, 1.0f, 0.0f, 1.0f, { 0, 0 } },
        { MOE_ROPE_NEOX, 32, 10000.0f, 0.25f, 1.0f, 1.0f, { 3.5f, 20.2f } },   /* YaRN */
        { MOE_ROPE_NORM, 16, 10000.0f, 1.0f, 0.0f, 1.0f, { 0, 0 } },          /* partial */
        { MOE_ROPE_NORM, 64, 10000.0f, 0.5f, 1.0f, 0.7f, { 0.0f, 31.0f } },    /* YaRN, norm */
    };
    for (int k = 0; k < 5; k++)
        for (int many = 0; many < 2; many++) {
            const int n_tok = many ? 300 : 5, n_head = 3, stride = 72;
            int32_t *pos = xmalloc((size_t)n_tok * 4);
            const int32_t few[5] = { 0, 1, 7, 300, 4095 };
            for (int t = 0; t < n_tok; t++)
                pos[t] = many ? t * 13 : few[t];
            const size_t n = (size_t)n_tok * n_head * stride;
            float *x = xmalloc(n * 4), *c1 = xmalloc(n * 4), *c2 = xmalloc(n * 4);
            for (size_t i = 0; i < n; i++)
                x[i] = frand();
            const int off = k == 3 ? 8 : 0;
            memcpy(c1, x, n * 4);
            float *dx = dev(x, n);
            CHECK(cpu->ops->rope(cpu, c1, n_tok, n_head, stride, off, pos, &cases[k]) == 0);
            CHECK(gpu->ops->rope(gpu, dx, n_tok, n_head, stride, off, pos, &cases[k]) == 0);
            CHECK(back(c2, dx, n) == 0);
            CHECK_MSG(max_rel(c2, c1, n) <= 2e-5, "rope case %d tokens %d: %g", k, n_tok, max_rel(c2, c1, n));
            gpu->ops->free(gpu, dx);
            free(pos);
            free(x);
            free(c1);
            free(c2);
        }
    close_backends();
}

/* gemma4's ops: geglu (the CPU's fp16 GELU table, copied to the device:
 * equal bits), scale and mul_rows (one multiply each: equal bits), and rope
 * with per-pair frequency divisors (1e30 leaves a pair unrotated, as
 * gemma4's global layers do), inline (32 pairs) and through the device
 * copy (300 pairs, more than travel inline). */
static void test_gemma4_ops(void)
{
    OPEN();
    const int64_t sizes[] = { 1, 1000, 65535 * 256 + 3 };
    for (size_t si = 0; si < 3; si++) {
        const int64_t n = sizes[si];
        float *a = xmalloc((size_t)n * 4), *b = xmalloc((size_t)n * 4);
        float *c1 = xmalloc((size_t)n * 4), *c2 = xmalloc((size_t)n * 4);
        for (int64_t i = 0; i < n; i++) {
            /* gates across the table's range and past both cut-offs (+-10) */
            a[i] = frand() * (i % 7 == 0 ? 24.0f : 6.0f);
            b[i] = frand() * 4;
        }
        if (n > 4) {
            a[0] = -10.0f;
            a[1] = 10.0f;
            a[2] = 0.0f;
            a[3] = 65504.0f;
        }
        for (int op = 0; op < 2; op++) {
            float *da = dev(a, (size_t)n), *db = dev(b, (size_t)n), *dy = dev(NULL, (size_t)n);
            int r1, r2;
            if (op == 0) {
                r1 = cpu->ops->geglu(cpu, c1, a, b, n);
                r2 = gpu->ops->geglu(gpu, dy, da, db, n);
            } else {
                r1 = cpu->ops->scale(cpu, c1, a, 0.0625f * 3.0f, n);
                r2 = gpu->ops->scale(gpu, dy, da, 0.0625f * 3.0f, n);
            }
            CHECK(r1 == 0 && r2 == 0);
            CHECK_MSG(back(c2, dy, (size_t)n) == 0, "%s n %lld: error or guard", op ? "scale" : "geglu",
                      (long long)n);
            CHECK_MSG(memcmp(c1, c2, (size_t)n * 4) == 0, "%s n %lld: not bit-identical (%g)",
                      op ? "scale" : "geglu", (long long)n, max_rel(c2, c1, (size_t)n));
            /* in place (y == x) */
            if (op == 1) {
                CHECK(gpu->ops->scale(gpu, da, da, 0.0625f * 3.0f, n) == 0);
                CHECK(back(c2, da, (size_t)n) == 0);
                CHECK(memcmp(c1, c2, (size_t)n * 4) == 0);
            }
            gpu->ops->free(gpu, da);
            gpu->ops->free(gpu, db);
            gpu->ops->free(gpu, dy);
        }
        free(a);
        free(b);
        free(c1);
        free(c2);
    }
    /* mul_rows: 7 rows of 333, and in place */
    {
        enum { R = 7, N = 333 };
        static float x[R * N], w[N], c1[R * N], c2[R * N];
        for (int i = 0; i < R * N; i++)
            x[i] = frand() * 3;
        for (int i = 0; i < N; i++)
            w[i] = frand() * 2;
        float *dx = dev(x, R * N), *dw = dev(w, N), *dy = dev(NULL, R * N);
        CHECK(cpu->ops->mul_rows(cpu, c1, x, w, R, N) == 0);
        CHECK(gpu->ops->mul_rows(gpu, dy, dx, dw, R, N) == 0);
        CHECK(back(c2, dy, R * N) == 0);
        CHECK_MSG(memcmp(c1, c2, sizeof(c1)) == 0, "mul_rows: %g", max_rel(c2, c1, R * N));
        CHECK(gpu->ops->mul_rows(gpu, dx, dx, dw, R, N) == 0);
        CHECK(back(c2, dx, R * N) == 0);
        CHECK(memcmp(c1, c2, sizeof(c1)) == 0);
        gpu->ops->free(gpu, dx);
        gpu->ops->free(gpu, dw);
        gpu->ops->free(gpu, dy);
    }
    /* rope with freq_factors: neox over a whole head (gemma4's global
     * layers) and normal mode with YaRN; 64 and 600 rotated dims */
    for (int k = 0; k < 3; k++) {
        const int n_rot = k == 2 ? 600 : 64, stride = k == 2 ? 640 : 72;
        float *ff = xmalloc((size_t)(n_rot / 2) * 4);
        for (int i = 0; i < n_rot / 2; i++)
            ff[i] = i >= n_rot / 4 ? 1e30f : 1.0f + (float)(i % 5) * 0.5f;
        struct moe_rope_params rp = { k == 1 ? MOE_ROPE_NORM : MOE_ROPE_NEOX, n_rot, 1000000.0f, 1.0f,
                                      0.0f, 1.0f, { 0, 0 }, ff };
        if (k == 1) {
            rp.freq_scale = 0.5f;
            rp.ext_factor = 1.0f;
            rp.corr_dims[1] = 20.0f;
        }
        for (int many = 0; many < 2; many++) {
            const int n_tok = many ? 300 : 5, n_head = 2;
            int32_t *pos = xmalloc((size_t)n_tok * 4);
            const int32_t few[5] = { 0, 1, 7, 300, 4095 };
            for (int t = 0; t < n_tok; t++)
                pos[t] = many ? t * 13 : few[t];
            const size_t n = (size_t)n_tok * n_head * stride;
            float *x = xmalloc(n * 4), *c1 = xmalloc(n * 4), *c2 = xmalloc(n * 4);
            for (size_t i = 0; i < n; i++)
                x[i] = frand();
            memcpy(c1, x, n * 4);
            float *dx = dev(x, n);
            CHECK(cpu->ops->rope(cpu, c1, n_tok, n_head, stride, 0, pos, &rp) == 0);
            CHECK(gpu->ops->rope(gpu, dx, n_tok, n_head, stride, 0, pos, &rp) == 0);
            CHECK(back(c2, dx, n) == 0);
            CHECK_MSG(max_rel(c2, c1, n) <= 2e-5, "rope freq_factors case %d tokens %d: %g", k, n_tok,
                      max_rel(c2, c1, n));
            gpu->ops->free(gpu, dx);
            free(pos);
            free(x);
            free(c1);
            free(c2);
        }
        free(ff);
    }
    close_backends();
}

/* qwen35moe's delta-net ops: ssm_conv and gated_delta_net over a sequence
 * fed in chunks (1, 6 and 300 tokens: the state carried between calls on
 * the device), outputs and the final state against the CPU backend; state
 * dims 128 (Qwen3.5's: the state in shared memory, past the 48 KiB default),
 * 40 (a partial warp) and 256 (more than the opt-in shared memory: the
 * state used in place in device memory), value heads sharing key heads.
 * Tolerance 1e-4 of the largest value: the same float operations in the
 * same order as the CPU, but CUDA's expf / logf are not glibc's, and the
 * recurrence carries their ulps through 307 tokens. */
static int check_ssm(int NK, int NV, int D, int d_conv)
{
    const int C = 2 * NK * D + NV * D, DI = NV * D, hist = d_conv - 1;
    const int chunks[3] = { 1, 6, 300 }, N = 307;
    const size_t conv_f = (size_t)C * hist, ssm_f = (size_t)NV * D * D;
    float *w = xmalloc((size_t)C * d_conv * 4), *dt = xmalloc((size_t)NV * 4), *a = xmalloc((size_t)NV * 4);
    float *norm = xmalloc((size_t)D * 4), *x = xmalloc((size_t)N * C * 4), *z = xmalloc((size_t)N * DI * 4);
    float *beta = xmalloc((size_t)N * NV * 4), *alpha = xmalloc((size_t)N * NV * 4);
    float *st = xmalloc((conv_f + ssm_f) * 4), *cv = xmalloc((size_t)N * C * 4);
    float *o = xmalloc((size_t)N * DI * 4), *go = xmalloc((size_t)N * DI * 4);
    float *gst = xmalloc((conv_f + ssm_f) * 4);
    for (size_t i = 0; i < (size_t)C * d_conv; i++)
        w[i] = frand();
    for (int i = 0; i < NV; i++) {
        dt[i] = frand();
        a[i] = -1.0f - frand();
    }
    for (int i = 0; i < D; i++)
        norm[i] = 1.0f + frand();
    for (size_t i = 0; i < (size_t)N * C; i++)
        x[i] = frand() * 3;
    for (size_t i = 0; i < (size_t)N * DI; i++)
        z[i] = frand() * 3;
    for (size_t i = 0; i < (size_t)N * NV; i++) {
        beta[i] = frand() * 3;
        alpha[i] = frand() * 3;
    }
    memset(st, 0, (conv_f + ssm_f) * 4);
    float *dw = dev(w, (size_t)C * d_conv), *ddt = dev(dt, (size_t)NV), *da = dev(a, (size_t)NV);
    float *dnorm = dev(norm, (size_t)D), *dx = dev(x, (size_t)N * C), *dz = dev(z, (size_t)N * DI);
    float *dbeta = dev(beta, (size_t)N * NV), *dalpha = dev(alpha, (size_t)N * NV);
    float *dst = dev(st, conv_f + ssm_f), *dcv = dev(NULL, (size_t)N * C), *dout = dev(NULL, (size_t)N * DI);
    const struct moe_gdn_params hp = { NK, NV, D, 1e-6f, dt, a, norm };
    const struct moe_gdn_params gp = { NK, NV, D, 1e-6f, ddt, da, dnorm };
    int bad = 0, off = 0;
    for (int k = 0; k < 3 && !bad; k++) {
        const int m = chunks[k];
        const size_t xo = (size_t)off * C, oo = (size_t)off * DI;
        if (cpu->ops->ssm_conv(cpu, cv + xo, x + xo, st, w, m, C, d_conv) != 0 ||
            cpu->ops->gated_delta_net(cpu, o + oo, cv + xo, z + oo, beta + off * NV, alpha + off * NV,
                                      st + conv_f, m, &hp) != 0) {
            MOE_FAIL_AT("CPU delta-net ops failed");
            bad = 1;
        }
        int rc = gpu->ops->ssm_conv(gpu, dcv + xo, dx + xo, dst, dw, m, C, d_conv);
        if (rc == 0)
            rc = gpu->ops->gated_delta_net(gpu, dout + oo, dcv + xo, dz + oo, dbeta + off * NV,
                                           dalpha + off * NV, dst + conv_f, m, &gp);
        if (rc != 0 && !bad) {
            MOE_FAIL_AT("nk %d nv %d D %d: delta-net ops on the GPU: %d", NK, NV, D, rc);
            bad = 1;
        }
        off += m;
    }
    if (!bad) {
        const int r1 = back(go, dout, (size_t)N * DI), r2 = back(gst, dst, conv_f + ssm_f);
        const double e1 = max_rel(go, o, (size_t)N * DI), e2 = max_rel(gst, st, conv_f + ssm_f);
        printf("  nk %d nv %d D %d d_conv %d, %d tokens in 3 calls: outputs %.3g, state %.3g (max rel)\n",
               NK, NV, D, d_conv, N, e1, e2);
        if (r1 != 0 || r2 != 0) {
            MOE_FAIL_AT("nk %d nv %d D %d: error or guard (%d, %d)", NK, NV, D, r1, r2);
            bad = 1;
        } else if (!(e1 <= 1e-4 && e2 <= 1e-4)) {
            MOE_FAIL_AT("nk %d nv %d D %d: outputs %g, state %g > 1e-4", NK, NV, D, e1, e2);
            bad = 1;
        }
    }
    float *dv[] = { dw, ddt, da, dnorm, dx, dz, dbeta, dalpha, dst, dcv, dout };
    for (size_t i = 0; i < sizeof(dv) / sizeof(dv[0]); i++)
        gpu->ops->free(gpu, dv[i]);
    float *hv[] = { w, dt, a, norm, x, z, beta, alpha, st, cv, o, go, gst };
    for (size_t i = 0; i < sizeof(hv) / sizeof(hv[0]); i++)
        free(hv[i]);
    return bad;
}

static void test_ssm_ops(void)
{
    OPEN();
    CHECK(gpu->ops->ssm_conv != NULL && gpu->ops->gated_delta_net != NULL);
    if (!check_ssm(2, 4, 128, 4) && !check_ssm(1, 3, 40, 4) && !quick)
        check_ssm(2, 2, 256, 3);
    close_backends();
}

/* ---- kv_store and attention ---------------------------------------------------- */

struct attn_case {
    int H, KV, hd, hdv, f16, window, sinks, mla;
    int n_ctx, n_tok, pos0;   /* n_tok tokens at positions pos0 - n_tok + 1 .. pos0 (a prefill
                                 ending there), or spread when n_tok is small */
};

static int run_attn_case(const struct attn_case *c, int ci)
{
    const int H = c->H, KV = c->KV, hd = c->hd, hdv = c->hdv, n_ctx = c->n_ctx;
    /* MLA: one row per position holds K (hd wide, one kv head) and V is
     * its first hdv elements */
    const int64_t krow = (int64_t)KV * hd, vrow = c->mla ? krow : (int64_t)KV * hdv;
    const int es = c->f16 ? 2 : 4;
    const int n_fill = c->pos0 + 1;
    int32_t *fp = xmalloc((size_t)n_fill * 4);
    for (int i = 0; i < n_fill; i++)
        fp[i] = i;
    float *kx = xmalloc((size_t)n_fill * krow * 4), *vx = xmalloc((size_t)n_fill * vrow * 4);
    for (int64_t i = 0; i < n_fill * krow; i++)
        kx[i] = frand();
    for (int64_t i = 0; i < n_fill * vrow; i++)
        vx[i] = frand();
    uint8_t *kc = calloc((size_t)n_ctx * krow, es), *vc = calloc((size_t)n_ctx * vrow, es);
    void *dkc = dev_bytes(kc, (size_t)n_ctx * krow * es);
    void *dvc = c->mla ? dkc : dev_bytes(vc, (size_t)n_ctx * vrow * es);
    float *dkx = dev(kx, (size_t)(n_fill * krow)), *dvx = dev(vx, (size_t)(n_fill * vrow));
    int bad = 0;
    bad |= cpu->ops->kv_store(cpu, kc, kx, n_fill, fp, (int)krow, krow, 0, c->f16 ? MOE_DTYPE_F16 : MOE_DTYPE_F32) != 0;
    bad |= gpu->ops->kv_store(gpu, dkc, dkx, n_fill, fp, (int)krow, krow, 0, c->f16 ? MOE_DTYPE_F16 : MOE_DTYPE_F32) != 0;
    if (!c->mla) {
        bad |= cpu->ops->kv_store(cpu, vc, vx, n_fill, fp, (int)vrow, vrow, 0, c->f16 ? MOE_DTYPE_F16 : MOE_DTYPE_F32) != 0;
        bad |= gpu->ops->kv_store(gpu, dvc, dvx, n_fill, fp, (int)vrow, vrow, 0, c->f16 ? MOE_DTYPE_F16 : MOE_DTYPE_F32) != 0;
    }
    uint8_t *kc2 = xmalloc((size_t)n_ctx * krow * es);
    bad |= gpu->ops->download(gpu, kc2, dkc, (size_t)n_ctx * krow * es) != 0;
    if (bad || memcmp(kc, kc2, (size_t)n_ctx * krow * es) != 0) {
        MOE_FAIL_AT("attention case %d: kv_store differs from the CPU's", ci);
        bad = 1;
    }
    float sinks[64];
    for (int h = 0; h < 64; h++)
        sinks[h] = frand() * 3;
    float *dsinks = dev(sinks, 64);
    const int n_tok = c->n_tok;
    int32_t *pos = xmalloc((size_t)n_tok * 4);
    for (int t = 0; t < n_tok; t++)
        pos[t] = n_tok <= 4 ? (t == n_tok - 1 ? c->pos0 : (int)((int64_t)c->pos0 * t / n_tok))
                            : c->pos0 - n_tok + 1 + t;
    const size_t nq = (size_t)n_tok * H * hd, no = (size_t)n_tok * H * hdv;
    float *q = xmalloc(nq * 4), *o1 = xmalloc(no * 4), *o2 = xmalloc(no * 4);
    for (size_t i = 0; i < nq; i++)
        q[i] = frand();
    float *dq = dev(q, nq), *dout = dev(NULL, no);
    struct moe_attn_params ap = {
        .n_head = H, .n_head_kv = KV, .head_dim = hd, .head_dim_v = hdv, .k_row = krow,
        .v_row = vrow, .scale = 1.0f / sqrtf((float)hd), .kv_type = c->f16 ? MOE_DTYPE_F16 : MOE_DTYPE_F32,
        .k_cache = kc, .v_cache = c->mla ? kc : vc, .window = c->window,
        .sinks = c->sinks ? sinks : NULL,
    };
    if (!bad && cpu->ops->attention(cpu, o1, q, n_tok, pos, &ap) != 0) {
        MOE_FAIL_AT("attention case %d: CPU failed", ci);
        bad = 1;
    }
    ap.k_cache = dkc;
    ap.v_cache = dvc;
    ap.sinks = c->sinks ? dsinks : NULL;
    int rc = bad ? 0 : gpu->ops->attention(gpu, dout, dq, n_tok, pos, &ap);
    if (!bad && (rc != 0 || back(o2, dout, no) != 0)) {
        MOE_FAIL_AT("attention case %d: %d or guard", ci, rc);
        bad = 1;
    }
    const double tol = c->f16 ? 2e-3 : 2e-5;
    if (!bad && !(max_rel(o2, o1, no) <= tol)) {
        MOE_FAIL_AT("attention case %d (H %d KV %d hd %d/%d f16 %d window %d sinks %d mla %d, %d tokens"
                    " to %d): %g > %g", ci, H, KV, hd, hdv, c->f16, c->window, c->sinks, c->mla, n_tok,
                    c->pos0, max_rel(o2, o1, no), tol);
        bad = 1;
    }
    gpu->ops->free(gpu, dkc);
    if (!c->mla)
        gpu->ops->free(gpu, dvc);
    gpu->ops->free(gpu, dkx);
    gpu->ops->free(gpu, dvx);
    gpu->ops->free(gpu, dq);
    gpu->ops->free(gpu, dout);
    gpu->ops->free(gpu, dsinks);
    free(fp); free(kx); free(vx); free(kc); free(vc); free(kc2); free(pos); free(q); free(o1); free(o2);
    return bad;
}

static void test_attention(void)
{
    OPEN();
    const struct attn_case cases[] = {
        /* H KV hd hdv f16 win sinks mla  ctx tok pos0 */
        { 4, 2, 64, 64, 0, 0, 0, 0, 300, 4, 249 },
        { 4, 2, 64, 64, 1, 0, 0, 0, 300, 4, 249 },
        { 6, 1, 40, 24, 0, 0, 0, 0, 300, 4, 249 },
        { 4, 4, 32, 32, 0, 17, 1, 0, 300, 4, 249 },
        { 8, 2, 48, 48, 1, 0, 1, 0, 300, 4, 249 },
        /* decode at a long context: split-K, with window, sinks, f16 */
        { 8, 2, 128, 128, 0, 0, 0, 0, 4100, 1, 4000 },
        { 8, 2, 128, 128, 1, 0, 1, 0, 4100, 1, 4000 },
        { 8, 8, 64, 64, 0, 1000, 1, 0, 4100, 2, 3999 },
        { 16, 1, 72, 64, 0, 0, 0, 1, 3000, 1, 2999 },   /* MLA-like: V inside the K rows */
        /* prefill: many tokens (positions through the device copy) */
        { 4, 2, 64, 64, 0, 0, 0, 0, 600, 300, 599 },
        { 4, 1, 64, 48, 1, 128, 1, 0, 600, 300, 599 },
    };
    for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++)
        if (run_attn_case(&cases[ci], (int)ci))
            break;
    close_backends();
}

/* ---- router ------------------------------------------------------------------- */

static void test_router(void)
{
    OPEN();
    enum { T = 7, E = 64, K = 6 };
    float l[T * E], bias[E];
    for (int i = 0; i < T * E; i++)
        l[i] = frand() * 4;
    l[3] = l[5];   /* a tie */
    for (int i = 0; i < E; i++)
        bias[i] = frand() * 0.1f;
    float *dl = dev(l, T * E);
    const struct moe_gating_params g[6] = {
        { MOE_GATING_SOFTMAX, E, K, 0, 1.0f, NULL, 0, 0 },
        { MOE_GATING_SOFTMAX, E, K, 1, 1.0f, NULL, 0, 0 },
        { MOE_GATING_SIGMOID, E, K, 1, 2.5f, bias, 8, 3 },
        { MOE_GATING_SOFTMAX_TOPK, E, K, 0, 1.0f, NULL, 0, 0 },
        { MOE_GATING_SIGMOID, E, 2, 0, 1.0f, NULL, 0, 0 },
        { MOE_GATING_SOFTMAX, E, K, 0, 16.0f, NULL, 4, 2 },
    };
    for (int k = 0; k < 6; k++) {
        int32_t i1[T * K], i2[T * K];
        float w1[T * K], w2[T * K];
        memset(i2, 0xff, sizeof(i2));
        CHECK(cpu->ops->router_topk(cpu, l, T, &g[k], i1, w1) == 0);
        CHECK(gpu->ops->router_topk(gpu, dl, T, &g[k], i2, w2) == 0);
        const size_t n = (size_t)T * (size_t)g[k].k;
        CHECK_MSG(memcmp(i1, i2, n * 4) == 0 && memcmp(w1, w2, n * 4) == 0, "router rule %d", k);
    }
    gpu->ops->free(gpu, dl);
    close_backends();
}

/* ---- refusals ------------------------------------------------------------------ */

static void test_refusals(void)
{
    OPEN();
    struct moe_weight w = { NULL, MOE_DTYPE_IQ2_XXS, 256, 1, 66 };
    CHECK(!gpu->ops->supports(gpu, MOE_DTYPE_IQ2_XXS));
    float *y = dev(NULL, 256);
    int32_t id = 0;
    CHECK(gpu->ops->get_rows(gpu, y, &w, &id, 1) == MOE_EUNSUPPORTED);
    CHECK(gpu->ops->matmul(gpu, y, &w, NULL, y, 1) == MOE_EUNSUPPORTED);
    w.dtype = MOE_DTYPE_F32;
    w.row_bytes = 1024;
    id = 5;
    CHECK(gpu->ops->get_rows(gpu, y, &w, &id, 1) == -EINVAL);
    id = -1;
    CHECK(gpu->ops->get_rows(gpu, y, &w, &id, 1) == -EINVAL);
    struct moe_rope_params rp = { MOE_ROPE_NORM, 7, 10000.0f, 1.0f, 0.0f, 1.0f, { 0, 0 } };
    int32_t pos = 0;
    CHECK(gpu->ops->rope(gpu, y, 1, 1, 64, 0, &pos, &rp) == -EINVAL);
    struct moe_attn_params ap = { .n_head = 3, .n_head_kv = 2, .head_dim = 8, .head_dim_v = 8,
                                  .k_row = 16, .v_row = 16, .scale = 1.0f, .k_cache = y, .v_cache = y };
    CHECK(gpu->ops->attention(gpu, y, y, 1, &pos, &ap) == -EINVAL);
    ap.n_head = 2;
    pos = -1;
    CHECK(gpu->ops->attention(gpu, y, y, 1, &pos, &ap) == -EINVAL);
    /* nothing above may have poisoned the context */
    float back_y[256];
    CHECK(back(back_y, y, 256) == 0);
    gpu->ops->free(gpu, y);
    close_backends();
}

/* ---- the overlapped upload ------------------------------------------------------ */

/* The copy stream against the compute stream, on the device: 50 GEMVs read
 * weight buffer A (accumulated into acc), the release's "last use" event is
 * recorded after them, and new weights are uploaded into A on the copy
 * stream after that event; a GEMV queued after a stream wait on the
 * upload's event must see the new weights, and the 50 before it the old
 * ones. Without either wait the copy would race the kernels (A is 64 MiB:
 * its copy takes longer than one GEMV). */
static void test_async_upload(void)
{
    OPEN();
    enum { NI = 4096, NO = 4096, REPS = 50 };
    const size_t wb = (size_t)NI * NO * sizeof(float);
    float *w1 = xmalloc(wb), *x = xmalloc(NI * sizeof(float));
    float *w2 = gpu->ops->host_alloc(gpu, wb);   /* page-locked: the DMA reads it */
    CHECK(w2 != NULL);
    CHECK_MSG(((uintptr_t)w2 & 4095) == 0, "host_alloc: %p is not page-aligned", (void *)w2);
    for (size_t i = 0; i < (size_t)NI * NO; i++) {
        w1[i] = frand();
        w2[i] = frand();
    }
    for (int i = 0; i < NI; i++)
        x[i] = frand();
    float y1[NO], y2[NO], acc[NO], g2[NO];
    struct moe_weight hw1 = { w1, MOE_DTYPE_F32, NI, NO, NI * sizeof(float) };
    struct moe_weight hw2 = { w2, MOE_DTYPE_F32, NI, NO, NI * sizeof(float) };
    CHECK(cpu->ops->matmul(cpu, y1, &hw1, NULL, x, 1) == 0);
    CHECK(cpu->ops->matmul(cpu, y2, &hw2, NULL, x, 1) == 0);
    void *da = gpu->ops->alloc(gpu, wb);
    CHECK(da != NULL);
    CHECK(gpu->ops->upload(gpu, da, w1, wb) == 0);
    struct moe_weight dw = { da, MOE_DTYPE_F32, NI, NO, NI * sizeof(float) };
    float *dx = dev(x, NI), *dy = dev(NULL, NO), *dacc = dev(NULL, NO), *dy2 = dev(NULL, NO);
    struct moe_event last_use = { 0 }, ready = { 0 }, never = { 0 };
    CHECK(gpu->ops->event_init(gpu, &last_use) == 0);
    CHECK(gpu->ops->event_init(gpu, &ready) == 0);
    CHECK(gpu->ops->event_init(gpu, &never) == 0);
    CHECK_INT(gpu->ops->event_query(gpu, &never), ==, 1);   /* never recorded: complete */
    CHECK(gpu->ops->stream_wait(gpu, &never) == 0);
    struct moe_copy_stats c0, c1;
    gpu->ops->copy_stats(gpu, &c0);
    CHECK(gpu->ops->fill(gpu, dacc, 0.0f, NO) == 0);
    for (int r = 0; r < REPS; r++) {
        CHECK(gpu->ops->matmul(gpu, dy, &dw, NULL, dx, 1) == 0);
        CHECK(gpu->ops->axpy(gpu, dacc, 1.0f, dy, NO) == 0);
    }
    CHECK(gpu->ops->event_record(gpu, &last_use) == 0);
    CHECK(gpu->ops->upload_async(gpu, da, w2, wb, &last_use, &ready) == 0);
    const int q = gpu->ops->event_query(gpu, &ready);
    CHECK_MSG(q == 0 || q == 1, "event_query: %d", q);
    CHECK(gpu->ops->stream_wait(gpu, &ready) == 0);
    CHECK(gpu->ops->matmul(gpu, dy2, &dw, NULL, dx, 1) == 0);
    CHECK_MSG(back(acc, dacc, NO) == 0, "acc: error or guard");
    CHECK_MSG(back(g2, dy2, NO) == 0, "y2: error or guard");
    CHECK(gpu->ops->event_sync(gpu, &ready) == 0);
    CHECK_INT(gpu->ops->event_query(gpu, &ready), ==, 1);
    for (int o = 0; o < NO; o++)
        acc[o] /= REPS;
    const double e1 = max_rel(acc, y1, NO), e2 = max_rel(g2, y2, NO);
    printf("  50 GEMVs before the upload: max rel err %.3g; the GEMV after it: %.3g (query right"
           " after queueing: %s)\n", e1, e2, q ? "done" : "pending");
    CHECK_MSG(e1 <= 1e-4, "kernels queued before the upload saw new weights: %g", e1);
    CHECK_MSG(e2 <= 1e-4, "the kernel after the stream wait saw old weights: %g", e2);
    gpu->ops->copy_stats(gpu, &c1);
    CHECK_U64(c1.uploads - c0.uploads, ==, 1);
    CHECK_U64(c1.bytes - c0.bytes, ==, wb);
    if (c1.timed > c0.timed) {
        const double s = c1.busy_s - c0.busy_s;
        CHECK(s > 0);
        printf("  upload of %zu MiB from page-locked memory: %.3f ms, %.1f GB/s\n", wb >> 20, s * 1e3,
               (double)wb / s / 1e9);
    }
    gpu->ops->event_fini(gpu, &last_use);
    gpu->ops->event_fini(gpu, &ready);
    gpu->ops->event_fini(gpu, &never);
    gpu->ops->free(gpu, da);
    gpu->ops->free(gpu, dx);
    gpu->ops->free(gpu, dy);
    gpu->ops->free(gpu, dy2);
    gpu->ops->free(gpu, dacc);
    gpu->ops->host_free(gpu, w2);
    free(w1);
    free(x);
    close_backends();
}

int main(void)
{
    /* probed in a child: the cases fork, and CUDA does not survive a fork */
    if (moe_test_gpu_stand_in()) {
        printf("MOE_GPU_STAND_IN=cpu: the CPU backend stands in for the GPU (tests the test, not CUDA)\n");
    } else if (moe_test_cuda_devices() <= 0) {
        printf("no CUDA device (or a build without CUDA): skipped\n");
        return MOE_TEST_SKIP;
    }
    /* MOE_GPU_QUICK=1: the subset tools/gpu_check.sh runs under
     * compute-sanitizer (every kernel family once, a few types) */
    quick = getenv("MOE_GPU_QUICK") != NULL && strcmp(getenv("MOE_GPU_QUICK"), "0") != 0;
    moe_test_run("overlapped upload: copy stream, events, page-locked memory", test_async_upload);
    moe_test_run(quick ? "matmul: F32, F16, Q4_0, Q8_0, Q4_K, Q6_K, MXFP4" :
                 "matmul: every type, GEMV and cuBLAS paths", test_matmul);
    if (!quick)
        moe_test_run("get_rows: every type", test_get_rows);
    moe_test_run("swiglu, swiglu_oai, axpy, add, fill", test_elementwise);
    moe_test_run("gate_rows, copy_rows", test_rows_ops);
    moe_test_run("rmsnorm", test_rmsnorm);
    moe_test_run("rope", test_rope);
    moe_test_run("gemma4: geglu, scale, mul_rows, rope freq_factors", test_gemma4_ops);
    moe_test_run("qwen35moe: ssm_conv, gated_delta_net", test_ssm_ops);
    moe_test_run("kv_store and attention", test_attention);
    moe_test_run("router_topk: every gating rule", test_router);
    if (!moe_test_gpu_stand_in())   /* the CPU backend refuses other things */
        moe_test_run("refusals", test_refusals);
    return moe_test_exit_code();
}
