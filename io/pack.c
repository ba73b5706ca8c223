/* .moe pack reader and the expert-layout rules shared with the writer. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <xxhash.h>

#include "common/alloc.h"
#include "io/file.h"
#include "io/pack-impl.h"
#include "common/dtype.h"

/* ---- expert layouts -------------------------------------------------- */

bool moe_expert_tensor_name(const char *name, uint32_t *layer)
{
    /* llama.cpp names: blk.<N>.ffn_{gate,up,down}_exps.{weight,bias}; shared
     * experts are "_shexp" and stay dense. */
    if (strncmp(name, "blk.", 4) != 0)
        return false;
    const char *p = name + 4;
    uint64_t l = 0;
    int digits = 0;
    while (*p >= '0' && *p <= '9' && digits < 9) {
        l = l * 10 + (uint64_t)(*p - '0');
        p++;
        digits++;
    }
    if (digits == 0 || *p != '.' || strstr(p, "_exps.") == NULL)
        return false;
    /* per-expert scale vectors [n_expert] (gemma4's ffn_down_exps.scale)
     * stay dense, as in moe_tensor_is_expert() */
    const size_t n = strlen(p);
    if (n > 6 && strcmp(p + n - 6, ".scale") == 0)
        return false;
    if (layer)
        *layer = (uint32_t)l;
    return true;
}

static bool is16(uint32_t dtype)
{
    return dtype == MOE_DTYPE_F16 || dtype == MOE_DTYPE_BF16;
}

/* Byte size of one expert's slice from its shape; 0 when invalid. */
static uint64_t slice_bytes(uint32_t dtype, uint32_t n_dims, const uint64_t *ne)
{
    int err = 0;
    uint64_t b = moe_dtype_row_bytes((enum moe_dtype)dtype, ne[0], &err);
    if (err || b == 0)
        return 0;
    for (uint32_t d = 1; d < n_dims; d++)
        if (__builtin_mul_overflow(b, ne[d], &b))
            return 0;
    return b;
}

/* Appends a slice to a layout; computes its offset. */
static int layout_add(struct moe_expert_layout *lo, const char *name, uint32_t dtype,
                      uint32_t n_dims, const uint64_t *ne, uint64_t size, const char *file,
                      struct moe_diag *diag)
{
    if (lo->n_slices >= MOE_EXPERT_MAX_SLICES)
        return moe_diag_set(diag, MOE_ELIMIT, "%s: layer %u: more than %u expert tensors (%s)",
                            file, lo->layer, MOE_EXPERT_MAX_SLICES, name);
    uint64_t off = (lo->raw_size + MOE_PACK_SLICE_ALIGN - 1) / MOE_PACK_SLICE_ALIGN *
                   MOE_PACK_SLICE_ALIGN;
    if (size > MOE_PACK_MAX_BLOB || off + size > MOE_PACK_MAX_BLOB)
        return moe_diag_set(diag, MOE_ELIMIT, "%s: layer %u: one expert's tensors exceed %llu bytes",
                            file, lo->layer, (unsigned long long)MOE_PACK_MAX_BLOB);
    struct moe_expert_slice *s = &lo->s[lo->n_slices++];
    memset(s, 0, sizeof(*s));
    s->name = name;
    s->dtype = dtype;
    s->n_dims = n_dims;
    for (unsigned d = 0; d < MOE_GGUF_MAX_DIMS; d++)
        s->ne[d] = d < n_dims ? ne[d] : 1;
    s->offset = off;
    s->size = size;
    lo->raw_size = off + size;
    if (is16(dtype)) {
        lo->groups[lo->n_groups].offset = off;
        lo->groups[lo->n_groups].size = size;
        lo->n_groups++;
    }
    return 0;
}

int moe_expert_layouts_from_gguf(const struct moe_gguf *g, struct moe_expert_layout **out,
                                 uint32_t *n_layer_out, uint32_t *n_expert_out,
                                 struct moe_diag *diag)
{
    *out = NULL;
    *n_layer_out = *n_expert_out = 0;
    const char *file = moe_gguf_path(g);
    uint32_t n_layer = 0;
    uint64_t n_expert = 0;
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const struct moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        uint32_t l;
        if (!moe_expert_tensor_name(t->name, &l))
            continue;
        if (t->n_dims < 2)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: tensor %s: expert tensor with %u dims, "
                                "expected 2..4 (last = expert count)", file, t->name, t->n_dims);
        uint64_t ne = t->ne[t->n_dims - 1];
        if (n_expert == 0)
            n_expert = ne;
        if (ne != n_expert)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: tensor %s: %" PRIu64 " experts, other "
                                "expert tensors have %" PRIu64, file, t->name, ne, n_expert);
        if (l >= MOE_PACK_MAX_LAYERS)
            return moe_diag_set(diag, MOE_ELIMIT, "%s: tensor %s: layer %u, at most %u layers",
                                file, t->name, l, MOE_PACK_MAX_LAYERS);
        if (l + 1 > n_layer)
            n_layer = l + 1;
    }
    if (n_layer == 0)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: no expert tensors (blk.N.*_exps.*): "
                            "not a mixture-of-experts model", file);
    if (n_expert > MOE_PACK_MAX_EXPERTS || (uint64_t)n_layer * n_expert > MOE_PACK_MAX_ENTRIES)
        return moe_diag_set(diag, MOE_ELIMIT, "%s: %u layers x %" PRIu64 " experts, at most %u "
                            "experts and %u (layer, expert) pairs", file, n_layer, n_expert,
                            MOE_PACK_MAX_EXPERTS, MOE_PACK_MAX_ENTRIES);
    struct moe_expert_layout *lo = moe_calloc(n_layer, sizeof(*lo));
    if (lo == NULL)
        return moe_diag_set(diag, -ENOMEM, "%s: out of memory", file);
    for (uint32_t l = 0; l < n_layer; l++)
        lo[l].layer = l;
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const struct moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        uint32_t l;
        if (!moe_expert_tensor_name(t->name, &l))
            continue;
        /* The expert dim is the outermost: expert e is the contiguous
         * range [e * size / n_expert, (e + 1) * size / n_expert). */
        uint64_t sz = slice_bytes(t->dtype, t->n_dims - 1, t->ne);
        if (sz == 0 || t->size % n_expert != 0 || t->size / n_expert != sz) {
            moe_free(lo);
            return moe_diag_set(diag, MOE_EFORMAT, "%s: tensor %s: size %" PRIu64 " is not %" PRIu64
                                " experts of one slice", file, t->name, t->size, n_expert);
        }
        struct moe_expert_layout *L = &lo[l];
        int rc = layout_add(L, t->name, t->dtype, t->n_dims - 1, t->ne, sz, file, diag);
        if (rc < 0) {
            moe_free(lo);
            return rc;
        }
        L->s[L->n_slices - 1].src_offset = moe_gguf_tensor_file_offset(g, t);
        L->s[L->n_slices - 1].src_part = t->part;
    }
    *out = lo;
    *n_layer_out = n_layer;
    *n_expert_out = (uint32_t)n_expert;
    return 0;
}

bool moe_expert_layout_direct(struct moe_expert_layout *lo, uint64_t align)
{
    if (lo->n_slices == 0 || align == 0)
        return false;
    for (uint32_t k = 0; k < lo->n_slices; k++)
        if (lo->s[k].size % align != 0 || lo->s[k].src_offset % 32 != 0)
            return false;
    uint64_t cur = 0;
    lo->n_groups = 0;
    for (uint32_t k = 0; k < lo->n_slices; k++) {
        struct moe_expert_slice *s = &lo->s[k];
        s->offset = cur + s->src_offset % align;
        if (is16(s->dtype)) {
            lo->groups[lo->n_groups].offset = s->offset;
            lo->groups[lo->n_groups++].size = s->size;
        }
        /* the superset read covers [cur, the page after the slice's end) */
        cur = (s->offset + s->size + align - 1) / align * align;
    }
    lo->raw_size = cur;
    return true;
}

/* ---- reader ---------------------------------------------------------- */

struct pentry {
    struct pack_entry_rec r;
    uint64_t prev_end;   /* end of the previous good blob, for the overlap check */
    int err;             /* 0, or the code of the first failed check */
};

struct moe_pack {
    char *path;
    int fd;                      /* -1 for _open_mem */
    const uint8_t *mem;
    size_t mem_len;
    void *map;                   /* [0, dense end) of the file */
    size_t map_len;
    unsigned flags;
    struct pack_header h;
    struct moe_gguf *gguf;
    struct moe_expert_layout *layouts;
    struct pack_tensor_rec *recs;
    struct pentry *e;
    uint64_t n_bad, max_raw, max_stored;
};

static int rd(const struct moe_pack *p, uint64_t off, void *dst, size_t n, struct moe_diag *diag)
{
    if (p->mem) {
        if (off > p->mem_len || n > p->mem_len - off)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: read of %zu bytes at %" PRIu64
                                " past the end (%zu bytes)", p->path, n, off, p->mem_len);
        if (n)
            memcpy(dst, p->mem + off, n);
        return 0;
    }
    uint64_t at;
    int rc = moe_file_pread(p->fd, dst, n, off, &at);
    if (rc == MOE_EFORMAT)
        return moe_diag_set(diag, rc, "%s: unexpected end of file at offset %" PRIu64, p->path, at);
    if (rc < 0)
        return moe_diag_set(diag, rc, "%s: read at offset %" PRIu64 ": %s", p->path, at, strerror(-rc));
    return 0;
}

/* [off, off + len) inside [lo, hi), overflow-safe. */
static bool in_range(uint64_t off, uint64_t len, uint64_t lo, uint64_t hi)
{
    return off >= lo && off <= hi && len <= hi - off;
}

static int check_header(struct moe_pack *p, uint64_t file_size, struct moe_diag *diag)
{
    const struct pack_header *h = &p->h;
    const char *f = p->path;
    if (moe_file_kind_of(h->magic, sizeof(h->magic)) != MOE_FILE_PACK)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: not a .moe pack (bad magic)", f);
    if (h->version != MOE_PACK_VERSION)
        return moe_diag_set(diag, h->version > MOE_PACK_VERSION ? MOE_EUNSUPPORTED : MOE_EFORMAT,
                            "%s: header: version %u, this build reads version %u", f, h->version,
                            MOE_PACK_VERSION);
    if (h->header_size != sizeof(*h))
        return moe_diag_set(diag, MOE_EFORMAT, "%s: header: header_size %u, expected %zu", f,
                            h->header_size, sizeof(*h));
    uint64_t hx = XXH3_64bits(h, offsetof(struct pack_header, header_xxh3));
    if (hx != h->header_xxh3 && !(p->flags & MOE_PACK_OPEN_NO_META_CHECKSUMS))
        return moe_diag_set(diag, MOE_ECHECKSUM, "%s: header: checksum %016" PRIx64 ", expected %016"
                            PRIx64, f, hx, h->header_xxh3);
    if (h->file_size != file_size)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: file is %" PRIu64 " bytes, header says %" PRIu64
                            "%s", f, file_size, h->file_size,
                            file_size < h->file_size ? " (truncated)" : "");
    if (h->blob_align != MOE_PACK_BLOB_ALIGN || file_size % MOE_PACK_BLOB_ALIGN)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: header: blob_align %u and file size %" PRIu64
                            ", expected %u and a multiple of it", f, h->blob_align, file_size,
                            MOE_PACK_BLOB_ALIGN);
    if (h->n_layer == 0 || h->n_layer > MOE_PACK_MAX_LAYERS || h->n_expert == 0 ||
        h->n_expert > MOE_PACK_MAX_EXPERTS ||
        (uint64_t)h->n_layer * h->n_expert > MOE_PACK_MAX_ENTRIES)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: header: %u layers x %u experts, expected "
                            "1..%u x 1..%u and at most %u pairs", f, h->n_layer, h->n_expert,
                            MOE_PACK_MAX_LAYERS, MOE_PACK_MAX_EXPERTS, MOE_PACK_MAX_ENTRIES);
    if (h->n_tensors == 0 || h->n_tensors > (uint64_t)h->n_layer * MOE_EXPERT_MAX_SLICES)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: header: %u expert tensors, expected 1..%u", f,
                            h->n_tensors, h->n_layer * MOE_EXPERT_MAX_SLICES);
    const uint64_t A = MOE_PACK_BLOB_ALIGN;
    uint64_t n_entries = (uint64_t)h->n_layer * h->n_expert;
    uint64_t tsize = (uint64_t)h->n_tensors * sizeof(struct pack_tensor_rec);
    uint64_t isize = n_entries * sizeof(struct pack_entry_rec);
    if (h->dense_offset != A || h->dense_size == 0 ||
        !in_range(h->dense_offset, h->dense_size, A, file_size))
        return moe_diag_set(diag, MOE_EFORMAT, "%s: header: dense section %" PRIu64 "+%" PRIu64
                            ", expected to start at %" PRIu64 " inside the file", f,
                            h->dense_offset, h->dense_size, A);
    if (h->blobs_offset % A || h->blobs_end % A || h->tensors_offset % A ||
        h->blobs_offset < h->dense_offset + h->dense_size ||
        !in_range(h->blobs_offset, h->blobs_end - h->blobs_offset, h->blobs_offset, file_size) ||
        h->blobs_end < h->blobs_offset || h->tensors_offset < h->blobs_end)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: header: blob section [%" PRIu64 ", %" PRIu64
                            ") and index at %" PRIu64 " are misaligned, out of order or outside "
                            "the file", f, h->blobs_offset, h->blobs_end, h->tensors_offset);
    if (h->index_offset != h->tensors_offset + tsize ||
        !in_range(h->tensors_offset, tsize + isize, h->blobs_end, file_size))
        return moe_diag_set(diag, MOE_EFORMAT, "%s: header: index at %" PRIu64 " (%" PRIu64
                            " tensor records, %" PRIu64 " entries) does not fit the file", f,
                            h->tensors_offset, (uint64_t)h->n_tensors, n_entries);
    return 0;
}

static int check_tensors(struct moe_pack *p, struct moe_diag *diag)
{
    const struct pack_header *h = &p->h;
    const char *f = p->path;
    size_t tsize = (size_t)h->n_tensors * sizeof(struct pack_tensor_rec);
    p->recs = moe_malloc(tsize);
    p->layouts = moe_calloc(h->n_layer, sizeof(*p->layouts));
    if (p->recs == NULL || p->layouts == NULL)
        return moe_diag_set(diag, -ENOMEM, "%s: out of memory", f);
    int rc = rd(p, h->tensors_offset, p->recs, tsize, diag);
    if (rc < 0)
        return rc;
    uint64_t x = XXH3_64bits(p->recs, tsize);
    if (x != h->tensors_xxh3 && !(p->flags & MOE_PACK_OPEN_NO_META_CHECKSUMS))
        return moe_diag_set(diag, MOE_ECHECKSUM, "%s: tensor table: checksum %016" PRIx64
                            ", expected %016" PRIx64, f, x, h->tensors_xxh3);
    for (uint32_t l = 0; l < h->n_layer; l++)
        p->layouts[l].layer = l;
    uint32_t prev_layer = 0;
    for (uint32_t i = 0; i < h->n_tensors; i++) {
        struct pack_tensor_rec *r = &p->recs[i];
        if (memchr(r->name, 0, sizeof(r->name)) == NULL || r->name[0] == 0)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: tensor record %u: name empty or not "
                                "NUL-terminated", f, i);
        uint32_t nl;
        if (!moe_expert_tensor_name(r->name, &nl) || nl != r->layer || r->layer >= h->n_layer)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: tensor record %u (%s): layer %u, expected "
                                "the name's layer and < %u", f, i, r->name, r->layer, h->n_layer);
        if (r->layer < prev_layer)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: tensor record %u (%s): layers out of order",
                                f, i, r->name);
        prev_layer = r->layer;
        if (moe_dtype_info(r->dtype) == NULL)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: tensor record %u (%s): unknown type %u", f,
                                i, r->name, r->dtype);
        if (r->n_dims < 2 || r->n_dims > 4)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: tensor record %u (%s): n_dims %u, expected "
                                "2..4", f, i, r->name, r->n_dims);
        for (uint32_t d = 0; d < 4; d++)
            if (r->ne[d] == 0 || (d >= r->n_dims && r->ne[d] != 1) || r->ne[d] > (1ull << 40))
                return moe_diag_set(diag, MOE_EFORMAT, "%s: tensor record %u (%s): ne[%u] = %"
                                    PRIu64 " invalid", f, i, r->name, d, r->ne[d]);
        if (r->ne[r->n_dims - 1] != h->n_expert)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: tensor record %u (%s): %" PRIu64
                                " experts, header says %u", f, i, r->name, r->ne[r->n_dims - 1],
                                h->n_expert);
        uint64_t sz = slice_bytes(r->dtype, r->n_dims - 1, r->ne);
        if (sz == 0 || sz != r->slice_size)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: tensor record %u (%s): slice_size %" PRIu64
                                ", the shape gives %" PRIu64, f, i, r->name, r->slice_size, sz);
        struct moe_expert_layout *L = &p->layouts[r->layer];
        for (uint32_t k = 0; k < L->n_slices; k++)
            if (strcmp(L->s[k].name, r->name) == 0)
                return moe_diag_set(diag, MOE_EFORMAT, "%s: tensor record %u: duplicate name %s",
                                    f, i, r->name);
        rc = layout_add(L, r->name, r->dtype, r->n_dims - 1, r->ne, sz, f, diag);
        if (rc < 0)
            return rc;
        if (L->s[L->n_slices - 1].offset != r->blob_offset)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: tensor record %u (%s): blob_offset %" PRIu64
                                ", expected %" PRIu64, f, i, r->name, r->blob_offset,
                                L->s[L->n_slices - 1].offset);
        if (L->raw_size > p->max_raw)
            p->max_raw = L->raw_size;
    }
    return 0;
}

/* Checks one entry; `prev_end` is where the previous good blob ended. */
static int entry_check(const struct moe_pack *p, uint32_t layer, uint32_t expert,
                       const struct pentry *pe, struct moe_diag *diag)
{
    const struct pack_entry_rec *r = &pe->r;
    const struct moe_expert_layout *L = &p->layouts[layer];
    const char *f = p->path;
    uint64_t x = XXH3_64bits(r, PACK_ENTRY_HASHED);
    if (x != r->entry_xxh3 && !(p->flags & MOE_PACK_OPEN_NO_META_CHECKSUMS))
        return moe_diag_set(diag, MOE_EFORMAT, "%s: index entry (layer %u, expert %u): entry "
                            "checksum %016" PRIx64 ", expected %016" PRIx64 " (corrupt index)",
                            f, layer, expert, x, r->entry_xxh3);
    if (L->n_slices == 0) {
        if (r->offset || r->stored_size || r->raw_size || r->codec || r->flags)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: index entry (layer %u, expert %u): layer "
                                "has no expert tensors but the entry is not empty", f, layer, expert);
        return 0;
    }
    if (r->codec >= MOE_CODEC_COUNT || r->flags != 0 ||
        (r->codec == MOE_CODEC_ZSTD_BG16 && L->n_groups == 0))
        return moe_diag_set(diag, MOE_EFORMAT, "%s: index entry (layer %u, expert %u): codec %u "
                            "flags %u, expected a known codec for this layer's types and 0",
                            f, layer, expert, r->codec, r->flags);
    if (r->raw_size != L->raw_size)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: index entry (layer %u, expert %u): raw size %"
                            PRIu64 ", the layer's tensors need %" PRIu64, f, layer, expert,
                            r->raw_size, L->raw_size);
    bool raw = r->codec == MOE_CODEC_RAW;
    if (r->stored_size == 0 || (raw && r->stored_size != r->raw_size) ||
        (!raw && r->stored_size > moe_codec_bound(r->raw_size)))
        return moe_diag_set(diag, MOE_EFORMAT, "%s: index entry (layer %u, expert %u): stored size %"
                            PRIu64 " at offset 0x%" PRIx64 ", expected %s%" PRIu64, f, layer,
                            expert, r->stored_size, r->offset, raw ? "" : "1..",
                            raw ? r->raw_size : (uint64_t)moe_codec_bound(r->raw_size));
    if (r->offset % MOE_PACK_BLOB_ALIGN ||
        !in_range(r->offset, r->stored_size, p->h.blobs_offset, p->h.blobs_end) ||
        r->offset < pe->prev_end)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: index entry (layer %u, expert %u): blob %"
                            PRIu64 "+%" PRIu64 " is misaligned, outside the blob section [%"
                            PRIu64 ", %" PRIu64 ") or overlaps the previous blob", f, layer,
                            expert, r->offset, r->stored_size, p->h.blobs_offset, p->h.blobs_end);
    return 0;
}

static int load_entries(struct moe_pack *p, struct moe_diag *diag)
{
    const struct pack_header *h = &p->h;
    uint64_t n = (uint64_t)h->n_layer * h->n_expert;
    size_t bytes = (size_t)n * sizeof(struct pack_entry_rec);
    struct pack_entry_rec *raw = moe_malloc(bytes);
    p->e = moe_calloc((size_t)n, sizeof(*p->e));
    if (raw == NULL || p->e == NULL) {
        moe_free(raw);
        return moe_diag_set(diag, -ENOMEM, "%s: out of memory", p->path);
    }
    int rc = rd(p, h->index_offset, raw, bytes, diag);
    if (rc < 0) {
        moe_free(raw);
        return rc;
    }
    uint64_t prev_end = h->blobs_offset;
    for (uint64_t i = 0; i < n; i++) {
        struct pentry *pe = &p->e[i];
        pe->r = raw[i];
        pe->prev_end = prev_end;
        pe->err = entry_check(p, (uint32_t)(i / h->n_expert), (uint32_t)(i % h->n_expert), pe,
                              NULL);
        if (pe->err) {
            p->n_bad++;
        } else if (pe->r.stored_size) {
            prev_end = pe->r.offset + pe->r.stored_size;
            if (pe->r.stored_size > p->max_stored)
                p->max_stored = pe->r.stored_size;
        }
    }
    moe_free(raw);
    return 0;
}

static int open_common(struct moe_pack *p, uint64_t file_size, struct moe_diag *diag)
{
    if (file_size < MOE_PACK_BLOB_ALIGN)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: %" PRIu64 " bytes, too small for a .moe pack",
                            p->path, file_size);
    int rc = rd(p, 0, &p->h, sizeof(p->h), diag);
    if (rc < 0)
        return rc;
    if ((rc = check_header(p, file_size, diag)) < 0 || (rc = check_tensors(p, diag)) < 0 ||
        (rc = load_entries(p, diag)) < 0)
        return rc;
    const uint8_t *dense;
    if (p->mem) {
        dense = p->mem + p->h.dense_offset;
    } else {
        p->map_len = (size_t)(p->h.dense_offset + p->h.dense_size);
        p->map = mmap(NULL, p->map_len, PROT_READ, MAP_PRIVATE, p->fd, 0);
        if (p->map == MAP_FAILED) {
            p->map = NULL;
            return moe_diag_set(diag, -errno, "%s: mmap of the dense section: %s", p->path,
                                strerror(errno));
        }
        dense = (const uint8_t *)p->map + p->h.dense_offset;
    }
    char name[600];
    snprintf(name, sizeof(name), "%s (dense section)", p->path);
    return moe_gguf_open_mem(&p->gguf, dense, (size_t)p->h.dense_size, name, diag);
}

static int pack_new(struct moe_pack **out, const char *name, unsigned flags, struct moe_diag *diag)
{
    *out = moe_calloc(1, sizeof(**out));
    if (*out == NULL)
        return moe_diag_set(diag, -ENOMEM, "%s: out of memory", name);
    (*out)->fd = -1;
    (*out)->flags = flags;
    (*out)->path = moe_strndup(name, strlen(name));
    if ((*out)->path == NULL) {
        moe_free(*out);
        *out = NULL;
        return moe_diag_set(diag, -ENOMEM, "%s: out of memory", name);
    }
    return 0;
}

int moe_pack_open(struct moe_pack **out, const char *path, unsigned flags, struct moe_diag *diag)
{
    *out = NULL;
    struct moe_pack *p;
    int rc = pack_new(&p, path, flags, diag);
    if (rc < 0)
        return rc;
    p->fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (p->fd < 0 || fstat(p->fd, &st) < 0) {
        rc = moe_diag_set(diag, -errno, "%s: %s", path, strerror(errno));
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = moe_diag_set(diag, MOE_EFORMAT, "%s: not a regular file", path);
        goto fail;
    }
    rc = open_common(p, (uint64_t)st.st_size, diag);
    if (rc < 0)
        goto fail;
    *out = p;
    return 0;
fail:
    moe_pack_close(p);
    return rc;
}

int moe_pack_open_mem(struct moe_pack **out, const void *buf, size_t len, const char *name,
                      unsigned flags, struct moe_diag *diag)
{
    *out = NULL;
    struct moe_pack *p;
    int rc = pack_new(&p, name ? name : "(memory)", flags, diag);
    if (rc < 0)
        return rc;
    p->mem = len ? buf : (const uint8_t *)"";
    p->mem_len = len;
    rc = open_common(p, len, diag);
    if (rc < 0) {
        moe_pack_close(p);
        return rc;
    }
    *out = p;
    return 0;
}

void moe_pack_close(struct moe_pack *p)
{
    if (p == NULL)
        return;
    moe_gguf_close(p->gguf);
    if (p->map)
        munmap(p->map, p->map_len);
    if (p->fd >= 0)
        close(p->fd);
    moe_free(p->e);
    moe_free(p->recs);
    moe_free(p->layouts);
    moe_free(p->path);
    moe_free(p);
}

const char *moe_pack_path(const struct moe_pack *p) { return p->path; }
uint64_t moe_pack_file_size(const struct moe_pack *p) { return p->h.file_size; }
uint32_t moe_pack_n_layer(const struct moe_pack *p) { return p->h.n_layer; }
uint32_t moe_pack_n_expert(const struct moe_pack *p) { return p->h.n_expert; }
void moe_pack_drop_cache(const struct moe_pack *p)
{
    if (p->map == NULL)
        return;
    (void)madvise(p->map, p->map_len, MADV_DONTNEED);
    (void)posix_fadvise(p->fd, 0, (off_t)p->map_len, POSIX_FADV_DONTNEED);
}

const struct moe_gguf *moe_pack_gguf(const struct moe_pack *p) { return p->gguf; }
uint64_t moe_pack_max_raw(const struct moe_pack *p) { return p->max_raw; }
uint64_t moe_pack_max_stored(const struct moe_pack *p) { return p->max_stored; }
uint64_t moe_pack_n_bad_entries(const struct moe_pack *p) { return p->n_bad; }

const struct moe_expert_layout *moe_pack_layout(const struct moe_pack *p, uint32_t layer)
{
    if (layer >= p->h.n_layer || p->layouts[layer].n_slices == 0)
        return NULL;
    return &p->layouts[layer];
}

int moe_pack_blob(const struct moe_pack *p, uint32_t layer, uint32_t expert,
                  struct moe_pack_blob *out, struct moe_diag *diag)
{
    memset(out, 0, sizeof(*out));
    if (layer >= p->h.n_layer || expert >= p->h.n_expert || p->layouts[layer].n_slices == 0)
        return moe_diag_set(diag, -ENOENT, "%s: no expert (layer %u, expert %u): the pack has %u "
                            "layers x %u experts%s", p->path, layer, expert, p->h.n_layer,
                            p->h.n_expert, layer < p->h.n_layer && expert < p->h.n_expert ?
                            " and this layer has none" : "");
    const struct pentry *pe = &p->e[(uint64_t)layer * p->h.n_expert + expert];
    if (pe->err)
        return entry_check(p, layer, expert, pe, diag);
    out->layer = layer;
    out->expert = expert;
    out->codec = pe->r.codec;
    out->offset = pe->r.offset;
    out->stored_size = pe->r.stored_size;
    out->raw_size = pe->r.raw_size;
    out->xxh3 = pe->r.xxh3;
    return 0;
}

int moe_pack_check_blob(const struct moe_pack *p, const struct moe_pack_blob *b,
                        const void *stored, struct moe_diag *diag)
{
    uint64_t x = XXH3_64bits(stored, (size_t)b->stored_size);
    if (x != b->xxh3)
        return moe_diag_set(diag, MOE_ECHECKSUM, "%s: blob (layer %u, expert %u) at offset 0x%"
                            PRIx64 ": checksum %016" PRIx64 ", index says %016" PRIx64,
                            p->path, b->layer, b->expert, b->offset, x, b->xxh3);
    return 0;
}

int moe_pack_decode_blob(const struct moe_pack *p, const struct moe_pack_blob *b,
                         struct moe_codec_dctx *d, const void *stored, void *dst, size_t dst_size,
                         struct moe_diag *diag)
{
    if (dst_size != b->raw_size)
        return moe_diag_set(diag, -EINVAL, "%s: expert (layer %u, expert %u): destination of %zu "
                            "bytes, the expert has %" PRIu64, p->path, b->layer, b->expert,
                            dst_size, b->raw_size);
    int rc = moe_pack_check_blob(p, b, stored, diag);
    if (rc < 0)
        return rc;
    const struct moe_expert_layout *L = &p->layouts[b->layer];
    struct moe_diag dd = {0};
    rc = moe_codec_decode(d, b->codec, dst, dst_size, stored, (size_t)b->stored_size, L->groups,
                          L->n_groups, &dd);
    if (rc < 0)
        return moe_diag_set(diag, rc, "%s: blob (layer %u, expert %u) at offset 0x%" PRIx64 ": %s",
                            p->path, b->layer, b->expert, b->offset, dd.msg);
    return 0;
}

int moe_pack_read_expert(const struct moe_pack *p, uint32_t layer, uint32_t expert,
                         void *dst, size_t dst_size, struct moe_codec_dctx *d,
                         struct moe_diag *diag)
{
    struct moe_pack_blob b;
    int rc = moe_pack_blob(p, layer, expert, &b, diag);
    if (rc < 0)
        return rc;
    struct moe_codec_dctx *own = NULL;
    uint8_t *buf = moe_malloc((size_t)b.stored_size);
    if (buf == NULL || (d == NULL && moe_codec_dctx_create(&own) < 0)) {
        rc = moe_diag_set(diag, -ENOMEM, "%s: out of memory", p->path);
        goto out;
    }
    rc = rd(p, b.offset, buf, (size_t)b.stored_size, diag);
    if (rc == 0)
        rc = moe_pack_decode_blob(p, &b, d ? d : own, buf, dst, dst_size, diag);
out:
    moe_codec_dctx_destroy(own);
    moe_free(buf);
    return rc;
}

int moe_pack_verify_dense(const struct moe_pack *p, struct moe_diag *diag)
{
    const uint8_t *dense = p->mem ? p->mem + p->h.dense_offset
                                  : (const uint8_t *)p->map + p->h.dense_offset;
    uint64_t x = XXH3_64bits(dense, (size_t)p->h.dense_size);
    if (x != p->h.dense_xxh3)
        return moe_diag_set(diag, MOE_ECHECKSUM, "%s: dense section (%" PRIu64 " bytes at 0x%"
                            PRIx64 "): checksum %016" PRIx64 ", header says %016" PRIx64, p->path,
                            p->h.dense_size, p->h.dense_offset, x, p->h.dense_xxh3);
    return 0;
}

/* The layer's dtype signature, "Q4_K+Q6_K", for ratio statistics. */
static void types_of(const struct moe_expert_layout *L, char *buf, size_t n)
{
    buf[0] = 0;
    size_t len = 0;
    for (uint32_t k = 0; k < L->n_slices; k++) {
        bool seen = false;
        for (uint32_t j = 0; j < k; j++)
            seen |= L->s[j].dtype == L->s[k].dtype;
        if (seen)
            continue;
        int w = snprintf(buf + len, n - len, "%s%s", len ? "+" : "", moe_dtype_name(L->s[k].dtype));
        if (w < 0 || (size_t)w >= n - len)
            break;
        len += (size_t)w;
    }
}

void moe_pack_stats_add(struct moe_pack_stats *st, const struct moe_expert_layout *L,
                        uint64_t raw, uint64_t stored, bool compressed)
{
    char types[48];
    types_of(L, types, sizeof(types));
    st->n_blobs++;
    st->n_compressed += compressed;
    st->raw_bytes += raw;
    st->stored_bytes += stored;
    unsigned k = 0;
    while (k < st->n_ratios && strcmp(st->ratios[k].types, types) != 0)
        k++;
    if (k == st->n_ratios) {
        if (k == MOE_PACK_MAX_RATIOS)
            return;
        st->n_ratios++;
        snprintf(st->ratios[k].types, sizeof(st->ratios[k].types), "%s", types);
    }
    struct moe_pack_ratio *r = &st->ratios[k];
    r->n_blobs++;
    r->n_compressed += compressed;
    r->raw_bytes += raw;
    r->stored_bytes += stored;
}

void moe_pack_stats_of(const struct moe_pack *p, struct moe_pack_stats *st)
{
    memset(st, 0, sizeof(*st));
    st->dense_bytes = p->h.dense_size;
    st->file_size = p->h.file_size;
    for (uint32_t l = 0; l < p->h.n_layer; l++) {
        const struct moe_expert_layout *L = &p->layouts[l];
        if (L->n_slices == 0)
            continue;
        for (uint32_t e = 0; e < p->h.n_expert; e++) {
            const struct pentry *pe = &p->e[(uint64_t)l * p->h.n_expert + e];
            if (pe->err == 0)
                moe_pack_stats_add(st, L, pe->r.raw_size, pe->r.stored_size,
                                   pe->r.codec != MOE_CODEC_RAW);
        }
    }
}
