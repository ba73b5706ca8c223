/* Blob codecs of the expert store: byte grouping of 16-bit types and zstd.
 *
 * A blob is the concatenation of an expert's tensor slices. Before zstd, the
 * slices of 16-bit types (F16, BF16) are byte-grouped: all high bytes of the
 * slice, then all low bytes. The exponent and sign live in the high byte, so
 * grouping puts the compressible bytes together (zstd alone barely finds
 * them when they alternate with near-random mantissa bytes).
 *
 * Codec ids are stored in the pack index (doc/pack-format.md); never renumber.
 *
 * Threading: the functions are reentrant; a struct moe_codec_dctx belongs to
 * one thread at a time (the decompression pool keeps one per worker).
 */
#ifndef MOE_IO_CODEC_H
#define MOE_IO_CODEC_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

#ifdef __cplusplus
extern "C" {
#endif

enum moe_codec {
    MOE_CODEC_RAW       = 0, /* stored bytes are the raw blob */
    MOE_CODEC_ZSTD      = 1, /* one zstd frame of the raw blob */
    MOE_CODEC_ZSTD_BG16 = 2, /* one zstd frame of the blob with 16-bit slices byte-grouped */
    MOE_CODEC_COUNT
};

const char *moe_codec_name(uint32_t codec); /* "raw", "zstd", "zstd+bg16", "?" */

/* One region of a blob that is byte-grouped (offset and size in bytes, size
 * even). Regions outside any group are copied as they are. */
struct moe_codec_group {
    uint64_t offset;
    uint64_t size;
};

/* Groups: dst[off .. off+n/2) = high bytes, dst[off+n/2 .. off+n) = low bytes
 * of src[off .. off+n), for every group; other bytes copied. src != dst. */
void moe_codec_bg16_encode(uint8_t *dst, const uint8_t *src, size_t n,
                           const struct moe_codec_group *g, unsigned n_groups);
/* Inverse of moe_codec_bg16_encode. src != dst. */
void moe_codec_bg16_decode(uint8_t *dst, const uint8_t *src, size_t n,
                           const struct moe_codec_group *g, unsigned n_groups);

/* Upper bound of the compressed size of n bytes. */
size_t moe_codec_bound(size_t n);

/* Compresses src[0..n) at `level` into dst (capacity cap >= moe_codec_bound(n)).
 * Returns 0 and *out_n, or MOE_ELIMIT/-ENOMEM. `cctx` is an opaque per-thread
 * context from moe_codec_cctx_create (NULL: a temporary one). */
struct moe_codec_cctx;
int  moe_codec_cctx_create(struct moe_codec_cctx **out, int level);
void moe_codec_cctx_destroy(struct moe_codec_cctx *c);
int  moe_codec_compress(struct moe_codec_cctx *c, void *dst, size_t cap, size_t *out_n,
                        const void *src, size_t n);

/* Decompression context: a ZSTD_DCtx plus a scratch buffer for byte-grouped
 * blobs (grown on demand, kept for reuse). */
struct moe_codec_dctx;
int  moe_codec_dctx_create(struct moe_codec_dctx **out);
void moe_codec_dctx_destroy(struct moe_codec_dctx *d);

/* Decodes a stored blob of codec `codec` into dst, which must receive exactly
 * raw_n bytes (a frame that decodes to any other size is MOE_EFORMAT, and
 * dst is never written past raw_n). `groups` is used by MOE_CODEC_ZSTD_BG16.
 * Errors: MOE_EFORMAT (corrupt frame, wrong size, unknown codec), -ENOMEM.
 * The message in diag names only the problem; the caller adds the blob. */
int moe_codec_decode(struct moe_codec_dctx *d, uint32_t codec, void *dst, size_t raw_n,
                     const void *src, size_t stored_n,
                     const struct moe_codec_group *groups, unsigned n_groups,
                     struct moe_diag *diag);

#ifdef __cplusplus
}
#endif

#endif
