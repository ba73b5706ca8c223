/* The corrupt-GGUF table (shared/RELIABILITY.md row 1): every way a file
 * can lie is rejected with MOE_EFORMAT (or MOE_ELIMIT for a cap, and
 * MOE_EUNSUPPORTED for version 1 and big-endian files, as doc/gguf.md says)
 * and a message naming the file and the field, through both entry points
 * (moe_gguf_open_mem with the caller's name, moe_gguf_open with the path),
 * leaving no allocation behind. Truncation at every offset of small valid
 * files fails cleanly through both entry points; valid files (every value
 * type, vocab-only, v2, each cap exactly reached) read back exactly.
 *
 * Cases are built by tests/unit/gguf_builder.h from one small valid file. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include "common/alloc.h"
#include "common/error.h"
#include "io/gguf.h"
#include "tests/harness.h"
#include "tests/unit/gguf_builder.h"

static const char *write_tmp(const uint8_t *p, size_t n, const char *name)
{
    static char path[4096];
    snprintf(path, sizeof(path), "%s/%s", moe_test_tmpdir(), name);
    /* A fresh inode each time: rewriting a truncated file makes ext4 flush
     * it on close (auto_da_alloc), which turns thousands of cases into
     * thousands of disk writes. */
    unlink(path);
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0644);
    if (fd < 0)
        return NULL;
    size_t done = 0;
    while (done < n) {
        ssize_t w = write(fd, p + done, n - done);
        if (w <= 0) {
            close(fd);
            return NULL;
        }
        done += (size_t)w;
    }
    close(fd);
    return path;
}

/* Opens and closes bytes through one entry point: open_mem from an
 * exact-size heap copy (so ASan sees any over-read), or open on a file.
 * Checks the contract of a failed open: *out NULL, diag->code == rc, and
 * every allocation returned (after close, for a successful one). Returns rc; *where gets the name that
 * messages must carry. */
static int try_open(const uint8_t *p, size_t n, int use_file, struct moe_diag *d,
                    const char **where)
{
    struct moe_gguf *g = (struct moe_gguf *)(uintptr_t)1;
    uint8_t *copy = NULL;
    long live = moe_alloc_live();
    int rc;
    moe_diag_clear(d);
    if (use_file) {
        const char *path = write_tmp(p, n, "case.gguf");
        if (path == NULL)
            return -EIO;
        *where = path;
        rc = moe_gguf_open(&g, path, d);
        unlink(path); /* the open descriptor keeps the file readable */
    } else {
        copy = malloc(n ? n : 1);
        if (n)
            memcpy(copy, p, n);
        *where = "case-mem.gguf";
        rc = moe_gguf_open_mem(&g, copy, n, *where, d);
    }
    if (rc == 0)
        moe_gguf_close(g); /* before the buffer it reads from goes away */
    free(copy);
    if (rc == 0) {
        if (moe_alloc_live() != live) {
            MOE_FAIL_AT("open + close leaked %ld allocations", moe_alloc_live() - live);
            return -EFAULT;
        }
        return 0;
    }
    if (g != NULL) {
        MOE_FAIL_AT("failed open (rc %d) left *out non-NULL", rc);
        return -EFAULT;
    }
    if (d->code != rc) {
        MOE_FAIL_AT("rc %d but diag.code %d: %s", rc, d->code, d->msg);
        return -EFAULT;
    }
    if (moe_alloc_live() != live) {
        MOE_FAIL_AT("failed open (rc %d) leaked %ld allocations", rc, moe_alloc_live() - live);
        return -EFAULT;
    }
    return rc;
}

/* The bytes must be refused with `code` through both entry points, with a
 * message naming the file and containing each needle (NULL: none). */
static void expect_bytes(const uint8_t *p, size_t n, int code, const char *n1, const char *n2)
{
    for (int use_file = 0; use_file < 2; use_file++) {
        struct moe_diag d = { 0 };
        const char *where = "";
        int rc = try_open(p, n, use_file, &d, &where);
        const char *how = use_file ? "moe_gguf_open" : "moe_gguf_open_mem";
        CHECK_MSG(rc == code, "%s: expected %d (%s), got %d (%s): %s", how, code,
                  moe_strerror(code), rc, moe_strerror(rc), d.msg);
        CHECK_MSG(strncmp(d.msg, where, strlen(where)) == 0, "%s: message does not start with '%s': %s",
                  how, where, d.msg);
        CHECK_MSG(n1 == NULL || strstr(d.msg, n1) != NULL, "%s: message lacks '%s': %s", how, n1, d.msg);
        CHECK_MSG(n2 == NULL || strstr(d.msg, n2) != NULL, "%s: message lacks '%s': %s", how, n2, d.msg);
        if (getenv("MOE_TEST_VERBOSE"))
            printf("  %s\n", d.msg);
    }
}

static void expect(const struct gb_spec *s, int code, const char *n1, const char *n2)
{
    struct gb b;
    gb_build(&b, s);
    expect_bytes(b.p, b.len, code, n1, n2);
    free(b.p);
}

/* The base file's bytes and field offsets, for cases that need lengths
 * relative to the end of the file. */
static struct gb base_bytes(void)
{
    struct gb_spec s;
    struct gb b;
    gb_spec_base(&s);
    gb_build(&b, &s);
    return b;
}

#define CASE(name, code, n1, n2, ...) \
    static void name(void) { struct gb_spec s; gb_spec_base(&s); __VA_ARGS__; expect(&s, code, n1, n2); }

/* A spec with one raw extra kv; val/n are the bytes after key and type. */
#define CASE_KV(name, code, n1, n2, key, key_len, type, ...) \
    static void name(void) { \
        static const uint8_t val[] = { __VA_ARGS__ }; \
        struct gb kv; gb_kv_raw(&kv, key, key_len, type, val, sizeof(val)); \
        struct gb_spec s; gb_spec_base(&s); s.extra_kv = kv.p; s.extra_kv_len = kv.len; \
        expect(&s, code, n1, n2); free(kv.p); }

#define LE64(v) (uint8_t)((uint64_t)(v) >> 0), (uint8_t)((uint64_t)(v) >> 8), \
    (uint8_t)((uint64_t)(v) >> 16), (uint8_t)((uint64_t)(v) >> 24), (uint8_t)((uint64_t)(v) >> 32), \
    (uint8_t)((uint64_t)(v) >> 40), (uint8_t)((uint64_t)(v) >> 48), (uint8_t)((uint64_t)(v) >> 56)
#define LE32(v) (uint8_t)((uint32_t)(v) >> 0), (uint8_t)((uint32_t)(v) >> 8), \
    (uint8_t)((uint32_t)(v) >> 16), (uint8_t)((uint32_t)(v) >> 24)

/* ---- header ---------------------------------------------------------- */

CASE(test_bad_magic, MOE_EFORMAT, "magic", "GGUF", memcpy(s.magic, "GGML", 4))
CASE(test_version_0, MOE_EFORMAT, "version 0", "expected 2 or 3", s.version = 0)
CASE(test_version_1, MOE_EUNSUPPORTED, "version 1", NULL, s.version = 1)
CASE(test_version_4, MOE_EFORMAT, "version 4", "expected 2 or 3", s.version = 4)
CASE(test_version_future, MOE_EFORMAT, "version 4294967295", NULL, s.version = UINT32_MAX)
CASE(test_big_endian_v3, MOE_EUNSUPPORTED, "big-endian", "v3", s.version = 0x03000000u)
CASE(test_big_endian_v2, MOE_EUNSUPPORTED, "big-endian", "v2", s.version = 0x02000000u)
CASE(test_n_tensors_2_63, MOE_EFORMAT, "n_tensors 9223372036854775808", "cannot fit",
     s.n_tensors = 1ull << 63)
CASE(test_n_tensors_max, MOE_EFORMAT, "n_tensors", "cannot fit", s.n_tensors = UINT64_MAX - 1)
CASE(test_n_kv_2_63, MOE_EFORMAT, "n_kv 9223372036854775808", "cannot fit", s.n_kv = 1ull << 63)
/* More kvs than written: kv #18 is read from the tensor infos, and what
 * follows is garbage somewhere. */
CASE(test_n_kv_more_than_written, MOE_EFORMAT, NULL, NULL, s.n_kv = 25)
/* One tensor more than written: tensor #3's name length is read from the
 * data section (bytes 00 01 02 ...), far above the 63-byte cap. */
CASE(test_n_tensors_one_more, MOE_EFORMAT, "tensor #3", "name", s.n_tensors = 4)

/* A count whose smallest encoding needs one byte more than is left. */
static void test_counts_past_remaining(void)
{
    struct gb b = base_bytes();
    uint64_t left = b.len - b.at_counts;
    uint64_t n_t = left / 33 + 1, n_kv = left / 14 + 1; /* smallest tensor info / kv */
    free(b.p);
    struct gb_spec s;
    gb_spec_base(&s);
    s.n_tensors = n_t;
    expect(&s, MOE_EFORMAT, "n_tensors", "cannot fit");
    gb_spec_base(&s);
    s.n_kv = n_kv;
    expect(&s, MOE_EFORMAT, "n_kv", "cannot fit");
}

/* ---- strings --------------------------------------------------------- */

CASE(test_string_len_2_63, MOE_ELIMIT, "general.architecture", "exceeds the cap", s.arch_len = 1ull << 63)
CASE(test_string_len_max, MOE_ELIMIT, "general.architecture", "exceeds the cap", s.arch_len = UINT64_MAX - 1)
CASE(test_string_len_cap_plus_one, MOE_ELIMIT, "general.architecture", "16777217",
     s.arch_len = MOE_GGUF_MAX_STRING + 1)

static void test_string_len_past_eof(void)
{
    struct gb b = base_bytes();
    uint64_t left = b.len - b.at_arch_len;
    free(b.p);
    struct gb_spec s;
    gb_spec_base(&s);
    s.arch_len = left + 1;
    expect(&s, MOE_EFORMAT, "general.architecture", "runs past the end of the file");
    /* exactly to the end: the string parses, the next kv is missing */
    s.arch_len = left;
    expect(&s, MOE_EFORMAT, "kv #1", "remain");
}

static void test_key_too_long(void)
{
    char key[MOE_GGUF_MAX_KEY + 1];
    memset(key, 'k', sizeof(key));
    struct gb kv;
    gb_kv_raw(&kv, key, sizeof(key), MOE_GGUF_UINT8, "", 1);
    struct gb_spec s;
    gb_spec_base(&s);
    s.extra_kv = kv.p;
    s.extra_kv_len = kv.len;
    expect(&s, MOE_EFORMAT, "kv #18", "length 1025 at offset");
    free(kv.p);
}

CASE(test_duplicate_key, MOE_EFORMAT, "duplicate key 'test.u32'", NULL, s.dup_key = 1)
CASE(test_empty_key, MOE_EFORMAT, "empty key", "kv #18", s.empty_key = 1)
CASE_KV(test_key_with_nul, MOE_EFORMAT, "kv #18", "NUL", "bad\0key", 7, MOE_GGUF_UINT8, 1)

/* ---- values ---------------------------------------------------------- */

CASE(test_bad_value_type, MOE_EFORMAT, "value type 13", "'test.u8'", s.bad_value_type = 13)
CASE(test_bad_value_type_max, MOE_EFORMAT, "value type 4294967295", "'test.u8'",
     s.bad_value_type = UINT32_MAX)
CASE(test_bad_elem_type, MOE_EFORMAT, "element type 99", "'test.floats'", s.bad_elem_type = 99)
CASE(test_bad_elem_type_13, MOE_EFORMAT, "element type 13", "'test.floats'", s.bad_elem_type = 13)
CASE(test_bool_value, MOE_EFORMAT, "bool value 2", "'test.bool'", s.bool_value = 2)
CASE(test_bool_value_ff, MOE_EFORMAT, "bool value 255", "'test.bool'", s.bool_value = 255)
CASE_KV(test_bool_array_value, MOE_EFORMAT, "bool element [1] is 2", "'test.bools'",
        "test.bools", 10, MOE_GGUF_ARRAY, LE32(MOE_GGUF_BOOL), LE64(3), 1, 2, 0)
CASE(test_array_len_2_62, MOE_EFORMAT, "'test.strs'", "does not fit", s.strs_len = 1ull << 62)
CASE(test_u8_array_len_2_62, MOE_EFORMAT, "'test.empty'", "does not fit", s.empty_len = 1ull << 62)
/* n x element size overflows u64 (2^61 x 8, 2^62 x 4): the check must not wrap */
CASE_KV(test_array_bytes_overflow_u64, MOE_EFORMAT, "'test.big'", "does not fit",
        "test.big", 8, MOE_GGUF_ARRAY, LE32(MOE_GGUF_UINT64), LE64(1ull << 61), 0, 0, 0, 0, 0, 0, 0, 0)
CASE_KV(test_array_bytes_overflow_f32, MOE_EFORMAT, "'test.big'", "does not fit",
        "test.big", 8, MOE_GGUF_ARRAY, LE32(MOE_GGUF_FLOAT32), LE64(1ull << 62), 0, 0, 0, 0)
CASE_KV(test_array_of_arrays_huge, MOE_EFORMAT, "'test.big'", "does not fit",
        "test.big", 8, MOE_GGUF_ARRAY, LE32(MOE_GGUF_ARRAY), LE64(UINT64_MAX / 4), 0, 0, 0, 0)
CASE_KV(test_string_in_array_past_eof, MOE_EFORMAT, "'test.ss'", "string [1]",
        "test.ss", 7, MOE_GGUF_ARRAY, LE32(MOE_GGUF_STRING), LE64(2), LE64(1), 'x', LE64(100000))

static void test_array_len_past_eof(void)
{
    struct gb b = base_bytes();
    uint64_t left_strs = b.len - b.at_strs_len, left_u8 = b.len - b.at_empty_len;
    free(b.p);
    struct gb_spec s;
    gb_spec_base(&s);
    s.strs_len = left_strs / 8 + 1; /* each string takes at least its 8-byte length */
    expect(&s, MOE_EFORMAT, "'test.strs'", "does not fit");
    gb_spec_base(&s);
    s.empty_len = left_u8 + 1;
    expect(&s, MOE_EFORMAT, "'test.empty'", "does not fit");
    /* exactly the bytes left: the array swallows the rest, kv #17 is missing */
    s.empty_len = left_u8;
    expect(&s, MOE_EFORMAT, "kv #17", "remain");
}

CASE(test_nesting_too_deep, MOE_ELIMIT, "'test.nested'", "nested deeper than 8", s.nest_depth = 9)
CASE(test_nesting_far_too_deep, MOE_ELIMIT, "'test.nested'", "nested deeper than 8", s.nest_depth = 200)

/* ---- general.alignment ----------------------------------------------- */

CASE(test_alignment_zero, MOE_EFORMAT, "general.alignment", "power of two", s.alignment = 0)
CASE(test_alignment_not_pow2, MOE_EFORMAT, "general.alignment: 3", "power of two", s.alignment = 3)
CASE(test_alignment_above_cap, MOE_EFORMAT, "general.alignment: 2097152", "power of two",
     s.alignment = MOE_GGUF_MAX_ALIGNMENT * 2)
CASE(test_alignment_2_31, MOE_EFORMAT, "general.alignment: 2147483648", "power of two",
     s.alignment = 1u << 31)
CASE(test_alignment_u64, MOE_EFORMAT, "general.alignment", "type UINT64, expected UINT32",
     s.alignment_type = MOE_GGUF_UINT64)
CASE(test_alignment_i32, MOE_EFORMAT, "general.alignment", "type INT32, expected UINT32",
     s.alignment_type = MOE_GGUF_INT32)

/* ---- tensor infos ---------------------------------------------------- */

CASE(test_n_dims_zero, MOE_EFORMAT, "'t.f16'", "n_dims 0", s.t[1].n_dims = 0)
CASE(test_n_dims_five, MOE_EFORMAT, "'t.f16'", "n_dims 5", s.t[1].n_dims = 5)
CASE(test_n_dims_huge, MOE_EFORMAT, "'t.f16'", "n_dims 4294967295", s.t[1].n_dims = UINT32_MAX)
CASE(test_dim_zero, MOE_EFORMAT, "'t.f32'", "ne[1] = 0", s.t[0].ne[1] = 0)
CASE(test_dim_above_2_63, MOE_EFORMAT, "'t.f32'", "ne[0] = 9223372036854775808",
     s.t[0].ne[0] = 1ull << 63)
CASE(test_shape_overflow, MOE_EFORMAT, "'t.q8_0'", "overflow",
     s.t[2].ne[0] = 1ull << 32; s.t[2].ne[1] = 1ull << 32; s.t[2].ne[2] = 1ull << 32)
CASE(test_shape_overflow_4d, MOE_EFORMAT, "'t.f32'", "overflow",
     s.t[0].n_dims = 4; s.t[0].ne[0] = 1ull << 16; s.t[0].ne[1] = 1ull << 16;
     s.t[0].ne[2] = 1ull << 16; s.t[0].ne[3] = 1ull << 16)
/* 2^62 elements fit in u64, but 4 bytes each do not */
CASE(test_bytes_overflow, MOE_EFORMAT, "'t.f32'", "overflow",
     s.t[0].ne[0] = 1ull << 40; s.t[0].ne[1] = 1ull << 22)
CASE(test_row_not_block_multiple, MOE_EFORMAT, "'t.q8_0'", "not a multiple", s.t[2].ne[0] = 48)
CASE(test_type_unknown, MOE_EFORMAT, "'t.f16'", "type id 1000", s.t[1].type = 1000)
CASE(test_type_count, MOE_EFORMAT, "'t.f16'", "type id 42", s.t[1].type = MOE_DTYPE_COUNT)

/* ggml ids that were removed (Q4_2, Q4_3, Q4_0_4_4 ...) are not types */
static void test_type_removed(void)
{
    static const uint32_t removed[] = { 4, 5, 31, 32, 33, 36, 37, 38 };
    for (size_t i = 0; i < sizeof(removed) / sizeof(removed[0]); i++) {
        char needle[32];
        snprintf(needle, sizeof(needle), "type id %u ", removed[i]);
        struct gb_spec s;
        gb_spec_base(&s);
        s.t[1].type = removed[i];
        int before = moe_test_failed;
        expect(&s, MOE_EFORMAT, "'t.f16'", needle);
        if (moe_test_failed != before)
            return;
    }
}

CASE(test_offset_misaligned, MOE_EFORMAT, "'t.f16'", "not a multiple of the alignment 32",
     s.t[1].offset = 136)
CASE(test_offset_past_data, MOE_EFORMAT, "'t.q8_0'", "runs past the end of the data section",
     s.t[2].offset = 416)
CASE(test_offset_far_past_data, MOE_EFORMAT, "'t.q8_0'", "runs past the end of the data section",
     s.t[2].offset = INT64_MAX & ~INT64_C(31))
/* the data section is 392 bytes; t.q8_0 (136 bytes) at 384 starts inside, ends outside */
CASE(test_size_crosses_eof, MOE_EFORMAT, "'t.q8_0'", "runs past the end of the data section",
     s.t[2].offset = 384)
CASE(test_overlap_same_offset, MOE_EFORMAT, "'t.f32'", "overlap", s.t[1].offset = 0)
/* t.f16 is [128, 256); t.q8_0 at 224 overlaps its tail */
CASE(test_overlap_partial, MOE_EFORMAT, "'t.f16'", "overlap", s.t[2].offset = 224)
CASE(test_duplicate_tensor, MOE_EFORMAT, "duplicate tensor name 't.f32'", NULL, s.t[1].name = "t.f32")
CASE(test_name_64_bytes, MOE_EFORMAT, "tensor #0", "exceeds the cap of 63",
     s.t[0].name = "0123456789012345678901234567890123456789012345678901234567890123")
CASE(test_name_empty, MOE_EFORMAT, "tensor #0", "empty", s.t[0].name = "")
CASE(test_truncated_data, MOE_EFORMAT, "'t.q8_0'", "runs past the end of the data section",
     s.cut_tail = 10)
CASE(test_truncated_data_1, MOE_EFORMAT, "'t.q8_0'", "runs past the end of the data section",
     s.cut_tail = 1)

static void test_name_with_nul(void)
{
    struct gb b = base_bytes();
    size_t at = gb_find(&b, "t.f16", 5);
    gb_patch(&b, at + 1, "", 1);
    expect_bytes(b.p, b.len, MOE_EFORMAT, "tensor #1", "NUL");
    free(b.p);
}

/* Tensor infos present, but the file ends before the data section starts. */
static void test_data_section_missing(void)
{
    struct gb b = base_bytes();
    expect_bytes(b.p, b.at_data - 1, MOE_EFORMAT, NULL, NULL);
    struct moe_diag d = { 0 };
    const char *where;
    /* with no padding needed, ending right after the infos is still an error */
    CHECK(try_open(b.p, b.at_data, 0, &d, &where) == MOE_EFORMAT);
    free(b.p);
}

/* ---- truncation ------------------------------------------------------ */

/* Every prefix of a valid file is refused with MOE_EFORMAT through both
 * entry points, and the message names the file. */
static void truncate_everywhere(const struct gb_spec *s, const char *what)
{
    struct gb b;
    gb_build(&b, s);
    for (size_t n = 0; n < b.len; n++) {
        for (int use_file = 0; use_file < 2; use_file++) {
            struct moe_diag d = { 0 };
            const char *where = "";
            int rc = try_open(b.p, n, use_file, &d, &where);
            CHECK_MSG(rc == MOE_EFORMAT, "%s cut at %zu of %zu (%s): rc %d: %s", what, n, b.len,
                      use_file ? "file" : "mem", rc, d.msg);
            CHECK_MSG(strncmp(d.msg, where, strlen(where)) == 0, "%s cut at %zu: %s", what, n, d.msg);
        }
    }
    /* and the whole file opens */
    struct moe_diag d = { 0 };
    const char *where;
    CHECK_MSG(try_open(b.p, b.len, 0, &d, &where) == 0, "%s: %s", what, d.msg);
    CHECK_MSG(try_open(b.p, b.len, 1, &d, &where) == 0, "%s: %s", what, d.msg);
    printf("  %s: %zu truncation points refused through both entry points\n", what, b.len);
    free(b.p);
}

static void test_truncation_everywhere(void)
{
    struct gb_spec s;
    gb_spec_base(&s);
    truncate_everywhere(&s, "base");
}

static void test_truncation_everywhere_vocab_v2(void)
{
    struct gb_spec s;
    gb_spec_base(&s);
    s.n_t = 0;
    truncate_everywhere(&s, "vocab-only");
    gb_spec_base(&s);
    s.version = 2;
    truncate_everywhere(&s, "v2");
}

/* ---- valid files ----------------------------------------------------- */

static void check_base(struct moe_gguf *g, const char *name, uint64_t file_size)
{
    struct moe_diag d = { 0 };
    CHECK_STR(moe_gguf_path(g), name);
    CHECK_U64(moe_gguf_file_size(g), ==, file_size);
    CHECK_U64(moe_gguf_version(g), ==, 3);
    CHECK_U64(moe_gguf_alignment(g), ==, 32);
    CHECK_U64(moe_gguf_data_offset(g) % 32, ==, 0);
    CHECK_U64(moe_gguf_data_offset(g) + 392, ==, file_size);
    CHECK_U64(moe_gguf_n_kv(g), ==, 18);
    CHECK_U64(moe_gguf_n_tensors(g), ==, 3);
    /* kv_at keeps file order; find_kv finds each */
    static const char *const keys[] = {
        "general.architecture", "general.alignment", "test.u8", "test.i8", "test.u16", "test.i16",
        "test.u32", "test.i32", "test.f32", "test.bool", "test.u64", "test.i64", "test.f64",
        "test.strs", "test.nested", "test.floats", "test.empty", "test.str",
    };
    for (uint64_t i = 0; i < 18; i++) {
        const struct moe_gguf_kv *kv = moe_gguf_kv_at(g, i);
        CHECK(kv != NULL);
        CHECK_STR(kv->key, keys[i]);
        CHECK(moe_gguf_find_kv(g, keys[i]) == kv);
        CHECK(i == 0 || kv->file_offset > moe_gguf_kv_at(g, i - 1)->file_offset);
    }
    CHECK(moe_gguf_kv_at(g, 18) == NULL);
    CHECK_U64(moe_gguf_kv_at(g, 0)->file_offset, ==, 24);
    uint64_t u;
    uint32_t u32;
    int64_t i;
    float f;
    bool bo;
    struct moe_gguf_str str;
    CHECK(moe_gguf_get_str(g, "general.architecture", &str, &d) == 0 && str.len == 5 &&
          memcmp(str.ptr, "llama", 5) == 0);
    CHECK(moe_gguf_get_u32(g, "general.alignment", &u32, &d) == 0 && u32 == 32);
    CHECK(moe_gguf_get_u64(g, "test.u8", &u, &d) == 0 && u == 200);
    CHECK(moe_gguf_get_i64(g, "test.i8", &i, &d) == 0 && i == -5);
    CHECK(moe_gguf_get_u64(g, "test.u16", &u, &d) == 0 && u == 0x1234);
    CHECK(moe_gguf_get_i64(g, "test.i16", &i, &d) == 0 && i == -2);
    CHECK(moe_gguf_get_u32(g, "test.u32", &u32, &d) == 0 && u32 == 4000000000u);
    CHECK(moe_gguf_get_i64(g, "test.i32", &i, &d) == 0 && i == -7);
    CHECK(moe_gguf_get_f32(g, "test.f32", &f, &d) == 0 && f == 1.5f);
    CHECK(moe_gguf_get_bool(g, "test.bool", &bo, &d) == 0 && bo);
    CHECK(moe_gguf_get_u64(g, "test.u64", &u, &d) == 0 && u == 1ull << 40);
    CHECK(moe_gguf_get_i64(g, "test.i64", &i, &d) == 0 && i == -9);
    CHECK(moe_gguf_get_f32(g, "test.f64", &f, &d) == 0 && f == -2.25f);
    CHECK(moe_gguf_find_kv(g, "test.f64")->value.v.f64 == -2.25);
    CHECK(moe_gguf_get_str(g, "test.str", &str, &d) == 0 && str.len == 5 && memcmp(str.ptr, "hello", 5) == 0);
    /* conversions that must be refused, with messages naming file and key */
    CHECK(moe_gguf_get_u32(g, "test.u64", &u32, &d) == MOE_EFORMAT);
    moe_diag_clear(&d);
    CHECK(moe_gguf_get_u64(g, "test.i8", &u, &d) == MOE_EFORMAT);
    CHECK(strstr(d.msg, "test.i8") != NULL && strstr(d.msg, name) != NULL);
    moe_diag_clear(&d);
    CHECK(moe_gguf_get_str(g, "test.u8", &str, &d) == MOE_EFORMAT);
    CHECK(strstr(d.msg, "test.u8") != NULL && strstr(d.msg, "STRING") != NULL);
    CHECK(moe_gguf_get_bool(g, "test.u8", &bo, NULL) == MOE_EFORMAT);
    CHECK(moe_gguf_get_f32(g, "test.u8", &f, NULL) == MOE_EFORMAT);
    CHECK(moe_gguf_get_u64(g, "test.f32", &u, NULL) == MOE_EFORMAT);
    CHECK(moe_gguf_get_i64(g, "test.str", &i, NULL) == MOE_EFORMAT);
    moe_diag_clear(&d);
    CHECK(moe_gguf_get_u64(g, "no.such.key", &u, &d) == -ENOENT);
    CHECK(d.code == 0 && d.msg[0] == '\0'); /* absent: diag untouched */
    /* arrays */
    const struct moe_gguf_value *a;
    CHECK(moe_gguf_get_arr(g, "test.strs", MOE_GGUF_STRING, &a, &d) == 0);
    const struct moe_gguf_str *ss = a->v.arr.data;
    CHECK(a->v.arr.n == 3 && ss[0].len == 1 && ss[1].len == 2 && ss[2].len == 3);
    CHECK(memcmp(ss[0].ptr, "a", 1) == 0 && memcmp(ss[1].ptr, "bc", 2) == 0 && memcmp(ss[2].ptr, "def", 3) == 0);
    CHECK(moe_gguf_get_arr(g, "test.nested", MOE_GGUF_ARRAY, &a, &d) == 0);
    const struct moe_gguf_value *inner = a->v.arr.data;
    CHECK(a->v.arr.n == 1 && inner[0].type == MOE_GGUF_ARRAY);
    CHECK(inner[0].v.arr.elem_type == MOE_GGUF_INT32 && inner[0].v.arr.n == 2);
    CHECK(((const int32_t *)inner[0].v.arr.data)[0] == 7 && ((const int32_t *)inner[0].v.arr.data)[1] == 8);
    CHECK(moe_gguf_get_arr(g, "test.floats", MOE_GGUF_FLOAT32, &a, &d) == 0);
    CHECK(a->v.arr.n == 2 && ((const float *)a->v.arr.data)[0] == 0.5f &&
          ((const float *)a->v.arr.data)[1] == -0.25f);
    CHECK(moe_gguf_get_arr(g, "test.floats", MOE_GGUF_TYPE_COUNT, &a, &d) == 0);
    CHECK(moe_gguf_get_arr(g, "test.empty", MOE_GGUF_UINT8, &a, &d) == 0 && a->v.arr.n == 0);
    CHECK(moe_gguf_get_arr(g, "test.floats", MOE_GGUF_INT32, &a, NULL) == MOE_EFORMAT);
    CHECK(moe_gguf_get_arr(g, "test.u8", MOE_GGUF_TYPE_COUNT, &a, NULL) == MOE_EFORMAT);
    /* tensors: shapes, sizes, offsets, bytes by pread and by mapping */
    static const struct { const char *name; uint32_t n_dims, dtype; uint64_t ne0, ne1, size, off; } want[] = {
        { "t.f32", 2, MOE_DTYPE_F32, 8, 4, 128, 0 },
        { "t.f16", 2, MOE_DTYPE_F16, 32, 2, 128, 128 },
        { "t.q8_0", 3, MOE_DTYPE_Q8_0, 64, 2, 136, 256 },
    };
    CHECK(moe_gguf_map(g, &d) == 0);
    CHECK(moe_gguf_map(g, &d) == 0); /* idempotent */
    for (uint64_t k = 0; k < 3; k++) {
        const struct moe_gguf_tensor *t = moe_gguf_tensor_at(g, k);
        CHECK(t != NULL && moe_gguf_find_tensor(g, want[k].name) == t);
        CHECK_STR(t->name, want[k].name);
        CHECK_U64(t->n_dims, ==, want[k].n_dims);
        CHECK_U64(t->dtype, ==, want[k].dtype);
        CHECK(t->ne[0] == want[k].ne0 && t->ne[1] == want[k].ne1 && t->ne[2] == 1 && t->ne[3] == 1);
        CHECK_U64(t->n_elements, ==, want[k].ne0 * want[k].ne1);
        CHECK_U64(t->size, ==, want[k].size);
        CHECK_U64(t->offset, ==, want[k].off);
        uint8_t buf[136];
        CHECK(moe_gguf_pread(g, t, 0, buf, (size_t)t->size, &d) == 0);
        for (uint64_t j = 0; j < t->size; j++)
            CHECK_MSG(buf[j] == gb_data_byte(j), "%s byte %" PRIu64, t->name, j);
        CHECK(memcmp(moe_gguf_tensor_data(g, t), buf, (size_t)t->size) == 0);
        /* mapped bytes copied out by a read of exactly them (the loader's
         * dense weights with an expert cache) */
        const uint8_t *mp = moe_gguf_tensor_data(g, t);
        uint8_t cp[136];
        CHECK(moe_gguf_maps(g, mp, (size_t)t->size));
        CHECK(moe_gguf_read_mapped(g, mp, (size_t)t->size, cp, &d) == 0);
        CHECK(memcmp(cp, buf, (size_t)t->size) == 0);
        CHECK(moe_gguf_read_mapped(g, mp + 1, (size_t)t->size - 1, cp, &d) == 0);
        CHECK(memcmp(cp, buf + 1, (size_t)t->size - 1) == 0);
        /* reads are range-checked against the tensor */
        moe_diag_clear(&d);
        CHECK(moe_gguf_pread(g, t, 1, buf, (size_t)t->size, &d) == -EINVAL);
        CHECK(strstr(d.msg, t->name) != NULL);
        CHECK(moe_gguf_pread(g, t, t->size + 1, buf, 0, NULL) == -EINVAL);
        CHECK(moe_gguf_pread(g, t, UINT64_MAX, buf, 2, NULL) == -EINVAL);
        CHECK(moe_gguf_pread(g, t, t->size - 3, buf, 3, &d) == 0);
        CHECK(buf[2] == gb_data_byte(t->size - 1));
    }
    /* outside the mapping: refused; the page cache given back, the mapping
     * still reads the file */
    uint8_t own[8] = { 0 }, cp[8];
    const struct moe_gguf_tensor *t0 = moe_gguf_tensor_at(g, 0);
    const uint8_t *m0 = moe_gguf_tensor_data(g, t0);
    CHECK(!moe_gguf_maps(g, own, sizeof(own)));
    moe_diag_clear(&d);
    CHECK(moe_gguf_read_mapped(g, own, sizeof(own), cp, &d) == -EINVAL);
    CHECK(strstr(d.msg, "not in its mapping") != NULL);
    moe_gguf_drop_cache(g);
    for (uint64_t j = 0; j < t0->size; j++)
        CHECK_MSG(m0[j] == gb_data_byte(j), "after drop_cache: byte %" PRIu64, j);
    CHECK(moe_gguf_tensor_at(g, 3) == NULL);
    CHECK(moe_gguf_find_tensor(g, "t.none") == NULL);
    CHECK(moe_gguf_find_tensor(g, "") == NULL);
}

static void test_valid_reads_back(void)
{
    struct gb b = base_bytes();
    struct moe_gguf *g;
    struct moe_diag d = { 0 };
    long live = moe_alloc_live();
    CHECK_MSG(moe_gguf_open_mem(&g, b.p, b.len, "ok.gguf", &d) == 0, "%s", d.msg);
    int before = moe_test_failed;
    check_base(g, "ok.gguf", b.len);
    moe_gguf_close(g);
    CHECK(moe_test_failed == before);
    CHECK_INT(moe_alloc_live(), ==, live);
    /* the same through a file (pread and mmap paths) */
    const char *path = write_tmp(b.p, b.len, "ok.gguf");
    CHECK(path != NULL);
    char p2[4096];
    snprintf(p2, sizeof(p2), "%s", path);
    CHECK_MSG(moe_gguf_open(&g, p2, &d) == 0, "%s", d.msg);
    check_base(g, p2, b.len);
    moe_gguf_close(g);
    unlink(p2);
    CHECK(moe_test_failed == before);
    CHECK_INT(moe_alloc_live(), ==, live);
    moe_gguf_close(NULL);
    free(b.p);
}

/* Opens a spec that must be accepted (both entry points); returns the
 * object opened from memory through *out (caller closes it and frees *buf). */
static int open_ok(const struct gb_spec *s, const char *name, struct moe_gguf **out, struct gb *b)
{
    gb_build(b, s);
    struct moe_diag d = { 0 };
    const char *where;
    int rc = try_open(b->p, b->len, 1, &d, &where);
    if (rc != 0) {
        MOE_FAIL_AT("%s through a file: %s", name, d.msg);
        return rc;
    }
    rc = moe_gguf_open_mem(out, b->p, b->len, name, &d);
    if (rc != 0)
        MOE_FAIL_AT("%s: %s", name, d.msg);
    return rc;
}

static void test_vocab_only(void)
{
    struct gb_spec s;
    gb_spec_base(&s);
    s.n_t = 0;
    s.with_alignment = 0;
    struct gb b;
    struct moe_gguf *g;
    if (open_ok(&s, "vocab.gguf", &g, &b) != 0)
        return;
    CHECK_U64(moe_gguf_n_tensors(g), ==, 0);
    CHECK_U64(moe_gguf_n_kv(g), ==, 17);
    CHECK_U64(moe_gguf_alignment(g), ==, MOE_GGUF_DEFAULT_ALIGNMENT);
    CHECK(moe_gguf_tensor_at(g, 0) == NULL && moe_gguf_find_tensor(g, "t.f32") == NULL);
    CHECK(moe_gguf_map(g, NULL) == 0);
    moe_gguf_close(g);
    free(b.p);
}

static void test_v2(void)
{
    struct gb_spec s;
    gb_spec_base(&s);
    s.version = 2;
    struct gb b;
    struct moe_gguf *g;
    if (open_ok(&s, "v2.gguf", &g, &b) != 0)
        return;
    CHECK_U64(moe_gguf_version(g), ==, 2);
    CHECK_U64(moe_gguf_n_tensors(g), ==, 3);
    const struct moe_gguf_value *a;
    CHECK(moe_gguf_get_arr(g, "test.strs", MOE_GGUF_STRING, &a, NULL) == 0 && a->v.arr.n == 3);
    moe_gguf_close(g);
    free(b.p);
}

/* Each cap exactly reached is accepted. */
static void test_caps_reached(void)
{
    struct gb_spec s;
    struct gb b;
    struct moe_gguf *g;
    /* nesting 8 deep */
    gb_spec_base(&s);
    s.nest_depth = MOE_GGUF_MAX_DEPTH;
    if (open_ok(&s, "depth8.gguf", &g, &b) != 0)
        return;
    moe_gguf_close(g);
    free(b.p);
    /* a 63-byte tensor name */
    gb_spec_base(&s);
    s.t[0].name = "012345678901234567890123456789012345678901234567890123456789012";
    if (open_ok(&s, "name63.gguf", &g, &b) != 0)
        return;
    CHECK(moe_gguf_find_tensor(g, s.t[0].name) != NULL);
    moe_gguf_close(g);
    free(b.p);
    /* a 1024-byte key and a 16 MiB string */
    char *key = malloc(MOE_GGUF_MAX_KEY + 1);
    memset(key, 'k', MOE_GGUF_MAX_KEY);
    key[MOE_GGUF_MAX_KEY] = '\0';
    struct gb kv;
    gb_kv_raw(&kv, key, MOE_GGUF_MAX_KEY, MOE_GGUF_STRING, NULL, 0);
    gb_u64(&kv, MOE_GGUF_MAX_STRING);
    char *big = calloc(1, MOE_GGUF_MAX_STRING);
    gb_bytes(&kv, big, MOE_GGUF_MAX_STRING);
    free(big);
    gb_spec_base(&s);
    s.extra_kv = kv.p;
    s.extra_kv_len = kv.len;
    if (open_ok(&s, "caps.gguf", &g, &b) == 0) {
        struct moe_gguf_str str;
        CHECK(moe_gguf_get_str(g, key, &str, NULL) == 0);
        CHECK_U64(str.len, ==, MOE_GGUF_MAX_STRING);
        moe_gguf_close(g);
        free(b.p);
    }
    free(kv.p);
    free(key);
}

/* Other alignments are honoured: 1 (no padding) and 256. */
static void test_alignments(void)
{
    static const uint32_t aligns[] = { 1, 256, 4096 };
    for (size_t i = 0; i < sizeof(aligns) / sizeof(aligns[0]); i++) {
        struct gb_spec s;
        gb_spec_base(&s);
        s.alignment = aligns[i];
        struct gb b;
        struct moe_gguf *g;
        if (open_ok(&s, "align.gguf", &g, &b) != 0)
            return;
        CHECK_U64(moe_gguf_alignment(g), ==, aligns[i]);
        CHECK_U64(moe_gguf_data_offset(g) % aligns[i], ==, 0);
        const struct moe_gguf_tensor *t = moe_gguf_find_tensor(g, "t.q8_0");
        CHECK(t != NULL && t->offset % aligns[i] == 0);
        uint8_t x;
        CHECK(moe_gguf_pread(g, t, 5, &x, 1, NULL) == 0 && x == gb_data_byte(5));
        moe_gguf_close(g);
        free(b.p);
    }
}

static void test_not_a_gguf_file(void)
{
    struct moe_gguf *g = (struct moe_gguf *)(uintptr_t)1;
    struct moe_diag d = { 0 };
    CHECK(moe_gguf_open(&g, moe_test_tmpdir(), &d) == -EINVAL);
    CHECK(g == NULL && strstr(d.msg, "not a regular file") != NULL);
    CHECK(strstr(d.msg, moe_test_tmpdir()) != NULL);
    moe_diag_clear(&d);
    CHECK(moe_gguf_open(&g, "/nonexistent/m.gguf", &d) == -ENOENT);
    CHECK(g == NULL && strstr(d.msg, "/nonexistent/m.gguf") != NULL);
    moe_diag_clear(&d);
    CHECK(moe_gguf_open_mem(&g, NULL, 0, NULL, &d) == MOE_EFORMAT);
    CHECK(g == NULL && d.msg[0] != '\0');
    /* a NULL diag is allowed */
    CHECK(moe_gguf_open_mem(&g, "GGUF", 4, "x", NULL) == MOE_EFORMAT && g == NULL);
}

int main(void)
{
    /* one scratch directory for every case (each runs in a forked child) */
    const char *tmp = moe_test_tmpdir();
    MOE_TEST_RUN(test_bad_magic);
    MOE_TEST_RUN(test_version_0);
    MOE_TEST_RUN(test_version_1);
    MOE_TEST_RUN(test_version_4);
    MOE_TEST_RUN(test_version_future);
    MOE_TEST_RUN(test_big_endian_v3);
    MOE_TEST_RUN(test_big_endian_v2);
    MOE_TEST_RUN(test_n_tensors_2_63);
    MOE_TEST_RUN(test_n_tensors_max);
    MOE_TEST_RUN(test_n_kv_2_63);
    MOE_TEST_RUN(test_n_kv_more_than_written);
    MOE_TEST_RUN(test_n_tensors_one_more);
    MOE_TEST_RUN(test_counts_past_remaining);
    MOE_TEST_RUN(test_string_len_2_63);
    MOE_TEST_RUN(test_string_len_max);
    MOE_TEST_RUN(test_string_len_cap_plus_one);
    MOE_TEST_RUN(test_string_len_past_eof);
    MOE_TEST_RUN(test_key_too_long);
    MOE_TEST_RUN(test_duplicate_key);
    MOE_TEST_RUN(test_empty_key);
    MOE_TEST_RUN(test_key_with_nul);
    MOE_TEST_RUN(test_bad_value_type);
    MOE_TEST_RUN(test_bad_value_type_max);
    MOE_TEST_RUN(test_bad_elem_type);
    MOE_TEST_RUN(test_bad_elem_type_13);
    MOE_TEST_RUN(test_bool_value);
    MOE_TEST_RUN(test_bool_value_ff);
    MOE_TEST_RUN(test_bool_array_value);
    MOE_TEST_RUN(test_array_len_2_62);
    MOE_TEST_RUN(test_u8_array_len_2_62);
    MOE_TEST_RUN(test_array_bytes_overflow_u64);
    MOE_TEST_RUN(test_array_bytes_overflow_f32);
    MOE_TEST_RUN(test_array_of_arrays_huge);
    MOE_TEST_RUN(test_string_in_array_past_eof);
    MOE_TEST_RUN(test_array_len_past_eof);
    MOE_TEST_RUN(test_nesting_too_deep);
    MOE_TEST_RUN(test_nesting_far_too_deep);
    MOE_TEST_RUN(test_alignment_zero);
    MOE_TEST_RUN(test_alignment_not_pow2);
    MOE_TEST_RUN(test_alignment_above_cap);
    MOE_TEST_RUN(test_alignment_2_31);
    MOE_TEST_RUN(test_alignment_u64);
    MOE_TEST_RUN(test_alignment_i32);
    MOE_TEST_RUN(test_n_dims_zero);
    MOE_TEST_RUN(test_n_dims_five);
    MOE_TEST_RUN(test_n_dims_huge);
    MOE_TEST_RUN(test_dim_zero);
    MOE_TEST_RUN(test_dim_above_2_63);
    MOE_TEST_RUN(test_shape_overflow);
    MOE_TEST_RUN(test_shape_overflow_4d);
    MOE_TEST_RUN(test_bytes_overflow);
    MOE_TEST_RUN(test_row_not_block_multiple);
    MOE_TEST_RUN(test_type_unknown);
    MOE_TEST_RUN(test_type_count);
    MOE_TEST_RUN(test_type_removed);
    MOE_TEST_RUN(test_offset_misaligned);
    MOE_TEST_RUN(test_offset_past_data);
    MOE_TEST_RUN(test_offset_far_past_data);
    MOE_TEST_RUN(test_size_crosses_eof);
    MOE_TEST_RUN(test_overlap_same_offset);
    MOE_TEST_RUN(test_overlap_partial);
    MOE_TEST_RUN(test_duplicate_tensor);
    MOE_TEST_RUN(test_name_64_bytes);
    MOE_TEST_RUN(test_name_empty);
    MOE_TEST_RUN(test_name_with_nul);
    MOE_TEST_RUN(test_truncated_data);
    MOE_TEST_RUN(test_truncated_data_1);
    MOE_TEST_RUN(test_data_section_missing);
    MOE_TEST_RUN(test_truncation_everywhere);
    MOE_TEST_RUN(test_truncation_everywhere_vocab_v2);
    MOE_TEST_RUN(test_valid_reads_back);
    MOE_TEST_RUN(test_vocab_only);
    MOE_TEST_RUN(test_v2);
    MOE_TEST_RUN(test_caps_reached);
    MOE_TEST_RUN(test_alignments);
    MOE_TEST_RUN(test_not_a_gguf_file);
    rmdir(tmp); /* empty again: each case removes its files */
    return moe_test_exit_code();
}
