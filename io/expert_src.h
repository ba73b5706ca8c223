/* Expert loads: one API over a .moe pack or a GGUF ("GGUF direct").
 *
 * moe_expert_src_load(layer, expert, dst) reads the expert's stored bytes
 * with io/uring.h (O_DIRECT into registered, aligned staging buffers; one
 * read per pack blob, three or so aligned superset reads per GGUF expert),
 * then a worker of the decompression pool (one ZSTD_DCtx each) checks the
 * blob's XXH3, decodes it into dst and runs the callback. A raw (stored
 * uncompressed) pack blob is read straight into dst when dst is aligned
 * like O_DIRECT wants (4096: the expert cache's slots are), all but its
 * last partial block, which goes through the stage; the worker then only
 * copies that tail and checks the XXH3 on dst. No copy of the expert. dst receives the
 * expert's raw blob: moe_expert_src_layout(layer) gives each tensor's
 * offset and size in it. A GGUF's layouts put each slice at its file
 * offset within a page where the slices are whole pages
 * (moe_expert_layout_direct): the slices' aligned superset reads then go
 * straight into a page-aligned dst, no stage and no copy, and the padding
 * between slices holds the file's neighbouring bytes (zeros otherwise).
 *
 * Callbacks (libuv's rule): if moe_expert_src_load returns an error, the
 * callback never runs and dst is untouched (a bad index entry is reported
 * here, MOE_EFORMAT, before any buffer is written); otherwise it runs
 * exactly once, on a pool thread, with 0, MOE_ECHECKSUM, MOE_EFORMAT
 * (corrupt frame, truncated file), an I/O error (-EIO, ...) or -ECANCELED
 * (moe_expert_src_close). The diag passed to it names file, layer, expert
 * and offset and lives until the callback returns. On an error the
 * contents of dst are unspecified (a raw blob read into dst directly is
 * there before its checksum fails); a compressed blob never reaches dst
 * unless its checksum holds.
 * dst must stay valid until the callback has run.
 *
 * Memory: n_staging buffers of the largest stored expert (allocated on
 * first use for a GGUF read straight into slots, moe_expert_src_lazy_stages),
 * plus one scratch blob per pool thread for byte-grouped codecs. No allocation per load
 * beyond one small request record.
 *
 * Threading: every function is thread-safe except _close, which must not
 * race with anything. Loads are started in order of submission, urgent
 * ones before prefetches (MOE_LOAD_PREFETCH).
 */
#ifndef MOE_IO_EXPERT_SRC_H
#define MOE_IO_EXPERT_SRC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "io/gguf.h"
#include "io/pack.h"
#include "io/uring.h"

#ifdef __cplusplus
extern "C" {
#endif

struct moe_io_config {
    struct moe_uring_config uring; /* queue depth, request size, fallbacks, log */
    unsigned n_threads;            /* decompression workers; 0 = 2 */
    unsigned n_staging;            /* experts being read/decoded at once; 0 = derived */
};

enum {
    MOE_LOAD_PREFETCH = 1u << 0,   /* starts after every queued urgent load */
};

typedef void (*moe_expert_done_fn)(void *arg, uint32_t layer, uint32_t expert, int status,
                                   const struct moe_diag *diag);

struct moe_io_stats {
    uint64_t loads_ok, loads_failed;
    uint64_t checksum_errors, format_errors, io_errors, cancelled;
    uint64_t stored_bytes;   /* read from the file (useful bytes) */
    uint64_t raw_bytes;      /* delivered into destinations */
    uint64_t read_retries;   /* reads requeued after -EAGAIN, -EINTR or a short count (bounded) */
    struct moe_uring_stats ring; /* the reader: requests, bytes, busy time, depth achieved */
    unsigned queue_depth;    /* the reader's configured requests in flight */
    unsigned n_staging;      /* staging buffers: loads read or decoded at once */
    /* time demand (not prefetch) loads waited for a staging buffer before
     * their reads were queued, summed; and the time from a load's start to
     * its callback, summed over loads (/ loads_ok: the mean latency) */
    double stage_wait_s, load_s;
};

struct moe_expert_src;

/* Opens a .moe pack or a GGUF (by magic). */
int moe_expert_src_open(struct moe_expert_src **out, const char *path,
                        const struct moe_io_config *cfg, struct moe_diag *diag);
/* Queued loads complete with -ECANCELED, loads in flight finish first.
 * Accepts NULL. */
void moe_expert_src_close(struct moe_expert_src *s);

bool moe_expert_src_is_pack(const struct moe_expert_src *s);
/* Metadata and dense tensors: the pack's embedded GGUF, or the GGUF itself
 * (whose tensor list then includes the expert tensors). Borrowed until
 * close. */
const struct moe_gguf *moe_expert_src_gguf(const struct moe_expert_src *s);
const struct moe_pack *moe_expert_src_pack(const struct moe_expert_src *s); /* NULL for GGUF */
uint32_t moe_expert_src_n_layer(const struct moe_expert_src *s);
uint32_t moe_expert_src_n_expert(const struct moe_expert_src *s);
/* NULL when the layer has no experts. Borrowed until close. */
const struct moe_expert_layout *moe_expert_src_layout(const struct moe_expert_src *s,
                                                      uint32_t layer);
/* How many staging buffers a source allocates for stored experts of up to
 * stage_cap bytes under cfg (NULL: defaults): enough to keep the reader's
 * queue full, plus one per decoder. The memory plan counts them. */
unsigned moe_expert_src_n_staging(const struct moe_io_config *cfg, size_t stage_cap);

/* The reader's mode, for logs and tests. */
bool moe_expert_src_uses_uring(const struct moe_expert_src *s);
bool moe_expert_src_uses_direct(const struct moe_expert_src *s);
/* A GGUF read entirely with O_DIRECT straight into page-aligned slots: its
 * staging buffers are allocated only when a load cannot go direct (the
 * memory plan counts one, model/plan.c). */
bool moe_expert_src_lazy_stages(const struct moe_expert_src *s);

/* Starts loading (layer, expert) into dst (dst_size = layout raw_size).
 * Errors (callback never runs): -ENOENT, -EINVAL (size), MOE_EFORMAT (bad
 * index entry), -ECANCELED (closing), -ENOMEM. */
int moe_expert_src_load(struct moe_expert_src *s, uint32_t layer, uint32_t expert, void *dst,
                        size_t dst_size, unsigned flags, moe_expert_done_fn cb, void *arg,
                        struct moe_diag *diag);

/* Cancels queued prefetches (MOE_LOAD_PREFETCH loads not started yet) for
 * which stale(ctx, arg, layer, expert) returns true (arg: the load's
 * callback argument). Their callbacks run in the calling thread with
 * -ECANCELED before this returns. Returns how many were cancelled. The stale
 * function runs under the source's lock: it must not call into the source. */
unsigned moe_expert_src_cancel_prefetches(struct moe_expert_src *s,
                                          bool (*stale)(void *ctx, void *arg, uint32_t layer,
                                                        uint32_t expert),
                                          void *ctx);

/* Blocking convenience: load and wait. */
int moe_expert_src_load_sync(struct moe_expert_src *s, uint32_t layer, uint32_t expert,
                             void *dst, size_t dst_size, struct moe_diag *diag);

void moe_expert_src_stats(struct moe_expert_src *s, struct moe_io_stats *out);

/* Test hook on every read request (io/uring.h); set before the first load. */
void moe_expert_src_set_fault_hook(struct moe_expert_src *s, moe_uring_fault_fn fn, void *ctx);

#ifdef __cplusplus
}
#endif

#endif
