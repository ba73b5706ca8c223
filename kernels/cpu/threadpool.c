/* Thread pool with spin-then-sleep hand-offs.
 *
 * A decode step runs hundreds of small ops; waking a sleeping thread costs
 * tens of microseconds, which on small models is most of the step. So
 * workers spin (with a pause hint) for a short while after each run before
 * sleeping on a condition variable, and the caller spins while waiting for
 * the last worker. Sleep/wake races are closed Dekker-style with sequentially
 * consistent atomics: the waker publishes the new generation and then looks
 * at the sleeper count; a sleeper registers and then re-reads the
 * generation under the mutex, so one of them always sees the other. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "common/alloc.h"
#include "kernels/cpu/threadpool.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

/* ~50-100 us of spinning on current x86 cores */
#define SPIN_ITERS 20000

struct moe_threadpool {
    int n_threads;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t start_cv, done_cv;
    atomic_uint_least64_t generation;  /* bumped for every run */
    atomic_int n_busy;                 /* workers still in the current run */
    atomic_int n_sleeping;             /* workers blocked on start_cv */
    atomic_int caller_sleeping;
    atomic_int stop;

    moe_task_fn fn;
    void *ctx;
    int64_t n_tasks;
    atomic_llong next;                 /* next task index to hand out */
};

struct worker_arg {
    struct moe_threadpool *p;
    int id;
};

static void drain(struct moe_threadpool *p, int worker)
{
    for (;;) {
        int64_t i = atomic_fetch_add(&p->next, 1);
        if (i >= p->n_tasks)
            break;
        p->fn(p->ctx, i, worker);
    }
}

static uint64_t wait_for_work(struct moe_threadpool *p, uint64_t seen)
{
    for (int i = 0; i < SPIN_ITERS; i++) {
        uint64_t g = atomic_load(&p->generation);
        if (g != seen || atomic_load(&p->stop))
            return g;
        cpu_relax();
    }
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add(&p->n_sleeping, 1);
    uint64_t g;
    while ((g = atomic_load(&p->generation)) == seen && !atomic_load(&p->stop))
        pthread_cond_wait(&p->start_cv, &p->mu);
    atomic_fetch_sub(&p->n_sleeping, 1);
    pthread_mutex_unlock(&p->mu);
    return g;
}

static void *worker_main(void *arg)
{
    struct worker_arg wa = *(struct worker_arg *)arg;
    struct moe_threadpool *p = wa.p;
    moe_free(arg);
    uint64_t seen = 0;
    for (;;) {
        seen = wait_for_work(p, seen);
        if (atomic_load(&p->stop))
            break;
        drain(p, wa.id);
        if (atomic_fetch_sub(&p->n_busy, 1) == 1 && atomic_load(&p->caller_sleeping)) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->done_cv);
            pthread_mutex_unlock(&p->mu);
        }
    }
    return NULL;
}

int moe_threadpool_create(struct moe_threadpool **out, int n_threads)
{
    *out = NULL;
    if (n_threads < 1 || n_threads > 1024)
        return -EINVAL;
    struct moe_threadpool *p = moe_calloc(1, sizeof(*p));
    if (p == NULL)
        return -ENOMEM;
    p->n_threads = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->start_cv, NULL);
    pthread_cond_init(&p->done_cv, NULL);
    if (n_threads > 1) {
        p->threads = moe_calloc((size_t)n_threads - 1, sizeof(pthread_t));
        if (p->threads == NULL) {
            p->n_threads = 1;
            moe_threadpool_destroy(p);
            return -ENOMEM;
        }
    }
    for (int i = 1; i < n_threads; i++) {
        struct worker_arg *wa = moe_malloc(sizeof(*wa));
        if (wa != NULL) {
            wa->p = p;
            wa->id = i;
        }
        int rc = wa ? pthread_create(&p->threads[i - 1], NULL, worker_main, wa) : ENOMEM;
        if (rc != 0) {
            moe_free(wa);
            p->n_threads = i; /* only join the ones that started */
            moe_threadpool_destroy(p);
            return -rc;
        }
    }
    *out = p;
    return 0;
}

void moe_threadpool_destroy(struct moe_threadpool *p)
{
    if (p == NULL)
        return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->start_cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n_threads && p->threads; i++)
        pthread_join(p->threads[i - 1], NULL);
    moe_free(p->threads);
    pthread_cond_destroy(&p->start_cv);
    pthread_cond_destroy(&p->done_cv);
    pthread_mutex_destroy(&p->mu);
    moe_free(p);
}

int moe_threadpool_size(const struct moe_threadpool *p)
{
    return p ? p->n_threads : 1;
}

void moe_threadpool_run(struct moe_threadpool *p, moe_task_fn fn, void *ctx, int64_t n_tasks)
{
    if (n_tasks <= 0)
        return;
    if (p == NULL || p->n_threads == 1 || n_tasks == 1) {
        for (int64_t i = 0; i < n_tasks; i++)
            fn(ctx, i, 0);
        return;
    }
    p->fn = fn;
    p->ctx = ctx;
    p->n_tasks = n_tasks;
    atomic_store(&p->next, 0);
    atomic_store(&p->n_busy, p->n_threads - 1);
    atomic_fetch_add(&p->generation, 1);  /* publishes fn/ctx/n_tasks (seq_cst) */
    if (atomic_load(&p->n_sleeping) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->start_cv);
        pthread_mutex_unlock(&p->mu);
    }
    drain(p, 0);
    for (int i = 0; i < SPIN_ITERS; i++) {
        if (atomic_load(&p->n_busy) == 0)
            return;
        cpu_relax();
    }
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->caller_sleeping, 1);
    while (atomic_load(&p->n_busy) > 0)
        pthread_cond_wait(&p->done_cv, &p->mu);
    atomic_store(&p->caller_sleeping, 0);
    pthread_mutex_unlock(&p->mu);
}
