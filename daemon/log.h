/* Leveled logging to stderr: one line per event, with a UTC timestamp. */
#ifndef MOE_DAEMON_LOG_H
#define MOE_DAEMON_LOG_H

enum moed_log_level { MOED_LOG_ERROR = 0, MOED_LOG_WARN, MOED_LOG_INFO, MOED_LOG_DEBUG };

void moed_log_set_level(int level);   /* enum moed_log_level */
/* A moe_model_opts progress callback: loading progress in the log (each
 * quarter), on a terminal, and in the service manager's status. */
void moed_log_progress(void *ud, const char *phase, double done);
/* Routes the library's log hook (common/log.h) into this log. */
void moed_log_capture_library(void);
void moed_log(enum moed_log_level lv, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define LOG_E(...) moed_log(MOED_LOG_ERROR, __VA_ARGS__)
#define LOG_W(...) moed_log(MOED_LOG_WARN, __VA_ARGS__)
#define LOG_I(...) moed_log(MOED_LOG_INFO, __VA_ARGS__)
#define LOG_D(...) moed_log(MOED_LOG_DEBUG, __VA_ARGS__)

#endif
