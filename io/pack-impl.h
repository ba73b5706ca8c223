/* On-disk structures of the .moe pack (doc/pack-format.md), shared by the
 * reader (io/pack.c) and the writer (io/pack_writer.c). All integers are
 * little-endian; the structs are read and written with memcpy, never
 * through a cast of a file buffer. */
#ifndef MOE_IO_PACK_IMPL_H
#define MOE_IO_PACK_IMPL_H

#include <assert.h>
#include <stdint.h>

#include "io/pack.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the .moe pack code assumes a little-endian host"
#endif

#define PACK_MAGIC "MOEPACK\0"

struct pack_header {
    char     magic[8];        /* PACK_MAGIC */
    uint32_t version;         /* MOE_PACK_VERSION */
    uint32_t header_size;     /* sizeof(struct pack_header) */
    uint64_t file_size;       /* multiple of MOE_PACK_BLOB_ALIGN */
    uint32_t blob_align;      /* MOE_PACK_BLOB_ALIGN */
    uint32_t n_layer;
    uint32_t n_expert;
    uint32_t n_tensors;       /* expert tensor records */
    uint64_t dense_offset;    /* embedded GGUF: = MOE_PACK_BLOB_ALIGN */
    uint64_t dense_size;
    uint64_t dense_xxh3;
    uint64_t blobs_offset;    /* first blob */
    uint64_t blobs_end;       /* end of the blob section (aligned) */
    uint64_t tensors_offset;  /* tensor records, then index entries */
    uint64_t tensors_xxh3;    /* of the n_tensors records */
    uint64_t index_offset;    /* = tensors_offset + n_tensors * 128 */
    uint64_t src_size;        /* size of the GGUF it was made from (information) */
    uint8_t  reserved[40];
    uint64_t header_xxh3;     /* of the bytes above */
};
static_assert(sizeof(struct pack_header) == 160, "pack header layout");

struct pack_tensor_rec {
    char     name[64];        /* NUL-terminated, NUL-padded */
    uint32_t layer;
    uint32_t dtype;
    uint32_t n_dims;          /* of the whole tensor: 2..4, last dim = n_expert */
    uint32_t reserved0;
    uint64_t ne[4];
    uint64_t blob_offset;     /* of the slice in the raw blob */
    uint64_t slice_size;      /* bytes per expert */
};
static_assert(sizeof(struct pack_tensor_rec) == 128, "pack tensor record layout");

struct pack_entry_rec {
    uint64_t offset;          /* absolute; 0 for layers without experts */
    uint64_t stored_size;
    uint64_t raw_size;
    uint64_t xxh3;            /* of the stored bytes */
    uint32_t codec;
    uint32_t flags;           /* 0 */
    uint64_t entry_xxh3;      /* of the 40 bytes above */
};
static_assert(sizeof(struct pack_entry_rec) == 48, "pack index entry layout");

#define PACK_ENTRY_HASHED 40u

/* Adds one blob of layout L to the ratio statistics (reader and writer). */
void moe_pack_stats_add(struct moe_pack_stats *st, const struct moe_expert_layout *L,
                        uint64_t raw, uint64_t stored, bool compressed);

#endif
