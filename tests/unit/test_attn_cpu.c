/* The CPU backend's attention gives, bit for bit, the per-row formula it had
 * before its blocked kernels (kernels/cpu/attn.c), which this file keeps as
 * the reference: one moe_vecdot per cached row, the scalar softmax, one
 * moe_vec_axpy per row. Checked on every path (AVX-512, AVX2, scalar: each
 * test forks, MOE_CPU_SIMD caps the path), for F32, F16 and Q8_0 caches,
 * head dims 16..256 (tails of the 32- and 16-element loops and of the
 * four-block Q8_0 loop included), V head dims unlike K's, positions 0..599
 * (rows not a multiple of 8 or 16), GQA ratios 1, 4 and 8, sliding windows,
 * sinks and block tables; each with the scratch model/plan.c reserves and
 * with room for a GQA group's scores (the query heads of a KV head computed
 * together, moe_cpu_attn_group), in batches and alone (decode). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/dtype.h"
#include "kernels/backend.h"
#include "kernels/blocks.h"
#include "kernels/cpu/dequant.h"
#include "kernels/cpu/vecdot.h"
#include "kernels/fp16.h"
#include "tests/harness.h"
#include "tests/simd_paths.h"

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static float frand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 11) & 0xffffff) / 16777216.0f - 0.5f;
}

static size_t kv_bytes(uint32_t t, int64_t n)
{
    if (t == MOE_DTYPE_Q8_0)
        return (size_t)(n / 32) * sizeof(struct moe_block_q8_0);
    return (size_t)n * (t == MOE_DTYPE_F16 ? 2 : 4);
}

static int64_t cache_row(const struct moe_attn_params *ap, int32_t r)
{
    if (ap->host_blocks == NULL)
        return r;
    return (int64_t)ap->host_blocks[r / ap->block_rows] * ap->block_rows + r % ap->block_rows;
}

/* The backend's attention of one (token, head) before attn.c, verbatim but
 * for the scratch (allocated here). */
static void ref_head(const struct moe_attn_params *ap, float *out, const float *q, int32_t p, int h)
{
    const int kvh = h / (ap->n_head / ap->n_head_kv);
    const int hd = ap->head_dim, hdv = ap->head_dim_v;
    const uint32_t kt = ap->kv_type;
    int32_t first = 0;
    if (ap->window > 0 && p - ap->window + 1 > 0)
        first = p - ap->window + 1;
    float *s = malloc((size_t)(p + 1) * sizeof(float));
    uint8_t *qx = malloc((size_t)hd * 2 + 64);
    float *vrow = malloc((size_t)hdv * sizeof(float));
    if (kt == MOE_DTYPE_F16)
        for (int d = 0; d < hd; d++)
            ((uint16_t *)qx)[d] = moe_fp32_to_fp16(q[d]);
    else if (kt == MOE_DTYPE_Q8_0)
        moe_vecdot_quantize_act(MOE_DTYPE_Q8_0, q, qx, hd);

    float max = -INFINITY;
    for (int32_t r = first; r <= p; r++) {
        const int64_t off = cache_row(ap, r) * ap->k_row + (int64_t)kvh * ap->head_dim;
        const uint8_t *k = (const uint8_t *)ap->k_cache + kv_bytes(kt, off);
        const float dot = kt == MOE_DTYPE_F32 ? moe_vecdot(MOE_DTYPE_F32, k, q, hd) : moe_vecdot(kt, k, qx, hd);
        s[r] = dot * ap->scale;
        if (s[r] > max)
            max = s[r];
    }
    const float sink = ap->sinks ? ap->sinks[h] : -INFINITY;
    if (sink > max)
        max = sink;
    double sum = 0.0;
    for (int32_t r = first; r <= p; r++) {
        s[r] = expf(s[r] - max);
        sum += (double)s[r];
    }
    if (ap->sinks)
        sum += (double)expf(sink - max);
    const float inv = (float)(1.0 / sum);
    for (int d = 0; d < hdv; d++)
        out[d] = 0.0f;
    for (int32_t r = first; r <= p; r++) {
        const float pr = s[r] * inv;
        const int64_t off = cache_row(ap, r) * ap->v_row + (int64_t)kvh * hdv;
        const uint8_t *vb = (const uint8_t *)ap->v_cache + kv_bytes(kt, off);
        if (kt == MOE_DTYPE_F16) {
            moe_vec_axpy(MOE_DTYPE_F16, out, moe_fp16_to_fp32(moe_fp32_to_fp16(pr)), vb, hdv);
        } else if (kt == MOE_DTYPE_Q8_0) {
            moe_dequantize_row(MOE_DTYPE_Q8_0, vb, vrow, hdv);
            moe_vec_axpy(MOE_DTYPE_F32, out, pr, vrow, hdv);
        } else {
            moe_vec_axpy(MOE_DTYPE_F32, out, pr, vb, hdv);
        }
    }
    free(s);
    free(qx);
    free(vrow);
}

/* A cache of n_rows rows of `row` elements of type t, random values of
 * magnitude about `amp`. */
static void *make_cache(uint32_t t, int64_t n_rows, int64_t row, float amp)
{
    const size_t bytes = kv_bytes(t, n_rows * row);
    uint8_t *c = aligned_alloc(64, (bytes + 63) / 64 * 64);
    float *x = malloc((size_t)row * sizeof(float));
    for (int64_t r = 0; r < n_rows; r++) {
        for (int64_t i = 0; i < row; i++)
            x[i] = frand() * amp;
        uint8_t *d = c + kv_bytes(t, r * row);
        if (t == MOE_DTYPE_F32)
            memcpy(d, x, (size_t)row * sizeof(float));
        else if (t == MOE_DTYPE_F16)
            for (int64_t i = 0; i < row; i++)
                ((uint16_t *)d)[i] = moe_fp32_to_fp16(x[i]);
        else
            moe_vecdot_quantize_act(MOE_DTYPE_Q8_0, x, d, row);
    }
    free(x);
    return c;
}

struct shape {
    uint32_t kv_type;
    int head_dim, head_dim_v, n_head, n_head_kv;
    int window;
    int sinks;
    int block_rows; /* 0: no block table */
};

static int n_checked;

/* Every position of pos[] as one batch (and the last alone, as decode)
 * against ref_head, bit for bit. */
static void check_shape(struct moe_backend *be, struct moe_backend *be_group, const struct shape *sh, const int32_t *pos, int n_pos)
{
    const int hd = sh->head_dim, hdv = sh->head_dim_v, nh = sh->n_head, nkv = sh->n_head_kv;
    int32_t max_pos = 0;
    for (int i = 0; i < n_pos; i++)
        max_pos = pos[i] > max_pos ? pos[i] : max_pos;
    /* rows longer than the heads (another layer's or padding), as the model's */
    const int64_t k_row = (int64_t)nkv * hd + 32, v_row = (int64_t)nkv * hdv + 64;
    int32_t *blocks = NULL;
    int64_t n_rows = max_pos + 1;
    if (sh->block_rows) {
        const int nb = max_pos / sh->block_rows + 1;
        blocks = malloc((size_t)nb * sizeof(int32_t));
        /* blocks in reverse order, spread over twice as many */
        for (int b = 0; b < nb; b++)
            blocks[b] = 2 * (nb - 1 - b) + 1;
        n_rows = (int64_t)2 * nb * sh->block_rows;
    }
    void *kc = make_cache(sh->kv_type, n_rows, k_row, 2.0f);
    void *vc = make_cache(sh->kv_type, n_rows, v_row, 1.0f);
    float *sinks = malloc((size_t)nh * sizeof(float));
    for (int h = 0; h < nh; h++)
        sinks[h] = frand() * 4.0f;
    const struct moe_attn_params ap = {
        .n_head = nh, .n_head_kv = nkv, .head_dim = hd, .head_dim_v = hdv, .k_row = k_row, .v_row = v_row,
        .scale = 1.0f / sqrtf((float)hd), .kv_type = sh->kv_type, .k_cache = kc, .v_cache = vc,
        .host_blocks = blocks, .block_rows = sh->block_rows, .window = sh->window,
        .sinks = sh->sinks ? sinks : NULL,
    };
    float *q = malloc((size_t)n_pos * nh * hd * sizeof(float));
    for (int64_t i = 0; i < (int64_t)n_pos * nh * hd; i++)
        q[i] = frand() * 3.0f;
    float *got = malloc((size_t)n_pos * nh * hdv * sizeof(float));
    float *want = malloc((size_t)nh * hdv * sizeof(float));
    /* be: the scratch model/plan.c reserves (a head at a time, or the
     * groups where their scores fit); be_group (one thread): room for a
     * whole GQA group's scores (the heads of a KV head together) */
    CHECK(be->ops->reserve(be, 0, (size_t)(max_pos + 1) * 4 + (size_t)hd * 2 + (size_t)(hd > hdv ? hd : hdv) * 4 +
                                      256) == 0);
    CHECK(be_group->ops->reserve(be_group, 0, (size_t)(max_pos + 16) * 4 * (size_t)(nh / nkv) + 4096) == 0);
    float *got2 = malloc((size_t)n_pos * nh * hdv * sizeof(float));
    CHECK_INT(be->ops->attention(be, got, q, n_pos, pos, &ap), ==, 0);
    CHECK_INT(be_group->ops->attention(be_group, got2, q, n_pos, pos, &ap), ==, 0);
    for (int t = 0; t < n_pos; t++) {
        for (int h = 0; h < nh; h++)
            ref_head(&ap, want + (size_t)h * hdv, q + ((size_t)t * nh + h) * hd, pos[t], h);
        for (int k = 0; k < 2; k++) {
            const float *g = (k ? got2 : got) + (size_t)t * nh * hdv;
            for (int i = 0; i < nh * hdv; i++) {
                CHECK_MSG(memcmp(&g[i], &want[i], sizeof(float)) == 0,
                          "%s kv %u hd %d hdv %d heads %d/%d window %d sinks %d blocks %d: pos %d head %d dim %d: "
                          "%.9g vs %.9g",
                          k ? "group scratch" : "plan scratch", sh->kv_type, hd, hdv, nh, nkv, sh->window, sh->sinks,
                          sh->block_rows, pos[t], i / hdv, i % hdv, g[i], want[i]);
            }
        }
    }
    /* decode: the last position alone */
    CHECK_INT(be->ops->attention(be, got, q + (size_t)(n_pos - 1) * nh * hd, 1, pos + n_pos - 1, &ap), ==, 0);
    CHECK(memcmp(got, want, (size_t)nh * hdv * sizeof(float)) == 0);
    CHECK_INT(be_group->ops->attention(be_group, got, q + (size_t)(n_pos - 1) * nh * hd, 1, pos + n_pos - 1, &ap), ==,
              0);
    CHECK(memcmp(got, want, (size_t)nh * hdv * sizeof(float)) == 0);
    free(got2);
    n_checked++;
    free(q);
    free(got);
    free(want);
    free(sinks);
    free(kc);
    free(vc);
    free(blocks);
}

static void check_all(void)
{
    struct moe_backend *be;
    struct moe_diag d = { 0 };
    struct moe_backend *be_group;
    CHECK(moe_backend_cpu_create(&be, 2, &d) == 0);
    CHECK(moe_backend_cpu_create(&be_group, 1, &d) == 0);
    printf("  implementation: %s\n", moe_vecdot_impl());
    static const int32_t pos_a[] = { 0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 100, 255, 256, 257, 599 };
    static const int32_t pos_b[] = { 3, 5, 63, 64, 65, 130, 301 };
    static const uint32_t types[] = { MOE_DTYPE_F16, MOE_DTYPE_F32, MOE_DTYPE_Q8_0 };
    /* head dims (K, V): the Q8_0 ones multiples of 32 */
    static const int dims[][2] = { { 128, 128 }, { 64, 64 }, { 256, 256 }, { 80, 80 }, { 48, 48 },
                                   { 96, 96 },   { 32, 32 }, { 16, 16 },   { 192, 128 }, { 128, 72 },
                                   { 40, 40 },   { 24, 24 }, { 160, 160 } };
    static const int gqa[][2] = { { 8, 1 }, { 4, 1 }, { 2, 2 }, { 16, 2 } };
    for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++)
        for (size_t di = 0; di < sizeof(dims) / sizeof(dims[0]); di++) {
            const uint32_t t = types[ti];
            if (t == MOE_DTYPE_Q8_0 && (dims[di][0] % 32 || dims[di][1] % 32))
                continue;
            for (size_t gi = 0; gi < sizeof(gqa) / sizeof(gqa[0]); gi++) {
                if (gi > 1 && di > 2) /* all GQA ratios on the common head dims */
                    continue;
                const struct shape sh = { t, dims[di][0], dims[di][1], gqa[gi][0], gqa[gi][1], 0, 0, 0 };
                check_shape(be, be_group, &sh, pos_a, (int)(sizeof(pos_a) / sizeof(pos_a[0])));
                if (moe_test_failed)
                    goto out;
            }
            /* windows, sinks, block tables */
            const struct shape w = { t, dims[di][0], dims[di][1], 4, 1, 37, 1, 0 };
            check_shape(be, be_group, &w, pos_b, (int)(sizeof(pos_b) / sizeof(pos_b[0])));
            if (moe_test_failed)
                goto out;
            const struct shape b = { t, dims[di][0], dims[di][1], 8, 1, 0, di % 2, 16 };
            check_shape(be, be_group, &b, pos_b, (int)(sizeof(pos_b) / sizeof(pos_b[0])));
            if (moe_test_failed)
                goto out;
            const struct shape bw = { t, dims[di][0], dims[di][1], 2, 2, 128, 1, 7 };
            check_shape(be, be_group, &bw, pos_a, (int)(sizeof(pos_a) / sizeof(pos_a[0])));
            if (moe_test_failed)
                goto out;
        }
    printf("  %d shapes\n", n_checked);
out:
    moe_backend_destroy(be);
    moe_backend_destroy(be_group);
}

/* Large scores (softmax picks one row), a sink far above them, and
 * -INFINITY sinks are covered by the shapes' random values only partly;
 * these pin the extremes. */
static void check_extremes(void)
{
    struct moe_backend *be;
    struct moe_diag d = { 0 };
    CHECK(moe_backend_cpu_create(&be, 1, &d) == 0);
    static const int32_t pos[] = { 0, 16, 33, 200 };
    for (int i = 0; i < 3; i++) {
        const uint32_t t = i == 0 ? MOE_DTYPE_F16 : i == 1 ? MOE_DTYPE_F32 : MOE_DTYPE_Q8_0;
        const int hd = 128, nh = 4;
        const int64_t row = hd + 32;
        void *kc = make_cache(t, 201, row, 40.0f);
        void *vc = make_cache(t, 201, row, 1000.0f);
        float sinks[4] = { 1e4f, -INFINITY, 0.0f, -1e4f };
        const struct moe_attn_params ap = {
            .n_head = nh, .n_head_kv = 1, .head_dim = hd, .head_dim_v = hd, .k_row = row, .v_row = row,
            .scale = 0.7f, .kv_type = t, .k_cache = kc, .v_cache = vc, .sinks = sinks,
        };
        float q[4 * 4 * 128], got[4 * 4 * 128], want[4 * 128];
        for (int k = 0; k < 4 * 4 * 128; k++)
            q[k] = frand() * 20.0f;
        CHECK(be->ops->reserve(be, 0, 4096 + 201 * 4) == 0);
        CHECK_INT(be->ops->attention(be, got, q, 4, pos, &ap), ==, 0);
        for (int k = 0; k < 4; k++) {
            for (int h = 0; h < nh; h++)
                ref_head(&ap, want + h * hd, q + (k * nh + h) * hd, pos[k], h);
            CHECK_MSG(memcmp(got + k * nh * hd, want, sizeof(want)) == 0, "kv %u pos %d", t, pos[k]);
        }
        free(kc);
        free(vc);
    }
    moe_backend_destroy(be);
}

static void test_default_path(void)
{
    check_all();
    if (!moe_test_failed)
        check_extremes();
}

MOE_TEST_SIMD_PATHS(test_default_path)

int main(void)
{
    MOE_TEST_RUN(test_avx512_path);
    MOE_TEST_RUN(test_avx2_path);
    MOE_TEST_RUN(test_scalar_path);
    return moe_test_exit_code();
}
