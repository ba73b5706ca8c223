#include "daemon/log.h"

#include "common/log.h"

_Static_assert((int)MOED_LOG_ERROR == (int)MOE_LOG_ERROR && (int)MOED_LOG_DEBUG == (int)MOE_LOG_DEBUG,
               "moed and library log levels are the same numbers");

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "daemon/notify.h"

static atomic_int level = MOED_LOG_INFO;

void moed_log_set_level(int lv)
{
    if (lv >= MOED_LOG_ERROR && lv <= MOED_LOG_DEBUG)
        atomic_store(&level, lv);
}

void moed_log(enum moed_log_level lv, const char *fmt, ...)
{
    if ((int)lv > atomic_load(&level))
        return;
    static const char *tags[] = { "error", "warn", "info", "debug" };
    struct timeval tv;
    gettimeofday(&tv, NULL);
    struct tm tm;
    gmtime_r(&tv.tv_sec, &tm);
    char line[2048];
    int n = snprintf(line, sizeof(line), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ moed %s: ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     (int)(tv.tv_usec / 1000), tags[lv]);
    va_list ap;
    va_start(ap, fmt);
    if (n > 0 && (size_t)n < sizeof(line))
        vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, ap);
    va_end(ap);
    /* one write per line, so lines from two threads never interleave */
    fprintf(stderr, "%s\n", line);
}

/* The library's messages land in this log, at the same levels. */
static void library_log(enum moe_log_level lv, const char *msg, void *user)
{
    (void)user;
    moed_log((enum moed_log_level)lv, "%s", msg);
}

void moed_log_capture_library(void)
{
    moe_log_set(library_log, NULL);
}

/* Model loading progress: a log line at each quarter of a phase, and on a
 * terminal a line that rewrites itself; the service manager's status too. */
void moed_log_progress(void *ud, const char *phase, double done)
{
    static char last_phase[32];
    static int last_quarter = -1;
    (void)ud;
    const int pct = (int)(done * 100.0 + 0.5), quarter = (int)(done * 4.0);
    if (isatty(2)) {
        fprintf(stderr, "\rloading the model: %s %3d%%%s", phase, pct, done >= 1.0 ? "\n" : "");
        fflush(stderr);
    }
    if (strcmp(last_phase, phase) != 0) {
        snprintf(last_phase, sizeof(last_phase), "%s", phase);
        last_quarter = -1;
    }
    if (quarter != last_quarter) {
        last_quarter = quarter;
        if (!isatty(2))
            moed_log(MOED_LOG_INFO, "loading the model: %s %d%%", phase, pct);
        moed_notify_status("loading the model: %s %d%%", phase, pct);
    }
}
