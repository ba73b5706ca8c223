/* io/file.h: telling a pack from a GGUF by its magic (in memory and on
 * disk, short and missing files included) and the exact positional reads
 * and writes: a read past the end is MOE_EFORMAT naming where it stopped. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "io/file.h"
#include "tests/harness.h"

static void write_file(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (f == NULL)
        return;
    fwrite(p, 1, n, f);
    fclose(f);
}

static void test_kind_of(void)
{
    CHECK_INT(moe_file_kind_of("MOEPACK\0\1\2", 10), ==, MOE_FILE_PACK);
    CHECK_INT(moe_file_kind_of("MOEPACK\0", 8), ==, MOE_FILE_PACK);
    CHECK_INT(moe_file_kind_of("MOEPACK\0", 7), ==, MOE_FILE_UNKNOWN); /* too short */
    CHECK_INT(moe_file_kind_of("MOEPACKX", 8), ==, MOE_FILE_UNKNOWN);  /* the NUL counts */
    CHECK_INT(moe_file_kind_of("GGUF\3\0\0\0", 8), ==, MOE_FILE_GGUF);
    CHECK_INT(moe_file_kind_of("GGUF", 4), ==, MOE_FILE_GGUF);
    CHECK_INT(moe_file_kind_of("GGU", 3), ==, MOE_FILE_UNKNOWN);
    CHECK_INT(moe_file_kind_of("", 0), ==, MOE_FILE_UNKNOWN);
}

static void test_probe(void)
{
    char path[512];
    enum moe_file_kind k;
    struct moe_diag d = { 0 };
    snprintf(path, sizeof(path), "%s/probe", moe_test_tmpdir());
    write_file(path, "MOEPACK\0rest of a header", 24);
    CHECK_INT(moe_file_probe(path, &k, &d), ==, 0);
    CHECK_INT(k, ==, MOE_FILE_PACK);
    write_file(path, "GGUF\3\0\0\0", 8);
    CHECK_INT(moe_file_probe(path, &k, &d), ==, 0);
    CHECK_INT(k, ==, MOE_FILE_GGUF);
    write_file(path, "GGUF", 4);   /* shorter than the longest magic: still a GGUF */
    CHECK_INT(moe_file_probe(path, &k, &d), ==, 0);
    CHECK_INT(k, ==, MOE_FILE_GGUF);
    write_file(path, "", 0);
    CHECK_INT(moe_file_probe(path, &k, &d), ==, 0);
    CHECK_INT(k, ==, MOE_FILE_UNKNOWN);
    k = MOE_FILE_GGUF;
    CHECK_INT(moe_file_probe("/nonexistent/model.moe", &k, &d), ==, -ENOENT);
    CHECK_INT(k, ==, MOE_FILE_UNKNOWN);
    CHECK_MSG(strstr(d.msg, "/nonexistent/model.moe") != NULL, "%s", d.msg);
}

static void test_pread_pwrite(void)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/rw", moe_test_tmpdir());
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    CHECK(fd >= 0);
    static char big[300000];
    for (size_t i = 0; i < sizeof(big); i++)
        big[i] = (char)(i * 7);
    CHECK_INT(moe_file_pwrite(fd, big, sizeof(big), 100), ==, 0);
    static char back[sizeof(big)];
    uint64_t at = 0;
    CHECK_INT(moe_file_pread(fd, back, sizeof(back), 100, &at), ==, 0);
    CHECK(memcmp(back, big, sizeof(big)) == 0);
    /* the file ends at 100 + 300000: a read across the end stops there */
    CHECK_INT(moe_file_pread(fd, back, 1000, 100 + sizeof(big) - 10, &at), ==, MOE_EFORMAT);
    CHECK_U64(at, ==, 100 + sizeof(big));
    CHECK_INT(moe_file_pread(fd, back, 0, 1u << 30, NULL), ==, 0);   /* nothing to read */
    close(fd);
    CHECK_INT(moe_file_pread(fd, back, 1, 0, &at), ==, -EBADF);
    CHECK_U64(at, ==, 0);
    CHECK_INT(moe_file_pwrite(fd, big, 1, 0), ==, -EBADF);
}

int main(void)
{
    MOE_TEST_RUN(test_kind_of);
    MOE_TEST_RUN(test_probe);
    MOE_TEST_RUN(test_pread_pwrite);
    return moe_test_exit_code();
}
