/* Minimal test harness: assertions that print both sides, a per-test
 * timeout, exit 77 = skip (meson and shared/RELIABILITY.md row 23).
 *
 * A test program is main() calling MOE_TEST_RUN(fn) for each case; the
 * program exits 0 when all pass, 1 when any failed, 77 when all skipped.
 * Assertion macros `return` from the current test function on failure.
 */
#ifndef MOE_TESTS_HARNESS_H
#define MOE_TESTS_HARNESS_H

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#define MOE_TEST_SKIP 77

extern int moe_test_failed;   /* failures in the current test */
extern int moe_test_skipped;  /* set by MOE_SKIP */

/* Runs fn with a timeout (seconds; env MOE_TEST_TIMEOUT overrides) and
 * records pass/fail/skip. */
void moe_test_run(const char *name, void (*fn)(void));
/* Exit code for main(): 1 if any failed, 77 if everything skipped, else 0. */
int moe_test_exit_code(void);
/* Directory of shared/ref (env MOE_REF_DIR), or NULL when it is missing:
 * then tests skip, except under CI=true where the harness fails them. */
const char *moe_test_ref_dir(void);
/* A copy of GGUF bytes data[len] with the string value of metadata `key`
 * replaced by val (malloc'ed, *out_len set), or NULL when the key is not
 * there as a string or the bytes end inside it. */
uint8_t *moe_test_gguf_set_str(const uint8_t *data, size_t len, const char *key, const char *val, size_t *out_len);
/* Directory for scratch files of this test program (created, unique). */
const char *moe_test_tmpdir(void);
/* Runs a shell command, its stdout into out (NUL-terminated, truncated to
 * cap - 1); returns the exit status, 128 + signal, or -1 if it could not
 * start. Redirect stderr in cmd to capture it. */
int moe_test_run_cmd(const char *cmd, char *out, size_t cap);
/* Reads a whole file into a block of its size plus a NUL (so that text can
 * be used as a string); NULL with errno set on error. Caller frees with
 * free(). */
void *moe_test_read_file(const char *path, size_t *len);

#define MOE_TEST_RUN(fn) moe_test_run(#fn, fn)

#define MOE_FAIL_AT(...) do { \
        fprintf(stderr, "  FAIL %s:%d: ", __FILE__, __LINE__); \
        fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); \
        moe_test_failed++; } while (0)

#define CHECK(cond) do { if (!(cond)) { MOE_FAIL_AT("%s", #cond); return; } } while (0)
#define CHECK_MSG(cond, ...) do { if (!(cond)) { MOE_FAIL_AT(__VA_ARGS__); return; } } while (0)
#define CHECK_INT(a, op, b) do { long long _a = (long long)(a), _b = (long long)(b); \
        if (!(_a op _b)) { MOE_FAIL_AT("%s %s %s: %lld vs %lld", #a, #op, #b, _a, _b); return; } } while (0)
#define CHECK_U64(a, op, b) do { uint64_t _a = (uint64_t)(a), _b = (uint64_t)(b); \
        if (!(_a op _b)) { MOE_FAIL_AT("%s %s %s: %" PRIu64 " vs %" PRIu64, #a, #op, #b, _a, _b); return; } } while (0)
#define CHECK_STR(a, b) do { const char *_a = (a), *_b = (b); \
        if (_a == NULL || _b == NULL || strcmp(_a, _b) != 0) { \
            MOE_FAIL_AT("%s == %s: \"%s\" vs \"%s\"", #a, #b, _a ? _a : "(null)", _b ? _b : "(null)"); return; } } while (0)
#define CHECK_NEAR(a, b, tol) do { double _a = (a), _b = (b); \
        if (!(_a - _b <= (tol) && _b - _a <= (tol))) { \
            MOE_FAIL_AT("%s ~ %s: %.9g vs %.9g (tol %g)", #a, #b, _a, _b, (double)(tol)); return; } } while (0)
#define MOE_SKIP(...) do { fprintf(stderr, "  SKIP: "); fprintf(stderr, __VA_ARGS__); \
        fputc('\n', stderr); moe_test_skipped = 1; return; } while (0)

#endif
