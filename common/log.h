/* The library's log hook: every message the library does not return in a
 * caller's moe_diag (a fallback taken once, a warning about a plan, an I/O
 * thread's failure) goes through moe_log(), so that the program embedding
 * the library decides where it lands (moed: its own leveled log).
 *
 * Contract: moe_log_set() installs fn for the whole process (NULL restores
 * the default, one line on stderr: "moe <level>: <msg>"). fn may be called
 * from any library thread, concurrently; it must not call back into the
 * library. The message never ends with a newline. Thread-safe.
 */
#ifndef MOE_COMMON_LOG_H
#define MOE_COMMON_LOG_H

#ifdef __cplusplus
extern "C" {
#endif

enum moe_log_level {
    MOE_LOG_ERROR = 0,
    MOE_LOG_WARN,
    MOE_LOG_INFO,
    MOE_LOG_DEBUG,
};

typedef void (*moe_log_fn)(enum moe_log_level level, const char *msg, void *user);

void moe_log_set(moe_log_fn fn, void *user);
/* "error", "warn", "info", "debug" */
const char *moe_log_level_name(enum moe_log_level level);

void moe_log(enum moe_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#ifdef __cplusplus
}
#endif

#endif
