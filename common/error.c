#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"

const char *moe_strerror(int code)
{
    switch (code) {
    case 0: return "success";
    case MOE_EFORMAT: return "malformed input";
    case MOE_ECHECKSUM: return "checksum mismatch";
    case MOE_EUNSUPPORTED: return "unsupported";
    case MOE_ELIMIT: return "limit exceeded";
    case MOE_EGPU: return "GPU error";
    case MOE_EGPU_FATAL: return "fatal GPU error";
    default: break;
    }
    if (code < 0 && code > -4000)
        return strerror(-code);
    return "unknown error";
}

int moe_diag_set(struct moe_diag *diag, int code, const char *fmt, ...)
{
    if (diag == NULL || diag->code != 0)
        return code;
    diag->code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(diag->msg, sizeof(diag->msg), fmt, ap);
    va_end(ap);
    return code;
}

void moe_diag_clear(struct moe_diag *diag)
{
    if (diag == NULL)
        return;
    diag->code = 0;
    diag->msg[0] = '\0';
}

void moe_assert_fail(const char *expr, const char *file, int line)
{
    fprintf(stderr, "moe: assertion failed: %s (%s:%d)\n", expr, file, line);
    fflush(stderr);
    abort();
}
