/* Fuzz entry for the GGUF reader (shared/RELIABILITY.md row 2): parse the
 * bytes with moe_gguf_open_mem, and when they parse, touch everything a
 * caller could (every key and value, nested arrays and strings included,
 * every typed getter, lookups, every tensor's first and last bytes by pread
 * and through the mapping) and check what the header promises about an
 * accepted file: its invariants are the oracle, so a validation hole shows
 * up as a trap, not only a memory error. Every input, accepted or not, must
 * give back every allocation it took (moe_alloc_live), so leaks show up in
 * builds without LeakSanitizer too. An accepted input is also opened as a
 * file (a memfd, by its /proc path) and must give the same header and the
 * same bytes through pread and mmap: the fd cursor is the path real models
 * take. */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common/alloc.h"
#include "io/gguf.h"
#include "common/dtype.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define REQUIRE(c) do { if (!(c)) __builtin_trap(); } while (0)

static uint64_t walk(const struct moe_gguf_value *v, unsigned depth)
{
    uint64_t h = (uint64_t)v->type;
    REQUIRE(v->type < MOE_GGUF_TYPE_COUNT);
    REQUIRE(depth < MOE_GGUF_MAX_DEPTH);
    if (v->type == MOE_GGUF_STRING) {
        REQUIRE(v->v.str.len <= MOE_GGUF_MAX_STRING);
        for (uint64_t i = 0; i < v->v.str.len; i++)
            h = h * 31 + (uint8_t)v->v.str.ptr[i];
    } else if (v->type == MOE_GGUF_ARRAY) {
        const enum moe_gguf_type et = v->v.arr.elem_type;
        REQUIRE(et < MOE_GGUF_TYPE_COUNT);
        if (et == MOE_GGUF_STRING) {
            const struct moe_gguf_str *s = v->v.arr.data;
            for (uint64_t i = 0; i < v->v.arr.n; i++) {
                REQUIRE(s[i].len <= MOE_GGUF_MAX_STRING);
                h += s[i].len + (s[i].len ? (uint8_t)s[i].ptr[0] + (uint8_t)s[i].ptr[s[i].len - 1] : 0);
            }
        } else if (et == MOE_GGUF_ARRAY) {
            const struct moe_gguf_value *a = v->v.arr.data;
            for (uint64_t i = 0; i < v->v.arr.n; i++) {
                REQUIRE(a[i].type == MOE_GGUF_ARRAY);
                h += walk(&a[i], depth + 1);
            }
        } else {
            const uint8_t *p = v->v.arr.data;
            size_t n = (size_t)v->v.arr.n * moe_gguf_type_size(et);
            for (size_t i = 0; i < n; i++)
                h += p[i];
            if (et == MOE_GGUF_BOOL)
                for (size_t i = 0; i < n; i++)
                    REQUIRE(p[i] <= 1);
        }
    } else if (v->type == MOE_GGUF_FLOAT32 || v->type == MOE_GGUF_FLOAT64) {
        h += (uint64_t)(v->v.f64 == v->v.f64);
    } else if (v->type == MOE_GGUF_BOOL) {
        h += v->v.b;
    } else {
        h += v->v.u64;
    }
    return h;
}

static int cmp_u64_pair(const void *a, const void *b)
{
    const uint64_t *x = a, *y = b;
    return x[0] < y[0] ? -1 : x[0] > y[0];
}

static void check_tensors(const struct moe_gguf *g)
{
    const uint64_t n = moe_gguf_n_tensors(g), align = moe_gguf_alignment(g);
    const uint64_t data_off = moe_gguf_data_offset(g), file = moe_gguf_file_size(g);
    REQUIRE(align >= 1 && align <= MOE_GGUF_MAX_ALIGNMENT && (align & (align - 1)) == 0);
    REQUIRE(data_off % align == 0);
    REQUIRE(n == 0 || data_off <= file);
    uint64_t *spans = n ? malloc(2 * n * sizeof(uint64_t)) : NULL;
    for (uint64_t i = 0; i < n; i++) {
        const struct moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        const struct moe_dtype_info *di = moe_dtype_info(t->dtype);
        size_t len = strlen(t->name);
        REQUIRE(len >= 1 && len < MOE_GGUF_MAX_NAME);
        REQUIRE(moe_gguf_find_tensor(g, t->name) == t);
        REQUIRE(t->n_dims >= 1 && t->n_dims <= MOE_GGUF_MAX_DIMS);
        REQUIRE(di != NULL && t->ne[0] % di->block_size == 0);
        uint64_t el = 1;
        for (uint32_t d = 0; d < MOE_GGUF_MAX_DIMS; d++) {
            REQUIRE(t->ne[d] >= 1 && (d < t->n_dims || t->ne[d] == 1));
            REQUIRE(!__builtin_mul_overflow(el, t->ne[d], &el));
        }
        REQUIRE(el == t->n_elements);
        REQUIRE(t->size == t->n_elements / di->block_size * di->type_size);
        REQUIRE(t->offset % align == 0);
        REQUIRE(t->offset <= file - data_off && t->size <= file - data_off - t->offset);
        if (spans) {
            spans[2 * i] = t->offset;
            spans[2 * i + 1] = t->size;
        }
        /* first and last bytes by pread, the same through the mapping */
        uint8_t head[16], tail[16];
        size_t k = t->size < sizeof(head) ? (size_t)t->size : sizeof(head);
        REQUIRE(moe_gguf_pread(g, t, 0, head, k, NULL) == 0);
        REQUIRE(moe_gguf_pread(g, t, t->size - k, tail, k, NULL) == 0);
        REQUIRE(moe_gguf_pread(g, t, t->size - k + 1, tail, k, NULL) == -EINVAL);
        const uint8_t *p = moe_gguf_tensor_data(g, t);
        REQUIRE(p != NULL);
        REQUIRE(memcmp(p, head, k) == 0 && memcmp(p + t->size - k, tail, k) == 0);
    }
    if (spans) {
        qsort(spans, (size_t)n, 2 * sizeof(uint64_t), cmp_u64_pair);
        for (uint64_t i = 1; i < n; i++)
            REQUIRE(spans[2 * (i - 1)] + spans[2 * (i - 1) + 1] <= spans[2 * i]);
        free(spans);
    }
    REQUIRE(moe_gguf_tensor_at(g, n) == NULL);
}

/* The same bytes through moe_gguf_open on a file must give the same result. */
static void check_file_path(const uint8_t *data, size_t size, struct moe_gguf *gm)
{
    int fd = memfd_create("fuzz.gguf", MFD_CLOEXEC);
    if (fd < 0)
        return; /* no memfd: nothing to compare */
    size_t done = 0;
    while (done < size) {
        ssize_t w = write(fd, data + done, size - done);
        REQUIRE(w > 0);
        done += (size_t)w;
    }
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    struct moe_gguf *gf;
    struct moe_diag d = { 0 };
    int rc = moe_gguf_open(&gf, path, &d);
    if (rc == -ENOENT) { /* no /proc */
        close(fd);
        return;
    }
    REQUIRE(rc == 0);
    REQUIRE(strcmp(moe_gguf_path(gf), path) == 0);
    REQUIRE(moe_gguf_version(gf) == moe_gguf_version(gm));
    REQUIRE(moe_gguf_alignment(gf) == moe_gguf_alignment(gm));
    REQUIRE(moe_gguf_data_offset(gf) == moe_gguf_data_offset(gm));
    REQUIRE(moe_gguf_n_kv(gf) == moe_gguf_n_kv(gm));
    REQUIRE(moe_gguf_n_tensors(gf) == moe_gguf_n_tensors(gm));
    for (uint64_t i = 0; i < moe_gguf_n_kv(gf); i++) {
        const struct moe_gguf_kv *a = moe_gguf_kv_at(gf, i), *b = moe_gguf_kv_at(gm, i);
        REQUIRE(strcmp(a->key, b->key) == 0 && a->value.type == b->value.type);
        REQUIRE(a->file_offset == b->file_offset);
        REQUIRE(walk(&a->value, 0) == walk(&b->value, 0));
    }
    REQUIRE(moe_gguf_map(gf, NULL) == 0);
    for (uint64_t i = 0; i < moe_gguf_n_tensors(gf); i++) {
        const struct moe_gguf_tensor *a = moe_gguf_tensor_at(gf, i), *b = moe_gguf_tensor_at(gm, i);
        REQUIRE(strcmp(a->name, b->name) == 0 && a->offset == b->offset && a->size == b->size);
        uint8_t x[16];
        size_t k = a->size < sizeof(x) ? (size_t)a->size : sizeof(x);
        REQUIRE(moe_gguf_pread(gf, a, a->size - k, x, k, NULL) == 0);
        REQUIRE(memcmp(x, moe_gguf_tensor_data(gm, b) + b->size - k, k) == 0);
        REQUIRE(memcmp(moe_gguf_tensor_data(gf, a), moe_gguf_tensor_data(gm, b), k) == 0);
    }
    moe_gguf_close(gf);
    close(fd);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct moe_gguf *g = (struct moe_gguf *)(uintptr_t)1;
    struct moe_diag d = { 0 };
    const long live = moe_alloc_live();
    int rc = moe_gguf_open_mem(&g, data, size, "fuzz.gguf", &d);
    if (rc != 0) {
        REQUIRE(moe_alloc_live() == live);
        /* the error contract: nothing returned, a code and a message naming the input */
        REQUIRE(g == NULL);
        REQUIRE(rc == MOE_EFORMAT || rc == MOE_ELIMIT || rc == MOE_EUNSUPPORTED);
        REQUIRE(d.code == rc && strncmp(d.msg, "fuzz.gguf: ", 11) == 0);
        return 0;
    }
    REQUIRE(moe_gguf_version(g) == 2 || moe_gguf_version(g) == 3);
    REQUIRE(moe_gguf_file_size(g) == size);
    volatile uint64_t sink = 0;
    for (uint64_t i = 0; i < moe_gguf_n_kv(g); i++) {
        const struct moe_gguf_kv *kv = moe_gguf_kv_at(g, i);
        size_t klen = strlen(kv->key);
        REQUIRE(klen >= 1 && klen <= MOE_GGUF_MAX_KEY);
        REQUIRE(moe_gguf_find_kv(g, kv->key) == kv);
        sink += walk(&kv->value, 0) + klen;
        uint64_t u;
        uint32_t u32;
        int64_t s;
        float f;
        bool b;
        struct moe_gguf_str str;
        const struct moe_gguf_value *a;
        struct moe_diag gd = { 0 };
        rc = moe_gguf_get_u64(g, kv->key, &u, &gd);
        REQUIRE(rc == 0 || (rc == MOE_EFORMAT && strstr(gd.msg, kv->key) != NULL));
        sink += rc == 0 ? u : 0;
        sink += moe_gguf_get_u32(g, kv->key, &u32, NULL) == 0 ? u32 : 0;
        sink += moe_gguf_get_i64(g, kv->key, &s, NULL) == 0 ? (uint64_t)s : 0;
        sink += moe_gguf_get_f32(g, kv->key, &f, NULL) == 0 ? (f == f) : 0;
        sink += moe_gguf_get_bool(g, kv->key, &b, NULL) == 0 ? b : 0;
        sink += moe_gguf_get_str(g, kv->key, &str, NULL) == 0 ? str.len : 0;
        rc = moe_gguf_get_arr(g, kv->key, MOE_GGUF_TYPE_COUNT, &a, NULL);
        REQUIRE(rc == (kv->value.type == MOE_GGUF_ARRAY ? 0 : MOE_EFORMAT));
        if (rc == 0) {
            const enum moe_gguf_type et = a->v.arr.elem_type;
            REQUIRE(moe_gguf_get_arr(g, kv->key, et, &a, NULL) == 0);
            REQUIRE(moe_gguf_get_arr(g, kv->key, (et + 1) % MOE_GGUF_TYPE_COUNT, &a, NULL) == MOE_EFORMAT);
        }
    }
    REQUIRE(moe_gguf_kv_at(g, moe_gguf_n_kv(g)) == NULL);
    REQUIRE(moe_gguf_find_kv(g, "") == NULL);
    REQUIRE(strcmp(moe_gguf_path(g), "fuzz.gguf") == 0);
    {
        /* a key that cannot be present (keys have no NUL, so use a 1025-byte one) */
        static char absent[MOE_GGUF_MAX_KEY + 2];
        if (absent[0] == '\0')
            memset(absent, 'x', MOE_GGUF_MAX_KEY + 1);
        uint64_t u;
        struct moe_gguf_str str;
        struct moe_diag nd = { 0 };
        REQUIRE(moe_gguf_get_u64(g, absent, &u, &nd) == -ENOENT && nd.code == 0);
        REQUIRE(moe_gguf_get_str(g, absent, &str, &nd) == -ENOENT && nd.code == 0);
        REQUIRE(moe_gguf_find_tensor(g, absent) == NULL);
    }
    /* general.alignment, when present, is what the reader uses */
    uint32_t al;
    if (moe_gguf_get_u32(g, "general.alignment", &al, NULL) == 0)
        REQUIRE(al == moe_gguf_alignment(g));
    else
        REQUIRE(moe_gguf_alignment(g) == MOE_GGUF_DEFAULT_ALIGNMENT);
    REQUIRE(moe_gguf_tensor_at(g, 0) == NULL || moe_gguf_tensor_data(g, moe_gguf_tensor_at(g, 0)) == NULL);
    REQUIRE(moe_gguf_map(g, NULL) == 0);
    REQUIRE(moe_gguf_map(g, NULL) == 0); /* idempotent */
    check_tensors(g);
    check_file_path(data, size, g);
    (void)sink;
    moe_gguf_close(g);
    REQUIRE(moe_alloc_live() == live);
    return 0;
}
