#include "daemon/notify.h"

#include <stdarg.h>
#include <stdio.h>
#include <systemd/sd-daemon.h>
#include <time.h>

void moed_notify_ready(const char *status)
{
    sd_notifyf(0, "READY=1\nSTATUS=%s", status ? status : "serving");
}

void moed_notify_reloading(void)
{
    /* systemd 253+ wants the monotonic time with RELOADING=1; older ones
     * ignore the extra field */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    sd_notifyf(0, "RELOADING=1\nMONOTONIC_USEC=%llu",
               (unsigned long long)ts.tv_sec * 1000000ull + (unsigned long long)ts.tv_nsec / 1000ull);
}

void moed_notify_stopping(void)
{
    sd_notify(0, "STOPPING=1");
}

void moed_notify_status(const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    sd_notifyf(0, "STATUS=%s", msg);
}
