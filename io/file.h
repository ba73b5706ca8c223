/* Plain-file helpers shared by io/: what kind of file a path holds (by its
 * magic, the one place that knows the magics), and positional reads and
 * writes that finish or fail, so that callers never loop over short
 * transfers and EINTR themselves.
 *
 * Contract: 0 or a negative code (-errno, MOE_EFORMAT); these never print
 * and never allocate. moe_file_probe writes its message into diag; the
 * pread/pwrite helpers leave the wording to the caller (which knows the
 * field or tensor being read) and report the offset where the failing
 * call started. Thread-safe: no shared state.
 */
#ifndef MOE_IO_FILE_H
#define MOE_IO_FILE_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

#ifdef __cplusplus
extern "C" {
#endif

enum moe_file_kind {
    MOE_FILE_UNKNOWN,
    MOE_FILE_GGUF,       /* "GGUF" */
    MOE_FILE_PACK,       /* "MOEPACK\0" (doc/pack-format.md) */
};

/* Bytes of magic moe_file_kind_of needs to tell every kind apart. */
#define MOE_FILE_MAGIC_BYTES 8

/* The kind of a file that starts with head[0..n); a head shorter than a
 * kind's magic is not that kind. */
enum moe_file_kind moe_file_kind_of(const void *head, size_t n);

/* Reads the first bytes of path: 0 with *kind set (MOE_FILE_UNKNOWN for
 * a short file or another format), or -errno when it cannot be opened or
 * read, with "<path>: <reason>" in diag and *kind = MOE_FILE_UNKNOWN. */
int moe_file_probe(const char *path, enum moe_file_kind *kind, struct moe_diag *diag);

/* Reads exactly n bytes at off into buf: 0, -errno, or MOE_EFORMAT when
 * the file ends first. On failure *at (may be NULL) is the offset of the
 * read that failed. */
int moe_file_pread(int fd, void *buf, size_t n, uint64_t off, uint64_t *at);

/* Writes exactly n bytes at off: 0 or -errno. */
int moe_file_pwrite(int fd, const void *buf, size_t n, uint64_t off);

#ifdef __cplusplus
}
#endif

#endif
