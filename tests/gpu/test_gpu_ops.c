/* The CUDA backend against the CPU backend, op by op: every weight type the
 * CUDA backend supports through get_rows and matmul (shapes whose token
 * counts and row counts are not multiples of anything), and rmsnorm, rope
 * (normal, neox, YaRN, partial), kv_store and attention (f32 and f16
 * caches, GQA, sliding window, sinks, V narrower than K), router_topk (every
 * gating rule), swiglu, swiglu_oai, axpy and add, on sizes that are not
 * multiples of a block or a warp. Every device output has guard floats after
 * it that must come back untouched. Exits 77 without a CUDA device. */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
#include "kernels/cpu/dequant.h"
#include "kernels/cuda.h"
#include "kernels/dtype.h"
#include "kernels/fp16.h"
#include "tests/harness.h"

#define GUARD 64
#define GUARD_BITS 0x7fc0dead

static struct moe_backend *cpu, *gpu;
static unsigned seed = 42;

static float frand(void) { return (float)rand_r(&seed) / (float)RAND_MAX * 2.0f - 1.0f; }

/* Device buffer of n floats (+ guard), filled from host (or the guard
 * pattern everywhere when host is NULL). */
static float *dev(const float *host, size_t n)
{
    float *d = gpu->ops->alloc(gpu, (n + GUARD) * sizeof(float));
    float *tmp = malloc((n + GUARD) * sizeof(float));
    uint32_t g = GUARD_BITS;
    for (size_t i = 0; i < n + GUARD; i++)
        memcpy(&tmp[i], &g, 4);
    if (host)
        memcpy(tmp, host, n * sizeof(float));
    gpu->ops->upload(gpu, d, tmp, (n + GUARD) * sizeof(float));
    free(tmp);
    return d;
}

static void *dev_bytes(const void *host, size_t n)
{
    void *d = gpu->ops->alloc(gpu, n ? n : 1);
    gpu->ops->upload(gpu, d, host, n);
    return d;
}

/* Downloads n floats and checks the guard after them. */
static int back(float *host, const float *d, size_t n)
{
    float *tmp = malloc((n + GUARD) * sizeof(float));
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

static double max_rel(const float *a, const float *b, size_t n)
{
    double scale = 1e-6, d = 0;
    for (size_t i = 0; i < n; i++)
        scale = fmax(scale, fabs((double)b[i]));
    for (size_t i = 0; i < n; i++)
        d = fmax(d, fabs((double)a[i] - (double)b[i]));
    return d / scale;
}

/* Random blocks of type t with finite, moderate scales. */
static void fill_type(uint32_t t, uint8_t *p, int64_t n_elems)
{
    const struct moe_dtype_info *inf = moe_dtype_info(t);
    const int64_t nb = n_elems / inf->block_size;
    for (int64_t i = 0; i < nb * (int64_t)inf->type_size; i++)
        p[i] = (uint8_t)rand_r(&seed);
    for (int64_t b = 0; b < nb; b++) {
        uint8_t *blk = p + b * inf->type_size;
        uint16_t h = moe_fp32_to_fp16(0.01f + 0.05f * fabsf(frand()));
        uint16_t h2 = moe_fp32_to_fp16(0.01f + 0.05f * fabsf(frand()));
        switch (t) {
        case MOE_DTYPE_F32:
            for (uint32_t i = 0; i < inf->block_size; i++) {
                float v = frand();
                memcpy(blk + 4 * i, &v, 4);
            }
            break;
        case MOE_DTYPE_F16:
            for (uint32_t i = 0; i < inf->block_size; i++) {
                uint16_t v = moe_fp32_to_fp16(frand());
                memcpy(blk + 2 * i, &v, 2);
            }
            break;
        case MOE_DTYPE_BF16:
            for (uint32_t i = 0; i < inf->block_size; i++) {
                float v = frand();
                uint32_t bits;
                memcpy(&bits, &v, 4);
                uint16_t hb = (uint16_t)(bits >> 16);
                memcpy(blk + 2 * i, &hb, 2);
            }
            break;
        case MOE_DTYPE_Q4_0: case MOE_DTYPE_Q5_0: case MOE_DTYPE_Q8_0: case MOE_DTYPE_IQ4_NL:
            memcpy(blk, &h, 2);
            break;
        case MOE_DTYPE_Q4_1: case MOE_DTYPE_Q5_1: case MOE_DTYPE_Q4_K: case MOE_DTYPE_Q5_K:
            memcpy(blk, &h, 2);
            memcpy(blk + 2, &h2, 2);
            break;
        case MOE_DTYPE_Q2_K:
            memcpy(blk + 80, &h, 2);
            memcpy(blk + 82, &h2, 2);
            break;
        case MOE_DTYPE_Q3_K:
            memcpy(blk + 108, &h, 2);
            break;
        case MOE_DTYPE_Q6_K:
            memcpy(blk + 208, &h, 2);
            break;
        case MOE_DTYPE_Q8_K: {
            float d = 0.01f;
            memcpy(blk, &d, 4);
            break;
        }
        case MOE_DTYPE_MXFP4:
            blk[0] = (uint8_t)(120 + rand_r(&seed) % 8);
            break;
        }
    }
}

static const uint32_t types[] = {
    MOE_DTYPE_F32, MOE_DTYPE_F16, MOE_DTYPE_BF16, MOE_DTYPE_Q4_0, MOE_DTYPE_Q4_1, MOE_DTYPE_Q5_0,
    MOE_DTYPE_Q5_1, MOE_DTYPE_Q8_0, MOE_DTYPE_Q2_K, MOE_DTYPE_Q3_K, MOE_DTYPE_Q4_K, MOE_DTYPE_Q5_K,
    MOE_DTYPE_Q6_K, MOE_DTYPE_Q8_K, MOE_DTYPE_IQ4_NL, MOE_DTYPE_MXFP4,
};

static void test_weights(void)
{
    for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
        const uint32_t t = types[ti];
        const struct moe_dtype_info *inf = moe_dtype_info(t);
        CHECK(gpu->ops->supports(gpu, t));
        const int64_t n_in = inf->block_size == 256 ? 512 : 96, n_out = 37;
        const size_t rb = (size_t)(n_in / inf->block_size) * inf->type_size;
        uint8_t *w = malloc(rb * (size_t)n_out);
        fill_type(t, w, n_in * n_out);
        /* the reference: rows dequantized on the CPU */
        float *wf = malloc((size_t)(n_in * n_out) * sizeof(float));
        for (int64_t r = 0; r < n_out; r++)
            CHECK(moe_dequantize_row(t, w + r * rb, wf + r * n_in, n_in) == 0);
        struct moe_weight hw = { w, t, n_in, n_out, rb };
        struct moe_weight dw = hw;
        dw.data = dev_bytes(w, rb * (size_t)n_out);
        /* get_rows */
        int32_t ids[5] = { 0, 36, 5, 5, 17 };
        float *y = dev(NULL, 5 * (size_t)n_in), *yh = malloc(5 * (size_t)n_in * sizeof(float));
        CHECK(gpu->ops->get_rows(gpu, y, &dw, ids, 5) == 0);
        CHECK_MSG(back(yh, y, 5 * (size_t)n_in) == 0, "%s get_rows: guard or error", moe_dtype_name(t));
        for (int i = 0; i < 5; i++)
            CHECK_MSG(max_rel(yh + i * n_in, wf + ids[i] * n_in, (size_t)n_in) < 1e-6,
                      "%s get_rows row %d", moe_dtype_name(t), ids[i]);
        /* matmul, against f64 sums of the same dequantized rows */
        const int64_t toks[] = { 1, 3, 17 };
        for (int k = 0; k < 3; k++) {
            const int64_t nt = toks[k];
            float *x = malloc((size_t)(nt * n_in) * sizeof(float)), *bias = malloc((size_t)n_out * 4);
            for (int64_t i = 0; i < nt * n_in; i++)
                x[i] = frand();
            for (int64_t i = 0; i < n_out; i++)
                bias[i] = frand();
            float *dx = dev(x, (size_t)(nt * n_in)), *db = dev(bias, (size_t)n_out);
            float *dy = dev(NULL, (size_t)(nt * n_out));
            float *gy = malloc((size_t)(nt * n_out) * sizeof(float));
            CHECK(gpu->ops->matmul(gpu, dy, &dw, k == 1 ? db : NULL, dx, nt) == 0);
            CHECK_MSG(back(gy, dy, (size_t)(nt * n_out)) == 0, "%s matmul guard", moe_dtype_name(t));
            for (int64_t tt = 0; tt < nt; tt++)
                for (int64_t o = 0; o < n_out; o++) {
                    double s = k == 1 ? bias[o] : 0.0, mag = fabs(s);
                    for (int64_t i = 0; i < n_in; i++) {
                        s += (double)wf[o * n_in + i] * x[tt * n_in + i];
                        mag += fabs((double)wf[o * n_in + i] * x[tt * n_in + i]);
                    }
                    CHECK_MSG(fabs(gy[tt * n_out + o] - s) <= 5e-5 * mag + 1e-6, "%s matmul t=%lld"
                              " o=%lld: %g vs %g", moe_dtype_name(t), (long long)tt, (long long)o,
                              gy[tt * n_out + o], s);
                }
            gpu->ops->free(gpu, dx);
            gpu->ops->free(gpu, db);
            gpu->ops->free(gpu, dy);
            free(x);
            free(bias);
            free(gy);
        }
        gpu->ops->free(gpu, (void *)dw.data);
        gpu->ops->free(gpu, y);
        free(yh);
        free(w);
        free(wf);
    }
}

/* Runs one elementwise-style op on both backends and compares. */
static void test_elementwise(void)
{
    const int64_t n = 1000;   /* not a multiple of 256 */
    float a[1000], b[1000], c1[1000], c2[1000];
    for (int i = 0; i < n; i++) {
        a[i] = frand() * 8;
        b[i] = frand() * 8;
    }
    for (int op = 0; op < 4; op++) {
        float *da = dev(a, n), *db = dev(b, n), *dy = dev(a, n);
        memcpy(c1, a, sizeof(a));
        switch (op) {
        case 0:
            CHECK(cpu->ops->swiglu(cpu, c1, a, b, n) == 0);
            CHECK(gpu->ops->swiglu(gpu, dy, da, db, n) == 0);
            break;
        case 1:
            CHECK(cpu->ops->swiglu_oai(cpu, c1, a, b, n, 1.702f, 7.0f) == 0);
            CHECK(gpu->ops->swiglu_oai(gpu, dy, da, db, n, 1.702f, 7.0f) == 0);
            break;
        case 2:
            CHECK(cpu->ops->axpy(cpu, c1, 0.37f, b, n) == 0);
            CHECK(gpu->ops->axpy(gpu, dy, 0.37f, db, n) == 0);
            break;
        case 3:
            CHECK(cpu->ops->add(cpu, c1, a, b, n) == 0);
            CHECK(gpu->ops->add(gpu, dy, da, db, n) == 0);
            break;
        }
        CHECK_MSG(back(c2, dy, n) == 0, "op %d guard", op);
        CHECK_MSG(max_rel(c2, c1, n) < 1e-6, "elementwise op %d: %g", op, max_rel(c2, c1, n));
        gpu->ops->free(gpu, da);
        gpu->ops->free(gpu, db);
        gpu->ops->free(gpu, dy);
    }
    /* rmsnorm, with and without weights, rows of 999 */
    const int64_t rows = 3, m = 333;
    float w[333];
    for (int i = 0; i < m; i++)
        w[i] = frand();
    for (int withw = 0; withw < 2; withw++) {
        float *dx = dev(a, rows * m), *dw = dev(w, m), *dy = dev(NULL, rows * m);
        CHECK(cpu->ops->rmsnorm(cpu, c1, a, withw ? w : NULL, rows, m, 1e-5f) == 0);
        CHECK(gpu->ops->rmsnorm(gpu, dy, dx, withw ? dw : NULL, rows, m, 1e-5f) == 0);
        CHECK(back(c2, dy, rows * m) == 0);
        CHECK_MSG(max_rel(c2, c1, rows * m) < 1e-5, "rmsnorm: %g", max_rel(c2, c1, rows * m));
        gpu->ops->free(gpu, dx);
        gpu->ops->free(gpu, dw);
        gpu->ops->free(gpu, dy);
    }
}

static void test_rope(void)
{
    const int n_tok = 5, n_head = 3, stride = 72;
    const int32_t pos[5] = { 0, 1, 7, 300, 4095 };
    struct moe_rope_params cases[4] = {
        { MOE_ROPE_NORM, 64, 10000.0f, 1.0f, 0.0f, 1.0f, { 0, 0 } },
        { MOE_ROPE_NEOX, 64, 1000000.0f, 1.0f, 0.0f, 1.0f, { 0, 0 } },
        { MOE_ROPE_NEOX, 32, 10000.0f, 0.25f, 1.0f, 1.0f, { 3.5f, 20.2f } },   /* YaRN */
        { MOE_ROPE_NORM, 16, 10000.0f, 1.0f, 0.0f, 1.0f, { 0, 0 } },          /* partial */
    };
    float x[5 * 3 * 72], c1[5 * 3 * 72], c2[5 * 3 * 72];
    for (size_t i = 0; i < sizeof(x) / 4; i++)
        x[i] = frand();
    for (int k = 0; k < 4; k++) {
        const int off = k == 3 ? 8 : 0;
        memcpy(c1, x, sizeof(x));
        float *dx = dev(x, sizeof(x) / 4);
        CHECK(cpu->ops->rope(cpu, c1, n_tok, n_head, stride, off, pos, &cases[k]) == 0);
        CHECK(gpu->ops->rope(gpu, dx, n_tok, n_head, stride, off, pos, &cases[k]) == 0);
        CHECK(back(c2, dx, sizeof(x) / 4) == 0);
        CHECK_MSG(max_rel(c2, c1, sizeof(x) / 4) < 2e-5, "rope case %d: %g", k,
                  max_rel(c2, c1, sizeof(x) / 4));
        gpu->ops->free(gpu, dx);
    }
}

static void test_attention(void)
{
    const int n_ctx = 300;
    CHECK(cpu->ops->reserve(cpu, 1 << 20, (size_t)n_ctx * 4 + 1024) == 0);
    struct { int H, KV, hd, hdv, f16, window, sinks; } cases[] = {
        { 4, 2, 64, 64, 0, 0, 0 }, { 4, 2, 64, 64, 1, 0, 0 }, { 6, 1, 40, 24, 0, 0, 0 },
        { 4, 4, 32, 32, 0, 17, 1 }, { 8, 2, 48, 48, 1, 0, 1 },
    };
    for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++) {
        const int H = cases[ci].H, KV = cases[ci].KV, hd = cases[ci].hd, hdv = cases[ci].hdv;
        const int64_t krow = (int64_t)KV * hd, vrow = (int64_t)KV * hdv;
        const int es = cases[ci].f16 ? 2 : 4;
        /* fill the caches through kv_store on both backends */
        const int n_fill = 250;
        int32_t *fp = malloc(n_fill * sizeof(int32_t));
        for (int i = 0; i < n_fill; i++)
            fp[i] = i;
        float *kx = malloc((size_t)n_fill * krow * 4), *vx = malloc((size_t)n_fill * vrow * 4);
        for (int64_t i = 0; i < n_fill * krow; i++)
            kx[i] = frand();
        for (int64_t i = 0; i < n_fill * vrow; i++)
            vx[i] = frand();
        uint8_t *kc = calloc((size_t)n_ctx * krow, es), *vc = calloc((size_t)n_ctx * vrow, es);
        void *dkc = dev_bytes(kc, (size_t)n_ctx * krow * es), *dvc = dev_bytes(vc, (size_t)n_ctx * vrow * es);
        float *dkx = dev(kx, (size_t)(n_fill * krow)), *dvx = dev(vx, (size_t)(n_fill * vrow));
        CHECK(cpu->ops->kv_store(cpu, kc, kx, n_fill, fp, (int)krow, krow, 0, cases[ci].f16) == 0);
        CHECK(cpu->ops->kv_store(cpu, vc, vx, n_fill, fp, (int)vrow, vrow, 0, cases[ci].f16) == 0);
        CHECK(gpu->ops->kv_store(gpu, dkc, dkx, n_fill, fp, (int)krow, krow, 0, cases[ci].f16) == 0);
        CHECK(gpu->ops->kv_store(gpu, dvc, dvx, n_fill, fp, (int)vrow, vrow, 0, cases[ci].f16) == 0);
        uint8_t *kc2 = malloc((size_t)n_ctx * krow * es);
        CHECK(gpu->ops->download(gpu, kc2, dkc, (size_t)n_ctx * krow * es) == 0);
        CHECK_MSG(memcmp(kc, kc2, (size_t)n_ctx * krow * es) == 0, "kv_store case %zu", ci);
        float sinks[8];
        for (int h = 0; h < 8; h++)
            sinks[h] = frand() * 3;
        float *dsinks = dev(sinks, 8);
        const int n_tok = 4;
        const int32_t pos[4] = { 0, 1, 130, 249 };
        float *q = malloc((size_t)n_tok * H * hd * 4), *o1 = malloc((size_t)n_tok * H * hdv * 4);
        float *o2 = malloc((size_t)n_tok * H * hdv * 4);
        for (int64_t i = 0; i < (int64_t)n_tok * H * hd; i++)
            q[i] = frand();
        float *dq = dev(q, (size_t)n_tok * H * hd), *dout = dev(NULL, (size_t)n_tok * H * hdv);
        struct moe_attn_params ap = {
            .n_head = H, .n_head_kv = KV, .head_dim = hd, .head_dim_v = hdv, .k_row = krow,
            .v_row = vrow, .scale = 1.0f / sqrtf((float)hd), .kv_f16 = cases[ci].f16,
            .k_cache = kc, .v_cache = vc, .window = cases[ci].window,
            .sinks = cases[ci].sinks ? sinks : NULL,
        };
        CHECK(cpu->ops->attention(cpu, o1, q, n_tok, pos, &ap) == 0);
        ap.k_cache = dkc;
        ap.v_cache = dvc;
        ap.sinks = cases[ci].sinks ? dsinks : NULL;
        CHECK(gpu->ops->attention(gpu, dout, dq, n_tok, pos, &ap) == 0);
        CHECK(back(o2, dout, (size_t)n_tok * H * hdv) == 0);
        const double tol = cases[ci].f16 ? 2e-3 : 2e-5;
        CHECK_MSG(max_rel(o2, o1, (size_t)n_tok * H * hdv) < tol, "attention case %zu: %g", ci,
                  max_rel(o2, o1, (size_t)n_tok * H * hdv));
        gpu->ops->free(gpu, dkc);
        gpu->ops->free(gpu, dvc);
        gpu->ops->free(gpu, dkx);
        gpu->ops->free(gpu, dvx);
        gpu->ops->free(gpu, dq);
        gpu->ops->free(gpu, dout);
        gpu->ops->free(gpu, dsinks);
        free(fp); free(kx); free(vx); free(kc); free(vc); free(kc2); free(q); free(o1); free(o2);
    }
}

static void test_router(void)
{
    const int n_tok = 7, E = 64, K = 6;
    float l[7 * 64], bias[64];
    for (int i = 0; i < n_tok * E; i++)
        l[i] = frand() * 4;
    for (int i = 0; i < E; i++)
        bias[i] = frand() * 0.1f;
    float *dl = dev(l, n_tok * E);
    struct moe_gating_params g[4] = {
        { MOE_GATING_SOFTMAX, E, K, 0, 1.0f, NULL, 0, 0 },
        { MOE_GATING_SOFTMAX, E, K, 1, 1.0f, NULL, 0, 0 },
        { MOE_GATING_SIGMOID, E, K, 1, 2.5f, bias, 8, 3 },
        { MOE_GATING_SOFTMAX_TOPK, E, K, 0, 1.0f, NULL, 0, 0 },
    };
    for (int k = 0; k < 4; k++) {
        int32_t i1[7 * 6], i2[7 * 6];
        float w1[7 * 6], w2[7 * 6];
        CHECK(cpu->ops->router_topk(cpu, l, n_tok, &g[k], i1, w1) == 0);
        CHECK(gpu->ops->router_topk(gpu, dl, n_tok, &g[k], i2, w2) == 0);
        CHECK_MSG(memcmp(i1, i2, sizeof(i1)) == 0 && memcmp(w1, w2, sizeof(w1)) == 0,
                  "router rule %d", k);
    }
    gpu->ops->free(gpu, dl);
}

static void test_reported_errors(void)
{
    /* bad arguments are refused, not run */
    struct moe_weight w = { NULL, MOE_DTYPE_IQ2_XXS, 256, 1, 66 };
    CHECK(!gpu->ops->supports(gpu, MOE_DTYPE_IQ2_XXS));
    float *y = dev(NULL, 256);
    int32_t id = 0;
    CHECK(gpu->ops->get_rows(gpu, y, &w, &id, 1) == MOE_EUNSUPPORTED);
    w.dtype = MOE_DTYPE_F32;
    id = 5;
    CHECK(gpu->ops->get_rows(gpu, y, &w, &id, 1) == -EINVAL);
    gpu->ops->free(gpu, y);
}

int main(void)
{
    struct moe_cuda_device devs[8];
    struct moe_diag d = { 0 };
    int n = moe_cuda_probe(devs, 8, &d);
    if (n <= 0) {
        printf("no CUDA device%s%s: skipped\n", d.msg[0] ? ": " : "", d.msg);
        return 77;
    }
    if (moe_backend_cpu_create(&cpu, 2, &d) != 0 || moe_backend_cuda_create(&gpu, 0, &d) != 0) {
        fprintf(stderr, "%s\n", d.msg);
        return 1;
    }
    if (gpu->ops->reserve(gpu, 1 << 20, 0) != 0) {
        fprintf(stderr, "reserve failed\n");
        return 1;
    }
    printf("device: %s (sm_%d%d)\n", devs[0].name, devs[0].cc_major, devs[0].cc_minor);
    moe_test_run("weights: get_rows and matmul, every type", test_weights);
    moe_test_run("elementwise and rmsnorm", test_elementwise);
    moe_test_run("rope", test_rope);
    moe_test_run("kv_store and attention", test_attention);
    moe_test_run("router", test_router);
    moe_test_run("refusals", test_reported_errors);
    int rc = moe_test_exit_code();
    moe_backend_destroy(gpu);
    moe_backend_destroy(cpu);
    return rc;
}
