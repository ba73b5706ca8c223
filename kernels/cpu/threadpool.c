#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "common/alloc.h"
#include "kernels/cpu/threadpool.h"

struct moe_threadpool {
    int n_threads;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t start_cv, done_cv;
    uint64_t generation;        /* bumped for every run; guarded by mu */
    int n_busy;                 /* workers still in the current run */
    int stop;

    moe_task_fn fn;
    void *ctx;
    int64_t n_tasks;
    atomic_llong next;          /* next task index to hand out */
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

static void *worker_main(void *arg)
{
    struct worker_arg wa = *(struct worker_arg *)arg;
    struct moe_threadpool *p = wa.p;
    moe_free(arg);
    uint64_t seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->stop && p->generation == seen)
            pthread_cond_wait(&p->start_cv, &p->mu);
        if (p->stop)
            break;
        seen = p->generation;
        pthread_mutex_unlock(&p->mu);
        drain(p, wa.id);
        pthread_mutex_lock(&p->mu);
        if (--p->n_busy == 0)
            pthread_cond_signal(&p->done_cv);
    }
    pthread_mutex_unlock(&p->mu);
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
    p->stop = 1;
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
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->ctx = ctx;
    p->n_tasks = n_tasks;
    atomic_store(&p->next, 0);
    p->n_busy = p->n_threads - 1;
    p->generation++;
    pthread_cond_broadcast(&p->start_cv);
    pthread_mutex_unlock(&p->mu);
    drain(p, 0);
    pthread_mutex_lock(&p->mu);
    while (p->n_busy > 0)
        pthread_cond_wait(&p->done_cv, &p->mu);
    pthread_mutex_unlock(&p->mu);
}
