/* The CPU backend: the reference implementation of kernels/backend.h.
 *
 * Numerics follow ggml's CPU backend where it decides results: activations
 * are converted to the weight type's dot format (vecdot.h), norms and
 * softmax sums accumulate in double, RoPE angles are built by repeated
 * multiplication by base^(-2/n_rot) as ggml does. Data-parallel ops run on a
 * thread pool; none allocates. */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "common/alloc.h"
#include "common/error.h"
#include "kernels/backend.h"
#include "kernels/blocks.h"
#include "kernels/cpu/attn.h"
#include "kernels/cpu/dequant.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/ops_ssm.h"
#include "kernels/cpu/threadpool.h"
#include "kernels/cpu/vecdot.h"
#include "common/dtype.h"
#include "kernels/fp16.h"

struct cpu_copy_count {
    _Atomic uint64_t uploads, bytes;
};

struct cpu_ctx {
    struct moe_threadpool *pool;
    int n_threads;
    uint8_t *shared;          /* op temporaries */
    size_t shared_bytes;
    uint8_t *per_worker;      /* n_threads x per_worker_bytes */
    size_t per_worker_bytes;
    struct cpu_copy_count copies;   /* upload_async runs on the loaders' threads */
};

static struct cpu_ctx *ctx_of(struct moe_backend *be)
{
    return be->ctx;
}

/* ---- memory ---------------------------------------------------------- */

static void *cpu_alloc(struct moe_backend *be, size_t bytes)
{
    (void)be;
    void *p = NULL;
    /* 64-byte alignment: cache lines and AVX-512 loads. */
    if (posix_memalign(&p, 64, bytes ? bytes : 1) != 0)
        return NULL;
    return p;
}

static void cpu_free(struct moe_backend *be, void *p)
{
    (void)be;
    free(p);
}

static int cpu_copy(struct moe_backend *be, void *dst, const void *src, size_t n)
{
    (void)be;
    memcpy(dst, src, n);
    return 0;
}

/* ---- the overlapped upload: everything completes at once ------------- */

static void *cpu_host_alloc(struct moe_backend *be, size_t bytes)
{
    (void)be;
    return moe_malloc_aligned(4096, bytes ? bytes : 1);
}

static void cpu_host_free(struct moe_backend *be, void *p)
{
    (void)be;
    moe_free(p);
}

static int cpu_event_init(struct moe_backend *be, struct moe_event *ev)
{
    (void)be;
    ev->h = NULL;
    return 0;
}

static void cpu_event_fini(struct moe_backend *be, struct moe_event *ev)
{
    (void)be;
    ev->h = NULL;
}

static int cpu_upload_async(struct moe_backend *be, void *dst, const void *src, size_t n,
                            struct moe_event *after, struct moe_event *done)
{
    (void)after;
    (void)done;
    struct cpu_ctx *c = ctx_of(be);
    memcpy(dst, src, n);
    c->copies.uploads++;
    c->copies.bytes += n;
    return 0;
}

static int cpu_event_noop(struct moe_backend *be, struct moe_event *ev)
{
    (void)be;
    (void)ev;
    return 0;
}

static int cpu_event_query(struct moe_backend *be, struct moe_event *ev)
{
    (void)be;
    (void)ev;
    return 1;
}

static void cpu_copy_stats(struct moe_backend *be, struct moe_copy_stats *out)
{
    struct cpu_ctx *c = ctx_of(be);
    *out = (struct moe_copy_stats){ .uploads = c->copies.uploads, .bytes = c->copies.bytes };
}

static int cpu_reserve(struct moe_backend *be, size_t shared, size_t per_worker)
{
    struct cpu_ctx *c = ctx_of(be);
    per_worker = (per_worker + 63) & ~(size_t)63;
    if (shared > c->shared_bytes) {
        void *p = NULL;
        if (posix_memalign(&p, 64, shared) != 0)
            return -ENOMEM;
        free(c->shared);
        c->shared = p;
        c->shared_bytes = shared;
    }
    if (per_worker > c->per_worker_bytes) {
        void *p = NULL;
        if (posix_memalign(&p, 64, per_worker * (size_t)c->n_threads) != 0)
            return -ENOMEM;
        free(c->per_worker);
        c->per_worker = p;
        c->per_worker_bytes = per_worker;
    }
    return 0;
}

static int cpu_supports(const struct moe_backend *be, uint32_t wtype)
{
    (void)be;
    return moe_vecdot_supported(wtype) && moe_dequantize_supported(wtype);
}

/* ---- get_rows -------------------------------------------------------- */

static int cpu_get_rows(struct moe_backend *be, float *y, const struct moe_weight *w,
                        const int32_t *ids, int n)
{
    (void)be;
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= w->n_out)
            return -EINVAL;
        const uint8_t *row = (const uint8_t *)w->data + (size_t)ids[i] * w->row_bytes;
        int rc = moe_dequantize_row(w->dtype, row, y + (size_t)i * w->n_in, w->n_in);
        if (rc)
            return rc;
    }
    return 0;
}

/* ---- element-wise ops over the pool ------------------------------------ */

/* Element-wise and row-wise ops split [0, n) into chunks over the pool when
 * there is enough work (a prefill batch); a decode step's vectors stay on
 * the calling thread, where a hand-off would cost more than the op. Every
 * element is computed by the same expression either way. */
enum { PAR_MIN_ELEMS = 32768, PAR_CHUNK_ALIGN = 64 };

typedef void (*range_fn)(void *arg, int64_t begin, int64_t end);

struct range_job {
    range_fn fn;
    void *arg;
    int64_t n, chunk;
};

static void range_task(void *arg, int64_t task, int worker)
{
    (void)worker;
    const struct range_job *r = arg;
    const int64_t b = task * r->chunk;
    const int64_t e = b + r->chunk < r->n ? b + r->chunk : r->n;
    r->fn(r->arg, b, e);
}

/* fn over [0, n) units of `unit_elems` elements each. */
static void par_range(struct cpu_ctx *c, int64_t n, int64_t unit_elems, range_fn fn, void *arg)
{
    if (c->n_threads <= 1 || n * unit_elems < PAR_MIN_ELEMS || n < 2) {
        fn(arg, 0, n);
        return;
    }
    int64_t chunk = (n + (int64_t)c->n_threads * 4 - 1) / ((int64_t)c->n_threads * 4);
    if (unit_elems == 1)
        chunk = (chunk + PAR_CHUNK_ALIGN - 1) / PAR_CHUNK_ALIGN * PAR_CHUNK_ALIGN;
    if (chunk < 1)
        chunk = 1;
    struct range_job r = { .fn = fn, .arg = arg, .n = n, .chunk = chunk };
    moe_threadpool_run(c->pool, range_task, &r, (n + chunk - 1) / chunk);
}

/* Arguments of the element-wise ops. */
struct ew_args {
    float *y;
    const float *a, *b;
    float s, s2;
    int64_t n;
};

/* ---- rmsnorm --------------------------------------------------------- */

struct rmsnorm_args {
    float *y;
    const float *x, *w;
    int64_t n;
    float eps;
};

static void rmsnorm_rows(void *arg, int64_t r0, int64_t r1)
{
    const struct rmsnorm_args *a = arg;
    const int64_t n = a->n;
    for (int64_t r = r0; r < r1; r++) {
        const float *xr = a->x + r * n;
        float *yr = a->y + r * n;
        double sum = 0.0;
        for (int64_t i = 0; i < n; i++)
            sum += (double)(xr[i] * xr[i]);
        const float mean = (float)(sum / (double)n);
        const float scale = 1.0f / sqrtf(mean + a->eps);
        for (int64_t i = 0; i < n; i++)
            yr[i] = xr[i] * scale;
        if (a->w != NULL)
            for (int64_t i = 0; i < n; i++)
                yr[i] = yr[i] * a->w[i];
    }
}

static int cpu_rmsnorm(struct moe_backend *be, float *y, const float *x, const float *w,
                       int64_t n_rows, int64_t n, float eps)
{
    struct rmsnorm_args a = { .y = y, .x = x, .w = w, .n = n, .eps = eps };
    par_range(ctx_of(be), n_rows, n, rmsnorm_rows, &a);
    return 0;
}

/* ---- matmul ---------------------------------------------------------- */

/* All matmuls go through one scheme: every job's input rows are converted
 * to its weight type's activation format once (jobs that share x, n_in and
 * format share the conversion), then one thread-pool run computes every
 * job's rows in chunks of rows_per_task. A decode step thus hands work to
 * the pool once for Q/K/V together, once for all experts' gate and up, once
 * for all experts' down, instead of once per matrix. */
#define MULTI_MAX_JOBS 512
/* prefill tiles of multi_task: tokens (a multiple of MOE_VECDOT_MAX_ROWS)
 * and rows (gemm.c's GEMM_MR) */
#define MULTI_TOK_TILE 64
#define MULTI_ROW_BLOCK 16

struct multi_run {
    const struct moe_matmul_job *jobs;
    int n_jobs;
    int64_t rows_per_task;
    int64_t task0[MULTI_MAX_JOBS + 1];  /* first task of each job; [n_jobs] = total */
    uint8_t *act[MULTI_MAX_JOBS];       /* job's converted rows, act_bytes apart */
    size_t act_bytes[MULTI_MAX_JOBS];
    int owner[MULTI_MAX_JOBS];          /* the job whose conversion this one uses */
    int64_t quant0[MULTI_MAX_JOBS + 1]; /* conversion task index of each owner job's rows */
};

static int job_of(const int64_t *first, int n, int64_t task)
{
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (first[mid] <= task)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

static void multi_quant_task(void *arg, int64_t task, int worker)
{
    (void)worker;
    struct multi_run *r = arg;
    const int j = job_of(r->quant0, r->n_jobs, task);
    const struct moe_matmul_job *jb = &r->jobs[j];
    const int64_t t = task - r->quant0[j];
    moe_vecdot_quantize_act(jb->w.dtype, jb->x + t * jb->w.n_in, r->act[j] + (size_t)t * r->act_bytes[j],
                            jb->w.n_in);
}

static void multi_task(void *arg, int64_t task, int worker)
{
    (void)worker;
    struct multi_run *r = arg;
    const int j = job_of(r->task0, r->n_jobs, task);
    const struct moe_matmul_job *jb = &r->jobs[j];
    const struct moe_weight *w = &jb->w;
    const int64_t r0 = (task - r->task0[j]) * r->rows_per_task;
    const int64_t r1 = r0 + r->rows_per_task < w->n_out ? r0 + r->rows_per_task : w->n_out;
    const uint8_t *act = r->act[j];
    const size_t ab = r->act_bytes[j];
    /* Tiled: a block of MULTI_ROW_BLOCK weight rows (a few KiB to tens of
     * KiB) stays in L1/L2 while it meets every tile of MULTI_TOK_TILE
     * converted tokens, and a token tile (~64-140 KiB at n_in 2048) stays in
     * L2 while the block's rows pass over it; moe_gemm unpacks each weight
     * row once per tile (a tile kernel) or once per MOE_VECDOT_MAX_ROWS
     * tokens. Without the tiles every weight row re-read all n_tok
     * converted tokens from L3 or memory (1.1 MiB at 512 tokens of 2048
     * Q8_0 values). Every output is the float moe_vecdot gives for its
     * (row, token) whatever the tiles (gemm.h), so results do not depend
     * on them. */
    /* (a tile kernel that unpacks a row block once per call gets all the
     * tokens: gemm.h's moe_gemm_whole_tokens) */
    const int64_t tt = moe_gemm_whole_tokens(w->dtype) ? jb->n_tok : MULTI_TOK_TILE;
    for (int64_t rb = r0; rb < r1; rb += MULTI_ROW_BLOCK) {
        const int64_t re = rb + MULTI_ROW_BLOCK < r1 ? rb + MULTI_ROW_BLOCK : r1;
        for (int64_t t0 = 0; t0 < jb->n_tok; t0 += tt) {
            const int64_t te = t0 + tt < jb->n_tok ? t0 + tt : jb->n_tok;
            moe_gemm(w->dtype, (const uint8_t *)w->data + (size_t)rb * w->row_bytes, w->row_bytes, re - rb,
                     act + (size_t)t0 * ab, ab, te - t0, w->n_in, jb->y + t0 * w->n_out + rb, w->n_out,
                     jb->bias ? jb->bias + rb : NULL);
        }
    }
}

static int cpu_matmul_multi(struct moe_backend *be, const struct moe_matmul_job *jobs, int n_jobs)
{
    struct cpu_ctx *c = ctx_of(be);
    if (n_jobs <= 0)
        return 0;
    if (n_jobs > MULTI_MAX_JOBS) {
        /* more matrices than one run tracks: in runs of the maximum */
        for (int i = 0; i < n_jobs; i += MULTI_MAX_JOBS) {
            int rc = cpu_matmul_multi(be, jobs + i, n_jobs - i < MULTI_MAX_JOBS ? n_jobs - i : MULTI_MAX_JOBS);
            if (rc)
                return rc;
        }
        return 0;
    }
    struct multi_run r;
    r.jobs = jobs;
    r.n_jobs = n_jobs;
    size_t used = 0;
    int64_t rows = 0, nq = 0;
    for (int j = 0; j < n_jobs; j++) {
        const struct moe_weight *w = &jobs[j].w;
        const size_t ab = moe_vecdot_act_bytes(w->dtype, w->n_in);
        if (ab == 0)
            return MOE_EUNSUPPORTED;
        r.act_bytes[j] = ab;
        r.owner[j] = j;
        for (int k = 0; k < j; k++) {
            const struct moe_weight *wk = &jobs[k].w;
            if (r.owner[k] == k && jobs[k].x == jobs[j].x && jobs[k].n_tok == jobs[j].n_tok &&
                wk->n_in == w->n_in && moe_dtype_vec_dot_type(wk->dtype) == moe_dtype_vec_dot_type(w->dtype)) {
                r.owner[j] = k;
                break;
            }
        }
        r.quant0[j] = nq;
        if (r.owner[j] == j) {
            const size_t need = (ab * (size_t)jobs[j].n_tok + 63) & ~(size_t)63;
            if (used + need > c->shared_bytes) {
                if (n_jobs == 1)
                    return MOE_ELIMIT; /* the engine reserves enough for its largest batch */
                /* the jobs' inputs do not fit together: half at a time */
                const int h = n_jobs / 2;
                int rc = cpu_matmul_multi(be, jobs, h);
                return rc ? rc : cpu_matmul_multi(be, jobs + h, n_jobs - h);
            }
            r.act[j] = c->shared + used;
            used += need;
            nq += jobs[j].n_tok;
        } else {
            r.act[j] = r.act[r.owner[j]];
        }
        rows += w->n_out;
    }
    r.quant0[n_jobs] = nq;
    /* conversion: the owners' rows; a job that shares has no rows of its own */
    if (nq <= 4) {
        for (int j = 0; j < n_jobs; j++)
            if (r.owner[j] == j)
                for (int64_t t = 0; t < jobs[j].n_tok; t++)
                    multi_quant_task(&r, r.quant0[j] + t, 0);
    } else {
        moe_threadpool_run(c->pool, multi_quant_task, &r, nq);
    }
    /* Enough tasks to balance, few enough to keep scheduling cheap. A
     * decode step's products (a few tokens) are each a few hundred
     * microseconds of streaming weights, and the run waits for its last
     * task: four times finer tasks there (a few rows of 16 each) cut the
     * idle tail while the task counter stays cheap; a prefill's tasks keep
     * their size (each re-reads its tokens' tiles). */
    int64_t tok_max = 0;
    for (int j = 0; j < n_jobs; j++)
        tok_max = jobs[j].n_tok > tok_max ? jobs[j].n_tok : tok_max;
    const int64_t want = (int64_t)c->n_threads * (tok_max <= 4 ? 32 : 8);
    r.rows_per_task = (rows + want - 1) / want;
    if (r.rows_per_task < 4)
        r.rows_per_task = 4;
    /* whole row blocks per task: the tile kernels take MULTI_ROW_BLOCK rows */
    if (r.rows_per_task > MULTI_ROW_BLOCK)
        r.rows_per_task = (r.rows_per_task + MULTI_ROW_BLOCK - 1) / MULTI_ROW_BLOCK * MULTI_ROW_BLOCK;
    int64_t t = 0;
    for (int j = 0; j < n_jobs; j++) {
        r.task0[j] = t;
        t += (jobs[j].w.n_out + r.rows_per_task - 1) / r.rows_per_task;
    }
    r.task0[n_jobs] = t;
    moe_threadpool_run(c->pool, multi_task, &r, t);
    return 0;
}

static int cpu_matmul(struct moe_backend *be, float *y, const struct moe_weight *w,
                      const float *bias, const float *x, int64_t n_tok)
{
    const struct moe_matmul_job job = { .y = y, .w = *w, .bias = bias, .x = x, .n_tok = n_tok };
    return cpu_matmul_multi(be, &job, 1);
}

/* ---- rope ------------------------------------------------------------ */

struct rope_args {
    float *x;
    const int32_t *pos;
    const struct moe_rope_params *rp;
    float *tab;   /* n_rot floats: cos then sin, or NULL: the stack's */
    int n_head, head_stride, offset;
    float theta_scale, mscale;
};

/* Tokens [t0, t1). The angles depend on the position and the pair, not the
 * head: one cos/sin table per token, applied to every head (the same floats
 * as computing them per head). */
static void rope_tokens(void *arg, int64_t t0, int64_t t1)
{
    const struct rope_args *ra = arg;
    const struct moe_rope_params *rp = ra->rp;
    const int n_rot = rp->n_rot, n_head = ra->n_head;
    float stack_tab[1024];
    float *cs = ra->tab ? ra->tab : stack_tab;
    float *sn = cs + n_rot / 2;
    for (int64_t t = t0; t < t1; t++) {
        float theta = (float)ra->pos[t];
        for (int i0 = 0; i0 < n_rot; i0 += 2) {
            const float base = rp->freq_factors ? theta / rp->freq_factors[i0 / 2] : theta;
            float th = rp->freq_scale * base;
            if (rp->ext_factor != 0.0f) {
                /* ramp from extrapolation (low dims) to interpolation */
                const float y = (float)(i0 / 2 - rp->corr_dims[0]) /
                                fmaxf(0.001f, rp->corr_dims[1] - rp->corr_dims[0]);
                const float mix = (1.0f - fminf(1.0f, fmaxf(0.0f, y))) * rp->ext_factor;
                th = th * (1.0f - mix) + base * mix;
            }
            cs[i0 / 2] = cosf(th) * ra->mscale;
            sn[i0 / 2] = sinf(th) * ra->mscale;
            theta *= ra->theta_scale;
        }
        for (int h = 0; h < n_head; h++) {
            float *v = ra->x + (t * n_head + h) * ra->head_stride + ra->offset;
            for (int i0 = 0; i0 < n_rot; i0 += 2) {
                int a, b;
                if (rp->mode == MOE_ROPE_NEOX) {
                    a = i0 / 2;
                    b = i0 / 2 + n_rot / 2;
                } else {
                    a = i0;
                    b = i0 + 1;
                }
                const float x0 = v[a], x1 = v[b];
                v[a] = x0 * cs[i0 / 2] - x1 * sn[i0 / 2];
                v[b] = x0 * sn[i0 / 2] + x1 * cs[i0 / 2];
            }
        }
    }
}

static int cpu_rope(struct moe_backend *be, float *x, int64_t n_tok, int n_head, int head_stride,
                    int offset, const int32_t *pos, const struct moe_rope_params *rp)
{
    const int n_rot = rp->n_rot;
    if (n_rot <= 0 || offset < 0 || offset + n_rot > head_stride || n_rot % 2 != 0)
        return -EINVAL;
    struct rope_args ra = { .x = x, .pos = pos, .rp = rp, .n_head = n_head,
                            .head_stride = head_stride, .offset = offset };
    ra.theta_scale = powf(rp->freq_base, -2.0f / (float)n_rot);
    ra.mscale = rp->attn_factor != 0.0f ? rp->attn_factor : 1.0f;
    if (rp->ext_factor != 0.0f)
        ra.mscale *= 1.0f + 0.1f * logf(1.0f / rp->freq_scale);
    if (n_rot <= 1024) {
        /* each chunk of tokens has its table on its worker's stack */
        par_range(ctx_of(be), n_tok, (int64_t)n_head * n_rot, rope_tokens, &ra);
        return 0;
    }
    if ((ra.tab = moe_malloc((size_t)n_rot * sizeof(float))) == NULL)
        return -ENOMEM;
    rope_tokens(&ra, 0, n_tok);
    moe_free(ra.tab);
    return 0;
}

/* ---- attention ------------------------------------------------------- */

struct attn_job {
    struct cpu_ctx *c;
    float *out;
    const float *q;
    const int32_t *pos;
    const struct moe_attn_params *ap;
};

/* Bytes of n cache elements of type t (n a multiple of 32 for Q8_0). */
static inline size_t kv_bytes(uint32_t t, int64_t n)
{
    if (t == MOE_DTYPE_Q8_0)
        return (size_t)(n / 32) * sizeof(struct moe_block_q8_0);
    return (size_t)n * (t == MOE_DTYPE_F16 ? 2 : 4);
}

static void attn_task(void *arg, int64_t task, int worker)
{
    struct attn_job *j = arg;
    const struct moe_attn_params *ap = j->ap;
    const int64_t t = task / ap->n_head;
    const int h = (int)(task % ap->n_head);
    moe_cpu_attn_head(ap, j->out + (t * ap->n_head + h) * ap->head_dim_v, j->q + (t * ap->n_head + h) * ap->head_dim,
                      j->pos[t], h, j->c->per_worker + (size_t)worker * j->c->per_worker_bytes);
}

/* The query heads of one KV head of one token (moe_cpu_attn_group). */
static void attn_group_task(void *arg, int64_t task, int worker)
{
    struct attn_job *j = arg;
    const struct moe_attn_params *ap = j->ap;
    const int64_t t = task / ap->n_head_kv;
    const int kvh = (int)(task % ap->n_head_kv), h = kvh * (ap->n_head / ap->n_head_kv);
    moe_cpu_attn_group(ap, j->out + (t * ap->n_head + h) * ap->head_dim_v, j->q + (t * ap->n_head + h) * ap->head_dim,
                       j->pos[t], kvh, j->c->per_worker + (size_t)worker * j->c->per_worker_bytes);
}

static int cpu_kv_supports(const struct moe_backend *be, uint32_t t)
{
    (void)be;
    return t == MOE_DTYPE_F32 || t == MOE_DTYPE_F16 || t == MOE_DTYPE_Q8_0;
}

static int cpu_attention(struct moe_backend *be, float *out, const float *q, int64_t n_tok,
                         const int32_t *pos, const struct moe_attn_params *ap)
{
    struct cpu_ctx *c = ctx_of(be);
    if (ap->n_head_kv <= 0 || ap->n_head % ap->n_head_kv != 0 || !cpu_kv_supports(be, ap->kv_type) ||
        (ap->host_blocks && ap->block_rows <= 0))
        return -EINVAL;
    if (ap->kv_type == MOE_DTYPE_Q8_0 &&
        (ap->head_dim % 32 || ap->head_dim_v % 32 || ap->k_row % 32 || ap->v_row % 32))
        return -EINVAL;
    int32_t pmax = 0;
    for (int64_t t = 0; t < n_tok; t++) {
        if (pos[t] < 0 || moe_cpu_attn_scratch(ap, pos[t]) > c->per_worker_bytes)
            return MOE_ELIMIT;
        pmax = pos[t] > pmax ? pos[t] : pmax;
    }
    struct attn_job j = { .c = c, .out = out, .q = q, .pos = pos, .ap = ap };
    /* A KV head's query heads together where that leaves every worker
     * enough tasks (the floats are the same either way) and its scores fit
     * the scratch. */
    const size_t gs = n_tok * ap->n_head_kv >= 2 * (int64_t)c->n_threads ? moe_cpu_attn_group_scratch(ap, pmax) : 0;
    if (gs != 0 && gs <= c->per_worker_bytes)
        moe_threadpool_run(c->pool, attn_group_task, &j, n_tok * ap->n_head_kv);
    else
        moe_threadpool_run(c->pool, attn_task, &j, n_tok * ap->n_head);
    return 0;
}

static int cpu_kv_store(struct moe_backend *be, void *cache, const float *x, int64_t n_tok,
                        const int32_t *pos, int n, int64_t row, int offset, uint32_t kv_type)
{
    if (!cpu_kv_supports(be, kv_type))
        return -EINVAL;
    if (kv_type == MOE_DTYPE_Q8_0 && (n % 32 || row % 32 || offset % 32))
        return -EINVAL;
    for (int64_t t = 0; t < n_tok; t++) {
        const float *xr = x + t * n;
        uint8_t *d = (uint8_t *)cache + kv_bytes(kv_type, (int64_t)pos[t] * row + offset);
        if (kv_type == MOE_DTYPE_F16)
            for (int i = 0; i < n; i++)
                ((uint16_t *)d)[i] = moe_fp32_to_fp16(xr[i]);
        else if (kv_type == MOE_DTYPE_Q8_0)   /* ggml's CPU from_float, as for activations */
            moe_vecdot_quantize_act(MOE_DTYPE_Q8_0, xr, d, n);
        else
            memcpy(d, xr, (size_t)n * 4);
    }
    return 0;
}

/* ---- router ---------------------------------------------------------- */

static void softmax_row(const float *x, float *y, int n)
{
    float max = -INFINITY;
    for (int i = 0; i < n; i++)
        if (x[i] > max)
            max = x[i];
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        y[i] = expf(x[i] - max);
        sum += (double)y[i];
    }
    const float inv = (float)(1.0 / sum);
    for (int i = 0; i < n; i++)
        y[i] *= inv;
}

/* Indices of the k largest values, largest first; ties keep the lower index. */
static void topk(const float *v, int n, int k, int32_t *ids)
{
    for (int i = 0; i < k; i++) {
        int best = -1;
        for (int e = 0; e < n; e++) {
            int taken = 0;
            for (int m = 0; m < i; m++)
                taken |= ids[m] == e;
            if (!taken && (best < 0 || v[e] > v[best]))
                best = e;
        }
        ids[i] = best;
    }
}

#define MAX_EXPERTS 1024

/* Group-limited routing: score each group by the sum of its two best
 * selection values, keep the n_used best groups, exclude the others. */
static void mask_groups(float *sel, int n, int n_group, int n_used)
{
    const int per = n / n_group;
    float score[MAX_EXPERTS];
    int32_t keep[MAX_EXPERTS];
    for (int g = 0; g < n_group; g++) {
        float b1 = -INFINITY, b2 = -INFINITY;
        for (int e = g * per; e < (g + 1) * per; e++) {
            if (sel[e] > b1) {
                b2 = b1;
                b1 = sel[e];
            } else if (sel[e] > b2) {
                b2 = sel[e];
            }
        }
        score[g] = per > 1 ? b1 + b2 : b1;
    }
    topk(score, n_group, n_used, keep);
    for (int g = 0; g < n_group; g++) {
        int kept = 0;
        for (int i = 0; i < n_used; i++)
            kept |= keep[i] == g;
        if (!kept)
            for (int e = g * per; e < (g + 1) * per; e++)
                sel[e] = -INFINITY;
    }
}

static int cpu_router_topk(struct moe_backend *be, const float *logits, int64_t n_tok,
                           const struct moe_gating_params *gp, int32_t *ids, float *weights)
{
    (void)be;
    const int n = gp->n_expert, k = gp->k;
    if (n <= 0 || n > MAX_EXPERTS || k <= 0 || k > n)
        return -EINVAL;
    float probs[MAX_EXPERTS], sel[MAX_EXPERTS];
    for (int64_t t = 0; t < n_tok; t++) {
        const float *l = logits + t * n;
        int32_t *id = ids + t * k;
        float *w = weights + t * k;
        switch (gp->func) {
        case MOE_GATING_SOFTMAX:
            softmax_row(l, probs, n);
            break;
        case MOE_GATING_SIGMOID:
            for (int e = 0; e < n; e++)
                probs[e] = 1.0f / (1.0f + expf(-l[e]));
            break;
        case MOE_GATING_SOFTMAX_TOPK:
            memcpy(probs, l, (size_t)n * sizeof(float));
            break;
        default:
            return -EINVAL;
        }
        const float *selv = probs;
        if (gp->bias || gp->n_group > 1) {
            for (int e = 0; e < n; e++)
                sel[e] = gp->bias ? probs[e] + gp->bias[e] : probs[e];
            selv = sel;
        }
        if (gp->n_group > 1 && gp->n_group_used < gp->n_group)
            mask_groups(sel, n, gp->n_group, gp->n_group_used);
        topk(selv, n, k, id);
        for (int i = 0; i < k; i++)
            w[i] = probs[id[i]];
        if (gp->func == MOE_GATING_SOFTMAX_TOPK)
            softmax_row(w, w, k);
        if (gp->norm) {
            double sum = 0.0;
            for (int i = 0; i < k; i++)
                sum += (double)w[i];
            const float s = (float)sum;
            for (int i = 0; i < k; i++)
                w[i] = w[i] / s;
        }
        if (gp->scale != 1.0f && gp->scale != 0.0f)
            for (int i = 0; i < k; i++)
                w[i] *= gp->scale;
    }
    return 0;
}

/* ---- elementwise ----------------------------------------------------- */

static void swiglu_range(void *arg, int64_t b, int64_t e)
{
    const struct ew_args *a = arg;
    float *y = a->y;
    const float *xa = a->a;
    const float *xb = a->b;
    for (int64_t i = b; i < e; i++) {
        const float g = xa[i];
        y[i] = g / (1.0f + expf(-g)) * xb[i];
    }
}

static int cpu_swiglu(struct moe_backend *be, float *y, const float *gate, const float *up, int64_t n)
{
    struct ew_args a = { .y = y, .a = gate, .b = up };
    par_range(ctx_of(be), n, 1, swiglu_range, &a);
    return 0;
}

/* ggml's CPU GELU: the tanh form evaluated once per fp16 input and kept
 * as fp16, looked up at the input rounded to fp16. */
static uint16_t gelu_table[1 << 16];
static pthread_once_t gelu_once = PTHREAD_ONCE_INIT;

static void gelu_table_init(void)
{
    const float a = 0.044715f, k = 0.79788456080286535587989211986876f;
    for (uint32_t i = 0; i < (1u << 16); i++) {
        const float f = moe_fp16_to_fp32((uint16_t)i);
        gelu_table[i] = moe_fp32_to_fp16(0.5f * f * (1.0f + tanhf(k * f * (1.0f + a * f * f))));
    }
}

static void geglu_range(void *arg, int64_t b, int64_t e)
{
    const struct ew_args *a = arg;
    float *y = a->y;
    const float *xa = a->a;
    const float *xb = a->b;
    for (int64_t i = b; i < e; i++) {
        const float g = xa[i];
        if (g <= -10.0f)
            y[i] = 0.0f;
        else if (g >= 10.0f)
            y[i] = g * xb[i];
        else
            y[i] = moe_fp16_to_fp32(gelu_table[moe_fp32_to_fp16(g)]) * xb[i];
    }
}

static int cpu_geglu(struct moe_backend *be, float *y, const float *gate, const float *up, int64_t n)
{
    pthread_once(&gelu_once, gelu_table_init);
    struct ew_args a = { .y = y, .a = gate, .b = up };
    par_range(ctx_of(be), n, 1, geglu_range, &a);
    return 0;
}

static void scale_range(void *arg, int64_t b, int64_t e)
{
    const struct ew_args *a = arg;
    float *y = a->y;
    const float *xa = a->a;
    const float s = a->s;
    for (int64_t i = b; i < e; i++)
        y[i] = xa[i] * s;
}

static int cpu_scale(struct moe_backend *be, float *y, const float *x, float s, int64_t n)
{
    struct ew_args a = { .y = y, .a = x, .s = s };
    par_range(ctx_of(be), n, 1, scale_range, &a);
    return 0;
}

static void mul_rows_range(void *arg, int64_t r0, int64_t r1)
{
    const struct ew_args *a = arg;
    float *y = a->y;
    const float *xa = a->a;
    const float *xb = a->b;
    const int64_t n = a->n;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t i = 0; i < n; i++)
            y[r * n + i] = xa[r * n + i] * xb[i];
}

static int cpu_mul_rows(struct moe_backend *be, float *y, const float *x, const float *w,
                        int64_t n_rows, int64_t n)
{
    struct ew_args a = { .y = y, .a = x, .b = w, .n = n };
    par_range(ctx_of(be), n_rows, n, mul_rows_range, &a);
    return 0;
}

static void swiglu_oai_range(void *arg, int64_t b, int64_t e)
{
    const struct ew_args *a = arg;
    float *y = a->y;
    const float *xa = a->a;
    const float *xb = a->b;
    const float alpha = a->s, limit = a->s2;
    for (int64_t i = b; i < e; i++) {
        const float x = fminf(xa[i], limit);
        const float u = fminf(fmaxf(xb[i], -limit), limit);
        y[i] = x / (1.0f + expf(alpha * -x)) * (u + 1.0f);
    }
}

static int cpu_swiglu_oai(struct moe_backend *be, float *y, const float *gate, const float *up,
                          int64_t n, float alpha, float limit)
{
    struct ew_args a = { .y = y, .a = gate, .b = up, .s = alpha, .s2 = limit };
    par_range(ctx_of(be), n, 1, swiglu_oai_range, &a);
    return 0;
}

static void axpy_range(void *arg, int64_t b, int64_t e)
{
    const struct ew_args *a = arg;
    float *y = a->y;
    const float *xa = a->a;
    const float s = a->s;
    for (int64_t i = b; i < e; i++)
        y[i] += s * xa[i];
}

static int cpu_axpy(struct moe_backend *be, float *y, float a, const float *x, int64_t n)
{
    struct ew_args r = { .y = y, .a = x, .s = a };
    par_range(ctx_of(be), n, 1, axpy_range, &r);
    return 0;
}

static void add_range(void *arg, int64_t b, int64_t e)
{
    const struct ew_args *a = arg;
    float *y = a->y;
    const float *xa = a->a;
    const float *xb = a->b;
    for (int64_t i = b; i < e; i++)
        y[i] = xa[i] + xb[i];
}

static int cpu_add(struct moe_backend *be, float *y, const float *a, const float *b, int64_t n)
{
    struct ew_args r = { .y = y, .a = a, .b = b };
    par_range(ctx_of(be), n, 1, add_range, &r);
    return 0;
}

static int cpu_copy_rows(struct moe_backend *be, float *dst, int64_t dst_stride, const int32_t *di,
                         const float *src, int64_t src_stride, const int32_t *si, int64_t n,
                         int64_t len)
{
    (void)be;
    for (int64_t i = 0; i < n; i++)
        memcpy(dst + (di ? di[i] : i) * dst_stride, src + (si ? si[i] : i) * src_stride,
               (size_t)len * sizeof(float));
    return 0;
}

static int cpu_fill(struct moe_backend *be, float *y, float v, int64_t n)
{
    (void)be;
    for (int64_t i = 0; i < n; i++)
        y[i] = v;
    return 0;
}

static void gate_rows_range(void *arg, int64_t r0, int64_t r1)
{
    const struct ew_args *a = arg;
    float *y = a->y;
    const float *xa = a->a;
    const int64_t n = a->n;
    for (int64_t r = r0; r < r1; r++) {
        const float s = 1.0f / (1.0f + expf(-xa[r]));
        float *yr = y + r * n;
        for (int64_t i = 0; i < n; i++)
            yr[i] *= s;
    }
}

static int cpu_gate_rows(struct moe_backend *be, float *y, const float *g, int64_t n_rows, int64_t n)
{
    struct ew_args a = { .y = y, .a = g, .n = n };
    par_range(ctx_of(be), n_rows, n, gate_rows_range, &a);
    return 0;
}

static void cpu_destroy(struct moe_backend *be)
{
    struct cpu_ctx *c = ctx_of(be);
    moe_threadpool_destroy(c->pool);
    free(c->shared);
    free(c->per_worker);
    moe_free(c);
    moe_free(be);
}

static const struct moe_backend_ops cpu_ops = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_copy,
    .download = cpu_copy,
    .reserve = cpu_reserve,
    .supports = cpu_supports,
    .get_rows = cpu_get_rows,
    .rmsnorm = cpu_rmsnorm,
    .matmul = cpu_matmul,
    .rope = cpu_rope,
    .attention = cpu_attention,
    .kv_store = cpu_kv_store,
    .kv_supports = cpu_kv_supports,
    .router_topk = cpu_router_topk,
    .swiglu = cpu_swiglu,
    .swiglu_oai = cpu_swiglu_oai,
    .geglu = cpu_geglu,
    .scale = cpu_scale,
    .mul_rows = cpu_mul_rows,
    .axpy = cpu_axpy,
    .add = cpu_add,
    .copy_rows = cpu_copy_rows,
    .fill = cpu_fill,
    .gate_rows = cpu_gate_rows,
    .host_alloc = cpu_host_alloc,
    .host_free = cpu_host_free,
    .event_init = cpu_event_init,
    .event_fini = cpu_event_fini,
    .upload_async = cpu_upload_async,
    .event_record = cpu_event_noop,
    .event_query = cpu_event_query,
    .event_sync = cpu_event_noop,
    .stream_wait = cpu_event_noop,
    .copy_stats = cpu_copy_stats,
    .host_memory = 1,
    .matmul_multi = cpu_matmul_multi,
    .ssm_conv = moe_cpu_ssm_conv,               /* kernels/cpu/ops_ssm.c */
    .gated_delta_net = moe_cpu_gated_delta_net,
};

int moe_backend_cpu_create(struct moe_backend **out, int n_threads, struct moe_diag *diag)
{
    *out = NULL;
    if (n_threads < 1 || n_threads > 1024)
        return moe_diag_set(diag, -EINVAL, "cpu backend: threads %d, expected 1..1024", n_threads);
    struct moe_backend *be = moe_calloc(1, sizeof(*be));
    struct cpu_ctx *c = moe_calloc(1, sizeof(*c));
    if (be == NULL || c == NULL) {
        moe_free(be);
        moe_free(c);
        return moe_diag_set(diag, -ENOMEM, "cpu backend: out of memory");
    }
    int rc = moe_threadpool_create(&c->pool, n_threads);
    if (rc) {
        moe_free(be);
        moe_free(c);
        return moe_diag_set(diag, rc, "cpu backend: cannot start %d threads: %s", n_threads,
                            moe_strerror(rc));
    }
    c->n_threads = n_threads;
    be->ops = &cpu_ops;
    be->ctx = c;
    *out = be;
    return 0;
}

void moe_backend_destroy(struct moe_backend *be)
{
    if (be != NULL)
        be->ops->destroy(be);
}
