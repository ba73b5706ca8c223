/* Streaming GGUF v3 writer.
 *
 * Usage: create; add key/values and tensor infos (any order, keys unique);
 * begin_data writes the header, the tensor infos and the padding; then the
 * tensors' bytes are written in declaration order with moe_gguf_writer_write
 * (any chunking; the writer pads between tensors and checks that each got
 * exactly its size); finish fsyncs and renames the temporary file
 * `<path>.tmp` to `path`. abort (or a failed finish) removes the temporary
 * file, so a half-written file never carries the final name.
 *
 * Memory: key/values are serialized into a growing buffer (metadata is
 * small); tensor data streams through a buffered writer.
 */
#ifndef MOE_IO_GGUF_WRITER_H
#define MOE_IO_GGUF_WRITER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "io/gguf.h"

struct moe_gguf_writer;

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

/* Declares a tensor; returns its byte size in *size if non-NULL. */
int moe_gguf_writer_add_tensor(struct moe_gguf_writer *w, const char *name, uint32_t n_dims,
                               const uint64_t *ne, uint32_t dtype, uint64_t *size);

int moe_gguf_writer_begin_data(struct moe_gguf_writer *w);
int moe_gguf_writer_write(struct moe_gguf_writer *w, const void *buf, size_t n);
int moe_gguf_writer_finish(struct moe_gguf_writer *w, struct moe_diag *diag);
void moe_gguf_writer_abort(struct moe_gguf_writer *w);

/* The first error of any call above, with its message (valid until
 * finish/abort). Calls after an error do nothing and return it. */
const char *moe_gguf_writer_error(const struct moe_gguf_writer *w);

#endif
