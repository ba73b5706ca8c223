#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "common/alloc.h"
#include "common/fault.h"
#include "common/log.h"

static struct moe_fault_spec spec;
static atomic_long left;          /* firings left; -1: unbounded */
static atomic_long fired;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static const struct { const char *name; enum moe_fault_kind kind; } kinds[] = {
    { "eio", MOE_FAULT_EIO },           { "short", MOE_FAULT_SHORT },
    { "eagain", MOE_FAULT_EAGAIN },     { "eof", MOE_FAULT_EOF },
    { "checksum", MOE_FAULT_CHECKSUM }, { "enospc", MOE_FAULT_ENOSPC },
    { "alloc", MOE_FAULT_ALLOC },
};

/* One ':'-separated field: a non-negative number or '*' (-1). */
static int field(const char **p, long *out)
{
    const char *s = *p;
    if (*s == '*') {
        *out = -1;
        s++;
    } else {
        char *end;
        errno = 0;
        long v = strtol(s, &end, 10);
        if (end == s || errno || v < 0)
            return -EINVAL;
        *out = v;
        s = end;
    }
    if (*s == ':')
        s++;
    else if (*s != '\0')
        return -EINVAL;
    *p = s;
    return 0;
}

static int parse(const char *text, struct moe_fault_spec *out)
{
    *out = (struct moe_fault_spec){ .kind = MOE_FAULT_NONE, .layer = -1, .expert = -1, .count = -1 };
    const char *colon = strchr(text, ':');
    const size_t n = colon ? (size_t)(colon - text) : strlen(text);
    enum moe_fault_kind k = MOE_FAULT_NONE;
    for (size_t i = 0; i < sizeof(kinds) / sizeof(kinds[0]); i++)
        if (strlen(kinds[i].name) == n && strncmp(kinds[i].name, text, n) == 0)
            k = kinds[i].kind;
    if (k == MOE_FAULT_NONE)
        return -EINVAL;
    const char *p = colon ? colon + 1 : text + n;
    long *fields[3] = { &out->layer, &out->expert, &out->count };
    for (int i = 0; i < 3 && *p; i++)
        if (field(&p, fields[i]) != 0)
            return -EINVAL;
    if (*p)
        return -EINVAL;
    out->kind = k;
    return 0;
}

static void install(const char *text)
{
    struct moe_fault_spec s;
    if (text == NULL || text[0] == '\0' || parse(text, &s) != 0) {
        if (text && text[0])
            moe_log(MOE_LOG_ERROR, "MOE_FAULT_INJECT='%s': expected KIND:LAYER:EXPERT:COUNT with KIND"
                    " one of eio|short|eagain|eof|checksum|enospc|alloc; nothing injected", text);
        spec = (struct moe_fault_spec){ .kind = MOE_FAULT_NONE, .layer = -1, .expert = -1, .count = -1 };
    } else {
        spec = s;
        moe_log(MOE_LOG_WARN, "fault injection armed: %s (test hook, MOE_FAULT_INJECT)", text);
    }
    atomic_store(&left, spec.count);
    atomic_store(&fired, 0);
}

static void from_env(void)
{
    install(getenv("MOE_FAULT_INJECT"));
}

const struct moe_fault_spec *moe_fault_spec(void)
{
    pthread_once(&once, from_env);
    return &spec;
}

int moe_fault_set(const char *text)
{
    pthread_once(&once, from_env);
    struct moe_fault_spec s;
    if (text && text[0] && parse(text, &s) != 0)
        return -EINVAL;
    install(text);
    return 0;
}

bool moe_fault_wants(enum moe_fault_kind kind, long layer, long expert)
{
    const struct moe_fault_spec *s = moe_fault_spec();
    return s->kind == kind && (s->layer < 0 || layer < 0 || s->layer == layer) &&
           (s->expert < 0 || expert < 0 || s->expert == expert);
}

bool moe_fault_fire(enum moe_fault_kind kind, long layer, long expert)
{
    if (!moe_fault_wants(kind, layer, expert))
        return false;
    long n = atomic_load(&left);
    while (n != 0) {
        if (n < 0 || atomic_compare_exchange_weak(&left, &n, n - 1)) {
            atomic_fetch_add(&fired, 1);
            return true;
        }
    }
    return false;
}

long moe_fault_fired(void)
{
    return atomic_load(&fired);
}

void moe_fault_arm_alloc(void)
{
    const struct moe_fault_spec *s = moe_fault_spec();
    if (s->kind != MOE_FAULT_ALLOC)
        return;
    moe_alloc_fail_window(s->layer < 1 ? 0 : s->layer - 1, s->count < 0 ? -1 : s->count);
}
