/* GGUF reader: parse and validate the header, then serve tensor bytes.
 *
 * The file is read through a bounds-checked cursor (pread into a buffer, or
 * a caller's memory buffer). Nothing is sized from the file before it has
 * been checked against the bytes that remain, so a hostile count can at most
 * make us allocate in proportion to the file, and never above the metadata
 * cap. Parsed values live in an arena owned by struct moe_gguf.
 *
 * Layout (GGUF v2/v3, little-endian):
 *   magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
 *   n_kv x (string key | u32 type | value)
 *   n_tensors x (string name | u32 n_dims | u64 ne[n_dims] | u32 type | u64 offset)
 *   padding to general.alignment | data section
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdalign.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/alloc.h"
#include "io/file.h"
#include "io/gguf.h"
#include "common/dtype.h"

#define CURSOR_BUF (1u << 20)

/* Smallest encodings, used to bound counts by the bytes left:
 * kv = key len (8) + 1 key byte + type (4) + 1 value byte;
 * tensor info = name len (8) + 1 + n_dims (4) + one dim (8) + type (4) + offset (8). */
#define MIN_KV_BYTES     14u
#define MIN_TINFO_BYTES  33u

struct arena_chunk {
    struct arena_chunk *next;
    size_t used, cap;
    alignas(max_align_t) unsigned char data[];
};

struct moe_gguf {
    char *name;                 /* path or caller's name, for messages */
    int fd;                     /* -1 for an in-memory source */
    const uint8_t *mem;         /* in-memory source, or NULL */
    uint64_t file_size;
    uint32_t version;
    uint32_t alignment;
    uint64_t data_offset;

    uint64_t n_kv;
    struct moe_gguf_kv *kv;
    uint64_t *kv_by_key;        /* indices into kv, sorted by key */

    uint64_t n_tensors;
    struct moe_gguf_tensor *tensors;
    uint64_t *t_by_name;        /* indices into tensors, sorted by name */

    struct arena_chunk *arena;
    uint64_t meta_bytes;        /* arena bytes handed out, against the cap */

    const uint8_t *map;         /* whole-file mapping (or mem) after map() */
    size_t map_len;

    struct moe_gguf **parts;    /* split sets: parts 2..n_parts, owned */
    uint32_t n_parts;           /* 1 for a single file */
};

struct cursor {
    struct moe_gguf *g;
    struct moe_diag *diag;
    uint64_t pos;
    uint8_t *buf;               /* fd source: window [buf_pos, buf_pos + buf_len) */
    uint64_t buf_pos;
    size_t buf_len;
    char ctx[160];              /* what is being parsed, for messages */
};

/* ---- errors ---------------------------------------------------------- */

static int failf(struct cursor *c, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int failf(struct cursor *c, int code, const char *fmt, ...)
{
    char what[320];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof(what), fmt, ap);
    va_end(ap);
    return moe_diag_set(c->diag, code, "%s: %s%s%s", c->g->name, c->ctx,
                        c->ctx[0] ? ": " : "", what);
}

static uint64_t left(const struct cursor *c)
{
    return c->pos <= c->g->file_size ? c->g->file_size - c->pos : 0;
}

static int open_split(struct moe_gguf *g, struct moe_diag *diag);

/* ---- arena ----------------------------------------------------------- */

static void *arena_alloc(struct cursor *c, uint64_t n)
{
    struct moe_gguf *g = c->g;
    uint64_t rounded = (n + 15) & ~(uint64_t)15;
    if (rounded < n || rounded > MOE_GGUF_MAX_META_BYTES - g->meta_bytes) {
        failf(c, MOE_ELIMIT, "metadata needs more than the %llu MiB cap",
              (unsigned long long)(MOE_GGUF_MAX_META_BYTES >> 20));
        return NULL;
    }
    struct arena_chunk *a = g->arena;
    if (a == NULL || a->cap - a->used < rounded) {
        size_t cap = rounded > (256u << 10) ? (size_t)rounded : (256u << 10);
        a = moe_malloc(sizeof(*a) + cap);
        if (a == NULL) {
            failf(c, -ENOMEM, "out of memory allocating %zu bytes", cap);
            return NULL;
        }
        a->used = 0;
        a->cap = cap;
        /* A big private chunk goes behind the current one, so the current
         * chunk's free space stays usable for small items. */
        if (g->arena != NULL && rounded > (256u << 10)) {
            a->next = g->arena->next;
            g->arena->next = a;
        } else {
            a->next = g->arena;
            g->arena = a;
        }
    }
    void *p = a->data + a->used;
    a->used += rounded;
    g->meta_bytes += rounded;
    return p;
}

static void arena_free(struct arena_chunk *a)
{
    while (a != NULL) {
        struct arena_chunk *next = a->next;
        moe_free(a);
        a = next;
    }
}

/* ---- cursor ---------------------------------------------------------- */

static int cur_read(struct cursor *c, void *dst, uint64_t n, const char *field)
{
    struct moe_gguf *g = c->g;
    if (n == 0)
        return 0; /* dst may be NULL (an empty array) */
    if (n > left(c))
        return failf(c, MOE_EFORMAT,
                     "%s: needs %" PRIu64 " bytes at offset 0x%" PRIx64
                     " but only %" PRIu64 " remain (truncated file?)",
                     field, n, c->pos, left(c));
    if (g->mem != NULL) {
        memcpy(dst, g->mem + c->pos, n);
        c->pos += n;
        return 0;
    }
    uint8_t *out = dst;
    while (n > 0) {
        if (c->pos >= c->buf_pos && c->pos < c->buf_pos + c->buf_len) {
            size_t off = (size_t)(c->pos - c->buf_pos);
            size_t k = c->buf_len - off;
            if (k > n)
                k = (size_t)n;
            memcpy(out, c->buf + off, k);
            out += k;
            n -= k;
            c->pos += k;
            continue;
        }
        /* Large reads bypass the window; small ones refill it. */
        int direct = n >= CURSOR_BUF;
        uint8_t *into = direct ? out : c->buf;
        size_t want = direct ? (size_t)n : CURSOR_BUF;
        if (want > left(c))
            want = (size_t)left(c);
        uint64_t at;
        int rc = moe_file_pread(g->fd, into, want, c->pos, &at);
        if (rc == MOE_EFORMAT)
            return failf(c, rc, "%s: file shrank while reading at offset 0x%" PRIx64, field, at);
        if (rc < 0)
            return failf(c, rc, "%s: read at offset 0x%" PRIx64 ": %s", field, at, strerror(-rc));
        const size_t got = want;
        if (direct) {
            out += got;
            n -= got;
            c->pos += got;
        } else {
            c->buf_pos = c->pos;
            c->buf_len = got;
        }
    }
    return 0;
}

static int cur_u32(struct cursor *c, uint32_t *v, const char *field)
{
    uint8_t b[4];
    int rc = cur_read(c, b, 4, field);
    if (rc == 0)
        *v = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
    return rc;
}

static uint64_t le64(const uint8_t *b)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | b[i];
    return v;
}

static int cur_u64(struct cursor *c, uint64_t *v, const char *field)
{
    uint8_t b[8];
    int rc = cur_read(c, b, 8, field);
    if (rc == 0)
        *v = le64(b);
    return rc;
}

/* A GGUF string: u64 length + bytes. Stored NUL-terminated in the arena
 * (the terminator is a convenience; values still carry their length). */
static int cur_string(struct cursor *c, struct moe_gguf_str *s, uint64_t max,
                      const char *field)
{
    uint64_t at = c->pos, len;
    int rc = cur_u64(c, &len, field);
    if (rc)
        return rc;
    if (len > max)
        return failf(c, max == MOE_GGUF_MAX_STRING ? MOE_ELIMIT : MOE_EFORMAT,
                     "%s: length %" PRIu64 " at offset 0x%" PRIx64 " exceeds the cap of %" PRIu64,
                     field, len, at, max);
    if (len > left(c))
        return failf(c, MOE_EFORMAT,
                     "%s: length %" PRIu64 " at offset 0x%" PRIx64 " runs past the end of the file"
                     " (%" PRIu64 " bytes left)", field, len, at, left(c));
    char *p = arena_alloc(c, len + 1);
    if (p == NULL)
        return c->diag ? c->diag->code : -ENOMEM;
    rc = cur_read(c, p, len, field);
    if (rc)
        return rc;
    p[len] = '\0';
    s->ptr = p;
    s->len = len;
    return 0;
}

/* ---- values ---------------------------------------------------------- */

size_t moe_gguf_type_size(enum moe_gguf_type t)
{
    switch (t) {
    case MOE_GGUF_UINT8: case MOE_GGUF_INT8: case MOE_GGUF_BOOL: return 1;
    case MOE_GGUF_UINT16: case MOE_GGUF_INT16: return 2;
    case MOE_GGUF_UINT32: case MOE_GGUF_INT32: case MOE_GGUF_FLOAT32: return 4;
    case MOE_GGUF_UINT64: case MOE_GGUF_INT64: case MOE_GGUF_FLOAT64: return 8;
    default: return 0;
    }
}

const char *moe_gguf_type_name(uint32_t t)
{
    static const char *const names[MOE_GGUF_TYPE_COUNT] = {
        "UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32",
        "BOOL", "STRING", "ARRAY", "UINT64", "INT64", "FLOAT64",
    };
    return t < MOE_GGUF_TYPE_COUNT ? names[t] : "?";
}

/* Bytes the smallest element of type t takes in the file. */
static uint64_t min_elem_bytes(enum moe_gguf_type t)
{
    if (t == MOE_GGUF_STRING)
        return 8;
    if (t == MOE_GGUF_ARRAY)
        return 12;
    return moe_gguf_type_size(t);
}

static int parse_scalar(struct cursor *c, struct moe_gguf_value *v, const uint8_t *b)
{
    switch (v->type) {
    case MOE_GGUF_UINT8:  v->v.u64 = b[0]; break;
    case MOE_GGUF_INT8:   v->v.i64 = (int8_t)b[0]; break;
    case MOE_GGUF_UINT16: v->v.u64 = (uint16_t)(b[0] | b[1] << 8); break;
    case MOE_GGUF_INT16:  v->v.i64 = (int16_t)(uint16_t)(b[0] | b[1] << 8); break;
    case MOE_GGUF_UINT32: v->v.u64 = (uint32_t)le64((const uint8_t[8]){ b[0], b[1], b[2], b[3] }); break;
    case MOE_GGUF_INT32:  v->v.i64 = (int32_t)(uint32_t)le64((const uint8_t[8]){ b[0], b[1], b[2], b[3] }); break;
    case MOE_GGUF_UINT64: v->v.u64 = le64(b); break;
    case MOE_GGUF_INT64:  v->v.i64 = (int64_t)le64(b); break;
    case MOE_GGUF_FLOAT32: {
        uint32_t u = (uint32_t)le64((const uint8_t[8]){ b[0], b[1], b[2], b[3] });
        float f;
        memcpy(&f, &u, 4);
        v->v.f64 = f;
        break;
    }
    case MOE_GGUF_FLOAT64: {
        uint64_t u = le64(b);
        memcpy(&v->v.f64, &u, 8);
        break;
    }
    case MOE_GGUF_BOOL:
        if (b[0] > 1)
            return failf(c, MOE_EFORMAT, "bool value %u at offset 0x%" PRIx64 ", expected 0 or 1",
                         b[0], c->pos - 1);
        v->v.b = b[0] != 0;
        break;
    default:
        MOE_ASSERT(0);
    }
    return 0;
}

static int parse_value(struct cursor *c, struct moe_gguf_value *v, uint32_t type, unsigned depth);

static int parse_array(struct cursor *c, struct moe_gguf_value *v, unsigned depth)
{
    uint64_t at = c->pos;
    uint32_t et;
    uint64_t n;
    int rc = cur_u32(c, &et, "array element type");
    if (rc)
        return rc;
    if (et >= MOE_GGUF_TYPE_COUNT)
        return failf(c, MOE_EFORMAT, "array element type %u at offset 0x%" PRIx64
                     ", expected 0..%d", et, at, MOE_GGUF_TYPE_COUNT - 1);
    if (et == MOE_GGUF_ARRAY && depth + 1 >= MOE_GGUF_MAX_DEPTH)
        return failf(c, MOE_ELIMIT, "arrays nested deeper than %u at offset 0x%" PRIx64,
                     MOE_GGUF_MAX_DEPTH, at);
    if ((rc = cur_u64(c, &n, "array length")))
        return rc;
    uint64_t need;
    if (__builtin_mul_overflow(n, min_elem_bytes(et), &need) || need > left(c))
        return failf(c, MOE_EFORMAT, "array of %" PRIu64 " %s at offset 0x%" PRIx64
                     " does not fit in the %" PRIu64 " bytes left",
                     n, moe_gguf_type_name(et), at, left(c));
    v->v.arr.elem_type = et;
    v->v.arr.n = n;
    v->v.arr.data = NULL;
    if (et == MOE_GGUF_STRING) {
        struct moe_gguf_str *s = n ? arena_alloc(c, n * sizeof(*s)) : NULL;
        if (n && s == NULL)
            return c->diag ? c->diag->code : -ENOMEM;
        for (uint64_t i = 0; i < n; i++) {
            char field[48];
            snprintf(field, sizeof(field), "string [%" PRIu64 "]", i);
            if ((rc = cur_string(c, &s[i], MOE_GGUF_MAX_STRING, field)))
                return rc;
        }
        v->v.arr.data = s;
    } else if (et == MOE_GGUF_ARRAY) {
        struct moe_gguf_value *a = n ? arena_alloc(c, n * sizeof(*a)) : NULL;
        if (n && a == NULL)
            return c->diag ? c->diag->code : -ENOMEM;
        for (uint64_t i = 0; i < n; i++)
            if ((rc = parse_value(c, &a[i], MOE_GGUF_ARRAY, depth + 1)))
                return rc;
        v->v.arr.data = a;
    } else {
        uint64_t bytes = n * moe_gguf_type_size(et); /* <= left(c), checked above */
        uint8_t *d = bytes ? arena_alloc(c, bytes) : NULL;
        if (bytes && d == NULL)
            return c->diag ? c->diag->code : -ENOMEM;
        if ((rc = cur_read(c, d, bytes, "array data")))
            return rc;
        if (et == MOE_GGUF_BOOL)
            for (uint64_t i = 0; i < n; i++)
                if (d[i] > 1)
                    return failf(c, MOE_EFORMAT, "bool element [%" PRIu64 "] is %u, expected 0 or 1",
                                 i, d[i]);
        v->v.arr.data = d;
    }
    return 0;
}

static int parse_value(struct cursor *c, struct moe_gguf_value *v, uint32_t type, unsigned depth)
{
    v->type = (enum moe_gguf_type)type;
    if (type == MOE_GGUF_STRING)
        return cur_string(c, &v->v.str, MOE_GGUF_MAX_STRING, "string");
    if (type == MOE_GGUF_ARRAY)
        return parse_array(c, v, depth);
    uint8_t b[8];
    int rc = cur_read(c, b, moe_gguf_type_size((enum moe_gguf_type)type), moe_gguf_type_name(type));
    return rc ? rc : parse_scalar(c, v, b);
}

/* ---- sorting and lookup ---------------------------------------------- */

/* Sorted index arrays: qsort with a context needs a global or qsort_r;
 * qsort_r is a GNU/BSD extension we already rely on via _GNU_SOURCE. */
static int cmp_kv(const void *a, const void *b, void *ctx)
{
    const struct moe_gguf *g = ctx;
    return strcmp(g->kv[*(const uint64_t *)a].key, g->kv[*(const uint64_t *)b].key);
}

static int cmp_tname(const void *a, const void *b, void *ctx)
{
    const struct moe_gguf *g = ctx;
    return strcmp(g->tensors[*(const uint64_t *)a].name, g->tensors[*(const uint64_t *)b].name);
}

static int cmp_toff(const void *a, const void *b, void *ctx)
{
    const struct moe_gguf *g = ctx;
    uint64_t x = g->tensors[*(const uint64_t *)a].offset, y = g->tensors[*(const uint64_t *)b].offset;
    return x < y ? -1 : x > y;
}

static uint64_t *sorted_index(struct cursor *c, uint64_t n,
                              int (*cmp)(const void *, const void *, void *))
{
    uint64_t *idx = arena_alloc(c, (n ? n : 1) * sizeof(uint64_t));
    if (idx == NULL)
        return NULL;
    for (uint64_t i = 0; i < n; i++)
        idx[i] = i;
    qsort_r(idx, (size_t)n, sizeof(uint64_t), cmp, c->g);
    return idx;
}

/* ---- header ---------------------------------------------------------- */

static int parse_kvs(struct cursor *c)
{
    struct moe_gguf *g = c->g;
    int rc;
    for (uint64_t i = 0; i < g->n_kv; i++) {
        struct moe_gguf_kv *kv = &g->kv[i];
        struct moe_gguf_str key;
        kv->file_offset = c->pos;
        snprintf(c->ctx, sizeof(c->ctx), "kv #%" PRIu64, i);
        if ((rc = cur_string(c, &key, MOE_GGUF_MAX_KEY, "key")))
            return rc;
        if (key.len == 0)
            return failf(c, MOE_EFORMAT, "empty key at offset 0x%" PRIx64, kv->file_offset);
        if (memchr(key.ptr, '\0', key.len) != NULL)
            return failf(c, MOE_EFORMAT, "key contains a NUL byte at offset 0x%" PRIx64,
                         kv->file_offset);
        kv->key = key.ptr;
        snprintf(c->ctx, sizeof(c->ctx), "kv #%" PRIu64 " '%.96s'", i, kv->key);
        uint32_t type;
        uint64_t at = c->pos;
        if ((rc = cur_u32(c, &type, "value type")))
            return rc;
        if (type >= MOE_GGUF_TYPE_COUNT)
            return failf(c, MOE_EFORMAT, "value type %u at offset 0x%" PRIx64 ", expected 0..%d",
                         type, at, MOE_GGUF_TYPE_COUNT - 1);
        if ((rc = parse_value(c, &kv->value, type, 0)))
            return rc;
    }
    c->ctx[0] = '\0';
    g->kv_by_key = sorted_index(c, g->n_kv, cmp_kv);
    if (g->kv_by_key == NULL)
        return c->diag ? c->diag->code : -ENOMEM;
    for (uint64_t i = 1; i < g->n_kv; i++) {
        const struct moe_gguf_kv *a = &g->kv[g->kv_by_key[i - 1]], *b = &g->kv[g->kv_by_key[i]];
        if (strcmp(a->key, b->key) == 0)
            return failf(c, MOE_EFORMAT, "duplicate key '%.96s' at offsets 0x%" PRIx64 " and 0x%" PRIx64,
                         a->key, a->file_offset, b->file_offset);
    }
    return 0;
}

static int parse_alignment(struct cursor *c)
{
    struct moe_gguf *g = c->g;
    const struct moe_gguf_kv *kv = moe_gguf_find_kv(g, "general.alignment");
    g->alignment = MOE_GGUF_DEFAULT_ALIGNMENT;
    if (kv == NULL)
        return 0;
    snprintf(c->ctx, sizeof(c->ctx), "general.alignment");
    if (kv->value.type != MOE_GGUF_UINT32)
        return failf(c, MOE_EFORMAT, "type %s, expected UINT32", moe_gguf_type_name(kv->value.type));
    uint64_t a = kv->value.v.u64;
    if (a == 0 || (a & (a - 1)) != 0 || a > MOE_GGUF_MAX_ALIGNMENT)
        return failf(c, MOE_EFORMAT, "%" PRIu64 ", expected a power of two from 1 to %u",
                     a, MOE_GGUF_MAX_ALIGNMENT);
    g->alignment = (uint32_t)a;
    c->ctx[0] = '\0';
    return 0;
}

static int parse_tensor_info(struct cursor *c, uint64_t i)
{
    struct moe_gguf *g = c->g;
    struct moe_gguf_tensor *t = &g->tensors[i];
    struct moe_gguf_str name;
    uint64_t at = c->pos;
    int rc;
    t->part = 0;
    snprintf(c->ctx, sizeof(c->ctx), "tensor #%" PRIu64, i);
    if ((rc = cur_string(c, &name, MOE_GGUF_MAX_NAME - 1, "name")))
        return rc;
    if (name.len == 0 || memchr(name.ptr, '\0', name.len) != NULL)
        return failf(c, MOE_EFORMAT, "name at offset 0x%" PRIx64 " is empty or contains NUL", at);
    t->name = name.ptr;
    snprintf(c->ctx, sizeof(c->ctx), "tensor '%s'", t->name);
    at = c->pos;
    if ((rc = cur_u32(c, &t->n_dims, "n_dims")))
        return rc;
    if (t->n_dims == 0 || t->n_dims > MOE_GGUF_MAX_DIMS)
        return failf(c, MOE_EFORMAT, "n_dims %u at offset 0x%" PRIx64 ", expected 1..%u",
                     t->n_dims, at, MOE_GGUF_MAX_DIMS);
    uint64_t n_el = 1;
    for (uint32_t d = 0; d < MOE_GGUF_MAX_DIMS; d++) {
        t->ne[d] = 1;
        if (d >= t->n_dims)
            continue;
        at = c->pos;
        if ((rc = cur_u64(c, &t->ne[d], "ne")))
            return rc;
        if (t->ne[d] == 0 || t->ne[d] > INT64_MAX)
            return failf(c, MOE_EFORMAT, "ne[%u] = %" PRIu64 " at offset 0x%" PRIx64
                         ", expected 1..2^63-1", d, t->ne[d], at);
        if (__builtin_mul_overflow(n_el, t->ne[d], &n_el) || n_el > INT64_MAX)
            return failf(c, MOE_EFORMAT, "shape overflows: element count exceeds 2^63-1 at ne[%u]", d);
    }
    t->n_elements = n_el;
    at = c->pos;
    if ((rc = cur_u32(c, &t->dtype, "type")))
        return rc;
    const struct moe_dtype_info *di = moe_dtype_info(t->dtype);
    if (di == NULL)
        return failf(c, MOE_EFORMAT, "type id %u at offset 0x%" PRIx64 " is not a known ggml type",
                     t->dtype, at);
    if (t->ne[0] % di->block_size != 0)
        return failf(c, MOE_EFORMAT, "ne[0] = %" PRIu64 " is not a multiple of the %s block size %u",
                     t->ne[0], di->name, di->block_size);
    uint64_t row = t->ne[0] / di->block_size * di->type_size, size = row;
    for (uint32_t d = 1; d < MOE_GGUF_MAX_DIMS; d++)
        if (__builtin_mul_overflow(size, t->ne[d], &size))
            return failf(c, MOE_EFORMAT, "shape overflows: byte size exceeds 2^64");
    t->size = size;
    at = c->pos;
    if ((rc = cur_u64(c, &t->offset, "offset")))
        return rc;
    if (t->offset % g->alignment != 0)
        return failf(c, MOE_EFORMAT, "offset 0x%" PRIx64 " (at 0x%" PRIx64 ") is not a multiple of"
                     " the alignment %u", t->offset, at, g->alignment);
    return 0;
}

static int check_tensor_layout(struct cursor *c)
{
    struct moe_gguf *g = c->g;
    uint64_t data_size = g->file_size > g->data_offset ? g->file_size - g->data_offset : 0;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const struct moe_gguf_tensor *t = &g->tensors[i];
        snprintf(c->ctx, sizeof(c->ctx), "tensor '%s'", t->name);
        if (t->offset > data_size || t->size > data_size - t->offset)
            return failf(c, MOE_EFORMAT, "data [0x%" PRIx64 ", +%" PRIu64 ") runs past the end of"
                         " the data section (%" PRIu64 " bytes at 0x%" PRIx64 "; truncated file?)",
                         t->offset, t->size, data_size, g->data_offset);
    }
    c->ctx[0] = '\0';
    g->t_by_name = sorted_index(c, g->n_tensors, cmp_tname);
    if (g->t_by_name == NULL)
        return c->diag ? c->diag->code : -ENOMEM;
    for (uint64_t i = 1; i < g->n_tensors; i++) {
        const char *a = g->tensors[g->t_by_name[i - 1]].name, *b = g->tensors[g->t_by_name[i]].name;
        if (strcmp(a, b) == 0)
            return failf(c, MOE_EFORMAT, "duplicate tensor name '%s'", a);
    }
    uint64_t *by_off = sorted_index(c, g->n_tensors, cmp_toff);
    if (by_off == NULL)
        return c->diag ? c->diag->code : -ENOMEM;
    for (uint64_t i = 1; i < g->n_tensors; i++) {
        const struct moe_gguf_tensor *a = &g->tensors[by_off[i - 1]], *b = &g->tensors[by_off[i]];
        if (a->offset + a->size > b->offset) /* no overflow: both inside the file */
            return failf(c, MOE_EFORMAT, "tensors '%s' [0x%" PRIx64 ", +%" PRIu64 ") and '%s'"
                         " [0x%" PRIx64 ", ...) overlap", a->name, a->offset, a->size,
                         b->name, b->offset);
    }
    return 0;
}

static int parse(struct cursor *c)
{
    struct moe_gguf *g = c->g;
    uint8_t magic[4];
    int rc;
    if ((rc = cur_read(c, magic, 4, "magic")))
        return rc;
    if (memcmp(magic, "GGUF", 4) != 0)
        return failf(c, MOE_EFORMAT, "magic is %02x %02x %02x %02x, expected \"GGUF\" (not a GGUF file)",
                     magic[0], magic[1], magic[2], magic[3]);
    if ((rc = cur_u32(c, &g->version, "version")))
        return rc;
    if (g->version != 2 && g->version != 3) {
        uint32_t sw = __builtin_bswap32(g->version);
        if (sw >= 1 && sw <= 3)
            return failf(c, MOE_EUNSUPPORTED, "version: big-endian GGUF (v%u) is not supported", sw);
        if (g->version == 1)
            return failf(c, MOE_EUNSUPPORTED, "version 1 (pre-2023 GGUF) is not supported; expected 2 or 3");
        return failf(c, MOE_EFORMAT, "version %u, expected 2 or 3", g->version);
    }
    if ((rc = cur_u64(c, &g->n_tensors, "n_tensors")) || (rc = cur_u64(c, &g->n_kv, "n_kv")))
        return rc;
    if (g->n_kv > left(c) / MIN_KV_BYTES)
        return failf(c, MOE_EFORMAT, "n_kv %" PRIu64 " cannot fit in the %" PRIu64 " bytes left",
                     g->n_kv, left(c));
    if (g->n_tensors > left(c) / MIN_TINFO_BYTES)
        return failf(c, MOE_EFORMAT, "n_tensors %" PRIu64 " cannot fit in the %" PRIu64 " bytes left",
                     g->n_tensors, left(c));
    /* Counts are now bounded by the file size, so these cannot overflow. */
    g->kv = arena_alloc(c, (g->n_kv ? g->n_kv : 1) * sizeof(*g->kv));
    g->tensors = arena_alloc(c, (g->n_tensors ? g->n_tensors : 1) * sizeof(*g->tensors));
    if (g->kv == NULL || g->tensors == NULL)
        return c->diag ? c->diag->code : -ENOMEM;
    if ((rc = parse_kvs(c)) || (rc = parse_alignment(c)))
        return rc;
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if ((rc = parse_tensor_info(c, i)))
            return rc;
    c->ctx[0] = '\0';
    uint64_t a = g->alignment;
    g->data_offset = (c->pos + a - 1) / a * a; /* pos < 2^63: no overflow */
    if (g->n_tensors > 0 && g->data_offset > g->file_size)
        return failf(c, MOE_EFORMAT, "data section at 0x%" PRIx64 " starts past the end of the file"
                     " (%" PRIu64 " bytes)", g->data_offset, g->file_size);
    return check_tensor_layout(c);
}

static int open_common(struct moe_gguf **out, struct moe_gguf *g, struct moe_diag *diag)
{
    struct cursor c = { .g = g, .diag = diag };
    int rc = 0;
    if (g->mem == NULL) {
        c.buf = moe_malloc(CURSOR_BUF);
        if (c.buf == NULL)
            rc = moe_diag_set(diag, -ENOMEM, "%s: out of memory", g->name);
    }
    if (rc == 0)
        rc = parse(&c);
    moe_free(c.buf);
    if (rc != 0) {
        /* A callee that failed without a message (should not happen) still
         * gets one naming the file. */
        moe_diag_set(diag, rc, "%s: %s", g->name, moe_strerror(rc));
        moe_gguf_close(g);
        return rc;
    }
    *out = g;
    return 0;
}

/* Opens and parses one file into the zeroed g (freed on failure). */
static int open_file(struct moe_gguf *g, const char *path, struct moe_diag *diag)
{
    g->fd = -1;
    g->n_parts = 1;
    g->name = moe_strndup(path, strlen(path));
    if (g->name == NULL) {
        moe_free(g);
        return moe_diag_set(diag, -ENOMEM, "%s: out of memory", path);
    }
    g->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (g->fd < 0) {
        int e = errno;
        moe_gguf_close(g);
        return moe_diag_set(diag, -e, "%s: cannot open: %s", path, strerror(e));
    }
    struct stat st;
    if (fstat(g->fd, &st) != 0) {
        int e = errno;
        moe_gguf_close(g);
        return moe_diag_set(diag, -e, "%s: stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        moe_gguf_close(g);
        return moe_diag_set(diag, -EINVAL, "%s: not a regular file", path);
    }
    g->file_size = (uint64_t)st.st_size;
    struct moe_gguf *done = NULL;
    return open_common(&done, g, diag);
}

int moe_gguf_open(struct moe_gguf **out, const char *path, struct moe_diag *diag)
{
    *out = NULL;
    struct moe_gguf *g = moe_calloc(1, sizeof(*g));
    if (g == NULL)
        return moe_diag_set(diag, -ENOMEM, "%s: out of memory", path);
    int rc = open_file(g, path, diag);
    if (rc)
        return rc;
    if ((rc = open_split(g, diag))) {
        moe_gguf_close(g);
        return rc;
    }
    *out = g;
    return 0;
}

int moe_gguf_open_mem(struct moe_gguf **out, const void *buf, size_t len,
                      const char *name, struct moe_diag *diag)
{
    *out = NULL;
    if (name == NULL)
        name = "(memory)";
    struct moe_gguf *g = moe_calloc(1, sizeof(*g));
    if (g == NULL)
        return moe_diag_set(diag, -ENOMEM, "%s: out of memory", name);
    g->fd = -1;
    g->name = moe_strndup(name, strlen(name));
    if (g->name == NULL) {
        moe_free(g);
        return moe_diag_set(diag, -ENOMEM, "%s: out of memory", name);
    }
    /* A zero-length buffer may come with a NULL pointer; any non-NULL
     * address works as a source for zero reads. */
    g->mem = len ? buf : (const uint8_t *)"";
    g->file_size = len;
    return open_common(out, g, diag);
}

void moe_gguf_close(struct moe_gguf *g)
{
    if (g == NULL)
        return;
    for (uint32_t i = 0; g->parts && i + 1 < g->n_parts; i++)
        moe_gguf_close(g->parts[i]);
    moe_free(g->parts);
    if (g->map != NULL && g->mem == NULL)
        munmap((void *)g->map, g->map_len);
    if (g->fd >= 0)
        close(g->fd);
    arena_free(g->arena);
    moe_free(g->name);
    moe_free(g);
}

/* ---- getters --------------------------------------------------------- */

const char *moe_gguf_path(const struct moe_gguf *g) { return g->name; }
uint32_t moe_gguf_version(const struct moe_gguf *g) { return g->version; }
uint32_t moe_gguf_alignment(const struct moe_gguf *g) { return g->alignment; }
uint64_t moe_gguf_file_size(const struct moe_gguf *g)
{
    uint64_t n = g->file_size;
    for (uint32_t i = 0; g->parts && i + 1 < g->n_parts; i++)
        n += g->parts[i]->file_size;
    return n;
}
uint64_t moe_gguf_data_offset(const struct moe_gguf *g) { return g->data_offset; }
uint64_t moe_gguf_n_kv(const struct moe_gguf *g) { return g->n_kv; }
uint64_t moe_gguf_n_tensors(const struct moe_gguf *g) { return g->n_tensors; }

const struct moe_gguf_kv *moe_gguf_kv_at(const struct moe_gguf *g, uint64_t i)
{
    return i < g->n_kv ? &g->kv[i] : NULL;
}

const struct moe_gguf_tensor *moe_gguf_tensor_at(const struct moe_gguf *g, uint64_t i)
{
    return i < g->n_tensors ? &g->tensors[i] : NULL;
}

const struct moe_gguf_kv *moe_gguf_find_kv(const struct moe_gguf *g, const char *key)
{
    if (g->kv_by_key == NULL)  /* during parsing, before the index exists */
        return NULL;
    uint64_t lo = 0, hi = g->n_kv;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        const struct moe_gguf_kv *kv = &g->kv[g->kv_by_key[mid]];
        int c = strcmp(kv->key, key);
        if (c == 0)
            return kv;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

const struct moe_gguf_tensor *moe_gguf_find_tensor(const struct moe_gguf *g, const char *name)
{
    if (g->t_by_name == NULL)
        return NULL;
    uint64_t lo = 0, hi = g->n_tensors;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        const struct moe_gguf_tensor *t = &g->tensors[g->t_by_name[mid]];
        int c = strcmp(t->name, name);
        if (c == 0)
            return t;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

static int type_err(const struct moe_gguf *g, const struct moe_gguf_kv *kv, const char *want,
                    struct moe_diag *diag)
{
    return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s': type %s, expected %s", g->name, kv->key,
                        moe_gguf_type_name(kv->value.type), want);
}

static int is_unsigned(enum moe_gguf_type t)
{
    return t == MOE_GGUF_UINT8 || t == MOE_GGUF_UINT16 || t == MOE_GGUF_UINT32 || t == MOE_GGUF_UINT64;
}

static int is_signed(enum moe_gguf_type t)
{
    return t == MOE_GGUF_INT8 || t == MOE_GGUF_INT16 || t == MOE_GGUF_INT32 || t == MOE_GGUF_INT64;
}

int moe_gguf_get_u64(const struct moe_gguf *g, const char *key, uint64_t *out, struct moe_diag *diag)
{
    const struct moe_gguf_kv *kv = moe_gguf_find_kv(g, key);
    if (kv == NULL)
        return -ENOENT;
    if (is_unsigned(kv->value.type)) {
        *out = kv->value.v.u64;
        return 0;
    }
    if (is_signed(kv->value.type)) {
        if (kv->value.v.i64 < 0)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s': value %" PRId64
                                ", expected a non-negative integer", g->name, key, kv->value.v.i64);
        *out = (uint64_t)kv->value.v.i64;
        return 0;
    }
    return type_err(g, kv, "an integer", diag);
}

int moe_gguf_get_u32(const struct moe_gguf *g, const char *key, uint32_t *out, struct moe_diag *diag)
{
    uint64_t v;
    int rc = moe_gguf_get_u64(g, key, &v, diag);
    if (rc)
        return rc;
    if (v > UINT32_MAX)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s': value %" PRIu64 ", expected at most %u",
                            g->name, key, v, UINT32_MAX);
    *out = (uint32_t)v;
    return 0;
}

int moe_gguf_get_i64(const struct moe_gguf *g, const char *key, int64_t *out, struct moe_diag *diag)
{
    const struct moe_gguf_kv *kv = moe_gguf_find_kv(g, key);
    if (kv == NULL)
        return -ENOENT;
    if (is_signed(kv->value.type)) {
        *out = kv->value.v.i64;
        return 0;
    }
    if (is_unsigned(kv->value.type)) {
        if (kv->value.v.u64 > INT64_MAX)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s': value %" PRIu64 " exceeds 2^63-1",
                                g->name, key, kv->value.v.u64);
        *out = (int64_t)kv->value.v.u64;
        return 0;
    }
    return type_err(g, kv, "an integer", diag);
}

int moe_gguf_get_f32(const struct moe_gguf *g, const char *key, float *out, struct moe_diag *diag)
{
    const struct moe_gguf_kv *kv = moe_gguf_find_kv(g, key);
    if (kv == NULL)
        return -ENOENT;
    if (kv->value.type != MOE_GGUF_FLOAT32 && kv->value.type != MOE_GGUF_FLOAT64)
        return type_err(g, kv, "FLOAT32 or FLOAT64", diag);
    *out = (float)kv->value.v.f64;
    return 0;
}

int moe_gguf_get_bool(const struct moe_gguf *g, const char *key, bool *out, struct moe_diag *diag)
{
    const struct moe_gguf_kv *kv = moe_gguf_find_kv(g, key);
    if (kv == NULL)
        return -ENOENT;
    if (kv->value.type != MOE_GGUF_BOOL)
        return type_err(g, kv, "BOOL", diag);
    *out = kv->value.v.b;
    return 0;
}

int moe_gguf_get_str(const struct moe_gguf *g, const char *key, struct moe_gguf_str *out,
                     struct moe_diag *diag)
{
    const struct moe_gguf_kv *kv = moe_gguf_find_kv(g, key);
    if (kv == NULL)
        return -ENOENT;
    if (kv->value.type != MOE_GGUF_STRING)
        return type_err(g, kv, "STRING", diag);
    *out = kv->value.v.str;
    return 0;
}

int moe_gguf_get_arr(const struct moe_gguf *g, const char *key, enum moe_gguf_type elem_type,
                     const struct moe_gguf_value **out, struct moe_diag *diag)
{
    const struct moe_gguf_kv *kv = moe_gguf_find_kv(g, key);
    if (kv == NULL)
        return -ENOENT;
    if (kv->value.type != MOE_GGUF_ARRAY)
        return type_err(g, kv, "ARRAY", diag);
    if (elem_type != MOE_GGUF_TYPE_COUNT && kv->value.v.arr.elem_type != elem_type)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s': array of %s, expected array of %s",
                            g->name, key, moe_gguf_type_name(kv->value.v.arr.elem_type),
                            moe_gguf_type_name(elem_type));
    *out = &kv->value;
    return 0;
}


/* ---- split sets ------------------------------------------------------ */

/* gguf-split's names: "<prefix>-%05u-of-%05u.gguf", parts counted from 1. */
static int split_prefix_len(const char *path, uint32_t no, uint32_t count, size_t *len)
{
    char tail[64];
    snprintf(tail, sizeof(tail), "-%05u-of-%05u.gguf", no + 1, count);
    const size_t n = strlen(path), t = strlen(tail);
    if (n < t || strcmp(path + n - t, tail) != 0)
        return -1;
    *len = n - t;
    return 0;
}

static int split_key(const struct moe_gguf *g, const char *key, uint64_t *v, struct moe_diag *diag)
{
    *v = 0;
    int rc = moe_gguf_get_u64(g, key, v, diag);
    return rc == -ENOENT ? 0 : rc;
}

/* Opens part `i` (0-based, i >= 1) of the set whose first part is g and
 * checks that it belongs: its own split.no and split.count. */
static int open_part(struct moe_gguf *g, size_t prefix, uint32_t i, uint32_t count,
                     struct moe_gguf **out, struct moe_diag *diag)
{
    char path[4096];
    if (prefix + 32 >= sizeof(path))
        return moe_diag_set(diag, -ENAMETOOLONG, "%s: path too long for its split parts", g->name);
    snprintf(path, sizeof(path), "%.*s-%05u-of-%05u.gguf", (int)prefix, g->name, i + 1, count);
    struct moe_gguf *p = moe_calloc(1, sizeof(*p));
    if (p == NULL)
        return moe_diag_set(diag, -ENOMEM, "%s: out of memory", path);
    int rc = open_file(p, path, diag);
    if (rc == -ENOENT) {
        moe_diag_clear(diag);
        return moe_diag_set(diag, MOE_EFORMAT, "%s: split part %u of %u is missing (%s)", g->name,
                            i + 1, count, path);
    }
    if (rc)
        return rc;
    uint64_t no = 0, cnt = 0;
    if ((rc = split_key(p, "split.no", &no, diag)) || (rc = split_key(p, "split.count", &cnt, diag))) {
        moe_gguf_close(p);
        return rc;
    }
    if (no != i || cnt != count) {
        moe_gguf_close(p);
        return moe_diag_set(diag, MOE_EFORMAT, "%s: split part %u of %u says split.no %" PRIu64
                            " of split.count %" PRIu64 " (a part of another set?)", path, i + 1,
                            count, no + 1, cnt);
    }
    *out = p;
    return 0;
}

/* Appends every part's tensors to g's list (tagged with their part) and
 * re-indexes them by name, refusing a name that two parts both hold. */
static int merge_parts(struct moe_gguf *g, uint64_t want, struct moe_diag *diag)
{
    uint64_t total = g->n_tensors;
    for (uint32_t i = 0; i + 1 < g->n_parts; i++)
        total += g->parts[i]->n_tensors;
    if (want != 0 && total != want)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: the %u split parts hold %" PRIu64 " tensors,"
                            " split.tensors.count says %" PRIu64, g->name, g->n_parts, total, want);
    struct cursor c = { .g = g, .diag = diag };
    struct moe_gguf_tensor *all = arena_alloc(&c, (total ? total : 1) * sizeof(*all));
    if (all == NULL)
        return diag && diag->code ? diag->code : -ENOMEM;
    memcpy(all, g->tensors, (size_t)g->n_tensors * sizeof(*all));
    uint64_t n = g->n_tensors;
    for (uint32_t i = 0; i + 1 < g->n_parts; i++)
        for (uint64_t k = 0; k < g->parts[i]->n_tensors; k++) {
            all[n] = g->parts[i]->tensors[k];
            all[n++].part = i + 1;
        }
    g->tensors = all;
    g->n_tensors = total;
    if ((g->t_by_name = sorted_index(&c, total, cmp_tname)) == NULL)
        return diag && diag->code ? diag->code : -ENOMEM;
    for (uint64_t k = 1; k < total; k++) {
        const struct moe_gguf_tensor *a = &all[g->t_by_name[k - 1]], *b = &all[g->t_by_name[k]];
        if (strcmp(a->name, b->name) == 0)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: tensor '%s' is in split parts %u and %u",
                                g->name, a->name, a->part + 1, b->part + 1);
    }
    return 0;
}

/* A first part with split.count > 1 opens the rest of its set. */
static int open_split(struct moe_gguf *g, struct moe_diag *diag)
{
    g->n_parts = 1;
    uint64_t count = 0, no = 0, want = 0;
    int rc;
    if ((rc = split_key(g, "split.count", &count, diag)) || (rc = split_key(g, "split.no", &no, diag)) ||
        (rc = split_key(g, "split.tensors.count", &want, diag)))
        return rc;
    if (count <= 1)
        return 0;
    if (count > 9999 || no >= count)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: split.no %" PRIu64 " of split.count %" PRIu64
                            ", expected a part 0..count-1 of at most 9999", g->name, no, count);
    size_t prefix = 0;
    if (split_prefix_len(g->name, (uint32_t)no, (uint32_t)count, &prefix) != 0)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: split part %" PRIu64 " of %" PRIu64 ", but the"
                            " name does not end in -%05" PRIu64 "-of-%05" PRIu64 ".gguf", g->name,
                            no + 1, count, no + 1, count);
    if (no != 0)
        return moe_diag_set(diag, -EINVAL, "%s: split part %" PRIu64 " of %" PRIu64 "; open the first"
                            " part, %.*s-00001-of-%05" PRIu64 ".gguf", g->name, no + 1, count,
                            (int)prefix, g->name, count);
    g->parts = moe_calloc((size_t)count - 1, sizeof(*g->parts));
    if (g->parts == NULL)
        return moe_diag_set(diag, -ENOMEM, "%s: out of memory", g->name);
    for (uint32_t i = 1; i < (uint32_t)count; i++) {
        if ((rc = open_part(g, prefix, i, (uint32_t)count, &g->parts[i - 1], diag)))
            return rc;
        g->n_parts = i + 1;
    }
    return merge_parts(g, want, diag);
}

static const struct moe_gguf *part_of(const struct moe_gguf *g, const struct moe_gguf_tensor *t)
{
    return t->part > 0 && t->part < g->n_parts ? g->parts[t->part - 1] : g;
}

uint32_t moe_gguf_n_parts(const struct moe_gguf *g)
{
    return g->n_parts ? g->n_parts : 1;
}

const char *moe_gguf_part_path(const struct moe_gguf *g, uint32_t part)
{
    if (part == 0)
        return g->name;
    return part < g->n_parts ? g->parts[part - 1]->name : NULL;
}

uint64_t moe_gguf_tensor_file_offset(const struct moe_gguf *g, const struct moe_gguf_tensor *t)
{
    return part_of(g, t)->data_offset + t->offset;
}

/* ---- tensor data ----------------------------------------------------- */

int moe_gguf_pread(const struct moe_gguf *g, const struct moe_gguf_tensor *t,
                   uint64_t off, void *dst, size_t n, struct moe_diag *diag)
{
    if (off > t->size || n > t->size - off)
        return moe_diag_set(diag, -EINVAL, "%s: tensor '%s': read of %zu bytes at %" PRIu64
                            " past its %" PRIu64 " bytes", g->name, t->name, n, off, t->size);
    if (n == 0)
        return 0; /* dst may be NULL */
    g = part_of(g, t);
    uint64_t pos = g->data_offset + t->offset + off;
    if (g->mem != NULL) {
        memcpy(dst, g->mem + pos, n);
        return 0;
    }
    uint64_t at;
    int rc = moe_file_pread(g->fd, dst, n, pos, &at);
    if (rc == MOE_EFORMAT)
        return moe_diag_set(diag, rc, "%s: tensor '%s': file ends at 0x%" PRIx64 " (it shrank after open)",
                            g->name, t->name, at);
    if (rc < 0)
        return moe_diag_set(diag, rc, "%s: tensor '%s': read at offset 0x%" PRIx64 ": %s", g->name,
                            t->name, at, strerror(-rc));
    return 0;
}

static int map_one(struct moe_gguf *g, struct moe_diag *diag);

int moe_gguf_map(struct moe_gguf *g, struct moe_diag *diag)
{
    int rc = map_one(g, diag);
    for (uint32_t i = 0; rc == 0 && g->parts && i + 1 < g->n_parts; i++)
        rc = map_one(g->parts[i], diag);
    return rc;
}

static int map_one(struct moe_gguf *g, struct moe_diag *diag)
{
    if (g->map != NULL)
        return 0;
    if (g->mem != NULL) {
        g->map = g->mem;
        g->map_len = (size_t)g->file_size;
        return 0;
    }
    if (g->file_size > SIZE_MAX)
        return moe_diag_set(diag, -EFBIG, "%s: too large to map", g->name);
    void *p = mmap(NULL, (size_t)g->file_size, PROT_READ, MAP_SHARED, g->fd, 0);
    if (p == MAP_FAILED)
        return moe_diag_set(diag, -errno, "%s: mmap of %" PRIu64 " bytes: %s", g->name,
                            g->file_size, strerror(errno));
    g->map = p;
    g->map_len = (size_t)g->file_size;
    return 0;
}

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22 /* linux/mman.h, Linux 5.14 */
#endif

int moe_gguf_populate(struct moe_gguf *g)
{
    for (uint32_t i = 0; i < g->n_parts; i++) {
        struct moe_gguf *p = i == 0 ? g : g->parts[i - 1];
        if (p->map == NULL || p->mem != NULL)
            continue;
        if (madvise((void *)p->map, p->map_len, MADV_POPULATE_READ) != 0)
            return -errno;
    }
    return 0;
}

/* The part whose mapping holds [p, p + n), or NULL. */
static const struct moe_gguf *part_mapping(const struct moe_gguf *g, const void *p, size_t n)
{
    const uint8_t *b = p;
    for (uint32_t i = 0; i == 0 || (g->parts && i < g->n_parts); i++) {
        const struct moe_gguf *q = i == 0 ? g : g->parts[i - 1];
        if (q->map != NULL && b >= q->map && b <= q->map + q->map_len &&
            n <= (size_t)(q->map + q->map_len - b))
            return q;
    }
    return NULL;
}

bool moe_gguf_maps(const struct moe_gguf *g, const void *p, size_t n)
{
    return part_mapping(g, p, n) != NULL;
}

int moe_gguf_read_mapped(const struct moe_gguf *g, const void *p, size_t n, void *dst,
                         struct moe_diag *diag)
{
    const uint8_t *b = p;
    const struct moe_gguf *q = part_mapping(g, p, n);
    if (q != NULL) {
        if (q->mem != NULL) {
            memcpy(dst, b, n);
            return 0;
        }
        /* a descriptor of its own: FADV_RANDOM is a property of the open
         * file, and q->fd's is shared with the mapping */
        char proc[64];
        snprintf(proc, sizeof(proc), "/proc/self/fd/%d", q->fd);
        int fd = open(proc, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return moe_diag_set(diag, -errno, "%s: reopen: %s", q->name, strerror(errno));
        (void)posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM);
        const uint64_t off = (uint64_t)(b - q->map);
        uint64_t at;
        int rc = moe_file_pread(fd, dst, n, off, &at);
        close(fd);
        if (rc == MOE_EFORMAT)
            return moe_diag_set(diag, rc, "%s: file ends at 0x%" PRIx64 " (it shrank after open)", q->name, at);
        if (rc < 0)
            return moe_diag_set(diag, rc, "%s: read at offset 0x%" PRIx64 ": %s", q->name, at, strerror(-rc));
        return 0;
    }
    return moe_diag_set(diag, -EINVAL, "%s: %zu bytes at %p are not in its mapping", g->name, n, p);
}

void moe_gguf_drop_cache(struct moe_gguf *g)
{
    for (uint32_t i = 0; i == 0 || (g->parts && i < g->n_parts); i++) {
        struct moe_gguf *q = i == 0 ? g : g->parts[i - 1];
        if (q->map == NULL || q->mem != NULL)
            continue;
        (void)madvise((void *)q->map, q->map_len, MADV_DONTNEED);
        (void)posix_fadvise(q->fd, 0, 0, POSIX_FADV_DONTNEED);
    }
}

const void *moe_gguf_tensor_data(const struct moe_gguf *g, const struct moe_gguf_tensor *t)
{
    g = part_of(g, t);
    if (g->map == NULL)
        return NULL;
    return g->map + g->data_offset + t->offset;
}
