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
