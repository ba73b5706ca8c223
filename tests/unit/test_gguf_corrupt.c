/* The corrupt-GGUF table (shared/RELIABILITY.md row 1): every way a file
 * can lie is rejected with MOE_EFORMAT (or MOE_ELIMIT / MOE_EUNSUPPORTED
 * where documented) and a message naming the file and the field; truncation
 * at every offset of a small valid file fails cleanly through both entry
 * points; valid files (all value types, vocab-only, v2) read back exactly. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include "common/error.h"
#include "io/gguf.h"
#include "tests/harness.h"
#include "tests/unit/gguf_builder.h"

/* Opens bytes from an exact-size heap copy (so ASan sees any over-read). */
static int open_bytes(const uint8_t *p, size_t n, struct moe_diag *d, struct moe_gguf **g)
{
    uint8_t *copy = malloc(n ? n : 1);
    memcpy(copy, p, n);
    moe_diag_clear(d);
    int rc = moe_gguf_open_mem(g, copy, n, "case.gguf", d);
    if (rc == 0)
        moe_gguf_close(*g);
    free(copy);
    return rc;
}

static int open_file(const uint8_t *p, size_t n, struct moe_diag *d, char *path, size_t cap)
{
    snprintf(path, cap, "%s/case-file.gguf", moe_test_tmpdir());
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write(fd, p, n) != (ssize_t)n) {
        if (fd >= 0)
            close(fd);
        return -EIO;
    }
    close(fd);
    struct moe_gguf *g;
    moe_diag_clear(d);
    int rc = moe_gguf_open(&g, path, d);
    if (rc == 0)
        moe_gguf_close(g);
    return rc;
}

static void expect(const struct gb_spec *s, int code, const char *needle)
{
    struct gb b;
    gb_build(&b, s);
    struct moe_diag d = { 0 };
    struct moe_gguf *g = (struct moe_gguf *)(uintptr_t)1;
    int rc = open_bytes(b.p, b.len, &d, &g);
    CHECK_MSG(rc == code, "expected %d (%s), got %d: %s", code, needle, rc, d.msg);
    CHECK(g == NULL);
    CHECK_MSG(strstr(d.msg, "case.gguf") != NULL, "message lacks the file name: %s", d.msg);
    CHECK_MSG(strstr(d.msg, needle) != NULL, "message lacks '%s': %s", needle, d.msg);
    /* the same through a real file: the message names the path */
    char path[4096];
    rc = open_file(b.p, b.len, &d, path, sizeof(path));
    CHECK_MSG(rc == code, "file: expected %d, got %d: %s", code, rc, d.msg);
    CHECK_MSG(strstr(d.msg, path) != NULL, "message lacks the path: %s", d.msg);
    free(b.p);
}

#define CASE(name, code, needle, ...) \
    static void name(void) { struct gb_spec s; gb_spec_base(&s); __VA_ARGS__; expect(&s, code, needle); }

CASE(test_bad_magic, MOE_EFORMAT, "magic", memcpy(s.magic, "GGML", 4))
CASE(test_version_1, MOE_EUNSUPPORTED, "version 1", s.version = 1)
CASE(test_version_future, MOE_EFORMAT, "version 4", s.version = 4)
CASE(test_big_endian, MOE_EUNSUPPORTED, "big-endian", s.version = 0x03000000u)
CASE(test_n_tensors_huge, MOE_EFORMAT, "n_tensors", s.n_tensors = INT64_MAX)
CASE(test_n_kv_huge, MOE_EFORMAT, "n_kv", s.n_kv = INT64_MAX)
CASE(test_n_kv_past_end, MOE_EFORMAT, "kv #", s.n_kv = 25)
CASE(test_string_len_huge, MOE_ELIMIT, "length", s.arch_len = INT64_MAX)
CASE(test_string_len_past_eof, MOE_EFORMAT, "runs past the end", s.arch_len = 100000)
CASE(test_array_len_huge, MOE_EFORMAT, "does not fit", s.strs_len = INT64_C(1) << 62)
CASE(test_array_len_past_eof, MOE_EFORMAT, "does not fit", s.strs_len = 5000)
CASE(test_nesting_too_deep, MOE_ELIMIT, "nested", s.nest_depth = 9)
CASE(test_bad_value_type, MOE_EFORMAT, "value type 13", s.bad_value_type = 13)
CASE(test_bad_elem_type, MOE_EFORMAT, "element type 99", s.bad_elem_type = 99)
CASE(test_bool_value, MOE_EFORMAT, "bool", s.bool_value = 2)
CASE(test_duplicate_key, MOE_EFORMAT, "duplicate key 'test.u32'", s.dup_key = 1)
CASE(test_empty_key, MOE_EFORMAT, "empty key", s.empty_key = 1)
CASE(test_alignment_zero, MOE_EFORMAT, "general.alignment", s.alignment = 0)
CASE(test_alignment_not_pow2, MOE_EFORMAT, "general.alignment", s.alignment = 3)
CASE(test_alignment_huge, MOE_EFORMAT, "general.alignment", s.alignment = 1u << 31)
CASE(test_alignment_wrong_type, MOE_EFORMAT, "expected UINT32", s.alignment_type = MOE_GGUF_UINT64)
CASE(test_n_dims_zero, MOE_EFORMAT, "n_dims 0", s.t[1].n_dims = 0)
CASE(test_n_dims_five, MOE_EFORMAT, "n_dims 5", s.t[1].n_dims = 5)
CASE(test_dim_zero, MOE_EFORMAT, "ne[1] = 0", s.t[0].ne[1] = 0)
CASE(test_shape_overflow, MOE_EFORMAT, "overflow",
     s.t[2].n_dims = 3; s.t[2].ne[0] = 1ull << 32; s.t[2].ne[1] = 1ull << 32; s.t[2].ne[2] = 1ull << 32)
CASE(test_bytes_overflow, MOE_EFORMAT, "overflow",
     s.t[0].n_dims = 2; s.t[0].ne[0] = 1ull << 40; s.t[0].ne[1] = 1ull << 22)
CASE(test_row_not_block_multiple, MOE_EFORMAT, "not a multiple", s.t[2].ne[0] = 48)
CASE(test_type_removed_4, MOE_EFORMAT, "type id 4", s.t[1].type = 4)
CASE(test_type_removed_31, MOE_EFORMAT, "type id 31", s.t[1].type = 31)
CASE(test_type_unknown, MOE_EFORMAT, "type id 1000", s.t[1].type = 1000)
CASE(test_offset_misaligned, MOE_EFORMAT, "alignment", s.t[1].offset = 8)
CASE(test_offset_past_data, MOE_EFORMAT, "runs past", s.t[2].offset = 1 << 20)
CASE(test_overlap, MOE_EFORMAT, "overlap", s.t[1].offset = 0)
CASE(test_duplicate_tensor, MOE_EFORMAT, "duplicate tensor name 't.f32'", s.t[1].name = "t.f32")
CASE(test_name_too_long, MOE_EFORMAT, "name",
     s.t[0].name = "0123456789012345678901234567890123456789012345678901234567890123")
CASE(test_empty_name, MOE_EFORMAT, "name", s.t[0].name = "")
CASE(test_truncated_data, MOE_EFORMAT, "runs past the end of the data section", s.cut_tail = 10)

/* Truncation at every offset: never success, never a crash, and the error
 * names the file. */
static void test_truncation_everywhere(void)
{
    struct gb_spec s;
    gb_spec_base(&s);
    struct gb b;
    gb_build(&b, &s);
    struct moe_diag d = { 0 };
    char path[4096];
    for (size_t n = 0; n < b.len; n++) {
        struct moe_gguf *g;
        int rc = open_bytes(b.p, n, &d, &g);
        CHECK_MSG(rc == MOE_EFORMAT, "cut at %zu of %zu: rc %d: %s", n, b.len, rc, d.msg);
        CHECK_MSG(strstr(d.msg, "case.gguf") != NULL, "cut at %zu: %s", n, d.msg);
        rc = open_file(b.p, n, &d, path, sizeof(path));
        CHECK_MSG(rc == MOE_EFORMAT, "file cut at %zu: rc %d: %s", n, rc, d.msg);
    }
    printf("  %zu truncation points rejected\n", b.len);
    free(b.p);
}

static void test_valid_reads_back(void)
{
    struct gb_spec s;
    gb_spec_base(&s);
    struct gb b;
    gb_build(&b, &s);
    struct moe_gguf *g;
    struct moe_diag d = { 0 };
    CHECK_MSG(moe_gguf_open_mem(&g, b.p, b.len, "ok.gguf", &d) == 0, "%s", d.msg);
    CHECK_U64(moe_gguf_n_kv(g), ==, 18);
    CHECK_U64(moe_gguf_n_tensors(g), ==, 3);
    uint64_t u;
    int64_t i;
    float f;
    bool bo;
    struct moe_gguf_str str;
    CHECK(moe_gguf_get_u64(g, "test.u8", &u, &d) == 0 && u == 200);
    CHECK(moe_gguf_get_i64(g, "test.i8", &i, &d) == 0 && i == -5);
    CHECK(moe_gguf_get_u64(g, "test.u16", &u, &d) == 0 && u == 0x1234);
    CHECK(moe_gguf_get_i64(g, "test.i16", &i, &d) == 0 && i == -2);
    CHECK(moe_gguf_get_u64(g, "test.u32", &u, &d) == 0 && u == 4000000000u);
    CHECK(moe_gguf_get_i64(g, "test.i32", &i, &d) == 0 && i == -7);
    CHECK(moe_gguf_get_f32(g, "test.f32", &f, &d) == 0 && f == 1.5f);
    CHECK(moe_gguf_get_bool(g, "test.bool", &bo, &d) == 0 && bo);
    CHECK(moe_gguf_get_u64(g, "test.u64", &u, &d) == 0 && u == 1ull << 40);
    CHECK(moe_gguf_get_i64(g, "test.i64", &i, &d) == 0 && i == -9);
    CHECK(moe_gguf_get_f32(g, "test.f64", &f, &d) == 0 && f == -2.25f);
    CHECK(moe_gguf_get_str(g, "test.str", &str, &d) == 0 && str.len == 5 && memcmp(str.ptr, "hello", 5) == 0);
    /* conversions that must be refused */
    uint32_t u32;
    CHECK(moe_gguf_get_u32(g, "test.u64", &u32, &d) == MOE_EFORMAT);
    moe_diag_clear(&d);
    CHECK(moe_gguf_get_u64(g, "test.i8", &u, &d) == MOE_EFORMAT);
    CHECK(strstr(d.msg, "test.i8") != NULL);
    CHECK(moe_gguf_get_str(g, "test.u8", &str, NULL) == MOE_EFORMAT);
    CHECK(moe_gguf_get_u64(g, "no.such.key", &u, NULL) == -ENOENT);
    const struct moe_gguf_value *a;
    CHECK(moe_gguf_get_arr(g, "test.strs", MOE_GGUF_STRING, &a, &d) == 0);
    const struct moe_gguf_str *ss = a->v.arr.data;
    CHECK(a->v.arr.n == 3 && ss[2].len == 3 && memcmp(ss[2].ptr, "def", 3) == 0);
    CHECK(moe_gguf_get_arr(g, "test.nested", MOE_GGUF_ARRAY, &a, &d) == 0);
    const struct moe_gguf_value *inner = a->v.arr.data;
    CHECK(a->v.arr.n == 1 && inner[0].v.arr.elem_type == MOE_GGUF_INT32 && inner[0].v.arr.n == 2);
    CHECK(((const int32_t *)inner[0].v.arr.data)[1] == 8);
    CHECK(moe_gguf_get_arr(g, "test.floats", MOE_GGUF_FLOAT32, &a, &d) == 0);
    CHECK(((const float *)a->v.arr.data)[1] == -0.25f);
    CHECK(moe_gguf_get_arr(g, "test.empty", MOE_GGUF_UINT8, &a, &d) == 0 && a->v.arr.n == 0);
    CHECK(moe_gguf_get_arr(g, "test.floats", MOE_GGUF_INT32, &a, NULL) == MOE_EFORMAT);
    const struct moe_gguf_tensor *t = moe_gguf_find_tensor(g, "t.q8_0");
    CHECK(t != NULL && t->size == 136 && t->n_dims == 3 && t->ne[2] == 1);
    uint8_t buf[136];
    CHECK(moe_gguf_pread(g, t, 0, buf, sizeof(buf), &d) == 0);
    for (int k = 0; k < 136; k++)
        CHECK(buf[k] == k % 61);
    CHECK(moe_gguf_map(g, &d) == 0);
    CHECK(memcmp(moe_gguf_tensor_data(g, t), buf, 136) == 0);
    CHECK(moe_gguf_find_tensor(g, "t.none") == NULL);
    moe_gguf_close(g);
    free(b.p);
}

static void test_vocab_only_and_v2(void)
{
    struct gb_spec s;
    gb_spec_base(&s);
    s.n_t = 0;
    s.with_alignment = 0;
    struct gb b;
    gb_build(&b, &s);
    struct moe_gguf *g;
    struct moe_diag d = { 0 };
    CHECK_MSG(moe_gguf_open_mem(&g, b.p, b.len, "vocab.gguf", &d) == 0, "%s", d.msg);
    CHECK_U64(moe_gguf_n_tensors(g), ==, 0);
    CHECK_U64(moe_gguf_alignment(g), ==, 32);
    moe_gguf_close(g);
    free(b.p);
    gb_spec_base(&s);
    s.version = 2;
    gb_build(&b, &s);
    CHECK_MSG(moe_gguf_open_mem(&g, b.p, b.len, "v2.gguf", &d) == 0, "%s", d.msg);
    CHECK_U64(moe_gguf_version(g), ==, 2);
    moe_gguf_close(g);
    free(b.p);
    /* a non-default alignment is honoured */
    gb_spec_base(&s);
    s.alignment = 256;
    gb_build(&b, &s);
    CHECK_MSG(moe_gguf_open_mem(&g, b.p, b.len, "a256.gguf", &d) == 0, "%s", d.msg);
    CHECK_U64(moe_gguf_data_offset(g) % 256, ==, 0);
    moe_gguf_close(g);
    free(b.p);
}

static void test_not_regular_file(void)
{
    struct moe_gguf *g;
    struct moe_diag d = { 0 };
    CHECK(moe_gguf_open(&g, moe_test_tmpdir(), &d) == -EINVAL);
    CHECK(g == NULL && strstr(d.msg, "not a regular file") != NULL);
    moe_diag_clear(&d);
    CHECK(moe_gguf_open(&g, "/nonexistent/m.gguf", &d) == -ENOENT);
    CHECK(strstr(d.msg, "/nonexistent/m.gguf") != NULL);
    moe_diag_clear(&d);
    CHECK(moe_gguf_open_mem(&g, NULL, 0, NULL, &d) == MOE_EFORMAT);
}

int main(void)
{
    MOE_TEST_RUN(test_bad_magic);
    MOE_TEST_RUN(test_version_1);
    MOE_TEST_RUN(test_version_future);
    MOE_TEST_RUN(test_big_endian);
    MOE_TEST_RUN(test_n_tensors_huge);
    MOE_TEST_RUN(test_n_kv_huge);
    MOE_TEST_RUN(test_n_kv_past_end);
    MOE_TEST_RUN(test_string_len_huge);
    MOE_TEST_RUN(test_string_len_past_eof);
    MOE_TEST_RUN(test_array_len_huge);
    MOE_TEST_RUN(test_array_len_past_eof);
    MOE_TEST_RUN(test_nesting_too_deep);
    MOE_TEST_RUN(test_bad_value_type);
    MOE_TEST_RUN(test_bad_elem_type);
    MOE_TEST_RUN(test_bool_value);
    MOE_TEST_RUN(test_duplicate_key);
    MOE_TEST_RUN(test_empty_key);
    MOE_TEST_RUN(test_alignment_zero);
    MOE_TEST_RUN(test_alignment_not_pow2);
    MOE_TEST_RUN(test_alignment_huge);
    MOE_TEST_RUN(test_alignment_wrong_type);
    MOE_TEST_RUN(test_n_dims_zero);
    MOE_TEST_RUN(test_n_dims_five);
    MOE_TEST_RUN(test_dim_zero);
    MOE_TEST_RUN(test_shape_overflow);
    MOE_TEST_RUN(test_bytes_overflow);
    MOE_TEST_RUN(test_row_not_block_multiple);
    MOE_TEST_RUN(test_type_removed_4);
    MOE_TEST_RUN(test_type_removed_31);
    MOE_TEST_RUN(test_type_unknown);
    MOE_TEST_RUN(test_offset_misaligned);
    MOE_TEST_RUN(test_offset_past_data);
    MOE_TEST_RUN(test_overlap);
    MOE_TEST_RUN(test_duplicate_tensor);
    MOE_TEST_RUN(test_name_too_long);
    MOE_TEST_RUN(test_empty_name);
    MOE_TEST_RUN(test_truncated_data);
    MOE_TEST_RUN(test_truncation_everywhere);
    MOE_TEST_RUN(test_valid_reads_back);
    MOE_TEST_RUN(test_vocab_only_and_v2);
    MOE_TEST_RUN(test_not_regular_file);
    return moe_test_exit_code();
}
