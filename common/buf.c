#include "common/buf.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "common/alloc.h"
#include "common/error.h"

#define BUF_MAX (SIZE_MAX / 2)

void moe_buf_init(struct moe_buf *b, size_t limit)
{
    *b = (struct moe_buf){ .limit = limit };
}

void moe_buf_free(struct moe_buf *b)
{
    moe_free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

void moe_buf_clear(struct moe_buf *b)
{
    b->len = 0;
    if (b->data)
        b->data[0] = '\0';
}

int moe_buf_reserve(struct moe_buf *b, size_t extra)
{
    const size_t limit = b->limit ? b->limit : BUF_MAX;
    if (extra > limit || b->len > limit - extra)
        return MOE_ELIMIT;
    const size_t need = b->len + extra + 1; /* the terminator */
    if (need <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need)
        cap = cap > BUF_MAX / 2 ? need : cap * 2;
    /* do not allocate far beyond what the limit can ever use */
    if (cap > limit + 1)
        cap = limit + 1 > need ? limit + 1 : need;
    char *p = moe_realloc(b->data, cap);
    if (p == NULL)
        return -ENOMEM;
    b->data = p;
    b->cap = cap;
    return 0;
}

int moe_buf_append(struct moe_buf *b, const void *p, size_t n)
{
    int rc = moe_buf_reserve(b, n);
    if (rc)
        return rc;
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

int moe_buf_puts(struct moe_buf *b, const char *s)
{
    return moe_buf_append(b, s, strlen(s));
}

int moe_buf_putc(struct moe_buf *b, char c)
{
    return moe_buf_append(b, &c, 1);
}

int moe_buf_vprintf(struct moe_buf *b, const char *fmt, va_list ap)
{
    va_list ap2;
    va_copy(ap2, ap);
    char small[256];
    int n = vsnprintf(small, sizeof(small), fmt, ap2);
    va_end(ap2);
    if (n < 0)
        return -EINVAL;
    if ((size_t)n < sizeof(small))
        return moe_buf_append(b, small, (size_t)n);
    int rc = moe_buf_reserve(b, (size_t)n);
    if (rc)
        return rc;
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    b->len += (size_t)n;
    return 0;
}

int moe_buf_printf(struct moe_buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = moe_buf_vprintf(b, fmt, ap);
    va_end(ap);
    return rc;
}

void moe_buf_consume(struct moe_buf *b, size_t n)
{
    if (n >= b->len) {
        moe_buf_clear(b);
        return;
    }
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
    b->data[b->len] = '\0';
}

char *moe_buf_take(struct moe_buf *b, size_t *len)
{
    if (b->data == NULL && moe_buf_reserve(b, 0) != 0)
        return NULL;
    b->data[b->len] = '\0';
    char *p = b->data;
    if (len)
        *len = b->len;
    b->data = NULL;
    b->len = b->cap = 0;
    return p;
}

int moe_buf_read_fd(struct moe_buf *b, int fd)
{
    for (;;) {
        const size_t limit = b->limit ? b->limit : BUF_MAX;
        if (b->len >= limit) {
            /* full: only EOF right now is success */
            char probe;
            ssize_t r = read(fd, &probe, 1);
            if (r < 0 && errno == EINTR)
                continue;
            return r == 0 ? 0 : r < 0 ? -errno : MOE_ELIMIT;
        }
        size_t want = b->cap > b->len + 1 ? b->cap - b->len - 1 : 0;
        if (want < 4096) {
            size_t extra = limit - b->len < 65536 ? limit - b->len : 65536;
            int rc = moe_buf_reserve(b, extra);
            if (rc)
                return rc;
            want = b->cap - b->len - 1;
        }
        if (want > limit - b->len)
            want = limit - b->len;
        ssize_t r = read(fd, b->data + b->len, want);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -errno;
        if (r == 0)
            return 0;
        b->len += (size_t)r;
        b->data[b->len] = '\0';
    }
}

int moe_buf_read_stream(struct moe_buf *b, FILE *f)
{
    char chunk[8192];
    for (;;) {
        size_t n = fread(chunk, 1, sizeof(chunk), f);
        if (n > 0) {
            int rc = moe_buf_append(b, chunk, n);
            if (rc)
                return rc;
        }
        if (n < sizeof(chunk))
            return ferror(f) ? -EIO : 0;
    }
}

int moe_buf_read_file(struct moe_buf *b, const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    int rc = moe_buf_read_fd(b, fd);
    close(fd);
    return rc;
}

int moe_array_grow(void **ptr, size_t *cap, size_t need, size_t elem_size, size_t max_elems)
{
    if (need <= *cap)
        return 0;
    const size_t hard = SIZE_MAX / (elem_size ? elem_size : 1);
    const size_t limit = max_elems && max_elems < hard ? max_elems : hard;
    if (need > limit)
        return MOE_ELIMIT;
    size_t n = *cap ? *cap : 16;
    while (n < need)
        n = n > limit / 2 ? limit : n * 2;
    void *p = moe_realloc(*ptr, n * elem_size);
    if (p == NULL)
        return -ENOMEM;
    *ptr = p;
    *cap = n;
    return 0;
}
