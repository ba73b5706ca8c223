/* Thread pool with spin-then-sleep hand-offs.
 *
 * A decode step runs hundreds of small ops; waking a sleeping thread costs
 * tens of microseconds, which on small models is most of the step. So
 * workers spin (with a pause hint) for a short while after each run before
 * sleeping on a condition variable, and the caller spins while waiting for
 * the last worker. The spin is bounded by time (SPIN_NS), not by a count of
 * pause instructions, whose latency differs tenfold between CPUs; and a pool
 * with more threads than the CPUs it may run on does not spin at all, since
 * a spinning thread would then take the CPU from the thread it waits for, or
 * from the I/O and decompression threads that feed the expert cache. Sleep/wake races are closed Dekker-style with sequentially
 * consistent atomics: the waker publishes the new generation and then looks
 * at the sleeper count; a sleeper registers and then re-reads the
 * generation under the mutex, so one of them always sees the other. */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/alloc.h"
#include "kernels/cpu/threadpool.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

/* How long a worker spins after a run, and the caller while it waits for
 * the last worker, before sleeping: longer than the serial work between two
 * runs of a decode step (norms, attention of one token, routing), short
 * enough that idle threads leave the CPU within a fraction of a millisecond. */
#define SPIN_NS 200000
/* pause hints between two reads of the clock */
#define SPIN_CHECK 64

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Spins until cond(arg) holds or budget_ns has passed; returns whether it held. */
static int spin_until(int (*cond)(void *), void *arg, uint64_t budget_ns)
{
    if (budget_ns == 0)
        return cond(arg);
    const uint64_t end = now_ns() + budget_ns;
    for (;;) {
        for (int i = 0; i < SPIN_CHECK; i++) {
            if (cond(arg))
                return 1;
            cpu_relax();
        }
        if (now_ns() >= end)
            return cond(arg);
    }
}

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
    uint64_t spin_ns;                  /* 0 when oversubscribed */

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

struct work_wait {
    struct moe_threadpool *p;
    uint64_t seen;
};

static int work_arrived(void *arg)
{
    const struct work_wait *w = arg;
    return atomic_load(&w->p->generation) != w->seen || atomic_load(&w->p->stop);
}

static int run_done(void *arg)
{
    return atomic_load(&((struct moe_threadpool *)arg)->n_busy) == 0;
}

static uint64_t wait_for_work(struct moe_threadpool *p, uint64_t seen)
{
    struct work_wait w = { p, seen };
    if (spin_until(work_arrived, &w, p->spin_ns))
        return atomic_load(&p->generation);
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
    p->spin_ns = n_threads > moe_cpus_usable() ? 0 : SPIN_NS;
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
    if (spin_until(run_done, p, p->spin_ns))
        return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->caller_sleeping, 1);
    while (atomic_load(&p->n_busy) > 0)
        pthread_cond_wait(&p->done_cv, &p->mu);
    atomic_store(&p->caller_sleeping, 0);
    pthread_mutex_unlock(&p->mu);
}

int moe_threadpool_spins(const struct moe_threadpool *p)
{
    return p != NULL && p->spin_ns > 0;
}

/* The CPU time the cgroup grants, in whole CPUs (rounded up), or 0 without
 * a quota: cgroup v2's cpu.max, else v1's cfs quota and period. */
static int cgroup_cpus(void)
{
    long long quota = -1, period = 0;
    FILE *f = fopen("/sys/fs/cgroup/cpu.max", "r");
    if (f != NULL) {
        char q[32] = "";
        if (fscanf(f, "%31s %lld", q, &period) == 2 && strcmp(q, "max") != 0)
            quota = atoll(q);
        fclose(f);
    } else if ((f = fopen("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "r")) != NULL) {
        if (fscanf(f, "%lld", &quota) != 1)
            quota = -1;
        fclose(f);
        if (quota > 0 && (f = fopen("/sys/fs/cgroup/cpu/cpu.cfs_period_us", "r")) != NULL) {
            if (fscanf(f, "%lld", &period) != 1)
                period = 0;
            fclose(f);
        }
    }
    if (quota <= 0 || period <= 0)
        return 0;
    long long n = (quota + period - 1) / period;
    return n > 1024 ? 1024 : (int)n;
}

int moe_cpus_usable(void)
{
    cpu_set_t set;
    int n = 0;
    if (sched_getaffinity(0, sizeof(set), &set) == 0)
        n = CPU_COUNT(&set);
    if (n <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n = c > 0 && c < 1024 ? (int)c : 1;
    }
    int q = cgroup_cpus();
    return q > 0 && q < n ? q : n;
}

int moe_threadpool_default_threads(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) != 0)
        return moe_cpus_usable();
    /* one thread per physical core the process may run on: a core's second
     * hardware thread adds little to matmuls that are bound by memory or by
     * the vector units, and leaves room for the I/O and decompression threads */
    enum { MAX_CORES = 1024 };
    long long seen[MAX_CORES]; /* 8 KiB */
    int n_cores = 0, n_cpus = 0;
    for (int cpu = 0; cpu < CPU_SETSIZE && n_cores < MAX_CORES; cpu++) {
        if (!CPU_ISSET(cpu, &set))
            continue;
        n_cpus++;
        char path[128];
        long long pkg = 0, core = cpu;
        FILE *f;
        snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu%d/topology/physical_package_id", cpu);
        if ((f = fopen(path, "r")) != NULL) {
            if (fscanf(f, "%lld", &pkg) != 1)
                pkg = 0;
            fclose(f);
        }
        snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu%d/topology/core_id", cpu);
        if ((f = fopen(path, "r")) != NULL) {
            if (fscanf(f, "%lld", &core) != 1)
                core = cpu;
            fclose(f);
        }
        const long long key = (pkg << 32) ^ core;
        int dup = 0;
        for (int i = 0; i < n_cores && !dup; i++)
            dup = seen[i] == key;
        if (!dup)
            seen[n_cores++] = key;
    }
    int n = n_cores > 0 ? n_cores : n_cpus > 0 ? n_cpus : 1;
    const int usable = moe_cpus_usable();
    return n < usable ? n : usable;
}
