/* Writes the handmade part of the GGUF seed corpus (tests/corpus/gguf/):
 * the builder's valid file, its vocab-only and v2 forms, and one file per
 * corruption of the corrupt-file table. Run once when the table grows:
 *   build/tests/fuzz/make_corpus_gguf tests/corpus/gguf
 * (the builder is deterministic: existing files are rewritten unchanged). */
#include <stdio.h>

#include "tests/unit/gguf_builder.h"

static int put(const char *dir, const char *name, const struct gb_spec *s)
{
    struct gb b;
    gb_build(&b, s);
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s.gguf", dir, name);
    FILE *f = fopen(path, "wb");
    if (f == NULL || fwrite(b.p, 1, b.len, f) != b.len) {
        perror(path);
        return 1;
    }
    fclose(f);
    free(b.p);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s OUTDIR\n", argv[0]);
        return 2;
    }
    const char *dir = argv[1];
    struct gb_spec s;
    int rc = 0;
#define CASE(name, ...) do { gb_spec_base(&s); __VA_ARGS__; rc |= put(dir, name, &s); } while (0)
    CASE("valid");
    CASE("vocab-only", s.n_t = 0);
    CASE("v2", s.version = 2);
    CASE("align-256", s.alignment = 256);
    CASE("bad-magic", memcpy(s.magic, "GGML", 4));
    CASE("version-1", s.version = 1);
    CASE("big-endian", s.version = 0x03000000u);
    CASE("n-kv-huge", s.n_kv = INT64_MAX);
    CASE("n-kv-plus-one", s.n_kv = 19);
    CASE("n-tensors-huge", s.n_tensors = INT64_MAX);
    CASE("string-len-huge", s.arch_len = INT64_MAX);
    CASE("array-len-huge", s.strs_len = INT64_C(1) << 62);
    CASE("nesting-deep", s.nest_depth = 9);
    CASE("bad-value-type", s.bad_value_type = 13);
    CASE("bad-elem-type", s.bad_elem_type = 99);
    CASE("bool-2", s.bool_value = 2);
    CASE("dup-key", s.dup_key = 1);
    CASE("empty-key", s.empty_key = 1);
    CASE("align-3", s.alignment = 3);
    CASE("align-u64", s.alignment_type = MOE_GGUF_UINT64);
    CASE("n-dims-5", s.t[1].n_dims = 5);
    CASE("dim-0", s.t[0].ne[1] = 0);
    CASE("shape-overflow", s.t[2].ne[0] = 1ull << 32; s.t[2].ne[1] = 1ull << 32; s.t[2].ne[2] = 1ull << 32);
    CASE("type-31", s.t[1].type = 31);
    CASE("misaligned", s.t[1].offset = 8);
    CASE("overlap", s.t[1].offset = 0);
    CASE("dup-tensor", s.t[1].name = "t.f32");
    CASE("truncated-data", s.cut_tail = 10);
    CASE("truncated-header", s.cut_tail = 700);
    CASE("type-5", s.t[1].type = 5);
    CASE("n-dims-0", s.t[1].n_dims = 0);
    CASE("bytes-overflow", s.t[0].ne[0] = 1ull << 40; s.t[0].ne[1] = 1ull << 22);
    CASE("row-not-block", s.t[2].ne[0] = 48);
    CASE("size-crosses-eof", s.t[2].offset = 384);
    CASE("overlap-partial", s.t[2].offset = 224);
    CASE("name-63", s.t[0].name = "012345678901234567890123456789012345678901234567890123456789012");
    CASE("nesting-8", s.nest_depth = MOE_GGUF_MAX_DEPTH);
    CASE("align-1", s.alignment = 1);
    CASE("align-0", s.alignment = 0);
    CASE("array-len-u8-2-62", s.empty_len = 1ull << 62);
    /* raw extra kvs: a bool array with a 2, a u64 array whose byte size wraps */
    static const uint8_t bools[] = { 7, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0 };
    static const uint8_t wrap[] = { 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0 };
    struct gb kv;
    gb_kv_raw(&kv, "test.bools", 10, MOE_GGUF_ARRAY, bools, sizeof(bools));
    CASE("bool-array-2", s.extra_kv = kv.p; s.extra_kv_len = kv.len);
    free(kv.p);
    gb_kv_raw(&kv, "test.big", 8, MOE_GGUF_ARRAY, wrap, sizeof(wrap));
    CASE("array-bytes-wrap", s.extra_kv = kv.p; s.extra_kv_len = kv.len);
    free(kv.p);
    gb_kv_raw(&kv, "bad\0key", 7, MOE_GGUF_UINT8, "", 1);
    CASE("key-nul", s.extra_kv = kv.p; s.extra_kv_len = kv.len);
    free(kv.p);
    return rc;
}
