/* GGUF reader (versions 2 and 3).
 *
 * moe_gguf_open() parses and validates the whole header (metadata and tensor
 * infos) and keeps it in memory; tensor bytes stay on disk and are reached by
 * pread (moe_gguf_pread) or through a read-only mapping (moe_gguf_map).
 *
 * Validation: every count, length and offset is checked against the bytes
 * left in the file before it sizes anything; every size product is checked
 * for overflow; caps below bound metadata, strings, dims and alignment.
 * Tensors must be known types, have 1..4 dims each >= 1, rows a multiple of
 * the block size, offsets aligned, inside the data section, not overlapping.
 * Keys and tensor names must be unique. Any violation is MOE_EFORMAT with a
 * message naming the file and the field, except: MOE_ELIMIT for the string,
 * nesting and total-metadata caps, MOE_EUNSUPPORTED for GGUF v1 and
 * big-endian files (doc/gguf.md has the table).
 *
 * Split sets (`<name>-00001-of-0000N.gguf`, the `split.*` keys that
 * llama.cpp's gguf-split writes): opening the first part opens every part,
 * checks that each is the part its name says, of the same set (split.no,
 * split.count, split.tensors.count, no tensor twice) and presents one model:
 * the metadata of the first part, the tensors of all. A missing part, a part
 * of another set or a mismatched count is MOE_EFORMAT naming the part;
 * opening a later part names the first one to open instead.
 *
 * Ownership: the struct moe_gguf owns everything it returns; pointers from
 * getters stay valid until moe_gguf_close(). Strings in values are NOT
 * NUL-terminated (GGUF strings may contain NUL): use .len. Keys and tensor
 * names are NUL-terminated (embedded NUL is rejected).
 * Threading: after open, all getters and moe_gguf_pread are thread-safe;
 * moe_gguf_map must not race with itself.
 */
#ifndef MOE_IO_GGUF_H
#define MOE_IO_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Caps (see doc/gguf.md for why these values). */
#define MOE_GGUF_MAX_META_BYTES  (512ull << 20) /* header bytes parsed + allocated */
#define MOE_GGUF_MAX_STRING      (16ull << 20)  /* one string value */
#define MOE_GGUF_MAX_KEY         1024u          /* one key */
#define MOE_GGUF_MAX_NAME        64u            /* tensor name incl. NUL, as ggml */
#define MOE_GGUF_MAX_DIMS        4u             /* GGML_MAX_DIMS */
#define MOE_GGUF_MAX_ALIGNMENT   (1u << 20)
#define MOE_GGUF_MAX_DEPTH       8u             /* nested arrays */
#define MOE_GGUF_DEFAULT_ALIGNMENT 32u

/* GGUF metadata value types (on-disk ids). */
enum moe_gguf_type {
    MOE_GGUF_UINT8   = 0,
    MOE_GGUF_INT8    = 1,
    MOE_GGUF_UINT16  = 2,
    MOE_GGUF_INT16   = 3,
    MOE_GGUF_UINT32  = 4,
    MOE_GGUF_INT32   = 5,
    MOE_GGUF_FLOAT32 = 6,
    MOE_GGUF_BOOL    = 7,
    MOE_GGUF_STRING  = 8,
    MOE_GGUF_ARRAY   = 9,
    MOE_GGUF_UINT64  = 10,
    MOE_GGUF_INT64   = 11,
    MOE_GGUF_FLOAT64 = 12,
    MOE_GGUF_TYPE_COUNT
};

struct moe_gguf_str {
    const char *ptr;  /* not NUL-terminated */
    uint64_t    len;
};

struct moe_gguf_value {
    enum moe_gguf_type type;
    union {
        uint64_t u64;          /* UINT8/16/32/64 */
        int64_t  i64;          /* INT8/16/32/64 */
        double   f64;          /* FLOAT32/64 (FLOAT32 widened exactly) */
        bool     b;            /* BOOL */
        struct moe_gguf_str str;
        struct {
            enum moe_gguf_type elem_type;
            uint64_t n;
            /* Element storage, by elem_type:
             *  scalars: packed little-endian values exactly as on disk
             *           (elem size from moe_gguf_type_size), host-aligned;
             *  STRING:  struct moe_gguf_str[n];
             *  ARRAY:   struct moe_gguf_value[n] (each of type ARRAY). */
            const void *data;
        } arr;
    } v;
};

struct moe_gguf_kv {
    const char *key;   /* NUL-terminated */
    struct moe_gguf_value value;
    uint64_t file_offset;  /* where the key starts, for messages */
};

struct moe_gguf_tensor {
    const char *name;          /* NUL-terminated, < MOE_GGUF_MAX_NAME bytes */
    uint32_t    n_dims;        /* 1..4 */
    uint64_t    ne[MOE_GGUF_MAX_DIMS]; /* elements per dim, ne[0] fastest; unused = 1 */
    uint32_t    dtype;         /* enum moe_dtype */
    uint64_t    offset;        /* relative to the data section of its part */
    uint64_t    size;          /* bytes */
    uint64_t    n_elements;
    uint32_t    part;          /* split sets: the file holding it, 0 = the first */
};

struct moe_gguf;

/* Opens and validates `path`. On failure *out is NULL, nothing is leaked and
 * diag names the file and field. */
int moe_gguf_open(struct moe_gguf **out, const char *path, struct moe_diag *diag);

/* Same, over a caller's buffer (fuzzing, tests, packs). `name` is used in
 * messages. The buffer must outlive the object; tensor data is read from it. */
int moe_gguf_open_mem(struct moe_gguf **out, const void *buf, size_t len,
                      const char *name, struct moe_diag *diag);

void moe_gguf_close(struct moe_gguf *g);

const char *moe_gguf_path(const struct moe_gguf *g);
uint32_t    moe_gguf_version(const struct moe_gguf *g);
uint32_t    moe_gguf_alignment(const struct moe_gguf *g);
uint64_t    moe_gguf_file_size(const struct moe_gguf *g);   /* a split set: all parts */
uint64_t    moe_gguf_data_offset(const struct moe_gguf *g); /* absolute */

uint64_t moe_gguf_n_kv(const struct moe_gguf *g);
const struct moe_gguf_kv *moe_gguf_kv_at(const struct moe_gguf *g, uint64_t i);
/* NULL when absent. O(log n). */
const struct moe_gguf_kv *moe_gguf_find_kv(const struct moe_gguf *g, const char *key);

uint64_t moe_gguf_n_tensors(const struct moe_gguf *g);
const struct moe_gguf_tensor *moe_gguf_tensor_at(const struct moe_gguf *g, uint64_t i);
const struct moe_gguf_tensor *moe_gguf_find_tensor(const struct moe_gguf *g, const char *name);

/* Typed getters. Return 0; -ENOENT when the key is absent (diag untouched);
 * MOE_EFORMAT with a message when present with a type that cannot represent
 * the request (any integer type converts if the value fits; FLOAT32/64 for
 * floats; a negative value never converts to unsigned). */
int moe_gguf_get_u64(const struct moe_gguf *g, const char *key, uint64_t *out, struct moe_diag *diag);
int moe_gguf_get_u32(const struct moe_gguf *g, const char *key, uint32_t *out, struct moe_diag *diag);
int moe_gguf_get_i64(const struct moe_gguf *g, const char *key, int64_t *out, struct moe_diag *diag);
int moe_gguf_get_f32(const struct moe_gguf *g, const char *key, float *out, struct moe_diag *diag);
int moe_gguf_get_bool(const struct moe_gguf *g, const char *key, bool *out, struct moe_diag *diag);
int moe_gguf_get_str(const struct moe_gguf *g, const char *key, struct moe_gguf_str *out, struct moe_diag *diag);
/* Array of elem_type (MOE_GGUF_TYPE_COUNT = any). */
int moe_gguf_get_arr(const struct moe_gguf *g, const char *key, enum moe_gguf_type elem_type,
                     const struct moe_gguf_value **out, struct moe_diag *diag);

/* Element size in bytes of a scalar type; 0 for STRING/ARRAY/invalid. */
size_t moe_gguf_type_size(enum moe_gguf_type t);
const char *moe_gguf_type_name(uint32_t t);

/* Split sets: the number of files (1 for a single file) and each one's
 * path (0 = the file opened). */
uint32_t moe_gguf_n_parts(const struct moe_gguf *g);
const char *moe_gguf_part_path(const struct moe_gguf *g, uint32_t part);
/* Where tensor t's bytes start in its part's file (absolute offset). */
uint64_t moe_gguf_tensor_file_offset(const struct moe_gguf *g, const struct moe_gguf_tensor *t);

/* Reads n bytes at `off` within tensor t into dst with pread (or memcpy for
 * _open_mem). Range-checked against the tensor: -EINVAL past its end. */
int moe_gguf_pread(const struct moe_gguf *g, const struct moe_gguf_tensor *t,
                   uint64_t off, void *dst, size_t n, struct moe_diag *diag);

/* Maps the data section read-only (idempotent). After success,
 * moe_gguf_tensor_data() returns the tensor's bytes; before, NULL. */
int moe_gguf_map(struct moe_gguf *g, struct moe_diag *diag);
const void *moe_gguf_tensor_data(const struct moe_gguf *g, const struct moe_gguf_tensor *t);

/* Fills the page tables of every part's mapping now (MADV_POPULATE_READ,
 * reading what the page cache lacks), as llama.cpp maps with MAP_POPULATE:
 * for weights that stay resident, so that the first forward pass does not
 * take a page fault per few pages of weights (measured: a first pass over a
 * fresh 2.6 GB mapping streamed 10 GB/s, a mapped one 27). Best effort: 0,
 * or -errno (-EINVAL on kernels before 5.14); the mapping works either way.
 * Call after moe_gguf_map. */
int moe_gguf_populate(struct moe_gguf *g);

/* Copies the n bytes that p points to, inside the mapping of one of g's
 * parts, into dst. A file is read with pread through a descriptor of its
 * own set to POSIX_FADV_RANDOM: exactly those bytes, none of the
 * neighbouring tensors' that a page fault on the mapping would read around
 * it (read_ahead_kb, often MiBs); an in-memory source is copied. 0, -EINVAL
 * where [p, p + n) is not inside one part's mapping, or -errno (diag
 * names the file). Call after moe_gguf_map. */
/* Whether [p, p + n) lies inside the mapping of one of g's parts. */
bool moe_gguf_maps(const struct moe_gguf *g, const void *p, size_t n);

int moe_gguf_read_mapped(const struct moe_gguf *g, const void *p, size_t n, void *dst,
                         struct moe_diag *diag);

/* Gives back the page cache behind every part's mapping: unmaps its pages
 * (MADV_DONTNEED; the mapping stays valid, a later access reads the file
 * again) and asks the kernel to drop the file's clean cached pages
 * (POSIX_FADV_DONTNEED), so that under a memory cgroup they stop counting
 * against the limit. Best effort; nothing for an in-memory source. */
void moe_gguf_drop_cache(struct moe_gguf *g);

#ifdef __cplusplus
}
#endif

#endif
