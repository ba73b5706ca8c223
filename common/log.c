#include "common/log.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>

/* fn and user change together, so they are read under one lock; logging is
 * rare (fallbacks, warnings, failures), never per token. */
static pthread_mutex_t hook_mu = PTHREAD_MUTEX_INITIALIZER;
static moe_log_fn hook_fn;
static void *hook_user;

void moe_log_set(moe_log_fn fn, void *user)
{
    pthread_mutex_lock(&hook_mu);
    hook_fn = fn;
    hook_user = user;
    pthread_mutex_unlock(&hook_mu);
}

const char *moe_log_level_name(enum moe_log_level level)
{
    static const char *const names[] = { "error", "warn", "info", "debug" };
    return (unsigned)level < 4 ? names[level] : "?";
}

void moe_log(enum moe_log_level level, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&hook_mu);
    moe_log_fn fn = hook_fn;
    void *user = hook_user;
    pthread_mutex_unlock(&hook_mu);
    if (fn != NULL)
        fn(level, msg, user);
    else
        fprintf(stderr, "moe %s: %s\n", moe_log_level_name(level), msg);
}
