/* A fixed pool of worker threads for data-parallel CPU ops.
 *
 * moe_threadpool_run(pool, fn, ctx, n_tasks) calls fn(ctx, i, worker) for
 * every i in [0, n_tasks), spread over the workers and the calling thread,
 * and returns when all calls have finished. Tasks are handed out one at a
 * time from an atomic counter, so uneven tasks balance themselves.
 * `worker` is 0..n_threads-1 and indexes per-thread scratch.
 *
 * One run at a time per pool (the engine thread owns it). Never allocates
 * after create.
 */
#ifndef MOE_KERNELS_CPU_THREADPOOL_H
#define MOE_KERNELS_CPU_THREADPOOL_H

#include <stdint.h>

struct moe_threadpool;

typedef void (*moe_task_fn)(void *ctx, int64_t task, int worker);

/* n_threads >= 1 counts the calling thread; 1 means run inline. */
int moe_threadpool_create(struct moe_threadpool **out, int n_threads);
void moe_threadpool_destroy(struct moe_threadpool *p);
int moe_threadpool_size(const struct moe_threadpool *p);
void moe_threadpool_run(struct moe_threadpool *p, moe_task_fn fn, void *ctx, int64_t n_tasks);
/* Whether the pool's idle threads spin before sleeping (not when it has more
 * threads than moe_cpus_usable()). */
int moe_threadpool_spins(const struct moe_threadpool *p);

/* CPUs this process may run on: its affinity mask, bounded by a cgroup CPU
 * quota (rounded up). */
int moe_cpus_usable(void);
/* The default compute thread count: physical cores in the affinity mask
 * (hardware threads of one core count once), at most moe_cpus_usable(). */
int moe_threadpool_default_threads(void);

#endif
