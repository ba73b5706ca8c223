#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <liburing.h>

#include "common/alloc.h"
#include "common/log.h"
#include "common/queue.h"
#include "io/uring.h"

#define MAX_RETRIES MOE_URING_MAX_RETRIES   /* -EAGAIN/-EINTR resubmissions of one request */

struct rop {                 /* one moe_uring_read */
    struct moe_qnode qn;     /* in ops while it has bytes not yet split */
    struct rop *next;        /* done list */
    uint64_t off;
    uint8_t *buf;
    size_t len, need, issued; /* issued: bytes split into requests so far */
    int buf_index;
    bool urgent;             /* in ops_hi: split before every read of ops */
    unsigned outstanding;    /* requests queued or in flight */
    int status;
    moe_uring_done_fn cb;
    void *arg;
};

struct req {                 /* one request (a chunk of a read) */
    struct req *next;        /* free list */
    struct moe_qnode qn;     /* retry queue */
    struct rop *op;
    uint64_t off;
    uint8_t *buf;
    size_t len;
    unsigned retries;
    bool buffered;           /* use the page-cache fd */
};

struct moe_uring {
    char *path;
    int fd_direct, fd_buf, efd;
    bool uring, direct, efd_armed, registered;
    size_t align, chunk;
    unsigned qd, inflight, pending;
    struct io_uring ring;
    struct req *reqs, *free_reqs;
    struct moe_queue retry;          /* requests to issue again, first in first out */
    struct moe_queue ops;            /* reads with bytes not yet split, in call order */
    struct moe_queue ops_hi;         /* the same for urgent reads, split first */
    struct rop *done_head;           /* finished, callbacks to run (a stack) */
    moe_uring_fault_fn fault;
    void *fault_ctx;
    _Atomic uint64_t retries;        /* requeued after -EAGAIN, -EINTR or a short read */
    /* accounting (moe_uring_stats): written by the owner thread */
    _Atomic uint64_t st_reqs, st_bytes, st_busy_ns, st_depth_ns, st_pages_ns;
    _Atomic unsigned st_max_depth;
    uint64_t acct_ns;                /* when the integrals were last brought up to date */
    uint64_t inflight_pages;         /* 4 KiB pages of the requests in flight */
    bool logged_uring, logged_direct, logged_reg;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Brings the busy time and the in-flight integrals up to now; called
 * before the number of requests in flight changes (owner thread). */
static void acct_update(struct moe_uring *r)
{
    const uint64_t t = now_ns(), dt = r->acct_ns ? t - r->acct_ns : 0;
    r->acct_ns = t;
    if (r->inflight == 0 || dt == 0)
        return;
    r->st_busy_ns += dt;
    r->st_depth_ns += dt * r->inflight;
    r->st_pages_ns += dt * r->inflight_pages;
}

static void say(bool *once, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* The first read with bytes not yet split (urgent ones first), or NULL. */
static struct rop *op_first(const struct moe_uring *r)
{
    struct moe_qnode *n = moe_queue_peek(&r->ops_hi);
    if (n == NULL)
        n = moe_queue_peek(&r->ops);
    return n ? moe_container_of(n, struct rop, qn) : NULL;
}

static struct moe_queue *op_queue(struct moe_uring *r, const struct rop *op)
{
    return op->urgent ? &r->ops_hi : &r->ops;
}

static struct req *retry_pop(struct moe_uring *r)
{
    struct moe_qnode *n = moe_queue_pop(&r->retry);
    return n ? moe_container_of(n, struct req, qn) : NULL;
}

static void say(bool *once, const char *fmt, ...)
{
    if (*once)
        return;
    *once = true;
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    moe_log(MOE_LOG_WARN, "io: %s", msg);
}

static size_t dio_align(int fd)
{
    size_t a = 4096;
#ifdef STATX_DIOALIGN
    struct statx sx;
    if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) == 0 && (sx.stx_mask & STATX_DIOALIGN)) {
        size_t m = sx.stx_dio_mem_align > sx.stx_dio_offset_align ? sx.stx_dio_mem_align
                                                                  : sx.stx_dio_offset_align;
        if (m > a)
            a = m;
    }
#else
    (void)fd;
#endif
    return a;
}

int moe_uring_open(struct moe_uring **out, const char *path, const struct moe_uring_config *cfg,
                   struct moe_diag *diag)
{
    *out = NULL;
    struct moe_uring_config c = cfg ? *cfg : (struct moe_uring_config){0};
    if (c.queue_depth == 0)
        c.queue_depth = MOE_URING_DEFAULT_QD;
    if (c.chunk_bytes == 0)
        c.chunk_bytes = MOE_URING_DEFAULT_CHUNK;
    if (c.queue_depth > MOE_URING_MAX_QD || c.chunk_bytes % 4096 || c.chunk_bytes < 4096 ||
        c.chunk_bytes > (16u << 20))
        return moe_diag_set(diag, -EINVAL, "io: queue depth %u and request size %zu, expected "
                            "1..%u and a multiple of 4096 in 4 KiB..16 MiB", c.queue_depth,
                            c.chunk_bytes, MOE_URING_MAX_QD);
    const char *env = getenv("MOE_IO_FORCE_PREAD");
    if (env && strcmp(env, "1") == 0)
        c.force_pread = true;
    struct moe_uring *r = moe_calloc(1, sizeof(*r));
    if (r == NULL)
        return moe_diag_set(diag, -ENOMEM, "%s: out of memory", path);
    r->fd_direct = r->fd_buf = r->efd = -1;
    r->qd = c.queue_depth;
    r->chunk = c.chunk_bytes;
    r->align = 1;
    int rc;
    r->path = moe_strndup(path, strlen(path));
    r->reqs = moe_calloc(r->qd, sizeof(*r->reqs));
    if (r->path == NULL || r->reqs == NULL) {
        rc = moe_diag_set(diag, -ENOMEM, "%s: out of memory", path);
        goto fail;
    }
    for (unsigned i = 0; i < r->qd; i++) {
        r->reqs[i].next = r->free_reqs;
        r->free_reqs = &r->reqs[i];
    }
    r->fd_buf = open(path, O_RDONLY | O_CLOEXEC);
    if (r->fd_buf < 0) {
        rc = moe_diag_set(diag, -errno, "%s: %s", path, strerror(errno));
        goto fail;
    }
    r->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (r->efd < 0) {
        rc = moe_diag_set(diag, -errno, "%s: eventfd: %s", path, strerror(errno));
        goto fail;
    }
    if (!c.force_pread) {
        /* one slot more than the queue depth: the eventfd poll */
        int e = io_uring_queue_init(r->qd + 1, &r->ring, 0);
        if (e == 0)
            r->uring = true;
        else
            say(&r->logged_uring, "%s: io_uring unavailable (%s), using pread", path,
                strerror(-e));
    } else {
        say(&r->logged_uring, "%s: io_uring disabled by configuration, using pread", path);
    }
    if (!c.no_direct) {
        r->fd_direct = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
        if (r->fd_direct >= 0) {
            r->direct = true;
            r->align = dio_align(r->fd_direct);
        } else {
            say(&r->logged_direct, "%s: O_DIRECT refused (%s), reading through the page cache",
                path, strerror(errno));
        }
    }
    *out = r;
    return 0;
fail:
    moe_uring_close(r);
    return rc;
}

size_t moe_uring_align(const struct moe_uring *r) { return r->align; }
bool moe_uring_is_uring(const struct moe_uring *r) { return r->uring; }
bool moe_uring_is_direct(const struct moe_uring *r) { return r->direct; }
unsigned moe_uring_queue_depth(const struct moe_uring *r) { return r->qd; }
unsigned moe_uring_pending(const struct moe_uring *r) { return r->pending; }

void moe_uring_stats(const struct moe_uring *r, struct moe_uring_stats *o)
{
    *o = (struct moe_uring_stats){ 0 };
    if (r == NULL)
        return;
    o->requests = r->st_reqs;
    o->bytes = r->st_bytes;
    o->busy_s = (double)r->st_busy_ns * 1e-9;
    o->depth_s = (double)r->st_depth_ns * 1e-9;
    o->pages_s = (double)r->st_pages_ns * 1e-9;
    o->max_depth = r->st_max_depth;
}

uint64_t moe_uring_retries(const struct moe_uring *r)
{
    return r ? r->retries : 0;
}

void moe_uring_set_fault_hook(struct moe_uring *r, moe_uring_fault_fn fn, void *ctx)
{
    r->fault = fn;
    r->fault_ctx = ctx;
}

int moe_uring_register_buffers(struct moe_uring *r, const struct iovec *iov, unsigned n)
{
    if (!r->uring || n == 0)
        return 0;
    int e = io_uring_register_buffers(&r->ring, iov, n);
    if (e < 0) {
        say(&r->logged_reg, "%s: buffer registration refused (%s), using plain reads",
            r->path, strerror(-e));
        return 0;
    }
    r->registered = true;
    return 0;
}

void moe_uring_wake(struct moe_uring *r)
{
    uint64_t one = 1;
    ssize_t w = write(r->efd, &one, sizeof(one));
    (void)w;  /* EAGAIN: the counter is already non-zero, a wake is pending */
}

static int read_impl(struct moe_uring *r, uint64_t offset, void *buf, size_t len, size_t need,
                     int buf_index, moe_uring_done_fn cb, void *arg, bool urgent)
{
    if (len == 0 || need > len || cb == NULL)
        return -EINVAL;
    if (r->direct && (offset % r->align || len % r->align || (uintptr_t)buf % r->align))
        return -EINVAL;
    struct rop *op = moe_calloc(1, sizeof(*op));
    if (op == NULL)
        return -ENOMEM;
    op->off = offset;
    op->buf = buf;
    op->len = len;
    op->need = need;
    op->buf_index = r->registered ? buf_index : -1;
    op->cb = cb;
    op->arg = arg;
    op->urgent = urgent;
    moe_queue_push(op_queue(r, op), &op->qn);
    r->pending++;
    return 0;
}

int moe_uring_read(struct moe_uring *r, uint64_t offset, void *buf, size_t len, size_t need,
                   int buf_index, moe_uring_done_fn cb, void *arg)
{
    return read_impl(r, offset, buf, len, need, buf_index, cb, arg, false);
}

int moe_uring_read_urgent(struct moe_uring *r, uint64_t offset, void *buf, size_t len, size_t need,
                          int buf_index, moe_uring_done_fn cb, void *arg)
{
    return read_impl(r, offset, buf, len, need, buf_index, cb, arg, true);
}

static void op_finish_one(struct moe_uring *r, struct rop *op)
{
    if (--op->outstanding > 0 || (op->issued < op->len && op->status == 0))
        return;
    /* all requests done, or failed with nothing more in flight */
    if (op->issued < op->len)
        moe_queue_remove(op_queue(r, op), &op->qn); /* still in the split queue */
    op->next = r->done_head;
    r->done_head = op;
}

static void retry_push(struct moe_uring *r, struct req *q)
{
    moe_queue_push(&r->retry, &q->qn);
}

/* Next request to issue: a retry first, then a new chunk. */
static struct req *next_req(struct moe_uring *r)
{
    struct req *q = retry_pop(r);
    if (q)
        return q;
    struct rop *op;
    while ((op = op_first(r)) != NULL && op->status != 0 && op->issued < op->len) {
        /* a failed read issues nothing more; it finishes when its
         * outstanding requests do */
        moe_queue_pop(op_queue(r, op));
        op->issued = op->len;
        if (op->outstanding == 0) {
            op->next = r->done_head;
            r->done_head = op;
        }
    }
    if (op == NULL || r->free_reqs == NULL)
        return NULL;
    q = r->free_reqs;
    r->free_reqs = q->next;
    size_t n = op->len - op->issued < r->chunk ? op->len - op->issued : r->chunk;
    *q = (struct req){ .op = op, .off = op->off + op->issued, .buf = op->buf + op->issued,
                       .len = n };
    op->issued += n;
    op->outstanding++;
    if (op->issued == op->len)
        moe_queue_pop(op_queue(r, op));
    return q;
}

/* Applies a request's result; true when the request is finished. */
static bool req_complete(struct moe_uring *r, struct req *q, int res)
{
    if (r->fault)
        res = r->fault(r->fault_ctx, q->off, q->len, res);
    if (res == -EINVAL && r->direct && !q->buffered) {
        /* Some filesystems accept O_DIRECT at open and refuse the read. */
        say(&r->logged_direct, "%s: O_DIRECT read refused (EINVAL), reading through the "
            "page cache", r->path);
        r->direct = false;
        q->buffered = true;
        retry_push(r, q);
        return false;
    }
    if (res == -EAGAIN || res == -EINTR || res == 0 || (res > 0 && (size_t)res < q->len)) {
        if (res > 0) {
            q->off += (uint64_t)res;
            q->buf += res;
            q->len -= (size_t)res;
            q->retries = 0;
            /* an O_DIRECT remainder may be misaligned: finish it buffered */
            if (q->off % r->align || (uintptr_t)q->buf % r->align || q->len % r->align)
                q->buffered = true;
            r->retries++;
            retry_push(r, q);
            return false;
        }
        if (res == 0) {
            /* end of file: fine past `need` (a superset read of the tail),
             * else the file is shorter than its index says */
            res = q->off >= q->op->off + q->op->need ? 0 : MOE_EFORMAT;
        } else if (++q->retries <= MAX_RETRIES) {
            r->retries++;
            retry_push(r, q);
            return false;
        }
    }
    struct rop *op = q->op;
    if (res < 0 && op->status == 0)
        op->status = res;
    q->next = r->free_reqs;
    r->free_reqs = q;
    op_finish_one(r, op);
    return true;
}

static int run_callbacks(struct moe_uring *r)
{
    int n = 0;
    while (r->done_head) {
        struct rop *op = r->done_head;
        r->done_head = op->next;
        r->pending--;
        op->cb(op->arg, op->status);
        moe_free(op);
        n++;
    }
    return n;
}

static int run_pread(struct moe_uring *r, bool wait)
{
    struct req *q;
    while ((q = next_req(r)) != NULL) {
        const uint64_t t0 = now_ns();
        ssize_t res = pread(r->fd_buf, q->buf, q->len, (off_t)q->off);
        const uint64_t dt = now_ns() - t0;
        r->st_busy_ns += dt;
        r->st_depth_ns += dt;
        r->st_pages_ns += dt * ((q->len + 4095) / 4096);
        r->st_reqs++;
        r->st_bytes += res > 0 ? (uint64_t)res : 0;
        r->st_max_depth = 1;
        req_complete(r, q, res < 0 ? -errno : (int)res);
    }
    int n = run_callbacks(r);
    if (n == 0 && wait) {
        struct pollfd p = { .fd = r->efd, .events = POLLIN };
        while (poll(&p, 1, -1) < 0 && errno == EINTR)
            ;
        uint64_t v;
        ssize_t rd = read(r->efd, &v, sizeof(v));
        (void)rd;
    }
    return n;
}

#define EFD_TAG ((void *)1)

static int run_uring(struct moe_uring *r, bool wait)
{
    unsigned queued = 0;
    if (!r->efd_armed) {
        struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
        if (sqe) {
            io_uring_prep_poll_add(sqe, r->efd, POLLIN);
            io_uring_sqe_set_data(sqe, EFD_TAG);
            r->efd_armed = true;
            queued++;
        }
    }
    struct req *q;
    while (r->inflight < r->qd && (q = next_req(r)) != NULL) {
        struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
        if (sqe == NULL) {
            retry_push(r, q);
            break;
        }
        bool direct = r->direct && !q->buffered;
        int fd = direct ? r->fd_direct : r->fd_buf;
        if (q->op->buf_index >= 0 && direct)
            io_uring_prep_read_fixed(sqe, fd, q->buf, (unsigned)q->len, q->off, q->op->buf_index);
        else
            io_uring_prep_read(sqe, fd, q->buf, (unsigned)q->len, q->off);
        io_uring_sqe_set_data(sqe, q);
        acct_update(r);
        r->inflight++;
        r->inflight_pages += (q->len + 4095) / 4096;
        if (r->inflight > r->st_max_depth)
            r->st_max_depth = r->inflight;
        queued++;
    }
    if (queued) {
        int e;
        while ((e = io_uring_submit(&r->ring)) == -EINTR || e == -EAGAIN)
            ;
        if (e < 0)
            return e;
    }
    int n = run_callbacks(r);
    bool block = wait && n == 0;
    for (;;) {
        struct io_uring_cqe *cqe;
        int e = block ? io_uring_wait_cqe(&r->ring, &cqe) : io_uring_peek_cqe(&r->ring, &cqe);
        if (e == -EINTR)
            continue;
        if (e == -EAGAIN || (!block && e < 0))
            break;
        if (e < 0)
            return e;
        block = false;
        void *tag = io_uring_cqe_get_data(cqe);
        int res = cqe->res;
        io_uring_cqe_seen(&r->ring, cqe);
        if (tag == EFD_TAG) {
            uint64_t v;
            ssize_t rd = read(r->efd, &v, sizeof(v));
            (void)rd;
            r->efd_armed = false;
            continue;
        }
        acct_update(r);
        r->inflight--;
        struct req *done = tag;
        r->inflight_pages -= (done->len + 4095) / 4096;
        r->st_reqs++;
        r->st_bytes += res > 0 ? (uint64_t)res : 0;
        req_complete(r, tag, res);
    }
    n += run_callbacks(r);
    return n;
}

int moe_uring_run(struct moe_uring *r, bool wait)
{
    int n = r->uring ? run_uring(r, wait) : run_pread(r, wait);
    /* a retry queued by a completion above is issued at once */
    if (n >= 0 && r->uring && !(moe_queue_empty(&r->retry) && moe_queue_empty(&r->ops) && moe_queue_empty(&r->ops_hi)) && r->inflight < r->qd) {
        int m = run_uring(r, false);
        if (m < 0)
            return m;
        n += m;
    }
    return n;
}

void moe_uring_close(struct moe_uring *r)
{
    if (r == NULL)
        return;
    if (r->uring) {
        /* wait for what the kernel still writes into caller buffers */
        while (r->inflight > 0) {
            struct io_uring_cqe *cqe;
            if (io_uring_wait_cqe(&r->ring, &cqe) < 0)
                break;
            void *tag = io_uring_cqe_get_data(cqe);
            io_uring_cqe_seen(&r->ring, cqe);
            if (tag == EFD_TAG)
                continue;
            r->inflight--;
            struct req *q = tag;
            if (q->op->status == 0)
                q->op->status = -ECANCELED;
            q->next = r->free_reqs;
            r->free_reqs = q;
            op_finish_one(r, q->op);
        }
    }
    struct req *q;
    while ((q = retry_pop(r)) != NULL) {
        if (q->op->status == 0)
            q->op->status = -ECANCELED;
        op_finish_one(r, q->op);
    }
    struct moe_qnode *n;
    while ((n = moe_queue_pop(&r->ops_hi)) != NULL || (n = moe_queue_pop(&r->ops)) != NULL) {
        struct rop *op = moe_container_of(n, struct rop, qn);
        op->issued = op->len;
        if (op->status == 0)
            op->status = -ECANCELED;
        if (op->outstanding == 0) {
            op->next = r->done_head;
            r->done_head = op;
        }
    }
    run_callbacks(r);
    if (r->uring)
        io_uring_queue_exit(&r->ring);
    if (r->fd_direct >= 0)
        close(r->fd_direct);
    if (r->fd_buf >= 0)
        close(r->fd_buf);
    if (r->efd >= 0)
        close(r->efd);
    moe_free(r->reqs);
    moe_free(r->path);
    moe_free(r);
}
