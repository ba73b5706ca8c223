/* The CPU thread pool: every task runs exactly once per run, with any
 * number of threads, including more threads than CPUs (where the pool must
 * not spin); the default thread count stays within the CPUs the process may
 * use; idle workers leave the CPU after a run (they sleep, so a long pause
 * between runs costs no CPU time). */
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "kernels/cpu/threadpool.h"
#include "tests/harness.h"

struct counts {
    atomic_int *hits;
    atomic_int bad_worker;
    int n_threads;
};

static void count_task(void *ctx, int64_t i, int worker)
{
    struct counts *c = ctx;
    atomic_fetch_add(&c->hits[i], 1);
    if (worker < 0 || worker >= c->n_threads)
        atomic_fetch_add(&c->bad_worker, 1);
}

static int run_many(int n_threads)
{
    struct moe_threadpool *p = NULL;
    if (moe_threadpool_create(&p, n_threads) != 0)
        return -1;
    enum { N = 1000 };
    atomic_int *hits = calloc(N, sizeof(*hits));
    struct counts c = { .hits = hits, .n_threads = n_threads };
    int bad = 0;
    for (int run = 0; run < 200 && !bad; run++) {
        const int n = 1 + (run * 37) % N;
        for (int i = 0; i < N; i++)
            atomic_store(&hits[i], 0);
        moe_threadpool_run(p, count_task, &c, n);
        for (int i = 0; i < N; i++)
            if (atomic_load(&hits[i]) != (i < n ? 1 : 0))
                bad = 1;
    }
    if (atomic_load(&c.bad_worker))
        bad = 1;
    free(hits);
    moe_threadpool_destroy(p);
    return bad;
}

static void every_task_once(void)
{
    const int usable = moe_cpus_usable();
    const int sizes[] = { 1, 2, 3, usable, usable + 3, 16 };
    for (size_t k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++)
        CHECK_MSG(run_many(sizes[k]) == 0, "%d threads: a task ran twice, never, or on a bad worker id",
                  sizes[k]);
}

static void spins_only_when_cpus_allow(void)
{
    const int usable = moe_cpus_usable();
    CHECK_INT(usable, >=, 1);
    struct moe_threadpool *p = NULL;
    CHECK_INT(moe_threadpool_create(&p, usable + 1), ==, 0);
    CHECK_MSG(!moe_threadpool_spins(p), "%d threads on %d CPUs must not spin", usable + 1, usable);
    moe_threadpool_destroy(p);
    CHECK_INT(moe_threadpool_create(&p, usable), ==, 0);
    CHECK(moe_threadpool_spins(p));
    moe_threadpool_destroy(p);
    const int def = moe_threadpool_default_threads();
    CHECK_INT(def, >=, 1);
    CHECK_INT(def, <=, usable);
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static void idle_workers_sleep(void)
{
    /* after a run, a pool of n threads idles for 300 ms: its workers may spin
     * for at most the spin budget (well under 10 ms each), then sleep */
    const int n = moe_cpus_usable() > 1 ? 2 : 1;
    if (n < 2)
        MOE_SKIP("one CPU: a one-thread pool has no workers");
    struct moe_threadpool *p = NULL;
    CHECK_INT(moe_threadpool_create(&p, n), ==, 0);
    enum { N = 64 };
    atomic_int hits[N];
    struct counts c = { .hits = hits, .n_threads = n };
    for (int i = 0; i < N; i++)
        atomic_store(&hits[i], 0);
    moe_threadpool_run(p, count_task, &c, N);
    const double t0 = cpu_seconds();
    struct timespec ts = { 0, 300 * 1000 * 1000 };
    nanosleep(&ts, NULL);
    const double used = cpu_seconds() - t0;
    moe_threadpool_destroy(p);
    CHECK_MSG(used < 0.1, "an idle pool used %.3f s of CPU in 0.3 s", used);
}

int main(void)
{
    MOE_TEST_RUN(every_task_once);
    MOE_TEST_RUN(spins_only_when_cpus_allow);
    MOE_TEST_RUN(idle_workers_sleep);
    return moe_test_exit_code();
}
