/* The expert store: `.moe` pack files (format: doc/pack-format.md).
 *
 * A pack holds a GGUF with the model's metadata and dense tensors (so that
 * it is self-contained), then one blob per (layer, expert) with that
 * expert's slices of every expert tensor of the layer (gate, up, down and
 * biases where the model has them), each blob on a 4096-byte boundary and
 * stored raw or zstd-compressed, then an index: the expert tensors' records
 * and one entry per (layer, expert) with offset, stored size, raw size,
 * codec and an XXH3 of the stored bytes.
 *
 * Reader contract. moe_pack_open() checks the header and the tensor table
 * (checksums, bounds, overflow) and opens the embedded GGUF; any problem
 * there fails the open (MOE_EFORMAT / MOE_ECHECKSUM / MOE_ELIMIT). Index
 * entries are checked one by one: a bad entry (its own checksum, a size
 * that disagrees with the tensor table, a range outside the blob section)
 * only makes that expert unloadable. moe_pack_blob() then returns
 * MOE_EFORMAT naming the layer and expert, before any buffer is written,
 * and every other expert keeps serving (shared/RELIABILITY.md row 5).
 *
 * Ownership: getters return pointers owned by the pack, valid until
 * moe_pack_close(). Threading: after open, every function taking a const
 * struct moe_pack * is thread-safe.
 */
#ifndef MOE_IO_PACK_H
#define MOE_IO_PACK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "io/codec.h"
#include "io/gguf.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_PACK_VERSION      1u
#define MOE_PACK_BLOB_ALIGN   4096u          /* every blob, section and the file size */
#define MOE_PACK_SLICE_ALIGN  256u           /* slice offsets within a raw blob */
#define MOE_EXPERT_MAX_SLICES 8u             /* expert tensors per layer */
#define MOE_PACK_MAX_LAYERS   4096u
#define MOE_PACK_MAX_EXPERTS  65536u
#define MOE_PACK_MAX_ENTRIES  (1u << 22)     /* n_layer x n_expert */
#define MOE_PACK_MAX_BLOB     (1ull << 30)   /* raw bytes of one expert */

/* One expert tensor's slice inside an expert's raw blob (= the bytes the
 * cache receives). The same for every expert of a layer. */
struct moe_expert_slice {
    const char *name;     /* full tensor name, "blk.7.ffn_up_exps.weight" */
    uint32_t dtype;       /* enum moe_dtype */
    uint32_t n_dims;      /* of one expert's slice: the tensor's n_dims - 1 */
    uint64_t ne[MOE_GGUF_MAX_DIMS]; /* slice shape, ne[0] fastest; unused = 1 */
    uint64_t offset;      /* in the raw blob; multiple of MOE_PACK_SLICE_ALIGN */
    uint64_t size;        /* bytes */
    uint64_t src_offset;  /* GGUF sources only: absolute file offset of expert 0's slice */
    uint32_t src_part;    /* GGUF sources only: the split part holding it (0: a single file) */
};

/* The raw blob of every expert of one layer. Padding between slices is zero. */
struct moe_expert_layout {
    uint32_t layer;
    uint32_t n_slices;
    uint64_t raw_size;    /* end of the last slice */
    struct moe_expert_slice s[MOE_EXPERT_MAX_SLICES];
    /* byte-grouped regions (the 16-bit slices) for MOE_CODEC_ZSTD_BG16 */
    unsigned n_groups;
    struct moe_codec_group groups[MOE_EXPERT_MAX_SLICES];
};

/* Finds the expert tensors of a GGUF (names "blk.N.*_exps.*", last dim =
 * expert count) and builds one layout per layer (NULL-free array of n_layer
 * entries; layers without experts have n_slices 0). Slices are ordered as
 * the tensors appear in the file. *out is freed with moe_free().
 * MOE_EFORMAT when expert tensors disagree on the expert count or a layer
 * has too many of them. */
int moe_expert_layouts_from_gguf(const struct moe_gguf *g, struct moe_expert_layout **out,
                                 uint32_t *n_layer, uint32_t *n_expert, struct moe_diag *diag);

/* GGUF sources read with O_DIRECT (io/expert_src.h): lays one layer's
 * slices out again so that each sits in the blob at the same offset within
 * a page of `align` bytes as its bytes do in the file, each slice's aligned
 * superset on pages of its own; raw_size becomes a whole number of pages.
 * A page-aligned destination can then receive each slice's aligned
 * superset read directly, without a copy. Possible only when every slice
 * is a whole number of pages (then every expert's slice starts at the same
 * offset within a page); returns false and leaves the layout as it was
 * otherwise. Offsets stay multiples of the GGUF's alignment (32), not of
 * MOE_PACK_SLICE_ALIGN: such a layout describes a slot, never a pack. */
bool moe_expert_layout_direct(struct moe_expert_layout *lo, uint64_t align);
#define MOE_EXPERT_DIRECT_ALIGN 4096u   /* the page GGUF sources lay their slots out by */

/* True when the tensor is an expert tensor by the rule above. */
bool moe_expert_tensor_name(const char *name, uint32_t *layer);

/* ---- reader ---------------------------------------------------------- */

struct moe_pack;

enum {
    /* Fuzzing only: ignore header/tensor-table/entry checksums so that the
     * structural checks behind them are reachable. */
    MOE_PACK_OPEN_NO_META_CHECKSUMS = 1u << 0,
};

int moe_pack_open(struct moe_pack **out, const char *path, unsigned flags, struct moe_diag *diag);
/* Over a caller's buffer, which must outlive the pack (fuzzing, tests). */
int moe_pack_open_mem(struct moe_pack **out, const void *buf, size_t len, const char *name,
                      unsigned flags, struct moe_diag *diag);
void moe_pack_close(struct moe_pack *p);

const char *moe_pack_path(const struct moe_pack *p);
uint64_t moe_pack_file_size(const struct moe_pack *p);
uint32_t moe_pack_n_layer(const struct moe_pack *p);
uint32_t moe_pack_n_expert(const struct moe_pack *p);
/* Metadata and dense tensors (the embedded GGUF); its tensors do not
 * include the expert tensors. Borrowed until moe_pack_close(). */
const struct moe_gguf *moe_pack_gguf(const struct moe_pack *p);
/* Gives back the page cache behind the mapped dense section (unmaps its
 * pages, MADV_DONTNEED, and drops the file's clean cached pages,
 * POSIX_FADV_DONTNEED): for a caller that copied what it needs out of it.
 * The mapping stays valid (an access reads the file again). Best effort. */
void moe_pack_drop_cache(const struct moe_pack *p);
/* Layout of layer's experts; NULL when layer >= n_layer or has no experts. */
const struct moe_expert_layout *moe_pack_layout(const struct moe_pack *p, uint32_t layer);
/* Largest raw blob and largest stored blob (for sizing buffers). */
uint64_t moe_pack_max_raw(const struct moe_pack *p);
uint64_t moe_pack_max_stored(const struct moe_pack *p);
/* Index entries that failed their checks at open. */
uint64_t moe_pack_n_bad_entries(const struct moe_pack *p);

/* Where and how one expert is stored. */
struct moe_pack_blob {
    uint32_t layer, expert;
    uint32_t codec;        /* enum moe_codec */
    uint64_t offset;       /* absolute, multiple of MOE_PACK_BLOB_ALIGN */
    uint64_t stored_size;
    uint64_t raw_size;
    uint64_t xxh3;         /* of the stored bytes */
};

/* -ENOENT (message set) when the layer has no experts or the ids are out of
 * range; MOE_EFORMAT naming file, layer, expert and field when the index
 * entry failed its checks. */
int moe_pack_blob(const struct moe_pack *p, uint32_t layer, uint32_t expert,
                  struct moe_pack_blob *out, struct moe_diag *diag);

/* MOE_ECHECKSUM naming file, layer, expert and offset when the stored bytes
 * do not hash to the index's XXH3. */
int moe_pack_check_blob(const struct moe_pack *p, const struct moe_pack_blob *b,
                        const void *stored, struct moe_diag *diag);

/* Checks the stored bytes, then decodes them into dst (dst_size must be
 * b->raw_size). dst is written only when the checksum matched; on a decode
 * error its contents are unspecified. */
int moe_pack_decode_blob(const struct moe_pack *p, const struct moe_pack_blob *b,
                         struct moe_codec_dctx *d, const void *stored, void *dst, size_t dst_size,
                         struct moe_diag *diag);

/* Synchronous read of one expert (pread; for tools and tests). `d` may be
 * NULL (a temporary context). */
int moe_pack_read_expert(const struct moe_pack *p, uint32_t layer, uint32_t expert,
                         void *dst, size_t dst_size, struct moe_codec_dctx *d,
                         struct moe_diag *diag);

/* Checks the dense section's XXH3 (reads it all). */
int moe_pack_verify_dense(const struct moe_pack *p, struct moe_diag *diag);

/* ---- writer ---------------------------------------------------------- */

#define MOE_PACK_DEFAULT_LEVEL     3
#define MOE_PACK_DEFAULT_MIN_RATIO 1.10   /* doc/pack-format.md, "Choosing --min-ratio" */

typedef void (*moe_pack_progress_fn)(void *arg, uint64_t done_bytes, uint64_t total_bytes);

struct moe_pack_write_opts {
    int level;             /* zstd level; 0 = MOE_PACK_DEFAULT_LEVEL */
    unsigned threads;      /* compression workers; 0 = online CPUs */
    double min_ratio;      /* store compressed only if raw/stored >= this; 0 = default */
    moe_pack_progress_fn progress; /* called on the writing thread; may be NULL */
    void *progress_arg;
};

/* Per dtype signature of a layer ("Q4_K+Q6_K"): how it compressed. */
struct moe_pack_ratio {
    char     types[48];
    uint64_t n_blobs, n_compressed;
    uint64_t raw_bytes, stored_bytes;
};

#define MOE_PACK_MAX_RATIOS 16

struct moe_pack_stats {
    uint64_t n_blobs, n_compressed;
    uint64_t raw_bytes, stored_bytes;   /* blobs only */
    uint64_t dense_bytes, file_size;
    bool removed_stale_tmp;             /* a leftover temporary file was removed */
    unsigned n_ratios;
    struct moe_pack_ratio ratios[MOE_PACK_MAX_RATIOS];
};

/* Writes the pack of GGUF `src` to `dst`: to "<dst>.tmp" (created
 * exclusively and locked), fsynced, renamed. A leftover "<dst>.tmp" that no
 * live writer holds is removed first (stats->removed_stale_tmp); one that a
 * writer holds is -EBUSY. On failure nothing exists under `dst` that was not
 * there before and the temporary file is removed. Memory: about
 * 3 x (threads + 1) x the largest expert, whatever the model size. */
int moe_pack_write(const char *src, const char *dst, const struct moe_pack_write_opts *opts,
                   struct moe_pack_stats *stats, struct moe_diag *diag);

/* Ratio statistics of an existing pack, from its index (no blob reads). */
void moe_pack_stats_of(const struct moe_pack *p, struct moe_pack_stats *stats);

#ifdef __cplusplus
}
#endif

#endif
