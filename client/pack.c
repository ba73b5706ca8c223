/* moectl pack: write a .moe expert store from a GGUF, or verify one.
 *
 *   moectl pack MODEL.gguf -o MODEL.moe [--level N] [--threads N] [--min-ratio R] [--quiet]
 *   moectl pack --verify MODEL.moe
 *
 * Exit codes (client/cli.h): 0 ok, 1 bad input or corruption (the message
 * names file, layer and expert), 2 usage. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/alloc.h"
#include "io/pack.h"

int moectl_pack_main(int argc, char **argv);

static void usage(FILE *f)
{
    fprintf(f, "usage: moectl pack MODEL.gguf -o MODEL.moe [--level N] [--threads N] "
               "[--min-ratio R] [--quiet]\n"
               "       moectl pack --verify MODEL.moe\n"
               "  --level N      zstd level 1..19 (default %d)\n"
               "  --threads N    compression threads (default: online CPUs)\n"
               "  --min-ratio R  store a blob compressed only if raw/stored >= R (default %.2f;\n"
               "                 doc/pack-format.md says why)\n",
            MOE_PACK_DEFAULT_LEVEL, MOE_PACK_DEFAULT_MIN_RATIO);
}

static void progress(void *arg, uint64_t done, uint64_t total)
{
    int *last = arg;
    int pct = total ? (int)(done * 100 / total) : 100;
    if (pct == *last)
        return;
    *last = pct;
    char bar[41];
    int n = pct * 40 / 100;
    for (int i = 0; i < 40; i++)
        bar[i] = i < n ? '#' : ' ';
    bar[40] = 0;
    fprintf(stderr, "\r[%s] %3d%%  %.2f / %.2f GB", bar, pct, (double)done / 1e9,
            (double)total / 1e9);
    if (done >= total)
        fputc('\n', stderr);
    fflush(stderr);
}

static void print_ratios(const struct moe_pack_stats *st)
{
    printf("%-16s %8s %10s %14s %14s %7s\n", "types", "experts", "compressed", "raw bytes",
           "stored bytes", "ratio");
    for (unsigned i = 0; i < st->n_ratios; i++) {
        const struct moe_pack_ratio *r = &st->ratios[i];
        printf("%-16s %8" PRIu64 " %10" PRIu64 " %14" PRIu64 " %14" PRIu64 " %7.3f\n", r->types,
               r->n_blobs, r->n_compressed, r->raw_bytes, r->stored_bytes,
               r->stored_bytes ? (double)r->raw_bytes / (double)r->stored_bytes : 0.0);
    }
    printf("%-16s %8" PRIu64 " %10" PRIu64 " %14" PRIu64 " %14" PRIu64 " %7.3f\n", "all",
           st->n_blobs, st->n_compressed, st->raw_bytes, st->stored_bytes,
           st->stored_bytes ? (double)st->raw_bytes / (double)st->stored_bytes : 0.0);
}

static int verify(const char *path)
{
    struct moe_diag diag = {0};
    struct moe_pack *p = NULL;
    uint8_t *buf = NULL;
    struct moe_codec_dctx *d = NULL;
    int rc = moe_pack_open(&p, path, 0, &diag);
    if (rc == 0)
        rc = moe_pack_verify_dense(p, &diag);
    if (rc == 0 && (moe_codec_dctx_create(&d) < 0 ||
                    (buf = moe_malloc((size_t)moe_pack_max_raw(p))) == NULL))
        rc = moe_diag_set(&diag, -ENOMEM, "%s: out of memory", path);
    for (uint32_t l = 0; rc == 0 && l < moe_pack_n_layer(p); l++) {
        const struct moe_expert_layout *L = moe_pack_layout(p, l);
        for (uint32_t e = 0; rc == 0 && L && e < moe_pack_n_expert(p); e++)
            rc = moe_pack_read_expert(p, l, e, buf, (size_t)L->raw_size, d, &diag);
    }
    if (rc == 0) {
        struct moe_pack_stats st;
        moe_pack_stats_of(p, &st);
        printf("%s: ok: %u layers x %u experts, dense %.1f MB, file %.1f MB\n", path,
               moe_pack_n_layer(p), moe_pack_n_expert(p), (double)st.dense_bytes / 1e6,
               (double)st.file_size / 1e6);
        print_ratios(&st);
    } else {
        fprintf(stderr, "moectl pack --verify: %s (%s)\n", diag.msg, moe_strerror(rc));
    }
    moe_free(buf);
    moe_codec_dctx_destroy(d);
    moe_pack_close(p);
    return rc == 0 ? 0 : 1;
}

static int parse_uint(const char *s, unsigned long lo, unsigned long hi, unsigned long *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-' || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

int moectl_pack_main(int argc, char **argv)
{
    const char *in = NULL, *out = NULL, *verify_path = NULL;
    struct moe_pack_write_opts o = {0};
    bool quiet = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        unsigned long u;
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(a, "--verify") == 0 && v) {
            verify_path = v;
            i++;
        } else if (strcmp(a, "-o") == 0 && v) {
            out = v;
            i++;
        } else if (strcmp(a, "--level") == 0 && v) {
            if (parse_uint(v, 1, 19, &u) < 0) {
                fprintf(stderr, "moectl pack: --level %s: expected 1..19\n", v);
                return 2;
            }
            o.level = (int)u;
            i++;
        } else if (strcmp(a, "--threads") == 0 && v) {
            if (parse_uint(v, 1, 256, &u) < 0) {
                fprintf(stderr, "moectl pack: --threads %s: expected 1..256\n", v);
                return 2;
            }
            o.threads = (unsigned)u;
            i++;
        } else if (strcmp(a, "--min-ratio") == 0 && v) {
            char *end;
            double r = strtod(v, &end);
            if (end == v || *end || !(r >= 1.0 && r <= 1000.0)) {
                fprintf(stderr, "moectl pack: --min-ratio %s: expected a number in 1..1000\n", v);
                return 2;
            }
            o.min_ratio = r;
            i++;
        } else if (strcmp(a, "--quiet") == 0) {
            quiet = true;
        } else if (a[0] != '-' && in == NULL) {
            in = a;
        } else {
            fprintf(stderr, "moectl pack: unexpected argument '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (verify_path) {
        if (in || out) {
            fprintf(stderr, "moectl pack: --verify takes only the pack\n");
            return 2;
        }
        return verify(verify_path);
    }
    if (in == NULL || out == NULL) {
        usage(stderr);
        return 2;
    }
    int last = -1;
    if (!quiet && isatty(STDERR_FILENO)) {
        o.progress = progress;
        o.progress_arg = &last;
    }
    struct moe_pack_stats st;
    struct moe_diag diag = {0};
    int rc = moe_pack_write(in, out, &o, &st, &diag);
    if (st.removed_stale_tmp)
        fprintf(stderr, "moectl pack: removed the leftover temporary file %s.tmp\n", out);
    if (rc < 0) {
        fprintf(stderr, "moectl pack: %s (%s)\n", diag.msg, moe_strerror(rc));
        return 1;
    }
    if (!quiet) {
        printf("%s: %.1f MB (dense %.1f MB, experts %.1f MB raw -> %.1f MB stored)\n", out,
               (double)st.file_size / 1e6, (double)st.dense_bytes / 1e6,
               (double)st.raw_bytes / 1e6, (double)st.stored_bytes / 1e6);
        print_ratios(&st);
    }
    return 0;
}
