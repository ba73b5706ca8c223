/* Allocation wrappers with a fault-injection hook.
 *
 * Every allocation in the library that depends on input goes through these,
 * so that tests can fail the Nth allocation (shared/RELIABILITY.md row 3) and
 * check that each error path frees everything. The hook and the live counter
 * are process-global and not meant for production use; the counters are
 * atomic so that the wrappers stay thread-safe.
 */
#ifndef MOE_COMMON_ALLOC_H
#define MOE_COMMON_ALLOC_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

void *moe_malloc(size_t n);
void *moe_calloc(size_t count, size_t size);
void *moe_realloc(void *p, size_t n);
/* `align` (a power of two, a multiple of sizeof(void *)) aligned; freed by
 * moe_free. Never moe_realloc it. */
void *moe_malloc_aligned(size_t align, size_t n);
void  moe_free(void *p);
char *moe_strndup(const char *s, size_t n);

/* Fail every allocation after `n` more have succeeded; n < 0 disables. */
void moe_alloc_fail_after(long n);
/* Let `skip` more allocations succeed, then fail `count` (-1: every one
 * from then on), then succeed again: one failure in the middle of a running
 * program (common/fault.h's alloc kind). count 0 disarms. */
void moe_alloc_fail_window(long skip, long count);
/* Allocations through these wrappers that returned NULL so far (injected
 * or real): lets a caller tell a library's "out of memory" from its other
 * errors when the library does not (jansson's parser, for one). */
long moe_alloc_failed(void);
/* Allocations made through moe_malloc/calloc/realloc(NULL,..) and not freed. */
long moe_alloc_live(void);

#ifdef __cplusplus
}
#endif

#endif
