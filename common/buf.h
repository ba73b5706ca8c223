/* One bounded growable byte buffer and one array-growth helper, for every
 * place that accumulates input of unknown length (a request body, a file
 * read whole, a token list, a rendered template).
 *
 * Contract: a struct moe_buf starts zeroed or from moe_buf_init(); its data
 * is always NUL-terminated once anything was appended (so text can be used
 * as a C string), and never longer than `limit` bytes (0: no limit beyond
 * SIZE_MAX / 2). Appends that would pass the limit fail with MOE_ELIMIT and
 * change nothing; allocation failure is -ENOMEM and changes nothing. Memory
 * comes from moe_malloc/moe_realloc (the fault-injection hook), so
 * allocation-failure sweeps reach every user. Not thread-safe: one owner.
 */
#ifndef MOE_COMMON_BUF_H
#define MOE_COMMON_BUF_H

#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

struct moe_buf {
    char *data;      /* NULL until the first append; NUL-terminated after */
    size_t len;      /* bytes held, not counting the terminator */
    size_t cap;      /* bytes allocated */
    size_t limit;    /* most bytes len may reach; 0 = unbounded */
};

void moe_buf_init(struct moe_buf *b, size_t limit);
/* Frees the data; the buffer is empty (same limit) and usable again. */
void moe_buf_free(struct moe_buf *b);
/* len = 0, memory kept. */
void moe_buf_clear(struct moe_buf *b);
/* Room for `extra` more bytes (and the terminator) without reallocating. */
int moe_buf_reserve(struct moe_buf *b, size_t extra);
int moe_buf_append(struct moe_buf *b, const void *p, size_t n);
int moe_buf_puts(struct moe_buf *b, const char *s);
int moe_buf_putc(struct moe_buf *b, char c);
int moe_buf_printf(struct moe_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int moe_buf_vprintf(struct moe_buf *b, const char *fmt, va_list ap);
/* Drops the first n bytes (n <= len), moving the rest to the front. */
void moe_buf_consume(struct moe_buf *b, size_t n);
/* Hands the data to the caller (free with moe_free; never NULL on success:
 * an empty buffer yields ""), leaving b empty. NULL on -ENOMEM. */
char *moe_buf_take(struct moe_buf *b, size_t *len);

/* Reads until end of input, appending. 0 at EOF; MOE_ELIMIT past the
 * limit (what was read stays appended); -errno on a read error. EINTR is
 * retried. */
int moe_buf_read_fd(struct moe_buf *b, int fd);
int moe_buf_read_stream(struct moe_buf *b, FILE *f);
/* Opens path and reads it whole; -errno from open. */
int moe_buf_read_file(struct moe_buf *b, const char *path);

/* Grows an array *ptr of *cap elements of elem_size bytes so that it holds
 * at least `need` (doubling, at least 16); at most max_elems (0 = limited
 * only by size_t). 0, -ENOMEM or MOE_ELIMIT; on failure *ptr and *cap are
 * unchanged. Memory from moe_realloc. */
int moe_array_grow(void **ptr, size_t *cap, size_t need, size_t elem_size, size_t max_elems);

#ifdef __cplusplus
}
#endif

#endif
