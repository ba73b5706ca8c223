#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cache/trace.h"
#include "common/alloc.h"
#include "common/buf.h"

#define MAX_LAYERS 4096
#define MAX_EXPERTS 65536
#define MAX_TRACE_BYTES (1ull << 31)

/* No limit of its own: MAX_TRACE_BYTES bounds the lines, so the accesses. */
static int push(struct moe_trace *t, size_t *cap, struct moe_access a)
{
    if (moe_array_grow((void **)&t->a, cap, (size_t)t->n + 1, sizeof(*t->a), 0) != 0)
        return -ENOMEM;
    t->a[t->n++] = a;
    return 0;
}

/* Reads "key=value" integers from a header line. */
static void header_ints(const char *line, size_t len, struct moe_trace *t)
{
    static const char *const keys[] = { "n_layer=", "n_expert=", "n_expert_used=" };
    int *dst[] = { &t->n_layer, &t->n_expert, &t->n_expert_used };
    for (int k = 0; k < 3; k++) {
        size_t kl = strlen(keys[k]);
        for (size_t i = 0; i + kl < len; i++) {
            if ((i == 0 || line[i - 1] == ' ') && memcmp(line + i, keys[k], kl) == 0) {
                /* the line is not NUL-terminated: digits up to its end only */
                long v = 0;
                size_t j = i + kl;
                for (; j < len && line[j] >= '0' && line[j] <= '9' && v < MAX_EXPERTS; j++)
                    v = v * 10 + (line[j] - '0');
                if (j > i + kl && v > 0 && v < MAX_EXPERTS)
                    *dst[k] = (int)v;
            }
        }
    }
}

static int parse_long(const char **p, const char *end, long lo, long hi, long *out)
{
    const char *s = *p;
    while (s < end && (*s == ' ' || *s == '\t'))
        s++;
    char buf[32];
    size_t n = 0;
    while (s < end && n < sizeof(buf) - 1 && (*s == '-' || (*s >= '0' && *s <= '9')))
        buf[n++] = *s++;
    buf[n] = '\0';
    if (n == 0)
        return -1;
    char *e;
    errno = 0;
    long v = strtol(buf, &e, 10);
    if (errno || *e || v < lo || v > hi)
        return -1;
    *out = v;
    *p = s;
    return 0;
}

static int parse_float(const char **p, const char *end, float *out)
{
    const char *s = *p;
    char buf[48];
    size_t n = 0;
    while (s < end && n < sizeof(buf) - 1 && *s != ',' && *s != ' ' && *s != '\t' && *s != '\r')
        buf[n++] = *s++;
    buf[n] = '\0';
    char *e;
    float v = strtof(buf, &e);
    if (n == 0 || *e)
        return -1;
    *out = v;
    *p = s;
    return 0;
}

int moe_trace_parse(struct moe_trace *t, const char *text, size_t len, const char *name,
                    struct moe_diag *diag)
{
    memset(t, 0, sizeof(*t));
    size_t cap = 0;
    int csv = 0, line_no = 0, rc = 0;
    /* CSV: token step = turn base + phase offset + step (below) */
    int64_t max_id = -1, base = 0;
    long cur_turn = -2, cur_phase = -2, prev_layer = -1, prev_step = -2;
    const char *p = text, *end = text + len;
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        const char *le = eol ? eol : end;
        line_no++;
        const char *s = p;
        p = eol ? eol + 1 : end;
        if (le > s && le[-1] == '\r')
            le--;
        if (le == s)
            continue;
        if (*s == '#') {
            if (le - s >= 16 && memmem(s, (size_t)(le - s), "route_trace v1", 14))
                csv = 1;
            header_ints(s, (size_t)(le - s), t);
            continue;
        }
        if (csv && (le - s) >= 4 && memcmp(s, "turn", 4) == 0)
            continue; /* column header */
        if (csv) {
            long f[6];
            const char *q = s;
            int ok = 1;
            for (int k = 0; k < 6 && ok; k++) {
                ok = parse_long(&q, le, k == 5 ? 0 : -1, k == 5 ? MAX_EXPERTS - 1 : INT32_MAX, &f[k]) == 0;
                if (ok && q < le && *q == ',')
                    q++;
                else if (ok)
                    ok = 0;
            }
            float w = 0;
            ok = ok && parse_float(&q, le, &w) == 0;
            if (!ok || f[3] < 0 || f[3] >= MAX_LAYERS) {
                rc = moe_diag_set(diag, MOE_EFORMAT, "%s:%d: expected turn,phase,step,layer,slot,expert,"
                                  "weight,... with a layer below %d", name, line_no, MAX_LAYERS);
                goto fail;
            }
            /* The token step is the row's step, which is the token's
             * position: prefill is layer-major (every prompt token at
             * layer 0, then at layer 1, ...), so the same step comes back
             * at each layer and must stay one token step; a layer a step
             * does not list (the last layer routes only the prompt's last
             * token) is simply absent. Each turn starts after the steps
             * before it, and a phase whose steps restart from 0 goes on
             * after the phase before it. A step below 0 (not attributed
             * to a position) is its own token step per run of rows. */
            if (f[0] != cur_turn) {
                cur_turn = f[0];
                cur_phase = f[1];
                base = max_id + 1;
            } else if (f[1] != cur_phase) {
                cur_phase = f[1];
                if (f[2] >= 0 && base + f[2] <= max_id)
                    base = max_id + 1 - f[2];
            }
            int64_t id;
            if (f[2] < 0)
                id = prev_step == -1 && f[3] == prev_layer ? max_id : max_id + 1;
            else
                id = base + f[2];
            prev_step = f[2] < 0 ? -1 : f[2];
            prev_layer = f[3];
            if (id > INT32_MAX) {
                rc = moe_diag_set(diag, MOE_EFORMAT, "%s:%d: step %ld: token steps beyond %d", name,
                                  line_no, f[2], INT32_MAX);
                goto fail;
            }
            if (id > max_id)
                max_id = id;
            struct moe_access a = { (int32_t)f[3], (int32_t)f[5], (int32_t)id, w };
            if ((rc = push(t, &cap, a)) != 0) {
                moe_diag_set(diag, rc, "%s: out of memory", name);
                goto fail;
            }
            continue;
        }
        /* moed format: token layer id:weight ... */
        long tok, layer;
        const char *q = s;
        if (parse_long(&q, le, 0, INT32_MAX, &tok) || parse_long(&q, le, 0, MAX_LAYERS - 1, &layer)) {
            rc = moe_diag_set(diag, MOE_EFORMAT, "%s:%d: expected 'token layer id:weight ...'", name,
                              line_no);
            goto fail;
        }
        int n_ids = 0;
        while (q < le) {
            while (q < le && (*q == ' ' || *q == '\t'))
                q++;
            if (q >= le)
                break;
            long id;
            float w = 0.0f;
            if (parse_long(&q, le, 0, MAX_EXPERTS - 1, &id) || q >= le || *q != ':' ||
                (q++, parse_float(&q, le, &w))) {
                rc = moe_diag_set(diag, MOE_EFORMAT, "%s:%d: expert %d: expected 'id:weight'", name,
                                  line_no, n_ids);
                goto fail;
            }
            struct moe_access a = { (int32_t)layer, (int32_t)id, (int32_t)tok, w };
            if ((rc = push(t, &cap, a)) != 0) {
                moe_diag_set(diag, rc, "%s: out of memory", name);
                goto fail;
            }
            n_ids++;
        }
        if (n_ids == 0) {
            rc = moe_diag_set(diag, MOE_EFORMAT, "%s:%d: no experts on the line", name, line_no);
            goto fail;
        }
    }
    if (t->n == 0) {
        rc = moe_diag_set(diag, MOE_EFORMAT, "%s: no accesses in the trace", name);
        goto fail;
    }
    /* infer what the header did not say, and check what it did */
    int max_l = 0, max_e = 0;
    for (int64_t i = 0; i < t->n; i++) {
        if (t->a[i].layer > max_l)
            max_l = t->a[i].layer;
        if (t->a[i].expert > max_e)
            max_e = t->a[i].expert;
    }
    if (t->n_layer == 0)
        t->n_layer = max_l + 1;
    if (t->n_expert == 0)
        t->n_expert = max_e + 1;
    if (max_l >= t->n_layer || max_e >= t->n_expert) {
        rc = moe_diag_set(diag, MOE_EFORMAT, "%s: layer %d / expert %d outside the header's n_layer %d"
                          " / n_expert %d", name, max_l, max_e, t->n_layer, t->n_expert);
        goto fail;
    }
    if (t->n_expert_used > t->n_expert) {
        rc = moe_diag_set(diag, MOE_EFORMAT, "%s: header's n_expert_used %d exceeds n_expert %d", name,
                          t->n_expert_used, t->n_expert);
        goto fail;
    }
    if (t->n_expert_used == 0) {
        /* the most experts one visit (a token step at a layer) used */
        int run = 0;
        for (int64_t i = 0; i < t->n; i++) {
            run = i > 0 && t->a[i].layer == t->a[i - 1].layer && t->a[i].step == t->a[i - 1].step ? run + 1 : 1;
            if (run > t->n_expert_used)
                t->n_expert_used = run < t->n_expert ? run : t->n_expert;
        }
    }
    return 0;
fail:
    moe_free(t->a);
    memset(t, 0, sizeof(*t));
    return rc;
}

int moe_trace_load(struct moe_trace *t, const char *path, struct moe_diag *diag)
{
    memset(t, 0, sizeof(*t));
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return moe_diag_set(diag, -errno, "%s: %s", path, strerror(errno));
    struct moe_buf b;
    moe_buf_init(&b, MAX_TRACE_BYTES);
    int rc = moe_buf_read_fd(&b, fd);
    close(fd);
    if (rc == MOE_ELIMIT)
        rc = moe_diag_set(diag, rc, "%s: larger than %llu bytes", path, (unsigned long long)MAX_TRACE_BYTES);
    else if (rc < 0)   /* -ENOMEM, or a read error: -EIO as stdio reported it before */
        rc = moe_diag_set(diag, rc == -ENOMEM ? rc : -EIO, "%s: cannot read", path);
    else
        rc = moe_trace_parse(t, b.data ? b.data : "", b.len, path, diag);
    moe_buf_free(&b);
    return rc;
}

void moe_trace_free(struct moe_trace *t)
{
    if (t == NULL)
        return;
    moe_free(t->a);
    memset(t, 0, sizeof(*t));
}
