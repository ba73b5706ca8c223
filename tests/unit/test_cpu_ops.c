/* The CPU backend's matmul_multi: several matmuls in one op give exactly
 * what the matmul op gives for each (the same kernels on the same rows), with
 * inputs shared between jobs (converted once), with and without bias, for
 * 1 and several tokens, on 1 and 3 threads, and when the jobs' converted
 * inputs do not fit the scratch together (the op then splits the jobs).
 * The element-wise and row-wise ops, split over the pool for a batch, give
 * every element the plain expression's float on 1 and 3 threads, below and
 * above the size where they start to split, in place and not. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
#include "kernels/cpu/quant.h"
#include "common/dtype.h"
#include "tests/harness.h"

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static float frand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 11) & 0xffffff) / 16777216.0f - 0.5f;
}

struct mat {
    struct moe_weight w;
    uint8_t *data;
};

static void make_mat(struct mat *m, uint32_t t, int64_t n_in, int64_t n_out)
{
    const size_t rb = moe_dtype_row_bytes(t, (uint64_t)n_in, NULL);
    m->data = aligned_alloc(64, (rb * (size_t)n_out + 63) / 64 * 64);
    float *row = malloc((size_t)n_in * sizeof(float));
    for (int64_t r = 0; r < n_out; r++) {
        for (int64_t i = 0; i < n_in; i++)
            row[i] = frand();
        CHECK(moe_quantize_row(t, row, m->data + (size_t)r * rb, n_in) == 0);
    }
    free(row);
    m->w = (struct moe_weight){ .data = m->data, .dtype = t, .n_in = n_in, .n_out = n_out, .row_bytes = rb };
}

static void check_multi(int n_threads, size_t shared, int64_t n_tok)
{
    struct moe_backend *be;
    struct moe_diag d = { 0 };
    CHECK(moe_backend_cpu_create(&be, n_threads, &d) == 0);
    CHECK(be->ops->matmul_multi != NULL);
    CHECK(be->ops->reserve(be, shared, 4096) == 0);
    enum { NJ = 7 };
    static const uint32_t types[NJ] = { MOE_DTYPE_Q4_0, MOE_DTYPE_Q8_0, MOE_DTYPE_Q4_K, MOE_DTYPE_Q6_K,
                                        MOE_DTYPE_F16, MOE_DTYPE_Q4_K, MOE_DTYPE_MXFP4 };
    static const int64_t n_out[NJ] = { 37, 64, 100, 3, 129, 256, 70 };
    const int64_t n_in = 512;
    struct mat m[NJ];
    float *x[3], *y[NJ], *want[NJ], bias[256];
    for (int i = 0; i < 256; i++)
        bias[i] = frand();
    for (int k = 0; k < 3; k++) {
        x[k] = malloc((size_t)(n_tok * n_in) * sizeof(float));
        for (int64_t i = 0; i < n_tok * n_in; i++)
            x[k][i] = frand() * 4.0f;
    }
    struct moe_matmul_job jobs[NJ];
    for (int j = 0; j < NJ; j++) {
        make_mat(&m[j], types[j], n_in, n_out[j]);
        y[j] = calloc((size_t)(n_tok * n_out[j]), sizeof(float));
        want[j] = calloc((size_t)(n_tok * n_out[j]), sizeof(float));
        /* jobs 0, 1 and 2 share x[0] (Q4_0 and Q8_0 share a conversion,
         * Q4_K needs its own); 3 and 5 share x[1]; the rest use x[2] */
        const float *xj = j <= 2 ? x[0] : j == 3 || j == 5 ? x[1] : x[2];
        const float *bj = j % 2 ? bias : NULL;
        jobs[j] = (struct moe_matmul_job){ .y = y[j], .w = m[j].w, .bias = bj, .x = xj, .n_tok = n_tok };
        CHECK(be->ops->matmul(be, want[j], &m[j].w, bj, xj, n_tok) == 0);
    }
    CHECK(be->ops->matmul_multi(be, jobs, NJ) == 0);
    for (int j = 0; j < NJ; j++)
        CHECK_MSG(memcmp(y[j], want[j], (size_t)(n_tok * n_out[j]) * sizeof(float)) == 0,
                  "job %d (%s, %lld tokens, %d threads, %zu bytes scratch) differs from matmul", j,
                  moe_dtype_name(types[j]), (long long)n_tok, n_threads, shared);
    for (int j = 0; j < NJ; j++) {
        free(m[j].data);
        free(y[j]);
        free(want[j]);
    }
    for (int k = 0; k < 3; k++)
        free(x[k]);
    moe_backend_destroy(be);
}

static void test_multi_decode(void) { check_multi(3, 1 << 20, 1); }
static void test_multi_batch(void) { check_multi(3, 1 << 20, 7); }
static void test_multi_one_thread(void) { check_multi(1, 1 << 20, 5); }
/* room for one job's converted input at a time (512 floats x 7 tokens) */
static void test_multi_split(void) { check_multi(2, 512 * 4 * 7 + 64, 7); }

static void test_multi_refuses(void)
{
    struct moe_backend *be;
    struct moe_diag d = { 0 };
    CHECK(moe_backend_cpu_create(&be, 2, &d) == 0);
    CHECK(be->ops->reserve(be, 256, 64) == 0);
    struct mat a;
    make_mat(&a, MOE_DTYPE_Q8_0, 512, 4);
    float x[512] = { 0 }, y[4];
    const struct moe_matmul_job j = { .y = y, .w = a.w, .x = x, .n_tok = 1 };
    CHECK_INT(be->ops->matmul_multi(be, &j, 1), ==, MOE_ELIMIT);
    CHECK_INT(be->ops->matmul_multi(be, &j, 0), ==, 0);
    free(a.data);
    moe_backend_destroy(be);
}

/* ---- element-wise ops ---------------------------------------------------- */

static float silu_ref(float g) { return g / (1.0f + expf(-g)); }

static void check_elementwise(int n_threads, int64_t n_rows, int64_t n)
{
    struct moe_backend *be;
    struct moe_diag d = { 0 };
    CHECK(moe_backend_cpu_create(&be, n_threads, &d) == 0);
    const int64_t tot = n_rows * n;
    float *a = malloc((size_t)tot * sizeof(float)), *b = malloc((size_t)tot * sizeof(float));
    float *y = malloc((size_t)tot * sizeof(float)), *r = malloc((size_t)tot * sizeof(float));
    float *w = malloc((size_t)n * sizeof(float)), *g = malloc((size_t)n_rows * sizeof(float));
    for (int64_t i = 0; i < tot; i++) {
        a[i] = frand() * 24.0f;
        b[i] = frand() * 8.0f;
    }
    for (int64_t i = 0; i < n; i++)
        w[i] = frand() + 1.0f;
    for (int64_t i = 0; i < n_rows; i++)
        g[i] = frand() * 6.0f;
    const size_t bytes = (size_t)tot * sizeof(float);
#define SAME(what) CHECK_MSG(memcmp(y, r, bytes) == 0, "%s: %d threads, %lld x %lld", what, n_threads, \
                             (long long)n_rows, (long long)n)
    CHECK(be->ops->swiglu(be, y, a, b, tot) == 0);
    for (int64_t i = 0; i < tot; i++)
        r[i] = silu_ref(a[i]) * b[i];
    SAME("swiglu");
    CHECK(be->ops->swiglu_oai(be, y, a, b, tot, 1.702f, 7.0f) == 0);
    for (int64_t i = 0; i < tot; i++) {
        const float x = fminf(a[i], 7.0f), u = fminf(fmaxf(b[i], -7.0f), 7.0f);
        r[i] = x / (1.0f + expf(1.702f * -x)) * (u + 1.0f);
    }
    SAME("swiglu_oai");
    CHECK(be->ops->scale(be, y, a, 0.37f, tot) == 0);
    for (int64_t i = 0; i < tot; i++)
        r[i] = a[i] * 0.37f;
    SAME("scale");
    CHECK(be->ops->add(be, y, a, b, tot) == 0);
    for (int64_t i = 0; i < tot; i++)
        r[i] = a[i] + b[i];
    SAME("add");
    memcpy(y, b, bytes);
    memcpy(r, b, bytes);
    CHECK(be->ops->add(be, y, y, a, tot) == 0);   /* in place */
    for (int64_t i = 0; i < tot; i++)
        r[i] = r[i] + a[i];
    SAME("add in place");
    CHECK(be->ops->axpy(be, y, -0.61f, a, tot) == 0);
    for (int64_t i = 0; i < tot; i++)
        r[i] += -0.61f * a[i];
    SAME("axpy");
    CHECK(be->ops->mul_rows(be, y, a, w, n_rows, n) == 0);
    for (int64_t i = 0; i < tot; i++)
        r[i] = a[i] * w[i % n];
    SAME("mul_rows");
    memcpy(y, b, bytes);
    memcpy(r, b, bytes);
    CHECK(be->ops->gate_rows(be, y, g, n_rows, n) == 0);
    for (int64_t row = 0; row < n_rows; row++) {
        const float s = 1.0f / (1.0f + expf(-g[row]));
        for (int64_t i = 0; i < n; i++)
            r[row * n + i] *= s;
    }
    SAME("gate_rows");
    for (int with_w = 0; with_w < 2; with_w++) {
        CHECK(be->ops->rmsnorm(be, y, a, with_w ? w : NULL, n_rows, n, 1e-6f) == 0);
        for (int64_t row = 0; row < n_rows; row++) {
            const float *xr = a + row * n;
            double sum = 0.0;
            for (int64_t i = 0; i < n; i++)
                sum += (double)(xr[i] * xr[i]);
            const float scale = 1.0f / sqrtf((float)(sum / (double)n) + 1e-6f);
            for (int64_t i = 0; i < n; i++) {
                r[row * n + i] = xr[i] * scale;
                if (with_w)
                    r[row * n + i] = r[row * n + i] * w[i];
            }
        }
        SAME(with_w ? "rmsnorm" : "rmsnorm without weight");
    }
#undef SAME
    free(a);
    free(b);
    free(y);
    free(r);
    free(w);
    free(g);
    moe_backend_destroy(be);
}

static void test_elementwise(void)
{
    const int64_t shapes[][2] = { { 1, 7 }, { 3, 2048 }, { 16, 2048 }, { 17, 2047 }, { 5, 100003 }, { 512, 130 } };
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
        for (int t = 1; t <= 3; t += 2)
            check_elementwise(t, shapes[s][0], shapes[s][1]);
}

/* rope split over tokens gives the one-thread op's floats (that one is the
 * reference the parity suite checks), NEOX and normal, with YaRN and with
 * per-pair frequency factors. */
static void test_rope_threads(void)
{
    struct moe_backend *b1, *b3;
    struct moe_diag d = { 0 };
    CHECK(moe_backend_cpu_create(&b1, 1, &d) == 0);
    CHECK(moe_backend_cpu_create(&b3, 3, &d) == 0);
    const int n_head = 8, hs = 136, n_tok = 301;
    const size_t n = (size_t)n_tok * n_head * hs;
    float *x = malloc(n * sizeof(float)), *y1 = malloc(n * sizeof(float)), *y3 = malloc(n * sizeof(float));
    int32_t *pos = malloc((size_t)n_tok * sizeof(int32_t));
    float ff[64];
    for (size_t i = 0; i < n; i++)
        x[i] = frand();
    for (int t = 0; t < n_tok; t++)
        pos[t] = 3 * t + 1;
    for (int i = 0; i < 64; i++)
        ff[i] = 1.0f + (float)i * 0.25f;
    for (int v = 0; v < 4; v++) {
        struct moe_rope_params rp = { .mode = (v & 1) ? MOE_ROPE_NEOX : MOE_ROPE_NORM, .n_rot = 128,
                                      .freq_base = 10000.0f, .freq_scale = 1.0f };
        if (v & 2) {
            rp.freq_scale = 0.25f;
            rp.ext_factor = 1.0f;
            rp.attn_factor = 1.0f;
            rp.corr_dims[0] = 8.0f;
            rp.corr_dims[1] = 40.0f;
            rp.freq_factors = ff;
        }
        memcpy(y1, x, n * sizeof(float));
        memcpy(y3, x, n * sizeof(float));
        CHECK(b1->ops->rope(b1, y1, n_tok, n_head, hs, 4, pos, &rp) == 0);
        CHECK(b3->ops->rope(b3, y3, n_tok, n_head, hs, 4, pos, &rp) == 0);
        CHECK_MSG(memcmp(y1, y3, n * sizeof(float)) == 0, "rope variant %d: 3 threads differ", v);
        CHECK_MSG(memcmp(y1, x, n * sizeof(float)) != 0, "rope variant %d: nothing rotated", v);
    }
    free(x);
    free(y1);
    free(y3);
    /* more rotary dims than the stack table holds: the heap table, the same
     * floats on 1 and 3 threads, every pair rotated */
    const int big = 1040, nt = 5;
    const size_t nb = (size_t)nt * 2 * big;
    float *bx = malloc(nb * sizeof(float)), *by1 = malloc(nb * sizeof(float)), *by3 = malloc(nb * sizeof(float));
    for (size_t i = 0; i < nb; i++)
        bx[i] = frand();
    const struct moe_rope_params bp = { .mode = MOE_ROPE_NEOX, .n_rot = big, .freq_base = 10000.0f, .freq_scale = 1.0f };
    memcpy(by1, bx, nb * sizeof(float));
    memcpy(by3, bx, nb * sizeof(float));
    CHECK(b1->ops->rope(b1, by1, nt, 2, big, 0, pos, &bp) == 0);
    CHECK(b3->ops->rope(b3, by3, nt, 2, big, 0, pos, &bp) == 0);
    CHECK(memcmp(by1, by3, nb * sizeof(float)) == 0);
    CHECK(by1[2 * big + big / 2 - 1] != bx[2 * big + big / 2 - 1]);   /* token 1, head 0, last pair */
    free(bx);
    free(by1);
    free(by3);
    free(pos);
    moe_backend_destroy(b1);
    moe_backend_destroy(b3);
}

int main(void)
{
    MOE_TEST_RUN(test_multi_decode);
    MOE_TEST_RUN(test_multi_batch);
    MOE_TEST_RUN(test_multi_one_thread);
    MOE_TEST_RUN(test_multi_split);
    MOE_TEST_RUN(test_multi_refuses);
    MOE_TEST_RUN(test_elementwise);
    MOE_TEST_RUN(test_rope_threads);
    return moe_test_exit_code();
}
