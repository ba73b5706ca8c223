/* GGUF writer (io/gguf_writer.h), read back with io/gguf.h:
 * - every key/value type, scalar and string arrays, nested arrays copied
 *   with add_value; tensors of several types and ranks written in odd
 *   chunks; everything compared after reading the file back;
 * - alignment from general.alignment, padding between tensors and after
 *   the last one;
 * - the temporary-file rule: nothing under the final name until finish
 *   succeeds; abort and failed finishes leave neither file (and an older
 *   file under the final name untouched);
 * - misuse and bad arguments are refused with a message naming the file,
 *   and the first error sticks;
 * - allocation failures at every point leave nothing behind;
 * - copying a shared/ref model key by key and tensor by tensor reproduces
 *   llama.cpp's bytes exactly (skips without shared/ref). */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/alloc.h"
#include "common/error.h"
#include "io/gguf.h"
#include "io/gguf_writer.h"
#include "common/dtype.h"
#include "tests/harness.h"

static int exists(const char *p)
{
    return access(p, F_OK) == 0;
}

static void path_in_tmp(char *buf, size_t n, const char *name)
{
    snprintf(buf, n, "%s/%s", moe_test_tmpdir(), name);
}

/* deterministic tensor bytes: byte k of tensor i */
static uint8_t pattern(int i, uint64_t k)
{
    return (uint8_t)(k * 131u + (uint64_t)i * 17u + (k >> 8));
}

struct ttest {
    const char *name;
    uint32_t n_dims;
    uint64_t ne[4];
    uint32_t dtype;
};

static const struct ttest tensors[] = {
    { "token_embd.weight", 2, { 64, 10, 1, 1 }, MOE_DTYPE_F16 },
    { "blk.0.attn_norm.weight", 1, { 7, 1, 1, 1 }, MOE_DTYPE_F32 },   /* 28 bytes: needs padding */
    { "blk.0.ffn_up_exps.weight", 3, { 64, 3, 5, 1 }, MOE_DTYPE_Q8_0 },
    { "blk.0.odd", 4, { 32, 3, 1, 2 }, MOE_DTYPE_Q4_0 },              /* 108 bytes */
    { "ids", 1, { 3, 1, 1, 1 }, MOE_DTYPE_I32 },
};
enum { N_TENSORS = sizeof(tensors) / sizeof(tensors[0]) };

static void test_round_trip(void)
{
    char path[4096], tmp[4200];
    path_in_tmp(path, sizeof(path), "all.gguf");
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    struct moe_gguf_writer *w = NULL;
    struct moe_diag d = { 0 };
    CHECK_MSG(moe_gguf_writer_create(&w, path, &d) == 0, "%s", d.msg);
    CHECK(exists(tmp) && !exists(path));

    /* every scalar type */
    uint8_t u8 = 200;
    int8_t i8 = -100;
    uint16_t u16 = 60000;
    int16_t i16 = -30000;
    double f64 = -1.0 / 3.0;
    int64_t i64 = -(1ll << 50);
    CHECK(moe_gguf_writer_add_scalar(w, "t.u8", MOE_GGUF_UINT8, &u8) == 0);
    CHECK(moe_gguf_writer_add_scalar(w, "t.i8", MOE_GGUF_INT8, &i8) == 0);
    CHECK(moe_gguf_writer_add_scalar(w, "t.u16", MOE_GGUF_UINT16, &u16) == 0);
    CHECK(moe_gguf_writer_add_scalar(w, "t.i16", MOE_GGUF_INT16, &i16) == 0);
    CHECK(moe_gguf_writer_add_u32(w, "t.u32", 4000000000u) == 0);
    CHECK(moe_gguf_writer_add_i32(w, "t.i32", -2000000000) == 0);
    CHECK(moe_gguf_writer_add_f32(w, "t.f32", 1.5e-6f) == 0);
    CHECK(moe_gguf_writer_add_bool(w, "t.bool", true) == 0);
    CHECK(moe_gguf_writer_add_str(w, "t.str", "h\xc3\xa9llo \xe2\x96\x81") == 0);
    CHECK(moe_gguf_writer_add_u64(w, "t.u64", UINT64_MAX - 1) == 0);
    CHECK(moe_gguf_writer_add_scalar(w, "t.i64", MOE_GGUF_INT64, &i64) == 0);
    CHECK(moe_gguf_writer_add_scalar(w, "t.f64", MOE_GGUF_FLOAT64, &f64) == 0);
    /* arrays */
    const int32_t ai32[5] = { 1, -2, 3, -4, 2147483647 };
    const float af32[3] = { 0.5f, -0.0f, 1e30f };
    const uint8_t abool[4] = { 1, 0, 0, 1 };
    const uint64_t au64[2] = { 1, UINT64_MAX };
    CHECK(moe_gguf_writer_add_arr(w, "a.i32", MOE_GGUF_INT32, 5, ai32) == 0);
    CHECK(moe_gguf_writer_add_arr(w, "a.f32", MOE_GGUF_FLOAT32, 3, af32) == 0);
    CHECK(moe_gguf_writer_add_arr(w, "a.bool", MOE_GGUF_BOOL, 4, abool) == 0);
    CHECK(moe_gguf_writer_add_arr(w, "a.u64", MOE_GGUF_UINT64, 2, au64) == 0);
    CHECK(moe_gguf_writer_add_arr(w, "a.empty", MOE_GGUF_INT16, 0, NULL) == 0);
    const char *strs[4] = { "<unk>", "", "a\0b", "\xe2\x96\x81the" };
    const size_t lens[4] = { 5, 0, 3, 6 };
    CHECK(moe_gguf_writer_add_str_arr(w, "a.str", 4, strs, lens) == 0);
    CHECK(moe_gguf_writer_add_str_arr(w, "a.str0", 2, (const char *const[]){ "x", "yz" }, NULL) == 0);
    /* a nested array through add_value: [[1, 2], [3]] of u16 */
    const uint16_t in0[2] = { 1, 2 }, in1[1] = { 3 };
    struct moe_gguf_value inner[2] = {
        { .type = MOE_GGUF_ARRAY, .v.arr = { MOE_GGUF_UINT16, 2, in0 } },
        { .type = MOE_GGUF_ARRAY, .v.arr = { MOE_GGUF_UINT16, 1, in1 } },
    };
    struct moe_gguf_value nested = { .type = MOE_GGUF_ARRAY, .v.arr = { MOE_GGUF_ARRAY, 2, inner } };
    CHECK(moe_gguf_writer_add_value(w, "a.nested", &nested) == 0);
    struct moe_gguf_value sv = { .type = MOE_GGUF_STRING, .v.str = { "via value", 9 } };
    CHECK(moe_gguf_writer_add_value(w, "v.str", &sv) == 0);

    uint64_t total = 0, sizes[N_TENSORS];
    for (int i = 0; i < N_TENSORS; i++) {
        CHECK(moe_gguf_writer_add_tensor(w, tensors[i].name, tensors[i].n_dims, tensors[i].ne, tensors[i].dtype,
                                         &sizes[i]) == 0);
        total += sizes[i];
    }
    CHECK_U64(sizes[0], ==, 64 * 10 * 2);
    CHECK_U64(sizes[1], ==, 28);
    CHECK_U64(sizes[2], ==, 2 * 34 * 15);
    CHECK_U64(sizes[3], ==, 18 * 6);
    CHECK(moe_gguf_writer_begin_data(w) == 0);
    /* all tensors' bytes as one stream, written in chunks of 1, 7, 100,
     * ... bytes (chunks span tensors) */
    uint8_t *all = malloc(total);
    CHECK(all != NULL);
    uint64_t k = 0;
    for (int i = 0; i < N_TENSORS; i++)
        for (uint64_t j = 0; j < sizes[i]; j++)
            all[k++] = pattern(i, j);
    static const size_t chunks[] = { 1, 7, 100, 3, 1000 };
    for (uint64_t off = 0, c = 0; off < total; c++) {
        size_t n = chunks[c % 5];
        if (n > total - off)
            n = (size_t)(total - off);
        if (moe_gguf_writer_write(w, all + off, n) != 0) {
            free(all);
            CHECK_MSG(0, "%s", moe_gguf_writer_error(w));
        }
        off += n;
    }
    free(all);
    CHECK(!exists(path));
    CHECK_MSG(moe_gguf_writer_finish(w, &d) == 0, "%s", d.msg);
    CHECK(exists(path) && !exists(tmp));

    /* read back */
    struct moe_gguf *g;
    CHECK_MSG(moe_gguf_open(&g, path, &d) == 0, "%s", d.msg);
    CHECK_INT(moe_gguf_version(g), ==, 3);
    CHECK_INT(moe_gguf_alignment(g), ==, 32);
    CHECK_U64(moe_gguf_n_kv(g), ==, 21);
    static const char *order[] = { "t.u8", "t.i8", "t.u16", "t.i16", "t.u32", "t.i32", "t.f32", "t.bool",
                                   "t.str", "t.u64", "t.i64", "t.f64", "a.i32", "a.f32", "a.bool", "a.u64",
                                   "a.empty", "a.str", "a.str0", "a.nested", "v.str" };
    for (int i = 0; i < 21; i++)
        CHECK_STR(moe_gguf_kv_at(g, (uint64_t)i)->key, order[i]);
    const struct moe_gguf_kv *kv;
#define KV(name, t) (kv = moe_gguf_find_kv(g, name), kv != NULL && kv->value.type == (t))
    CHECK(KV("t.u8", MOE_GGUF_UINT8) && kv->value.v.u64 == 200);
    CHECK(KV("t.i8", MOE_GGUF_INT8) && kv->value.v.i64 == -100);
    CHECK(KV("t.u16", MOE_GGUF_UINT16) && kv->value.v.u64 == 60000);
    CHECK(KV("t.i16", MOE_GGUF_INT16) && kv->value.v.i64 == -30000);
    CHECK(KV("t.u32", MOE_GGUF_UINT32) && kv->value.v.u64 == 4000000000u);
    CHECK(KV("t.i32", MOE_GGUF_INT32) && kv->value.v.i64 == -2000000000);
    CHECK(KV("t.f32", MOE_GGUF_FLOAT32) && kv->value.v.f64 == (double)1.5e-6f);
    CHECK(KV("t.bool", MOE_GGUF_BOOL) && kv->value.v.b);
    CHECK(KV("t.str", MOE_GGUF_STRING) && kv->value.v.str.len == 10 &&
          memcmp(kv->value.v.str.ptr, "h\xc3\xa9llo \xe2\x96\x81", 10) == 0);
    CHECK(KV("t.u64", MOE_GGUF_UINT64) && kv->value.v.u64 == UINT64_MAX - 1);
    CHECK(KV("t.i64", MOE_GGUF_INT64) && kv->value.v.i64 == i64);
    CHECK(KV("t.f64", MOE_GGUF_FLOAT64) && kv->value.v.f64 == f64);
    CHECK(KV("a.i32", MOE_GGUF_ARRAY) && kv->value.v.arr.elem_type == MOE_GGUF_INT32 &&
          kv->value.v.arr.n == 5 && memcmp(kv->value.v.arr.data, ai32, sizeof(ai32)) == 0);
    CHECK(KV("a.f32", MOE_GGUF_ARRAY) && kv->value.v.arr.elem_type == MOE_GGUF_FLOAT32 &&
          kv->value.v.arr.n == 3 && memcmp(kv->value.v.arr.data, af32, sizeof(af32)) == 0);
    CHECK(KV("a.bool", MOE_GGUF_ARRAY) && kv->value.v.arr.elem_type == MOE_GGUF_BOOL &&
          kv->value.v.arr.n == 4 && memcmp(kv->value.v.arr.data, abool, 4) == 0);
    CHECK(KV("a.u64", MOE_GGUF_ARRAY) && kv->value.v.arr.elem_type == MOE_GGUF_UINT64 &&
          kv->value.v.arr.n == 2 && memcmp(kv->value.v.arr.data, au64, sizeof(au64)) == 0);
    CHECK(KV("a.empty", MOE_GGUF_ARRAY) && kv->value.v.arr.elem_type == MOE_GGUF_INT16 &&
          kv->value.v.arr.n == 0);
    CHECK(KV("a.str", MOE_GGUF_ARRAY) && kv->value.v.arr.elem_type == MOE_GGUF_STRING && kv->value.v.arr.n == 4);
    const struct moe_gguf_str *s = kv->value.v.arr.data;
    for (int i = 0; i < 4; i++)
        CHECK_MSG(s[i].len == lens[i] && memcmp(s[i].ptr, strs[i], lens[i]) == 0, "a.str[%d]", i);
    CHECK(KV("a.str0", MOE_GGUF_ARRAY) && kv->value.v.arr.n == 2);
    s = kv->value.v.arr.data;
    CHECK(s[0].len == 1 && s[1].len == 2 && memcmp(s[1].ptr, "yz", 2) == 0);
    CHECK(KV("a.nested", MOE_GGUF_ARRAY) && kv->value.v.arr.elem_type == MOE_GGUF_ARRAY &&
          kv->value.v.arr.n == 2);
    const struct moe_gguf_value *in = kv->value.v.arr.data;
    CHECK(in[0].v.arr.elem_type == MOE_GGUF_UINT16 && in[0].v.arr.n == 2 && in[1].v.arr.n == 1);
    CHECK(memcmp(in[0].v.arr.data, in0, 4) == 0 && memcmp(in[1].v.arr.data, in1, 2) == 0);
    CHECK(KV("v.str", MOE_GGUF_STRING) && kv->value.v.str.len == 9);
#undef KV
    CHECK(moe_gguf_find_kv(g, "GGUF.version") == NULL);

    CHECK_U64(moe_gguf_n_tensors(g), ==, N_TENSORS);
    uint64_t end = 0;
    for (int i = 0; i < N_TENSORS; i++) {
        const struct moe_gguf_tensor *t = moe_gguf_tensor_at(g, (uint64_t)i);
        CHECK_STR(t->name, tensors[i].name);
        CHECK_INT(t->n_dims, ==, tensors[i].n_dims);
        for (int dd = 0; dd < 4; dd++)
            CHECK_U64(t->ne[dd], ==, tensors[i].ne[dd]);
        CHECK_INT(t->dtype, ==, tensors[i].dtype);
        CHECK_U64(t->size, ==, sizes[i]);
        /* offsets: the previous tensor's end rounded up to 32 */
        CHECK_U64(t->offset, ==, (end + 31) / 32 * 32);
        end = t->offset + t->size;
        uint8_t *buf = malloc(t->size);
        CHECK(buf != NULL);
        if (moe_gguf_pread(g, t, 0, buf, t->size, &d) != 0) {
            free(buf);
            CHECK_MSG(0, "%s", d.msg);
        }
        uint64_t bad = t->size;
        for (uint64_t j = 0; j < t->size && bad == t->size; j++)
            if (buf[j] != pattern(i, j))
                bad = j;
        free(buf);
        CHECK_MSG(bad == t->size, "%s: byte %llu differs", t->name, (unsigned long long)bad);
    }
    CHECK_U64(moe_gguf_data_offset(g) % 32, ==, 0);
    /* the last tensor is padded too */
    CHECK_U64(moe_gguf_file_size(g), ==, moe_gguf_data_offset(g) + (end + 31) / 32 * 32);
    moe_gguf_close(g);
}

#define NO_ALIGN UINT64_MAX

/* Two tensors (20 and 68 bytes); alignment NO_ALIGN: no general.alignment. */
static int write_small(const char *path, uint64_t alignment, int abort_it, struct moe_diag *d)
{
    struct moe_gguf_writer *w;
    int rc = moe_gguf_writer_create(&w, path, d);
    if (rc)
        return rc;
    if (alignment != NO_ALIGN)
        moe_gguf_writer_add_u32(w, "general.alignment", (uint32_t)alignment);
    moe_gguf_writer_add_str(w, "general.architecture", "llama");
    const uint64_t ne1[1] = { 5 }, ne2[2] = { 32, 2 };
    moe_gguf_writer_add_tensor(w, "a", 1, ne1, MOE_DTYPE_F32, NULL);
    moe_gguf_writer_add_tensor(w, "b", 2, ne2, MOE_DTYPE_Q8_0, NULL);
    moe_gguf_writer_begin_data(w);
    uint8_t buf[20 + 68];
    for (size_t i = 0; i < sizeof(buf); i++)
        buf[i] = (uint8_t)i;
    moe_gguf_writer_write(w, buf, sizeof(buf));
    if (abort_it) {
        moe_gguf_writer_abort(w);
        return 0;
    }
    return moe_gguf_writer_finish(w, d);
}

static void test_alignment(void)
{
    char path[4096];
    path_in_tmp(path, sizeof(path), "align.gguf");
    struct moe_diag d = { 0 };
    static const uint32_t aligns[] = { 1, 8, 64, 4096 };
    for (size_t i = 0; i < 4; i++) {
        CHECK_MSG(write_small(path, aligns[i], 0, &d) == 0, "%s", d.msg);
        struct moe_gguf *g;
        CHECK_MSG(moe_gguf_open(&g, path, &d) == 0, "%s", d.msg);
        CHECK_INT(moe_gguf_alignment(g), ==, aligns[i]);
        CHECK_U64(moe_gguf_data_offset(g) % aligns[i], ==, 0);
        const struct moe_gguf_tensor *b = moe_gguf_find_tensor(g, "b");
        CHECK(b != NULL);
        CHECK_U64(b->offset, ==, (20 + aligns[i] - 1) / aligns[i] * aligns[i]);
        uint8_t x[68];
        CHECK(moe_gguf_pread(g, b, 0, x, 68, &d) == 0);
        CHECK(x[0] == 20 && x[67] == 87);
        moe_gguf_close(g);
    }
    /* bad alignments */
    static const uint32_t bad[] = { 0, 3, 96, (1u << 21) };
    for (size_t i = 0; i < 4; i++) {
        d.code = 0;
        d.msg[0] = '\0';
        CHECK_INT(write_small(path, bad[i], 0, &d), ==, -EINVAL);
        CHECK_MSG(strstr(d.msg, "general.alignment") != NULL && strstr(d.msg, "align.gguf") != NULL, "%s",
                  d.msg);
    }
    struct moe_gguf_writer *w;
    CHECK(moe_gguf_writer_create(&w, path, &d) == 0);
    uint64_t a64 = 64;
    CHECK_INT(moe_gguf_writer_add_u64(w, "general.alignment", a64), ==, -EINVAL);
    moe_gguf_writer_abort(w);
}

static void test_temp_file(void)
{
    char path[4096], tmp[4200];
    path_in_tmp(path, sizeof(path), "tmpfile.gguf");
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    struct moe_diag d = { 0 };
    unlink(path);
    /* abort: neither file */
    CHECK(write_small(path, NO_ALIGN, 1, &d) == 0);
    CHECK(!exists(path) && !exists(tmp));
    /* a leftover temporary is replaced */
    FILE *f = fopen(tmp, "w");
    CHECK(f != NULL);
    fputs("stale", f);
    fclose(f);
    CHECK(write_small(path, NO_ALIGN, 0, &d) == 0);
    CHECK(exists(path) && !exists(tmp));
    struct stat st1;
    CHECK(stat(path, &st1) == 0);
    /* abort and failed finish keep the old file untouched */
    CHECK(write_small(path, NO_ALIGN, 1, &d) == 0);
    struct moe_gguf_writer *w;
    CHECK(moe_gguf_writer_create(&w, path, &d) == 0);
    const uint64_t ne[1] = { 8 };
    CHECK(moe_gguf_writer_add_tensor(w, "t", 1, ne, MOE_DTYPE_F32, NULL) == 0);
    CHECK(moe_gguf_writer_begin_data(w) == 0);
    float x[8] = { 0 };
    CHECK(moe_gguf_writer_write(w, x, 16) == 0); /* half the tensor */
    CHECK(exists(tmp));
    CHECK_INT(moe_gguf_writer_finish(w, &d), ==, -EINVAL);
    CHECK_MSG(strstr(d.msg, "tmpfile.gguf") && strstr(d.msg, "'t'") && strstr(d.msg, "16 of its 32"), "%s", d.msg);
    CHECK(!exists(tmp));
    struct stat st2;
    CHECK(stat(path, &st2) == 0);
    CHECK(st1.st_size == st2.st_size && st1.st_ino == st2.st_ino);
    /* too many bytes */
    CHECK(moe_gguf_writer_create(&w, path, &d) == 0);
    CHECK(moe_gguf_writer_add_tensor(w, "t", 1, ne, MOE_DTYPE_F32, NULL) == 0);
    CHECK(moe_gguf_writer_begin_data(w) == 0);
    float y[9] = { 0 };
    CHECK_INT(moe_gguf_writer_write(w, y, sizeof(y)), ==, -EINVAL);
    CHECK(moe_gguf_writer_error(w) != NULL && strstr(moe_gguf_writer_error(w), "more tensor bytes") != NULL);
    moe_diag_clear(&d);
    CHECK_INT(moe_gguf_writer_finish(w, &d), ==, -EINVAL);
    CHECK(!exists(tmp));
    /* a file with no tensors and no keys is valid */
    CHECK(moe_gguf_writer_create(&w, path, &d) == 0);
    CHECK(moe_gguf_writer_finish(w, &d) == 0);
    struct moe_gguf *g;
    CHECK_MSG(moe_gguf_open(&g, path, &d) == 0, "%s", d.msg);
    CHECK_U64(moe_gguf_n_tensors(g), ==, 0);
    CHECK_U64(moe_gguf_file_size(g), ==, 24);
    moe_gguf_close(g);
    /* cannot create: the message names the file */
    w = (struct moe_gguf_writer *)(uintptr_t)1;
    moe_diag_clear(&d);
    CHECK_INT(moe_gguf_writer_create(&w, "/nonexistent-dir/m.gguf", &d), ==, -ENOENT);
    CHECK(w == NULL);
    CHECK_MSG(strstr(d.msg, "/nonexistent-dir/m.gguf.tmp") != NULL, "%s", d.msg);
    moe_gguf_writer_abort(NULL);
}

static void test_misuse(void)
{
    char path[4096], tmp[4200];
    path_in_tmp(path, sizeof(path), "misuse.gguf");
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    unlink(path);
    struct moe_diag d = { 0 };
    struct moe_gguf_writer *w;
    const uint64_t ne[2] = { 32, 2 }, ne_bad[2] = { 33, 2 }, ne_zero[2] = { 32, 0 };
    char long_name[80];
    memset(long_name, 'x', sizeof(long_name) - 1);
    long_name[sizeof(long_name) - 1] = '\0';
    struct {
        const char *what;
        int expect;
    } cases[] = {
        { "duplicate key", -EINVAL },    { "duplicate tensor", -EINVAL }, { "key after begin", -EINVAL },
        { "tensor after begin", -EINVAL }, { "row not whole blocks", -EINVAL }, { "zero dim", -EOVERFLOW },
        { "5 dims", -EINVAL },          { "long name", -EINVAL },        { "empty key", -EINVAL },
        { "bad type", -EINVAL },        { "write before begin", -EINVAL },
    };
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        CHECK(moe_gguf_writer_create(&w, path, &d) == 0);
        int rc = 0;
        switch (c) {
        case 0:
            moe_gguf_writer_add_u32(w, "k", 1);
            rc = moe_gguf_writer_add_str(w, "k", "x");
            break;
        case 1:
            moe_gguf_writer_add_tensor(w, "t", 2, ne, MOE_DTYPE_Q8_0, NULL);
            rc = moe_gguf_writer_add_tensor(w, "t", 2, ne, MOE_DTYPE_F32, NULL);
            break;
        case 2:
            moe_gguf_writer_begin_data(w);
            rc = moe_gguf_writer_add_u32(w, "k", 1);
            break;
        case 3:
            moe_gguf_writer_begin_data(w);
            rc = moe_gguf_writer_add_tensor(w, "t", 2, ne, MOE_DTYPE_F32, NULL);
            break;
        case 4: rc = moe_gguf_writer_add_tensor(w, "t", 2, ne_bad, MOE_DTYPE_Q4_0, NULL); break;
        case 5: rc = moe_gguf_writer_add_tensor(w, "t", 2, ne_zero, MOE_DTYPE_F32, NULL); break;
        case 6: {
            const uint64_t ne5[5] = { 1, 1, 1, 1, 1 };
            rc = moe_gguf_writer_add_tensor(w, "t", 5, ne5, MOE_DTYPE_F32, NULL);
            break;
        }
        case 7: rc = moe_gguf_writer_add_tensor(w, long_name, 2, ne, MOE_DTYPE_F32, NULL); break;
        case 8: rc = moe_gguf_writer_add_u32(w, "", 1); break;
        case 9: rc = moe_gguf_writer_add_tensor(w, "t", 2, ne, 4 /* a removed ggml type */, NULL); break;
        case 10: rc = moe_gguf_writer_write(w, "x", 1); break;
        }
        CHECK_MSG(rc == cases[c].expect, "%s: rc %d (%s)", cases[c].what, rc, moe_strerror(rc));
        const char *msg = moe_gguf_writer_error(w);
        CHECK_MSG(msg != NULL && strstr(msg, "misuse.gguf") != NULL, "%s: message '%s'", cases[c].what,
                  msg ? msg : "(none)");
        /* sticky: later calls return the same error */
        CHECK_INT(moe_gguf_writer_add_u32(w, "other", 1), ==, cases[c].expect);
        moe_diag_clear(&d);
        CHECK_INT(moe_gguf_writer_finish(w, &d), ==, cases[c].expect);
        CHECK_STR(d.msg, msg ? d.msg : "");
        CHECK(!exists(path) && !exists(tmp));
    }
}

/* One write of more than the buffer (the direct path) between small ones. */
static void test_large_chunk(void)
{
    char path[4096];
    path_in_tmp(path, sizeof(path), "large.gguf");
    const size_t big = (9u << 20) + 3;
    uint8_t *buf = malloc(big);
    CHECK(buf != NULL);
    for (size_t i = 0; i < big; i++)
        buf[i] = pattern(3, i);
    struct moe_diag d = { 0 };
    struct moe_gguf_writer *w;
    int ok = moe_gguf_writer_create(&w, path, &d) == 0;
    const uint64_t ne_small[1] = { 3 }, ne_big[1] = { big };
    ok = ok && moe_gguf_writer_add_tensor(w, "small", 1, ne_small, MOE_DTYPE_I8, NULL) == 0;
    ok = ok && moe_gguf_writer_add_tensor(w, "big", 1, ne_big, MOE_DTYPE_I8, NULL) == 0;
    ok = ok && moe_gguf_writer_add_tensor(w, "tail", 1, ne_small, MOE_DTYPE_I8, NULL) == 0;
    ok = ok && moe_gguf_writer_begin_data(w) == 0;
    ok = ok && moe_gguf_writer_write(w, "abc", 3) == 0;
    ok = ok && moe_gguf_writer_write(w, buf, big) == 0;
    ok = ok && moe_gguf_writer_write(w, "xyz", 3) == 0;
    ok = ok && moe_gguf_writer_finish(w, &d) == 0;
    if (!ok) {
        free(buf);
        CHECK_MSG(0, "%s", d.msg);
    }
    struct moe_gguf *g;
    uint8_t *back = malloc(big);
    int same = 0;
    if (back && moe_gguf_open(&g, path, &d) == 0) {
        const struct moe_gguf_tensor *t = moe_gguf_find_tensor(g, "big");
        uint8_t tail[3];
        same = t && moe_gguf_pread(g, t, 0, back, big, &d) == 0 && memcmp(back, buf, big) == 0 &&
               moe_gguf_pread(g, moe_gguf_find_tensor(g, "tail"), 0, tail, 3, &d) == 0 &&
               memcmp(tail, "xyz", 3) == 0;
        moe_gguf_close(g);
    }
    free(back);
    free(buf);
    unlink(path);
    CHECK_MSG(same, "large chunk not read back (%s)", d.msg);
}

/* For N = 0, 1, ... fail the Nth allocation: every run before the first
 * success must fail with -ENOMEM and leave no allocation and no file. */
static void test_alloc_failures(void)
{
    char path[4096], tmp[4200];
    path_in_tmp(path, sizeof(path), "alloc.gguf");
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    unlink(path);
    int failures = 0;
    for (long n = 0; n < 1000; n++) {
        long live = moe_alloc_live();
        struct moe_diag d = { 0 };
        moe_alloc_fail_after(n);
        int rc = write_small(path, 64, 0, &d);
        moe_alloc_fail_after(-1);
        CHECK_MSG(moe_alloc_live() == live, "N=%ld: %ld allocations leaked", n, moe_alloc_live() - live);
        CHECK(!exists(tmp));
        if (rc == 0) {
            CHECK(exists(path));
            printf("  succeeded after %d injected failures\n", failures);
            CHECK(failures > 3);
            return;
        }
        CHECK_MSG(rc == -ENOMEM, "N=%ld: rc %d (%s)", n, rc, d.msg);
        CHECK_MSG(strstr(d.msg, "alloc.gguf") != NULL, "N=%ld: %s", n, d.msg);
        CHECK(!exists(path));
        failures++;
    }
    MOE_FAIL_AT("never succeeded");
}

/* Copying a llama-quantize output through the writer gives its bytes back:
 * same key/value and tensor-info encoding, same offsets and padding. */
static void copy_ref(const char *file)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    char src[4096], dst[4096];
    snprintf(src, sizeof(src), "%s/models/%s", ref, file);
    path_in_tmp(dst, sizeof(dst), file);
    struct moe_diag d = { 0 };
    struct moe_gguf *g;
    CHECK_MSG(moe_gguf_open(&g, src, &d) == 0, "%s", d.msg);
    struct moe_gguf_writer *w = NULL;
    int rc = moe_gguf_map(g, &d) || moe_gguf_writer_create(&w, dst, &d);
    for (uint64_t i = 0; rc == 0 && i < moe_gguf_n_kv(g); i++)
        rc = moe_gguf_writer_add_value(w, moe_gguf_kv_at(g, i)->key, &moe_gguf_kv_at(g, i)->value);
    for (uint64_t i = 0; rc == 0 && i < moe_gguf_n_tensors(g); i++) {
        const struct moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        rc = moe_gguf_writer_add_tensor(w, t->name, t->n_dims, t->ne, t->dtype, NULL);
    }
    rc = rc ? rc : moe_gguf_writer_begin_data(w);
    for (uint64_t i = 0; rc == 0 && i < moe_gguf_n_tensors(g); i++) {
        const struct moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        rc = moe_gguf_writer_write(w, moe_gguf_tensor_data(g, t), t->size);
    }
    moe_gguf_close(g);
    if (w)
        rc = moe_gguf_writer_finish(w, &d);
    CHECK_MSG(rc == 0, "%s", d.msg);
    size_t la = 0, lb = 0;
    uint8_t *a = moe_test_read_file(src, &la), *b = moe_test_read_file(dst, &lb);
    size_t k = 0;
    while (a && b && k < la && k < lb && a[k] == b[k])
        k++;
    free(a);
    free(b);
    unlink(dst);
    CHECK_MSG(la == lb && k == la, "%s: copy differs at byte %zu (sizes %zu vs %zu)", file, k, la, lb);
}

static void test_copy_mixtral_q4_0(void) { copy_ref("tiny-mixtral-Q4_0.gguf"); }
static void test_copy_mixtral_f32(void) { copy_ref("tiny-mixtral-F32.gguf"); }
static void test_copy_qwen3moe_q8_0(void) { copy_ref("tiny-qwen3moe-Q8_0.gguf"); }

int main(void)
{
    MOE_TEST_RUN(test_round_trip);
    MOE_TEST_RUN(test_alignment);
    MOE_TEST_RUN(test_temp_file);
    MOE_TEST_RUN(test_misuse);
    MOE_TEST_RUN(test_large_chunk);
    MOE_TEST_RUN(test_alloc_failures);
    MOE_TEST_RUN(test_copy_mixtral_q4_0);
    MOE_TEST_RUN(test_copy_mixtral_f32);
    MOE_TEST_RUN(test_copy_qwen3moe_q8_0);
    return moe_test_exit_code();
}
