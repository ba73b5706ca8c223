/* A tiny GGUF byte builder for tests and the seed corpus, independent of any
 * library writer: it writes exactly the bytes a case asks for, including
 * invalid ones.
 *
 * gb_spec_base() describes a small valid GGUF v3 file: general.architecture,
 * general.alignment, one scalar kv of every type, a string array, a nested
 * array, a float array, an empty u8 array, a string, and three tensors (F32,
 * F16, Q8_0) with data. Each knob of struct gb_spec breaks one thing;
 * gb_build() also records where some fields end (struct gb's at_* offsets)
 * so that a test can compute "just past the end of the file" lengths.
 * Everything here aborts on out-of-memory: it is test code. memmem needs
 * _GNU_SOURCE, which the build defines for every file. */
#ifndef MOE_TESTS_GGUF_BUILDER_H
#define MOE_TESTS_GGUF_BUILDER_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "io/gguf.h"
#include "common/dtype.h"

struct gb {
    uint8_t *p;
    size_t len, cap;
    /* Offsets recorded by gb_build(): the first byte after ... */
    size_t at_arch_len;    /* the length field of general.architecture's value */
    size_t at_strs_len;    /* the length field of test.strs (array of 3 strings) */
    size_t at_empty_len;   /* the length field of test.empty (array of u8) */
    size_t at_counts;      /* the header's n_tensors and n_kv */
    size_t at_tinfo;       /* the last kv (= start of the tensor infos) */
    size_t at_data;        /* the padding (= start of the data section) */
};

static inline void gb_bytes(struct gb *b, const void *src, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->len + n)
            cap *= 2;
        uint8_t *np = realloc(b->p, cap);
        if (np == NULL)
            abort();
        b->p = np;
        b->cap = cap;
    }
    if (n)
        memcpy(b->p + b->len, src, n);
    b->len += n;
}

/* GGUF is little-endian; so are the hosts we build for (x86-64, aarch64). */
static inline void gb_u8(struct gb *b, uint8_t v) { gb_bytes(b, &v, 1); }
static inline void gb_u32(struct gb *b, uint32_t v) { gb_bytes(b, &v, 4); }
static inline void gb_u64(struct gb *b, uint64_t v) { gb_bytes(b, &v, 8); }
static inline void gb_f32(struct gb *b, float v) { gb_bytes(b, &v, 4); }

static inline void gb_strn(struct gb *b, const char *s, size_t n)
{
    gb_u64(b, n);
    gb_bytes(b, s, n);
}

static inline void gb_str(struct gb *b, const char *s) { gb_strn(b, s, strlen(s)); }

static inline void gb_pad(struct gb *b, size_t align)
{
    while (b->len % align)
        gb_u8(b, 0);
}

/* Overwrites bytes already written (for cases that patch one field). */
static inline void gb_patch(struct gb *b, size_t at, const void *src, size_t n)
{
    if (at > b->len || n > b->len - at)
        abort();
    memcpy(b->p + at, src, n);
}

/* Offset of the first occurrence of a byte string, or abort. */
static inline size_t gb_find(const struct gb *b, const void *needle, size_t n)
{
    const uint8_t *p = memmem(b->p, b->len, needle, n);
    if (p == NULL)
        abort();
    return (size_t)(p - b->p);
}

/* ---- a small valid GGUF, with knobs to break it ---------------------- */

#define GB_AUTO UINT64_MAX    /* for the uint64_t knobs below: the real value */

struct gb_tensor {
    const char *name;
    uint32_t n_dims;
    uint64_t ne[4];
    uint32_t type;
    int64_t offset;           /* -1: computed */
};

struct gb_spec {
    char magic[4];
    uint32_t version;
    uint64_t n_tensors, n_kv; /* GB_AUTO: the real counts */
    const char *arch;
    uint64_t arch_len;        /* GB_AUTO: strlen; else the length written (the bytes of arch follow) */
    int with_alignment;
    uint32_t alignment_type;  /* MOE_GGUF_UINT32 normally; UINT64/INT64 write 8 bytes, others 4 */
    uint64_t alignment;
    uint64_t strs_len;        /* GB_AUTO: 3; else the array length written (3 strings follow) */
    uint64_t empty_len;       /* GB_AUTO: 0; else the length of test.empty (no bytes follow) */
    uint32_t nest_depth;      /* depth of the nested array kv (>= 1) */
    uint32_t bad_value_type;  /* nonzero: type id written for test.u8 */
    uint32_t bad_elem_type;   /* nonzero: element type written for test.floats */
    uint8_t bool_value;
    int dup_key;              /* a second "test.u32" */
    int empty_key;            /* a kv with key "" */
    const void *extra_kv;     /* raw bytes of one more kv (key, type, value), counted in n_kv */
    size_t extra_kv_len;
    int n_t;
    struct gb_tensor t[4];
    size_t cut_tail;          /* bytes dropped from the end */
};

static inline void gb_spec_base(struct gb_spec *s)
{
    memset(s, 0, sizeof(*s));
    memcpy(s->magic, "GGUF", 4);
    s->version = 3;
    s->n_tensors = s->n_kv = GB_AUTO;
    s->arch = "llama";
    s->arch_len = GB_AUTO;
    s->with_alignment = 1;
    s->alignment_type = MOE_GGUF_UINT32;
    s->alignment = 32;
    s->strs_len = GB_AUTO;
    s->empty_len = GB_AUTO;
    s->nest_depth = 2;
    s->bool_value = 1;
    s->n_t = 3;
    s->t[0] = (struct gb_tensor){ "t.f32", 2, { 8, 4, 1, 1 }, MOE_DTYPE_F32, -1 };
    s->t[1] = (struct gb_tensor){ "t.f16", 2, { 32, 2, 1, 1 }, MOE_DTYPE_F16, -1 };
    s->t[2] = (struct gb_tensor){ "t.q8_0", 3, { 64, 2, 1, 1 }, MOE_DTYPE_Q8_0, -1 };
}

/* Number of kv pairs gb_build() writes for s. */
static inline uint64_t gb_n_kv(const struct gb_spec *s)
{
    return 17u + (s->with_alignment ? 1 : 0) + (s->dup_key ? 1 : 0) + (s->empty_key ? 1 : 0) +
           (s->extra_kv ? 1 : 0);
}

/* depth 1: [7, 8] (INT32); depth k: an array holding one array of depth k-1. */
static inline void gb_nested(struct gb *b, uint32_t depth)
{
    if (depth <= 1) {
        gb_u32(b, MOE_GGUF_INT32);
        gb_u64(b, 2);
        gb_u32(b, 7);
        gb_u32(b, 8);
        return;
    }
    gb_u32(b, MOE_GGUF_ARRAY);
    gb_u64(b, 1);
    gb_nested(b, depth - 1);
}

static inline uint64_t gb_tensor_bytes(const struct gb_tensor *t)
{
    const struct moe_dtype_info *di = moe_dtype_info(t->type);
    if (di == NULL)
        return 64;
    uint64_t n = t->ne[0] / di->block_size * di->type_size;
    for (uint32_t d = 1; d < t->n_dims && d < 4; d++)
        n *= t->ne[d];
    return n;
}

/* Data byte k of every tensor (finite as F32 and F16). */
static inline uint8_t gb_data_byte(uint64_t k) { return (uint8_t)(k % 61); }

/* Builds the file; the caller frees b->p. */
static inline void gb_build(struct gb *b, const struct gb_spec *s)
{
    memset(b, 0, sizeof(*b));
    gb_bytes(b, s->magic, 4);
    gb_u32(b, s->version);
    gb_u64(b, s->n_tensors != GB_AUTO ? s->n_tensors : (uint64_t)s->n_t);
    gb_u64(b, s->n_kv != GB_AUTO ? s->n_kv : gb_n_kv(s));
    b->at_counts = b->len;
    /* 1: architecture */
    gb_str(b, "general.architecture");
    gb_u32(b, MOE_GGUF_STRING);
    gb_u64(b, s->arch_len != GB_AUTO ? s->arch_len : strlen(s->arch));
    b->at_arch_len = b->len;
    gb_bytes(b, s->arch, strlen(s->arch));
    if (s->with_alignment) {
        gb_str(b, "general.alignment");
        gb_u32(b, s->alignment_type);
        if (s->alignment_type == MOE_GGUF_UINT64 || s->alignment_type == MOE_GGUF_INT64)
            gb_u64(b, s->alignment);
        else
            gb_u32(b, (uint32_t)s->alignment);
    }
    /* one scalar of every type */
    gb_str(b, "test.u8");
    gb_u32(b, s->bad_value_type ? s->bad_value_type : MOE_GGUF_UINT8);
    gb_u8(b, 200);
    gb_str(b, "test.i8"); gb_u32(b, MOE_GGUF_INT8); gb_u8(b, (uint8_t)-5);
    gb_str(b, "test.u16"); gb_u32(b, MOE_GGUF_UINT16); gb_u8(b, 0x34); gb_u8(b, 0x12);
    gb_str(b, "test.i16"); gb_u32(b, MOE_GGUF_INT16); gb_u8(b, 0xfe); gb_u8(b, 0xff);
    gb_str(b, "test.u32"); gb_u32(b, MOE_GGUF_UINT32); gb_u32(b, 4000000000u);
    gb_str(b, "test.i32"); gb_u32(b, MOE_GGUF_INT32); gb_u32(b, (uint32_t)-7);
    gb_str(b, "test.f32"); gb_u32(b, MOE_GGUF_FLOAT32); gb_f32(b, 1.5f);
    gb_str(b, "test.bool"); gb_u32(b, MOE_GGUF_BOOL); gb_u8(b, s->bool_value);
    gb_str(b, "test.u64"); gb_u32(b, MOE_GGUF_UINT64); gb_u64(b, 1ull << 40);
    gb_str(b, "test.i64"); gb_u32(b, MOE_GGUF_INT64); gb_u64(b, (uint64_t)-9);
    gb_str(b, "test.f64"); gb_u32(b, MOE_GGUF_FLOAT64);
    double dv = -2.25;
    gb_bytes(b, &dv, 8);
    gb_str(b, "test.strs"); gb_u32(b, MOE_GGUF_ARRAY); gb_u32(b, MOE_GGUF_STRING);
    gb_u64(b, s->strs_len != GB_AUTO ? s->strs_len : 3);
    b->at_strs_len = b->len;
    gb_str(b, "a");
    gb_str(b, "bc");
    gb_str(b, "def");
    gb_str(b, "test.nested"); gb_u32(b, MOE_GGUF_ARRAY);
    gb_nested(b, s->nest_depth);
    gb_str(b, "test.floats"); gb_u32(b, MOE_GGUF_ARRAY);
    gb_u32(b, s->bad_elem_type ? s->bad_elem_type : MOE_GGUF_FLOAT32);
    gb_u64(b, 2);
    gb_f32(b, 0.5f);
    gb_f32(b, -0.25f);
    gb_str(b, "test.empty"); gb_u32(b, MOE_GGUF_ARRAY); gb_u32(b, MOE_GGUF_UINT8);
    gb_u64(b, s->empty_len != GB_AUTO ? s->empty_len : 0);
    b->at_empty_len = b->len;
    gb_str(b, "test.str"); gb_u32(b, MOE_GGUF_STRING); gb_str(b, "hello");
    if (s->dup_key) {
        gb_str(b, "test.u32"); gb_u32(b, MOE_GGUF_UINT32); gb_u32(b, 1);
    }
    if (s->empty_key) {
        gb_str(b, ""); gb_u32(b, MOE_GGUF_UINT32); gb_u32(b, 1);
    }
    if (s->extra_kv)
        gb_bytes(b, s->extra_kv, s->extra_kv_len);
    b->at_tinfo = b->len;
    /* tensor infos */
    const uint64_t align = s->alignment && s->alignment <= 4096 && !(s->alignment & (s->alignment - 1))
                               ? s->alignment : 32;
    uint64_t off = 0, offs[4];
    for (int i = 0; i < s->n_t; i++) {
        off = (off + align - 1) / align * align;
        offs[i] = s->t[i].offset >= 0 ? (uint64_t)s->t[i].offset : off;
        off += gb_tensor_bytes(&s->t[i]);
    }
    for (int i = 0; i < s->n_t; i++) {
        gb_str(b, s->t[i].name);
        gb_u32(b, s->t[i].n_dims);
        for (uint32_t d = 0; d < s->t[i].n_dims && d < 8; d++) /* n_dims may be huge */
            gb_u64(b, d < 4 ? s->t[i].ne[d] : 1);
        gb_u32(b, s->t[i].type);
        gb_u64(b, offs[i]);
    }
    b->at_data = b->len;
    if (s->n_t > 0) {
        gb_pad(b, (size_t)align);
        b->at_data = b->len;
        for (int i = 0; i < s->n_t; i++) {
            gb_pad(b, (size_t)align);
            uint64_t n = gb_tensor_bytes(&s->t[i]);
            for (uint64_t k = 0; k < n && k < (1u << 20); k++)
                gb_u8(b, gb_data_byte(k));
        }
    }
    if (s->cut_tail && s->cut_tail <= b->len)
        b->len -= s->cut_tail;
}

/* Raw bytes of one kv: key, type, then `n` value bytes, into out (caller frees). */
static inline void gb_kv_raw(struct gb *out, const char *key, size_t key_len, uint32_t type,
                             const void *val, size_t n)
{
    memset(out, 0, sizeof(*out));
    gb_strn(out, key, key_len);
    gb_u32(out, type);
    gb_bytes(out, val, n);
}

#endif
