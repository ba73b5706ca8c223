/* Fault injection for tests (shared/RELIABILITY.md rows 3, 4, 5): one
 * fault, read once from the environment variable MOE_FAULT_INJECT, that the
 * library's I/O, checksum, warm-restart and allocation paths consult.
 *
 *   MOE_FAULT_INJECT=KIND:LAYER:EXPERT:COUNT
 *
 * KIND is one of
 *   eio       a read of the expert's bytes fails with -EIO
 *   short     a read returns half of what it asked for (retried: the bytes
 *             read must still be right)
 *   eagain    a read fails with -EAGAIN (retried up to the reader's bound;
 *             a storm longer than that fails the load)
 *   eof       a read ends at the end of the file (a pack truncated under
 *             the reader: MOE_EFORMAT)
 *   checksum  one byte of the expert's blob is flipped after it was read
 *             (MOE_ECHECKSUM; packs only: a GGUF carries no checksums)
 *   enospc    writing the warm-restart statistics fails with -ENOSPC
 *             (LAYER and EXPERT are ignored)
 *   alloc     LAYER is N, EXPERT is ignored: once armed (moe_fault_arm_alloc),
 *             the Nth allocation through common/alloc.h and the COUNT - 1
 *             after it fail
 * LAYER or EXPERT may be '*' (any). COUNT is how many times the fault
 * fires (reads, blobs, allocations); '*' or a missing COUNT: always.
 *
 * Unset or malformed (logged once through the log hook), nothing is
 * injected and every check below costs one load of a static. The counter
 * is atomic: any thread may consult it.
 */
#ifndef MOE_COMMON_FAULT_H
#define MOE_COMMON_FAULT_H

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum moe_fault_kind {
    MOE_FAULT_NONE = 0,
    MOE_FAULT_EIO,
    MOE_FAULT_SHORT,
    MOE_FAULT_EAGAIN,
    MOE_FAULT_EOF,
    MOE_FAULT_CHECKSUM,
    MOE_FAULT_ENOSPC,
    MOE_FAULT_ALLOC,
};

struct moe_fault_spec {
    enum moe_fault_kind kind;
    long layer, expert;   /* -1: any */
    long count;           /* -1: always */
};

/* The fault from the environment (parsed on the first call); kind
 * MOE_FAULT_NONE when there is none. */
const struct moe_fault_spec *moe_fault_spec(void);

/* True, and one firing used up, when the fault of `kind` applies to
 * (layer, expert) (-1: the caller has no expert) and has firings left. */
bool moe_fault_fire(enum moe_fault_kind kind, long layer, long expert);

/* Whether a fault of `kind` for (layer, expert) is configured at all
 * (firings left or not): the reader installs its hook only then. */
bool moe_fault_wants(enum moe_fault_kind kind, long layer, long expert);

/* How many times the fault has fired so far. */
long moe_fault_fired(void);

/* The alloc kind: from now on, the Nth allocation and COUNT - 1 after it
 * fail (moe_alloc_fail_window). Nothing for other kinds. */
void moe_fault_arm_alloc(void);

/* Tests: parse `spec` instead of the environment (NULL: none). */
int moe_fault_set(const char *spec);

#ifdef __cplusplus
}
#endif

#endif
