/* Streaming GGUF v3 writer.
 *
 * Usage: create; add key/values and tensor infos (any order, keys and tensor
 * names unique); begin_data writes the header, the key/values, the tensor
 * infos and the padding; then the tensors' bytes are written in declaration
 * order with moe_gguf_writer_write (any chunking; the writer inserts the
 * padding between tensors and checks that each got exactly its size);
 * finish pads the last tensor, fsyncs, and renames the temporary file
 * `<path>.tmp` to `path`. abort (or a failed finish) removes the temporary
 * file, so a half-written file never carries the final name.
 *
 * Layout: tensor offsets are aligned to general.alignment when that key is
 * added (it must be a UINT32 power of two up to MOE_GGUF_MAX_ALIGNMENT),
 * else to 32; key/values are written in the order they were added. The
 * writer refuses what io/gguf.c would refuse (empty or long keys, strings
 * over MOE_GGUF_MAX_STRING, metadata over MOE_GGUF_MAX_META_BYTES, names of
 * MOE_GGUF_MAX_NAME bytes or more, rows not a multiple of the block size).
 *
 * Errors: every call returns 0 or a negative code (-EINVAL for misuse or a
 * bad argument, MOE_ELIMIT for a cap, -ENOMEM, -errno of a failed system
 * call). The first error sticks: later calls do nothing and return it,
 * moe_gguf_writer_error() gives its message (naming the file), and finish
 * returns it in diag and removes the temporary file.
 *
 * Memory: key/values and tensor infos are serialized into a growing buffer
 * (metadata is small); tensor data streams through an 8 MiB buffer, so any
 * size of model is written with constant memory. Not thread-safe: one
 * writer, one thread. Assumes a little-endian host (as GGUF is).
 */
#ifndef MOE_IO_GGUF_WRITER_H
#define MOE_IO_GGUF_WRITER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "io/gguf.h"

#ifdef __cplusplus
extern "C" {
#endif

struct moe_gguf_writer;

/* Creates `<path>.tmp` (replacing a leftover one from an interrupted run).
 * On failure *out is NULL and diag names the file. */
int moe_gguf_writer_create(struct moe_gguf_writer **out, const char *path, struct moe_diag *diag);

int moe_gguf_writer_add_u32(struct moe_gguf_writer *w, const char *key, uint32_t v);
int moe_gguf_writer_add_i32(struct moe_gguf_writer *w, const char *key, int32_t v);
int moe_gguf_writer_add_u64(struct moe_gguf_writer *w, const char *key, uint64_t v);
int moe_gguf_writer_add_f32(struct moe_gguf_writer *w, const char *key, float v);
int moe_gguf_writer_add_bool(struct moe_gguf_writer *w, const char *key, bool v);
int moe_gguf_writer_add_str(struct moe_gguf_writer *w, const char *key, const char *v);
/* Any scalar GGUF type: raw little-endian scalar bytes (type size from t). */
int moe_gguf_writer_add_scalar(struct moe_gguf_writer *w, const char *key, enum moe_gguf_type t,
                               const void *v);
/* Array of n scalars of type t (data: n packed little-endian values). */
int moe_gguf_writer_add_arr(struct moe_gguf_writer *w, const char *key, enum moe_gguf_type t,
                            uint64_t n, const void *data);
/* Array of n strings; lens may be NULL (NUL-terminated strings). */
int moe_gguf_writer_add_str_arr(struct moe_gguf_writer *w, const char *key, uint64_t n,
                                const char *const *strs, const size_t *lens);
/* Copies a value parsed by the reader (any type, nested arrays included). */
int moe_gguf_writer_add_value(struct moe_gguf_writer *w, const char *key,
                              const struct moe_gguf_value *v);

/* Declares a tensor of n_dims (1..4) dims ne[0..n_dims) (ne[0] the row
 * length, fastest), of type dtype (enum moe_dtype); returns its byte size in
 * *size if non-NULL. */
int moe_gguf_writer_add_tensor(struct moe_gguf_writer *w, const char *name, uint32_t n_dims,
                               const uint64_t *ne, uint32_t dtype, uint64_t *size);

/* Computes the offsets and writes everything up to the first tensor's
 * bytes. No key or tensor can be added afterwards. */
int moe_gguf_writer_begin_data(struct moe_gguf_writer *w);
/* Appends n bytes of tensor data (may span tensors). More bytes than the
 * declared tensors hold is -EINVAL. */
int moe_gguf_writer_write(struct moe_gguf_writer *w, const void *buf, size_t n);
/* Completes the file (calls begin_data if that was not done: a file with
 * no tensors) and releases w whatever the outcome. Fails with -EINVAL if
 * a tensor is short of data. */
int moe_gguf_writer_finish(struct moe_gguf_writer *w, struct moe_diag *diag);
/* Removes the temporary file and releases w. Accepts NULL. */
void moe_gguf_writer_abort(struct moe_gguf_writer *w);

/* The first error of any call above, with its message (valid until
 * finish/abort). Calls after an error do nothing and return it. */
const char *moe_gguf_writer_error(const struct moe_gguf_writer *w);

#ifdef __cplusplus
}
#endif

#endif
