#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "common/alloc.h"

static atomic_long fail_after = -1;
static atomic_long live;
static atomic_long failed;        /* allocations that returned NULL */

/* moe_alloc_fail_window: skip, then fail count (-1: all) */
static atomic_bool win_armed;
static atomic_long win_skip, win_count;

static int window_fails(void)
{
    if (atomic_fetch_sub(&win_skip, 1) > 0)
        return 0;
    atomic_store(&win_skip, 0);
    long c = atomic_load(&win_count);
    while (c != 0) {
        if (c < 0 || atomic_compare_exchange_weak(&win_count, &c, c - 1))
            return 1;
    }
    atomic_store(&win_armed, false);
    return 0;
}

void moe_alloc_fail_window(long skip, long count)
{
    atomic_store(&win_armed, false);
    atomic_store(&win_skip, skip < 0 ? 0 : skip);
    atomic_store(&win_count, count);
    atomic_store(&win_armed, count != 0);
}

static int should_fail_(void);

static int should_fail(void)
{
    if (!should_fail_())
        return 0;
    atomic_fetch_add(&failed, 1);
    return 1;
}

long moe_alloc_failed(void)
{
    return atomic_load(&failed);
}

static int should_fail_(void)
{
    if (atomic_load_explicit(&win_armed, memory_order_relaxed) && window_fails())
        return 1;
    long n = atomic_load(&fail_after);
    if (n < 0)
        return 0;
    /* Count down; once at zero every further allocation fails. */
    while (n > 0) {
        if (atomic_compare_exchange_weak(&fail_after, &n, n - 1))
            return 0;
        if (n < 0)
            return 0;
    }
    return 1;
}

void moe_alloc_fail_after(long n)
{
    atomic_store(&fail_after, n);
}

long moe_alloc_live(void)
{
    return atomic_load(&live);
}

void *moe_malloc(size_t n)
{
    if (should_fail())
        return NULL;
    void *p = malloc(n ? n : 1);
    atomic_fetch_add(p ? &live : &failed, 1);
    return p;
}

void *moe_malloc_aligned(size_t align, size_t n)
{
    if (should_fail())
        return NULL;
    void *p = NULL;
    if (posix_memalign(&p, align, n ? n : 1) != 0) {
        atomic_fetch_add(&failed, 1);
        return NULL;
    }
    atomic_fetch_add(&live, 1);
    return p;
}

void *moe_calloc(size_t count, size_t size)
{
    if (should_fail())
        return NULL;
    void *p = calloc(count ? count : 1, size ? size : 1);
    atomic_fetch_add(p ? &live : &failed, 1);
    return p;
}

void *moe_realloc(void *p, size_t n)
{
    if (p == NULL)
        return moe_malloc(n);
    if (should_fail())
        return NULL;
    void *q = realloc(p, n ? n : 1);
    if (q == NULL)
        atomic_fetch_add(&failed, 1);
    return q;
}

void moe_free(void *p)
{
    if (p == NULL)
        return;
    atomic_fetch_sub(&live, 1);
    free(p);
}

char *moe_strndup(const char *s, size_t n)
{
    char *d = moe_malloc(n + 1);
    if (d == NULL)
        return NULL;
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}
