/* Asynchronous reads of one file: io_uring with O_DIRECT, or buffered pread.
 *
 * A read (offset, buffer, length) is split into requests of at most
 * chunk_bytes; at most queue_depth requests are in flight. Short reads,
 * -EAGAIN and -EINTR are requeued (the remainder only); an end of file
 * before the requested length is MOE_EFORMAT (a truncated file); any other
 * error completes the read with the CQE's result unchanged.
 *
 * Fallback (shared/RELIABILITY.md row 6): when io_uring setup is refused
 * (seccomp, old kernel, EPERM), or `force_pread` is set, or the environment
 * has MOE_IO_FORCE_PREAD=1, reads run as buffered pread on the thread that
 * calls moe_uring_run. When O_DIRECT is refused (tmpfs: EINVAL at open or
 * on the first read), reads go through the page cache. Each fallback is
 * logged once through the library's log hook (common/log.h). The
 * bytes read are the same in every mode.
 *
 * Alignment: with O_DIRECT, offsets, lengths and buffers must be multiples
 * of moe_uring_align() (STATX_DIOALIGN where the kernel reports it, else
 * 4096); moe_uring_read refuses others with -EINVAL.
 *
 * Threading: one owner thread calls everything except moe_uring_wake,
 * which any thread may call. Callbacks run on the owner thread inside
 * moe_uring_run. Ownership follows libuv: if moe_uring_read fails, the
 * callback never runs; otherwise it runs exactly once.
 */
#ifndef MOE_IO_URING_H
#define MOE_IO_URING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "common/error.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_URING_DEFAULT_QD    32u
#define MOE_URING_MAX_QD        256u
#define MOE_URING_DEFAULT_CHUNK (1u << 20)

struct moe_uring_config {
    unsigned queue_depth;   /* requests in flight, 1..256; 0 = 32 */
    size_t chunk_bytes;     /* request size, multiple of 4096, 4 KiB..16 MiB; 0 = 1 MiB */
    bool force_pread;       /* no io_uring (also env MOE_IO_FORCE_PREAD=1) */
    bool no_direct;         /* buffered reads even where O_DIRECT works */
};

/* status: 0, or a negative code (CQE results pass through unchanged). */
typedef void (*moe_uring_done_fn)(void *arg, int status);

/* Test hook (shared/RELIABILITY.md row 4): sees every request's result
 * before the reader does and returns the result to use instead: e.g. a
 * shorter count, -EAGAIN, -EIO. Runs on the owner thread. */
typedef int (*moe_uring_fault_fn)(void *ctx, uint64_t offset, size_t len, int res);

struct moe_uring;

int moe_uring_open(struct moe_uring **out, const char *path, const struct moe_uring_config *cfg,
                   struct moe_diag *diag);
/* Waits for requests in flight; reads not finished complete with
 * -ECANCELED. Accepts NULL. */
void moe_uring_close(struct moe_uring *r);

size_t moe_uring_align(const struct moe_uring *r);
bool moe_uring_is_uring(const struct moe_uring *r);  /* false: pread fallback */
bool moe_uring_is_direct(const struct moe_uring *r); /* O_DIRECT in use */
unsigned moe_uring_queue_depth(const struct moe_uring *r);

/* Registers buffers for fixed reads (optional; io_uring mode only). When
 * the kernel refuses (RLIMIT_MEMLOCK), plain reads are used and the
 * refusal is logged once; that is not an error. */
int moe_uring_register_buffers(struct moe_uring *r, const struct iovec *iov, unsigned n);

/* Queues a read of [offset, offset + len) into buf; buf_index is the
 * registered buffer that holds buf, or -1. The end of the file before
 * `need` bytes (need <= len) is MOE_EFORMAT; after them, the rest of buf is
 * left as it was (an aligned superset read of a file's tail). Nothing is
 * submitted until moe_uring_run. */
int moe_uring_read(struct moe_uring *r, uint64_t offset, void *buf, size_t len, size_t need,
                   int buf_index, moe_uring_done_fn cb, void *arg);

/* The same, ahead of every read queued with moe_uring_read whose bytes
 * are not yet all issued (a demand load overtakes queued prefetches;
 * requests already in flight finish first). */
int moe_uring_read_urgent(struct moe_uring *r, uint64_t offset, void *buf, size_t len, size_t need,
                          int buf_index, moe_uring_done_fn cb, void *arg);

/* Submits queued requests up to the queue depth and reaps completions,
 * running callbacks. With `wait`, blocks until at least one read completes
 * or moe_uring_wake is called (with nothing pending: until a wake).
 * Returns the number of reads completed, or a negative code when the ring
 * itself fails. */
int moe_uring_run(struct moe_uring *r, bool wait);

/* Reads queued or in flight. */
unsigned moe_uring_pending(const struct moe_uring *r);

/* Makes a blocked moe_uring_run return. Thread-safe, async-signal-safe. */
void moe_uring_wake(struct moe_uring *r);

void moe_uring_set_fault_hook(struct moe_uring *r, moe_uring_fault_fn fn, void *ctx);

/* What the reader did so far (any thread; each field read atomically):
 * requests and bytes completed, the time at least one request was in
 * flight (io_uring mode; pread: the time spent in pread), the integral of
 * the requests and of the 4 KiB pages in flight over time (divided by
 * busy_s: the queue depth and the bytes in flight the reader achieved),
 * and the most requests in flight at once. */
struct moe_uring_stats {
    uint64_t requests, bytes;
    double busy_s, depth_s, pages_s;
    unsigned max_depth;
};
void moe_uring_stats(const struct moe_uring *r, struct moe_uring_stats *out);

/* Requests requeued so far after -EAGAIN, -EINTR or a short read (each at
 * most MOE_URING_MAX_RETRIES times in a row without progress). Any thread. */
uint64_t moe_uring_retries(const struct moe_uring *r);
#define MOE_URING_MAX_RETRIES 64

#ifdef __cplusplus
}
#endif

#endif
