/* Streaming GGUF v3 writer (see io/gguf_writer.h for the contract).
 *
 * Key/values and tensor infos are serialized into one growing buffer as
 * they are added (so that the header can be written in one go once the
 * offsets are known); tensor bytes stream through an 8 MiB buffer into
 * `<path>.tmp`, with large chunks written directly. The encoding matches
 * ggml's gguf writer byte for byte (tests/unit/test_gguf_writer.c copies
 * llama-quantize outputs and compares).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/alloc.h"
#include "common/buf.h"
#include "common/dtype.h"
#include "io/file.h"
#include "io/gguf_writer.h"

/* Values are copied as they lie in memory: GGUF is little-endian. */
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "little-endian hosts only");

/* Tensor data goes out in 8 MiB write(2) calls: large enough that a 4 GB
 * model is bound by the disk, not by system calls. */
#define OUT_BUF (8u << 20)
/* writeback is started every SYNC_EVERY bytes */
#define SYNC_EVERY (64u << 20)

struct tinfo {
    char *name;
    uint32_t n_dims;
    uint64_t ne[MOE_GGUF_MAX_DIMS];
    uint32_t dtype;
    uint64_t size, offset;
};

struct moe_gguf_writer {
    char *path, *tmp;
    int fd;
    struct moe_diag diag;       /* first error */
    int err;
    struct moe_buf kv;          /* serialized key/values (unbounded here; finish checks the cap) */
    uint64_t n_kv;
    char **keys;                /* for the duplicate check */
    size_t cap_keys;
    uint32_t alignment;
    struct tinfo *t;
    uint64_t n_t;
    size_t cap_t;
    /* data phase */
    bool in_data;
    uint64_t cur, cur_written, pos;
    uint8_t *out;
    size_t out_len;
    uint64_t on_disk, kicked;   /* bytes written to the fd; writeback started up to */
};

static int fail(struct moe_gguf_writer *w, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Records the first error as "<path>: <message>". */
static int fail(struct moe_gguf_writer *w, int code, const char *fmt, ...)
{
    if (w->err == 0) {
        char what[384];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(what, sizeof(what), fmt, ap);
        va_end(ap);
        w->err = code;
        moe_diag_set(&w->diag, code, "%s: %s", w->path, what);
    }
    return w->err;
}

const char *moe_gguf_writer_error(const struct moe_gguf_writer *w)
{
    return w->err ? w->diag.msg : NULL;
}

int moe_gguf_writer_create(struct moe_gguf_writer **out, const char *path, struct moe_diag *diag)
{
    *out = NULL;
    struct moe_gguf_writer *w = moe_calloc(1, sizeof(*w));
    if (w == NULL)
        return moe_diag_set(diag, -ENOMEM, "%s: out of memory", path);
    size_t n = strlen(path);
    w->path = moe_strndup(path, n);
    w->tmp = moe_malloc(n + 5);
    w->out = moe_malloc(OUT_BUF);
    w->alignment = MOE_GGUF_DEFAULT_ALIGNMENT;
    w->fd = -1;
    if (w->path == NULL || w->tmp == NULL || w->out == NULL) {
        moe_gguf_writer_abort(w);
        return moe_diag_set(diag, -ENOMEM, "%s: out of memory", path);
    }
    memcpy(w->tmp, path, n);
    memcpy(w->tmp + n, ".tmp", 5);
    /* A leftover temporary from an interrupted run is replaced, never
     * mistaken for output. */
    w->fd = open(w->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (w->fd < 0) {
        int e = errno;
        moe_diag_set(diag, -e, "%s: cannot create: %s", w->tmp, strerror(e));
        moe_gguf_writer_abort(w);
        return -e;
    }
    *out = w;
    return 0;
}

static int kv_put(struct moe_gguf_writer *w, const void *p, size_t n)
{
    if (w->err)
        return w->err;
    int rc = moe_buf_append(&w->kv, p, n); /* an empty array may come with p == NULL */
    return rc ? fail(w, rc, "out of memory for metadata") : 0;
}

static int put_u32(struct moe_gguf_writer *w, uint32_t v)
{
    uint8_t b[4] = { (uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24) };
    return kv_put(w, b, 4);
}

static int put_u64(struct moe_gguf_writer *w, uint64_t v)
{
    uint8_t b[8];
    for (int i = 0; i < 8; i++)
        b[i] = (uint8_t)(v >> (8 * i));
    return kv_put(w, b, 8);
}

static int put_str(struct moe_gguf_writer *w, const char *s, size_t n)
{
    if (n > MOE_GGUF_MAX_STRING)
        return fail(w, MOE_ELIMIT, "string of %zu bytes exceeds the cap of %llu", n,
                    (unsigned long long)MOE_GGUF_MAX_STRING);
    int rc = put_u64(w, n);
    return rc ? rc : kv_put(w, s, n);
}

static int begin_kv(struct moe_gguf_writer *w, const char *key, enum moe_gguf_type t)
{
    if (w->err)
        return w->err;
    if (w->in_data)
        return fail(w, -EINVAL, "key '%s' added after begin_data", key);
    /* never write what the reader (io/gguf.c) would refuse */
    size_t kl = strlen(key);
    if (kl == 0 || kl > MOE_GGUF_MAX_KEY)
        return fail(w, -EINVAL, "key '%.64s': length %zu, expected 1..%u", key, kl, MOE_GGUF_MAX_KEY);
    if (strcmp(key, "general.alignment") == 0 && t != MOE_GGUF_UINT32)
        return fail(w, -EINVAL, "general.alignment must be UINT32, not %s", moe_gguf_type_name(t));
    for (uint64_t i = 0; i < w->n_kv; i++)
        if (strcmp(w->keys[i], key) == 0)
            return fail(w, -EINVAL, "duplicate key '%s'", key);
    if (moe_array_grow((void **)&w->keys, &w->cap_keys, (size_t)w->n_kv + 1, sizeof(char *), 0) ||
        (w->keys[w->n_kv] = moe_strndup(key, strlen(key))) == NULL)
        return fail(w, -ENOMEM, "out of memory for metadata");
    w->n_kv++;
    int rc = put_str(w, key, strlen(key));
    return rc ? rc : put_u32(w, (uint32_t)t);
}

static int set_alignment(struct moe_gguf_writer *w, uint64_t a)
{
    if (a == 0 || (a & (a - 1)) || a > MOE_GGUF_MAX_ALIGNMENT)
        return fail(w, -EINVAL, "general.alignment %llu: expected a power of two up to %u",
                    (unsigned long long)a, MOE_GGUF_MAX_ALIGNMENT);
    w->alignment = (uint32_t)a;
    return 0;
}

int moe_gguf_writer_add_scalar(struct moe_gguf_writer *w, const char *key, enum moe_gguf_type t,
                               const void *v)
{
    size_t sz = moe_gguf_type_size(t);
    if (sz == 0)
        return fail(w, -EINVAL, "key '%s': not a scalar type", key);
    int rc = begin_kv(w, key, t);
    if (rc == 0 && strcmp(key, "general.alignment") == 0) {
        uint32_t a;
        memcpy(&a, v, 4);
        rc = set_alignment(w, a);
    }
    return rc ? rc : kv_put(w, v, sz);
}

int moe_gguf_writer_add_u32(struct moe_gguf_writer *w, const char *key, uint32_t v)
{
    return moe_gguf_writer_add_scalar(w, key, MOE_GGUF_UINT32, &v);
}

int moe_gguf_writer_add_i32(struct moe_gguf_writer *w, const char *key, int32_t v)
{
    return moe_gguf_writer_add_scalar(w, key, MOE_GGUF_INT32, &v);
}

int moe_gguf_writer_add_u64(struct moe_gguf_writer *w, const char *key, uint64_t v)
{
    return moe_gguf_writer_add_scalar(w, key, MOE_GGUF_UINT64, &v);
}

int moe_gguf_writer_add_f32(struct moe_gguf_writer *w, const char *key, float v)
{
    return moe_gguf_writer_add_scalar(w, key, MOE_GGUF_FLOAT32, &v);
}

int moe_gguf_writer_add_bool(struct moe_gguf_writer *w, const char *key, bool v)
{
    uint8_t b = v ? 1 : 0;
    return moe_gguf_writer_add_scalar(w, key, MOE_GGUF_BOOL, &b);
}

int moe_gguf_writer_add_str(struct moe_gguf_writer *w, const char *key, const char *v)
{
    int rc = begin_kv(w, key, MOE_GGUF_STRING);
    return rc ? rc : put_str(w, v, strlen(v));
}

int moe_gguf_writer_add_arr(struct moe_gguf_writer *w, const char *key, enum moe_gguf_type t,
                            uint64_t n, const void *data)
{
    size_t sz = moe_gguf_type_size(t);
    if (sz == 0)
        return fail(w, -EINVAL, "key '%s': array elements must be scalars here", key);
    uint64_t bytes;
    if (__builtin_mul_overflow(n, (uint64_t)sz, &bytes) || bytes > MOE_GGUF_MAX_META_BYTES)
        return fail(w, MOE_ELIMIT, "key '%s': array of %llu elements is too large", key,
                    (unsigned long long)n);
    int rc = begin_kv(w, key, MOE_GGUF_ARRAY);
    if (rc || (rc = put_u32(w, (uint32_t)t)) || (rc = put_u64(w, n)))
        return rc;
    return kv_put(w, data, (size_t)bytes);
}

int moe_gguf_writer_add_str_arr(struct moe_gguf_writer *w, const char *key, uint64_t n,
                                const char *const *strs, const size_t *lens)
{
    int rc = begin_kv(w, key, MOE_GGUF_ARRAY);
    if (rc || (rc = put_u32(w, MOE_GGUF_STRING)) || (rc = put_u64(w, n)))
        return rc;
    for (uint64_t i = 0; i < n && rc == 0; i++)
        rc = put_str(w, strs[i], lens ? lens[i] : strlen(strs[i]));
    return rc;
}

static int put_value_body(struct moe_gguf_writer *w, const struct moe_gguf_value *v)
{
    int rc = 0;
    switch (v->type) {
    case MOE_GGUF_STRING:
        return put_str(w, v->v.str.ptr, (size_t)v->v.str.len);
    case MOE_GGUF_ARRAY: {
        const enum moe_gguf_type et = v->v.arr.elem_type;
        if ((rc = put_u32(w, (uint32_t)et)) || (rc = put_u64(w, v->v.arr.n)))
            return rc;
        if (et == MOE_GGUF_STRING) {
            const struct moe_gguf_str *s = v->v.arr.data;
            for (uint64_t i = 0; i < v->v.arr.n && rc == 0; i++)
                rc = put_str(w, s[i].ptr, (size_t)s[i].len);
            return rc;
        }
        if (et == MOE_GGUF_ARRAY) {
            const struct moe_gguf_value *a = v->v.arr.data;
            for (uint64_t i = 0; i < v->v.arr.n && rc == 0; i++)
                rc = put_value_body(w, &a[i]);
            return rc;
        }
        uint64_t bytes;
        if (moe_gguf_type_size(et) == 0 ||
            __builtin_mul_overflow(v->v.arr.n, (uint64_t)moe_gguf_type_size(et), &bytes) ||
            bytes > MOE_GGUF_MAX_META_BYTES)
            return fail(w, -EINVAL, "array of %llu elements of type %u cannot be written",
                        (unsigned long long)v->v.arr.n, (unsigned)et);
        return kv_put(w, v->v.arr.data, (size_t)bytes);
    }
    case MOE_GGUF_BOOL: {
        uint8_t b = v->v.b;
        return kv_put(w, &b, 1);
    }
    case MOE_GGUF_FLOAT32: {
        float f = (float)v->v.f64;
        return kv_put(w, &f, 4);
    }
    case MOE_GGUF_FLOAT64:
        return kv_put(w, &v->v.f64, 8);
    default: {
        /* integers: low bytes of the 64-bit value, little-endian host */
        uint64_t u = v->v.u64;
        return kv_put(w, &u, moe_gguf_type_size(v->type));
    }
    }
}

int moe_gguf_writer_add_value(struct moe_gguf_writer *w, const char *key,
                              const struct moe_gguf_value *v)
{
    if ((uint32_t)v->type >= MOE_GGUF_TYPE_COUNT)
        return fail(w, -EINVAL, "key '%s': unknown value type %u", key, (unsigned)v->type);
    int rc = begin_kv(w, key, v->type);
    if (rc == 0 && strcmp(key, "general.alignment") == 0)
        rc = set_alignment(w, v->v.u64);
    return rc ? rc : put_value_body(w, v);
}

int moe_gguf_writer_add_tensor(struct moe_gguf_writer *w, const char *name, uint32_t n_dims,
                               const uint64_t *ne, uint32_t dtype, uint64_t *size)
{
    if (w->err)
        return w->err;
    if (w->in_data)
        return fail(w, -EINVAL, "tensor '%s' added after begin_data", name);
    const struct moe_dtype_info *di = moe_dtype_info(dtype);
    size_t nl = strlen(name);
    if (di == NULL || n_dims == 0 || n_dims > MOE_GGUF_MAX_DIMS || nl == 0 || nl >= MOE_GGUF_MAX_NAME ||
        ne[0] % di->block_size != 0)
        return fail(w, -EINVAL, "tensor '%s': bad name, type, dims or row length", name);
    for (uint64_t i = 0; i < w->n_t; i++)
        if (strcmp(w->t[i].name, name) == 0)
            return fail(w, -EINVAL, "duplicate tensor '%s'", name);
    if (moe_array_grow((void **)&w->t, &w->cap_t, (size_t)w->n_t + 1, sizeof(*w->t), 0))
        return fail(w, -ENOMEM, "out of memory for tensor infos");
    struct tinfo *t = &w->t[w->n_t];
    memset(t, 0, sizeof(*t));
    if ((t->name = moe_strndup(name, nl)) == NULL)
        return fail(w, -ENOMEM, "out of memory for tensor infos");
    t->n_dims = n_dims;
    t->dtype = dtype;
    uint64_t bytes = ne[0] / di->block_size * di->type_size;
    for (uint32_t d = 0; d < MOE_GGUF_MAX_DIMS; d++) {
        t->ne[d] = d < n_dims ? ne[d] : 1;
        if (t->ne[d] == 0 || (d > 0 && __builtin_mul_overflow(bytes, t->ne[d], &bytes))) {
            moe_free(t->name);
            return fail(w, -EOVERFLOW, "tensor '%s': shape overflows", name);
        }
    }
    t->size = bytes;
    w->n_t++;
    if (size)
        *size = bytes;
    return 0;
}

static int write_all(struct moe_gguf_writer *w, const uint8_t *p, size_t n);

static int out_flush(struct moe_gguf_writer *w)
{
    if (write_all(w, w->out, w->out_len))
        return w->err;
    w->out_len = 0;
    return 0;
}

static int write_all(struct moe_gguf_writer *w, const uint8_t *p, size_t n)
{
    /* the file is written front to back, so what is on disk ends at on_disk */
    int rc = moe_file_pwrite(w->fd, p, n, w->on_disk);
    if (rc < 0)
        return fail(w, rc, "write to %s: %s", w->tmp, strerror(-rc));
    w->on_disk += n;
    /* Start writeback of what is written so far, so that the disk works
     * while the caller produces the next bytes and the fsync in finish
     * has little left to do (without this, a multi-GB file is flushed
     * only when the kernel's dirty limits are hit, or at the end).
     * Asynchronous and best effort: fsync reports any error. */
    if (w->on_disk - w->kicked >= SYNC_EVERY) {
        (void)sync_file_range(w->fd, (off_t)w->kicked, (off_t)(w->on_disk - w->kicked), SYNC_FILE_RANGE_WRITE);
        w->kicked = w->on_disk;
    }
    return 0;
}

static int out_put(struct moe_gguf_writer *w, const void *p, size_t n)
{
    const uint8_t *b = p;
    if (n >= OUT_BUF) {
        /* a large chunk: write what is buffered, then the chunk itself
         * rather than copying it through the buffer */
        if (out_flush(w) || write_all(w, b, n))
            return w->err;
        w->pos += n;
        return 0;
    }
    while (n > 0) {
        if (w->out_len == OUT_BUF && out_flush(w))
            return w->err;
        size_t k = OUT_BUF - w->out_len < n ? OUT_BUF - w->out_len : n;
        memcpy(w->out + w->out_len, b, k);
        w->out_len += k;
        b += k;
        n -= k;
        w->pos += k;
    }
    return 0;
}

static int out_pad(struct moe_gguf_writer *w)
{
    static const uint8_t zeros[64];
    while (w->pos % w->alignment != 0) {
        size_t k = (size_t)(w->alignment - w->pos % w->alignment);
        if (out_put(w, zeros, k < sizeof(zeros) ? k : sizeof(zeros)))
            return w->err;
    }
    return 0;
}

int moe_gguf_writer_begin_data(struct moe_gguf_writer *w)
{
    if (w->err)
        return w->err;
    /* offsets */
    uint64_t off = 0;
    for (uint64_t i = 0; i < w->n_t; i++) {
        off = (off + w->alignment - 1) / w->alignment * w->alignment;
        w->t[i].offset = off;
        off += w->t[i].size;
    }
    /* the tensor infos follow the key/values: serialize them into the
     * same buffer */
    for (uint64_t i = 0; i < w->n_t; i++) {
        const struct tinfo *t = &w->t[i];
        int rc = put_str(w, t->name, strlen(t->name));
        if (rc || (rc = put_u32(w, t->n_dims)))
            return rc;
        for (uint32_t d = 0; d < t->n_dims; d++)
            if ((rc = put_u64(w, t->ne[d])))
                return rc;
        if ((rc = put_u32(w, t->dtype)) || (rc = put_u64(w, t->offset)))
            return rc;
    }
    uint8_t head[24];
    memcpy(head, "GGUF", 4);
    const uint32_t version = 3;
    memcpy(head + 4, &version, 4);
    memcpy(head + 8, &w->n_t, 8);
    memcpy(head + 16, &w->n_kv, 8);
    if (w->kv.len > MOE_GGUF_MAX_META_BYTES)
        return fail(w, MOE_ELIMIT, "metadata of %zu bytes exceeds the cap of %llu MiB", w->kv.len,
                    (unsigned long long)(MOE_GGUF_MAX_META_BYTES >> 20));
    if (out_put(w, head, sizeof(head)) || out_put(w, w->kv.data, w->kv.len))
        return w->err;
    if (w->n_t > 0 && out_pad(w))
        return w->err;
    w->in_data = true;
    w->cur = 0;
    w->cur_written = 0;
    return 0;
}

int moe_gguf_writer_write(struct moe_gguf_writer *w, const void *buf, size_t n)
{
    if (w->err)
        return w->err;
    if (!w->in_data)
        return fail(w, -EINVAL, "tensor data written before begin_data");
    const uint8_t *b = buf;
    while (n > 0) {
        if (w->cur >= w->n_t)
            return fail(w, -EINVAL, "more tensor bytes than declared");
        struct tinfo *t = &w->t[w->cur];
        if (w->cur_written == 0 && out_pad(w))
            return w->err;
        uint64_t left = t->size - w->cur_written;
        size_t k = left < n ? (size_t)left : n;
        if (out_put(w, b, k))
            return w->err;
        b += k;
        n -= k;
        w->cur_written += k;
        if (w->cur_written == t->size) {
            w->cur++;
            w->cur_written = 0;
        }
    }
    return 0;
}

static void writer_free(struct moe_gguf_writer *w)
{
    for (uint64_t i = 0; i < w->n_kv; i++)
        moe_free(w->keys[i]);
    for (uint64_t i = 0; i < w->n_t; i++)
        moe_free(w->t[i].name);
    moe_free(w->keys);
    moe_free(w->t);
    moe_buf_free(&w->kv);
    moe_free(w->out);
    moe_free(w->path);
    moe_free(w->tmp);
    moe_free(w);
}

void moe_gguf_writer_abort(struct moe_gguf_writer *w)
{
    if (w == NULL)
        return;
    if (w->fd >= 0) {
        close(w->fd);
        unlink(w->tmp);
    }
    writer_free(w);
}

/* Makes the rename durable. Best effort: the file itself is complete
 * either way, and some file systems refuse fsync on a directory. */
static void sync_dir(const char *path)
{
    const char *slash = strrchr(path, '/');
    char dir[4096];
    if (slash == NULL)
        snprintf(dir, sizeof(dir), ".");
    else if (slash == path)
        snprintf(dir, sizeof(dir), "/");
    else if ((size_t)(slash - path) < sizeof(dir))
        snprintf(dir, sizeof(dir), "%.*s", (int)(slash - path), path);
    else
        return;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
}

int moe_gguf_writer_finish(struct moe_gguf_writer *w, struct moe_diag *diag)
{
    if (!w->err && !w->in_data)
        moe_gguf_writer_begin_data(w);
    if (!w->err && w->cur < w->n_t) {
        const struct tinfo *t = &w->t[w->cur];
        fail(w, -EINVAL, "finished before all tensor data was written: tensor '%s' (#%" PRIu64 " of %" PRIu64
             ") got %" PRIu64 " of its %" PRIu64 " bytes", t->name, w->cur, w->n_t, w->cur_written, t->size);
    }
    /* pad the last tensor too: ggml's reader (no_alloc = false) reads the
     * whole data section as the sum of padded tensor sizes */
    if (!w->err && w->n_t > 0)
        out_pad(w);
    if (!w->err)
        out_flush(w);
    if (!w->err && fsync(w->fd) != 0)
        fail(w, -errno, "fsync: %s", strerror(errno));
    if (!w->err && close(w->fd) != 0) {
        w->fd = -1;
        fail(w, -errno, "close: %s", strerror(errno));
    } else if (!w->err) {
        w->fd = -1;
        if (rename(w->tmp, w->path) != 0)
            fail(w, -errno, "rename from %s: %s", w->tmp, strerror(errno));
        else
            sync_dir(w->path);
    }
    int rc = w->err;
    if (rc) {
        moe_diag_set(diag, rc, "%s", w->diag.msg);
        if (w->fd >= 0)
            close(w->fd);
        unlink(w->tmp);
        w->fd = -1;
    }
    writer_free(w);
    return rc;
}
