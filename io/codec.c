#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <zstd.h>
#include <zstd_errors.h>

#include "common/alloc.h"
#include "io/codec.h"

const char *moe_codec_name(uint32_t codec)
{
    switch (codec) {
    case MOE_CODEC_RAW: return "raw";
    case MOE_CODEC_ZSTD: return "zstd";
    case MOE_CODEC_ZSTD_BG16: return "zstd+bg16";
    default: return "?";
    }
}

/* Groups are few (one per tensor slice), sorted and disjoint: the pack
 * reader checks that before it hands them here. */
void moe_codec_bg16_encode(uint8_t *dst, const uint8_t *src, size_t n,
                           const struct moe_codec_group *g, unsigned n_groups)
{
    memcpy(dst, src, n);
    for (unsigned k = 0; k < n_groups; k++) {
        const uint8_t *s = src + g[k].offset;
        size_t half = (size_t)g[k].size / 2;
        uint8_t *hi = dst + g[k].offset, *lo = hi + half;
        for (size_t i = 0; i < half; i++) {
            lo[i] = s[2 * i];      /* little-endian: low byte first */
            hi[i] = s[2 * i + 1];
        }
    }
}

void moe_codec_bg16_decode(uint8_t *dst, const uint8_t *src, size_t n,
                           const struct moe_codec_group *g, unsigned n_groups)
{
    memcpy(dst, src, n);
    for (unsigned k = 0; k < n_groups; k++) {
        size_t half = (size_t)g[k].size / 2;
        const uint8_t *hi = src + g[k].offset, *lo = hi + half;
        uint8_t *d = dst + g[k].offset;
        for (size_t i = 0; i < half; i++) {
            d[2 * i] = lo[i];
            d[2 * i + 1] = hi[i];
        }
    }
}

size_t moe_codec_bound(size_t n)
{
    return ZSTD_compressBound(n);
}

struct moe_codec_cctx {
    ZSTD_CCtx *z;
};

int moe_codec_cctx_create(struct moe_codec_cctx **out, int level)
{
    *out = NULL;
    struct moe_codec_cctx *c = moe_calloc(1, sizeof(*c));
    if (c == NULL)
        return -ENOMEM;
    c->z = ZSTD_createCCtx();
    if (c->z == NULL) {
        moe_free(c);
        return -ENOMEM;
    }
    if (level < ZSTD_minCLevel())
        level = ZSTD_minCLevel();
    if (level > ZSTD_maxCLevel())
        level = ZSTD_maxCLevel();
    ZSTD_CCtx_setParameter(c->z, ZSTD_c_compressionLevel, level);
    /* The pack index carries an XXH3 of the stored bytes and the raw size;
     * the frame's own checksum would only cost time. The content size stays
     * in the frame so that a reader can cross-check it. */
    ZSTD_CCtx_setParameter(c->z, ZSTD_c_checksumFlag, 0);
    ZSTD_CCtx_setParameter(c->z, ZSTD_c_contentSizeFlag, 1);
    *out = c;
    return 0;
}

void moe_codec_cctx_destroy(struct moe_codec_cctx *c)
{
    if (c == NULL)
        return;
    ZSTD_freeCCtx(c->z);
    moe_free(c);
}

int moe_codec_compress(struct moe_codec_cctx *c, void *dst, size_t cap, size_t *out_n,
                       const void *src, size_t n)
{
    *out_n = 0;
    size_t r = ZSTD_compress2(c->z, dst, cap, src, n);
    if (ZSTD_isError(r))
        return ZSTD_getErrorCode(r) == ZSTD_error_memory_allocation ? -ENOMEM : MOE_ELIMIT;
    *out_n = r;
    return 0;
}

struct moe_codec_dctx {
    ZSTD_DCtx *z;
    uint8_t *scratch;
    size_t scratch_cap;
};

int moe_codec_dctx_create(struct moe_codec_dctx **out)
{
    *out = NULL;
    struct moe_codec_dctx *d = moe_calloc(1, sizeof(*d));
    if (d == NULL)
        return -ENOMEM;
    d->z = ZSTD_createDCtx();
    if (d->z == NULL) {
        moe_free(d);
        return -ENOMEM;
    }
    *out = d;
    return 0;
}

void moe_codec_dctx_destroy(struct moe_codec_dctx *d)
{
    if (d == NULL)
        return;
    ZSTD_freeDCtx(d->z);
    moe_free(d->scratch);
    moe_free(d);
}

static int zstd_exact(struct moe_codec_dctx *d, void *dst, size_t raw_n, const void *src,
                      size_t stored_n, struct moe_diag *diag)
{
    /* The frame header must announce exactly raw_n: a frame that would
     * decode to more is refused before a byte of dst is written. */
    unsigned long long fcs = ZSTD_getFrameContentSize(src, stored_n);
    if (fcs == ZSTD_CONTENTSIZE_ERROR)
        return moe_diag_set(diag, MOE_EFORMAT, "not a zstd frame");
    if (fcs != ZSTD_CONTENTSIZE_UNKNOWN && fcs != raw_n)
        return moe_diag_set(diag, MOE_EFORMAT, "zstd frame decodes to %llu bytes, expected %zu",
                            fcs, raw_n);
    size_t r = ZSTD_decompressDCtx(d->z, dst, raw_n, src, stored_n);
    if (ZSTD_isError(r))
        return moe_diag_set(diag, MOE_EFORMAT, "zstd: %s", ZSTD_getErrorName(r));
    if (r != raw_n)
        return moe_diag_set(diag, MOE_EFORMAT, "zstd frame decoded to %zu bytes, expected %zu",
                            r, raw_n);
    return 0;
}

int moe_codec_decode(struct moe_codec_dctx *d, uint32_t codec, void *dst, size_t raw_n,
                     const void *src, size_t stored_n,
                     const struct moe_codec_group *groups, unsigned n_groups,
                     struct moe_diag *diag)
{
    switch (codec) {
    case MOE_CODEC_RAW:
        if (stored_n != raw_n)
            return moe_diag_set(diag, MOE_EFORMAT, "raw blob of %zu bytes, expected %zu",
                                stored_n, raw_n);
        memcpy(dst, src, raw_n);
        return 0;
    case MOE_CODEC_ZSTD:
        return zstd_exact(d, dst, raw_n, src, stored_n, diag);
    case MOE_CODEC_ZSTD_BG16: {
        if (d->scratch_cap < raw_n) {
            uint8_t *s = moe_malloc(raw_n);
            if (s == NULL)
                return moe_diag_set(diag, -ENOMEM, "out of memory (%zu bytes of scratch)", raw_n);
            moe_free(d->scratch);
            d->scratch = s;
            d->scratch_cap = raw_n;
        }
        int rc = zstd_exact(d, d->scratch, raw_n, src, stored_n, diag);
        if (rc < 0)
            return rc;
        moe_codec_bg16_decode(dst, d->scratch, raw_n, groups, n_groups);
        return 0;
    }
    default:
        return moe_diag_set(diag, MOE_EFORMAT, "unknown codec %u", codec);
    }
}
