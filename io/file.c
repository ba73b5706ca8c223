#include "io/file.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "io/pack-impl.h"

/* One row per format: adding one means adding a row. */
static const struct {
    enum moe_file_kind kind;
    size_t n;
    const char *magic;
} magics[] = {
    { MOE_FILE_PACK, 8, PACK_MAGIC },   /* its NUL is part of the magic */
    { MOE_FILE_GGUF, 4, "GGUF" },       /* GGUF v3: the file starts "GGUF" */
};

enum moe_file_kind moe_file_kind_of(const void *head, size_t n)
{
    for (size_t i = 0; i < sizeof(magics) / sizeof(magics[0]); i++)
        if (n >= magics[i].n && memcmp(head, magics[i].magic, magics[i].n) == 0)
            return magics[i].kind;
    return MOE_FILE_UNKNOWN;
}

int moe_file_probe(const char *path, enum moe_file_kind *kind, struct moe_diag *diag)
{
    *kind = MOE_FILE_UNKNOWN;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return moe_diag_set(diag, -errno, "%s: %s", path, strerror(errno));
    unsigned char head[MOE_FILE_MAGIC_BYTES];
    size_t got = 0;
    int rc = 0;
    /* a short read is not the end of the file: only 0 is */
    while (got < sizeof(head)) {
        ssize_t r = pread(fd, head + got, sizeof(head) - got, (off_t)got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            rc = moe_diag_set(diag, -errno, "%s: %s", path, strerror(errno));
            break;
        }
        if (r == 0)
            break;
        got += (size_t)r;
    }
    close(fd);
    if (rc == 0)
        *kind = moe_file_kind_of(head, got);
    return rc;
}

int moe_file_pread(int fd, void *buf, size_t n, uint64_t off, uint64_t *at)
{
    unsigned char *p = buf;
    while (n > 0) {
        ssize_t r = pread(fd, p, n, (off_t)off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            if (at)
                *at = off;
            return r < 0 ? -errno : MOE_EFORMAT;
        }
        p += r;
        off += (uint64_t)r;
        n -= (size_t)r;
    }
    return 0;
}

int moe_file_pwrite(int fd, const void *buf, size_t n, uint64_t off)
{
    const unsigned char *p = buf;
    while (n > 0) {
        ssize_t w = pwrite(fd, p, n, (off_t)off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return -errno;
        p += w;
        off += (uint64_t)w;
        n -= (size_t)w;
    }
    return 0;
}
