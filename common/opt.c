#include "common/opt.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int moe_opt_parse_size(const char *s, int64_t *out)
{
    char *end;
    errno = 0;
    if (s[0] == '-' || s[0] == '+' || s[0] == ' ')
        return -EINVAL;
    double v = strtod(s, &end);
    if (end == s || errno || !(v >= 0) || isinf(v))
        return -EINVAL;
    double mul = 1;
    switch (*end) {
    case 'k': case 'K': mul = 1024.0; end++; break;
    case 'm': case 'M': mul = 1048576.0; end++; break;
    case 'g': case 'G': mul = 1073741824.0; end++; break;
    case 't': case 'T': mul = 1099511627776.0; end++; break;
    default: break;
    }
    if ((*end == 'i' || *end == 'I') && mul > 1)
        end++;
    if (*end == 'b' || *end == 'B')
        end++;
    if (*end != '\0')
        return -EINVAL;
    v *= mul;
    if (v >= 9.2e18)
        return -ERANGE;
    *out = (int64_t)v;
    return 0;
}

/* Names compare with '-' and '_' alike. */
static bool same_name(const char *a, const char *b)
{
    for (;; a++, b++) {
        const char x = *a == '-' ? '_' : *a, y = *b == '-' ? '_' : *b;
        if (x != y)
            return false;
        if (x == '\0')
            return true;
    }
}

const struct moe_opt *moe_opt_find(const struct moe_opt *t, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (same_name(t[i].name, name) || (t[i].alias && same_name(t[i].alias, name)))
            return &t[i];
    return NULL;
}

const char *moe_opt_choice_name(const struct moe_opt_choice *c, int value)
{
    for (; c && c->name; c++)
        if (c->value == value && !c->hidden)
            return c->name;
    return NULL;
}

bool moe_opt_bare_ok(const struct moe_opt *o)
{
    if (o->kind == MOE_OPT_BOOL)
        return true;
    for (const struct moe_opt_choice *c = o->choices; o->kind == MOE_OPT_ENUM && c && c->name; c++)
        if (strcmp(c->name, "true") == 0)
            return true;
    return false;
}

const char *moe_opt_choices(const struct moe_opt *o, char *buf, size_t cap)
{
    size_t len = 0;
    if (cap)
        buf[0] = '\0';
    for (const struct moe_opt_choice *c = o->choices; c && c->name && len < cap; c++) {
        if (c->hidden)
            continue;
        int w = snprintf(buf + len, cap - len, "%s%s", len ? "|" : "", c->name);
        if (w < 0)
            break;
        len += (size_t)w;
    }
    return buf;
}

static int set_bool(const struct moe_opt *o, bool *dst, const char *v, struct moe_diag *d)
{
    if (!strcmp(v, "1") || !strcmp(v, "true") || !strcmp(v, "yes") || !strcmp(v, "on"))
        *dst = true;
    else if (!strcmp(v, "0") || !strcmp(v, "false") || !strcmp(v, "no") || !strcmp(v, "off"))
        *dst = false;
    else
        return moe_diag_set(d, -EINVAL, "%s: '%s' is not a boolean (true/false, 1/0, yes/no, on/off)",
                            o->name, v);
    return 0;
}

static int set_enum(const struct moe_opt *o, int *dst, const char *v, struct moe_diag *d)
{
    for (const struct moe_opt_choice *c = o->choices; c && c->name; c++)
        if (strcmp(c->name, v) == 0) {
            *dst = c->value;
            return 0;
        }
    char list[256];
    return moe_diag_set(d, -EINVAL, "%s: '%s' is not one of %s", o->name, v,
                        moe_opt_choices(o, list, sizeof(list)));
}

int moe_opt_set(const struct moe_opt *o, void *base, const char *v, struct moe_diag *d)
{
    char *p = (char *)base + o->off;
    char *end;
    switch (o->kind) {
    case MOE_OPT_STR:
        if (strlen(v) >= o->cap)
            return moe_diag_set(d, -EINVAL, "%s: value is %zu bytes, at most %zu allowed", o->name,
                                strlen(v), o->cap - 1);
        memcpy(p, v, strlen(v) + 1);
        return 0;
    case MOE_OPT_ENUM:
        return set_enum(o, (int *)p, v, d);
    case MOE_OPT_BOOL:
        return set_bool(o, (bool *)p, v, d);
    case MOE_OPT_INT: {
        errno = 0;
        long long x = strtoll(v, &end, 10);
        if (end == v || *end != '\0' || errno)
            return moe_diag_set(d, -EINVAL, "%s: '%s' is not an integer", o->name, v);
        if (x < o->min || x > o->max)
            return moe_diag_set(d, -ERANGE, "%s: %lld is out of range %lld..%lld", o->name, x,
                                (long long)o->min, (long long)o->max);
        *(int *)p = (int)x;
        return 0;
    }
    case MOE_OPT_SIZE: {
        int64_t x;
        if (moe_opt_parse_size(v, &x))
            return moe_diag_set(d, -EINVAL, "%s: '%s' is not a size (bytes, or with K/M/G/T)",
                                o->name, v);
        if (x < o->min || x > o->max)
            return moe_diag_set(d, -ERANGE, "%s: %s is out of range %lld..%lld bytes", o->name, v,
                                (long long)o->min, (long long)o->max);
        *(uint64_t *)p = (uint64_t)x;
        return 0;
    }
    case MOE_OPT_MODE: {
        errno = 0;
        unsigned long x = strtoul(v, &end, 8);
        if (end == v || *end != '\0' || errno || v[0] == '-' || x > (unsigned long)o->max)
            return moe_diag_set(d, -EINVAL, "%s: '%s' is not an octal mode 0..0%llo", o->name, v,
                                (unsigned long long)o->max);
        *(unsigned *)p = (unsigned)x;
        return 0;
    }
    }
    return moe_diag_set(d, -EINVAL, "%s: unknown option kind", o->name);
}

int moe_opt_defaults(const struct moe_opt *t, size_t n, void *base, struct moe_diag *d)
{
    for (size_t i = 0; i < n; i++) {
        if (t[i].def == NULL || t[i].def[0] == '\0')
            continue;
        int rc = moe_opt_set(&t[i], base, t[i].def, d);
        if (rc)
            return rc;
    }
    return 0;
}

void moe_opt_format(const struct moe_opt *o, const void *base, char *buf, size_t cap)
{
    const char *p = (const char *)base + o->off;
    switch (o->kind) {
    case MOE_OPT_STR: snprintf(buf, cap, "%s", p); break;
    case MOE_OPT_INT: snprintf(buf, cap, "%d", *(const int *)p); break;
    case MOE_OPT_SIZE: snprintf(buf, cap, "%" PRIu64, *(const uint64_t *)p); break;
    case MOE_OPT_BOOL: snprintf(buf, cap, "%s", *(const bool *)p ? "true" : "false"); break;
    case MOE_OPT_MODE: snprintf(buf, cap, "0%o", *(const unsigned *)p); break;
    case MOE_OPT_ENUM: {
        const char *name = moe_opt_choice_name(o->choices, *(const int *)p);
        snprintf(buf, cap, "%s", name ? name : "?");
        break;
    }
    }
}
