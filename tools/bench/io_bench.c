/* Expert-store I/O benchmark (tools/bench/io.sh builds and runs it).
 *
 *   io_bench load FILE QD CHUNK THREADS MAX_BYTES SEED   expert loads in random order
 *   io_bench mmap FILE MAX_BYTES SEED                    mmap + memcpy, page cache dropped
 *   io_bench codec GGUF LEVEL                            ratio + 1-core zstd decode GB/s
 *
 * Prints one line of key=value pairs per run. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/alloc.h"
#include "io/expert_src.h"
#include "common/dtype.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

struct key {
    uint32_t layer, expert;
};

struct expert_view {
    uint32_t nl, ne;
    const struct moe_expert_layout *(*layout)(const void *, uint32_t);
    const void *ctx;
};

/* All (layer, expert) pairs in a random order. */
static struct key *shuffled(const struct expert_view *v, unsigned *n_out, uint64_t seed)
{
    struct key *k = malloc((size_t)v->nl * v->ne * sizeof(*k));
    unsigned n = 0;
    for (uint32_t l = 0; l < v->nl; l++)
        if (v->layout(v->ctx, l))
            for (uint32_t e = 0; e < v->ne; e++)
                k[n++] = (struct key){ l, e };
    for (unsigned i = n; i > 1; i--) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        unsigned j = (unsigned)((seed >> 33) % i);
        struct key t = k[i - 1];
        k[i - 1] = k[j];
        k[j] = t;
    }
    *n_out = n;
    return k;
}

static const struct moe_expert_layout *src_layout(const void *ctx, uint32_t l)
{
    return moe_expert_src_layout(ctx, l);
}

static const struct moe_expert_layout *pack_layout(const void *ctx, uint32_t l)
{
    return moe_pack_layout(ctx, l);
}

/* ---- load ------------------------------------------------------------- */

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static unsigned n_free;
static void **free_bufs;
static int errors;

static void done(void *arg, uint32_t layer, uint32_t expert, int status,
                 const struct moe_diag *diag)
{
    (void)layer;
    (void)expert;
    if (status < 0)
        fprintf(stderr, "load: %s\n", diag->msg);
    pthread_mutex_lock(&mu);
    errors += status < 0;
    free_bufs[n_free++] = arg;
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
}

static int cmd_load(int argc, char **argv)
{
    if (argc < 8)
        return 2;
    struct moe_io_config c = { .uring = { .queue_depth = (unsigned)atoi(argv[3]),
                                          .chunk_bytes = (size_t)atol(argv[4]) },
                               .n_threads = (unsigned)atoi(argv[5]) };
    uint64_t max_bytes = (uint64_t)atoll(argv[6]);
    struct moe_diag d = {0};
    struct moe_expert_src *s = NULL;
    if (moe_expert_src_open(&s, argv[2], &c, &d) < 0) {
        fprintf(stderr, "%s\n", d.msg);
        return 1;
    }
    struct expert_view v = { moe_expert_src_n_layer(s), moe_expert_src_n_expert(s), src_layout, s };
    unsigned n;
    struct key *k = shuffled(&v, &n, (uint64_t)atoll(argv[7]));
    size_t max_raw = 0;
    for (uint32_t l = 0; l < v.nl; l++)
        if (moe_expert_src_layout(s, l) && moe_expert_src_layout(s, l)->raw_size > max_raw)
            max_raw = (size_t)moe_expert_src_layout(s, l)->raw_size;
    /* destinations: enough for every staging buffer plus the decoders */
    unsigned n_dst = 16;
    free_bufs = calloc(n_dst, sizeof(void *));
    for (unsigned i = 0; i < n_dst; i++) {
        void *p = NULL;
        if (posix_memalign(&p, 4096, max_raw) != 0)
            return 1;
        memset(p, 0, max_raw);
        free_bufs[n_free++] = p;
    }
    double t0 = now();
    uint64_t raw = 0;
    unsigned i;
    for (i = 0; i < n && raw < max_bytes; i++) {
        size_t sz = (size_t)moe_expert_src_layout(s, k[i].layer)->raw_size;
        pthread_mutex_lock(&mu);
        while (n_free == 0)
            pthread_cond_wait(&cv, &mu);
        void *dst = free_bufs[--n_free];
        pthread_mutex_unlock(&mu);
        if (moe_expert_src_load(s, k[i].layer, k[i].expert, dst, sz, 0, done, dst, &d) < 0) {
            fprintf(stderr, "%s\n", d.msg);
            return 1;
        }
        raw += sz;
    }
    pthread_mutex_lock(&mu);
    while (n_free < n_dst)
        pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    double dt = now() - t0;
    struct moe_io_stats st;
    moe_expert_src_stats(s, &st);
    printf("mode=load uring=%d direct=%d qd=%s chunk=%s threads=%s experts=%u stored_GBps=%.3f "
           "raw_GBps=%.3f seconds=%.2f errors=%d\n", moe_expert_src_uses_uring(s),
           moe_expert_src_uses_direct(s), argv[3], argv[4], argv[5], i,
           (double)st.stored_bytes / dt / 1e9, (double)st.raw_bytes / dt / 1e9, dt, errors);
    moe_expert_src_close(s);
    return errors ? 1 : 0;
}

/* ---- mmap baseline -------------------------------------------------------- */

static int cmd_mmap(int argc, char **argv)
{
    if (argc < 5)
        return 2;
    struct moe_diag d = {0};
    struct moe_pack *p = NULL;
    if (moe_pack_open(&p, argv[2], 0, &d) < 0) {
        fprintf(stderr, "%s\n", d.msg);
        return 1;
    }
    uint64_t max_bytes = (uint64_t)atoll(argv[3]);
    int fd = open(argv[2], O_RDONLY);
    struct stat sb;
    fstat(fd, &sb);
    fdatasync(fd);
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);  /* cold page cache */
    uint8_t *m = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED)
        return 1;
    struct expert_view v = { moe_pack_n_layer(p), moe_pack_n_expert(p), pack_layout, p };
    unsigned n;
    struct key *k = shuffled(&v, &n, (uint64_t)atoll(argv[4]));
    uint8_t *dst = malloc((size_t)moe_pack_max_stored(p));
    double t0 = now();
    uint64_t bytes = 0;
    unsigned i;
    for (i = 0; i < n && bytes < max_bytes; i++) {
        struct moe_pack_blob b;
        moe_pack_blob(p, k[i].layer, k[i].expert, &b, &d);
        memcpy(dst, m + b.offset, (size_t)b.stored_size);
        bytes += b.stored_size;
    }
    double dt = now() - t0;
    printf("mode=mmap experts=%u stored_GBps=%.3f seconds=%.2f\n", i, (double)bytes / dt / 1e9, dt);
    munmap(m, (size_t)sb.st_size);
    close(fd);
    moe_pack_close(p);
    return 0;
}

/* ---- codec ------------------------------------------------------------- */

static int cmd_codec(int argc, char **argv)
{
    if (argc < 4)
        return 2;
    struct moe_diag d = {0};
    struct moe_expert_src *s = NULL;
    struct moe_io_config c = { .uring = { .force_pread = true } };
    if (moe_expert_src_open(&s, argv[2], &c, &d) < 0) {
        fprintf(stderr, "%s\n", d.msg);
        return 1;
    }
    int level = atoi(argv[3]);
    struct moe_codec_cctx *cc;
    struct moe_codec_dctx *dc;
    moe_codec_cctx_create(&cc, level);
    moe_codec_dctx_create(&dc);
    /* per dtype: sum over the first layer's experts of every slice */
    for (uint32_t l = 0; l < moe_expert_src_n_layer(s); l++) {
        const struct moe_expert_layout *L = moe_expert_src_layout(s, l);
        if (L == NULL)
            continue;
        uint32_t ne = moe_expert_src_n_expert(s);
        for (uint32_t k = 0; k < L->n_slices; k++) {
            const struct moe_expert_slice *sl = &L->s[k];
            size_t n = (size_t)sl->size;
            uint8_t *raw = malloc((size_t)L->raw_size), *in = malloc(n), *cb = malloc(moe_codec_bound(n)),
                    *out = malloc(n);
            uint64_t rawb = 0, stored = 0;
            double tdec = 0;
            struct moe_codec_group g = { 0, n };
            bool bg = sl->dtype == MOE_DTYPE_F16 || sl->dtype == MOE_DTYPE_BF16;
            uint32_t ecount = ne < 8 ? ne : 8;
            for (uint32_t e = 0; e < ecount; e++) {
                if (moe_expert_src_load_sync(s, l, e, raw, (size_t)L->raw_size, &d) < 0)
                    return 1;
                if (bg)
                    moe_codec_bg16_encode(in, raw + sl->offset, n, &g, 1);
                else
                    memcpy(in, raw + sl->offset, n);
                size_t cn;
                moe_codec_compress(cc, cb, moe_codec_bound(n), &cn, in, n);
                rawb += n;
                stored += cn;
                int reps = 0;
                double t0 = now();
                do {
                    moe_codec_decode(dc, bg ? MOE_CODEC_ZSTD_BG16 : MOE_CODEC_ZSTD, out, n, cb, cn,
                                     &g, 1, &d);
                    reps++;
                } while (now() - t0 < 0.05);
                tdec += (now() - t0) / reps;
            }
            printf("mode=codec file=%s type=%s tensor=%s level=%d ratio=%.3f decode_GBps_per_core=%.3f\n",
                   argv[2], moe_dtype_name(sl->dtype), sl->name, level, (double)rawb / (double)stored,
                   (double)rawb / tdec / 1e9);
            free(raw);
            free(in);
            free(cb);
            free(out);
        }
        break;  /* one layer is enough */
    }
    moe_codec_cctx_destroy(cc);
    moe_codec_dctx_destroy(dc);
    moe_expert_src_close(s);
    return 0;
}

static void progress(void *arg, uint64_t done_b, uint64_t total)
{
    (void)arg;
    (void)done_b;
    (void)total;
}

static int cmd_pack(int argc, char **argv)
{
    if (argc < 5)
        return 2;
    struct moe_pack_write_opts o = { .threads = (unsigned)atoi(argv[4]), .progress = progress };
    struct moe_pack_stats st;
    struct moe_diag d = {0};
    double t0 = now();
    if (moe_pack_write(argv[2], argv[3], &o, &st, &d) < 0) {
        fprintf(stderr, "%s\n", d.msg);
        return 1;
    }
    printf("mode=pack seconds=%.1f raw_MB=%.0f stored_MB=%.0f compressed=%llu/%llu\n", now() - t0,
           (double)st.raw_bytes / 1e6, (double)st.stored_bytes / 1e6,
           (unsigned long long)st.n_compressed, (unsigned long long)st.n_blobs);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    if (strcmp(argv[1], "pack") == 0)
        return cmd_pack(argc, argv);
    if (strcmp(argv[1], "load") == 0)
        return cmd_load(argc, argv);
    if (strcmp(argv[1], "mmap") == 0)
        return cmd_mmap(argc, argv);
    if (strcmp(argv[1], "codec") == 0)
        return cmd_codec(argc, argv);
    return 2;
}
