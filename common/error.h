/* Error codes, diagnostics and assertions shared by every module.
 *
 * Contract: functions return 0 or a negative code: -errno where one fits,
 * moed's own codes below -4000. A caller that wants to know *why* passes a
 * struct moe_diag; the callee writes one message into it naming the file,
 * field or request and what was expected. A NULL diag is allowed everywhere.
 */
#ifndef MOE_COMMON_ERROR_H
#define MOE_COMMON_ERROR_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    MOE_EFORMAT      = -4001, /* input file or request is malformed */
    MOE_ECHECKSUM    = -4002, /* stored checksum does not match the bytes */
    MOE_EUNSUPPORTED = -4003, /* well-formed, but not something we implement */
    MOE_ELIMIT       = -4004, /* a configured or built-in cap was exceeded */
    MOE_EGPU         = -4005, /* recoverable CUDA error (e.g. out of memory) */
    MOE_EGPU_FATAL   = -4006, /* sticky CUDA error: the context is poisoned */
};

#define MOE_DIAG_MSG_MAX 512

struct moe_diag {
    int  code;                     /* the code of the last error set, or 0 */
    char msg[MOE_DIAG_MSG_MAX];    /* NUL-terminated, possibly truncated */
};

/* Text for a code from this header or a -errno value. Never NULL. */
const char *moe_strerror(int code);

/* Records code and a printf-style message in diag (if non-NULL) and returns
 * code, so that callers can write `return moe_diag_set(d, MOE_EFORMAT, ...)`.
 * The first message set wins until moe_diag_clear(): the innermost error is
 * usually the most precise one. */
int moe_diag_set(struct moe_diag *diag, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void moe_diag_clear(struct moe_diag *diag);

/* Programmer errors only; stays on in release builds; never for input. */
void moe_assert_fail(const char *expr, const char *file, int line)
    __attribute__((noreturn));
#define MOE_ASSERT(e) ((e) ? (void)0 : moe_assert_fail(#e, __FILE__, __LINE__))

#ifdef __cplusplus
}
#endif

#endif
