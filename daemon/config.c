#include "daemon/config.h"

#include <errno.h>
#include <ini.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"

enum kind { K_STR, K_INT, K_SIZE, K_BOOL, K_MODE, K_ENUM };

struct key {
    const char *name;
    enum kind kind;
    size_t off;
    size_t cap;              /* K_STR/K_ENUM: buffer size */
    int64_t min, max;        /* K_INT/K_SIZE/K_MODE */
    bool runtime;            /* SIGHUP can change it */
    const char *choices;     /* K_ENUM: '|'-separated */
    const char *help;
};

#define OFF(f) offsetof(struct moed_config, f)
#define CAP(f) sizeof(((struct moed_config *)0)->f)

static const struct key keys[] = {
    { "model", K_STR, OFF(model), CAP(model), 0, 0, false, NULL,
      "model file: a GGUF, or a .moe pack made by `moectl pack`" },
    { "model_name", K_STR, OFF(model_name), CAP(model_name), 0, 0, false, NULL,
      "model id reported by /v1/models (default: the file name)" },
    { "threads", K_INT, OFF(threads), 0, 0, 1024, false, NULL,
      "CPU threads for compute (0: all online CPUs)" },
    { "ctx_size", K_INT, OFF(ctx_size), 0, 16, 1 << 20, false, NULL,
      "context (prompt + output) per sequence, tokens" },
    { "batch_size", K_INT, OFF(batch_size), 0, 1, 8192, false, NULL,
      "tokens per engine step, all sequences together" },
    { "max_seqs", K_INT, OFF(max_seqs), 0, 1, 256, false, NULL,
      "sequences decoded together (continuous batching); each has its own KV cache" },
    { "kv_f16", K_BOOL, OFF(kv_f16), 0, 0, 1, false, NULL, "f16 KV cache (default f32)" },
    { "cache_bytes", K_SIZE, OFF(cache_bytes), 0, 0, (int64_t)1 << 50, false, NULL,
      "expert cache budget (e.g. 12G); 0 with cache_experts 0: every expert resident" },
    { "cache_experts", K_INT, OFF(cache_experts), 0, 0, 1 << 24, false, NULL,
      "expert cache budget in experts (instead of cache_bytes)" },
    { "cache_policy", K_ENUM, OFF(cache_policy), CAP(cache_policy), 0, 0, false, "lru|lfu|layer|predict",
      "eviction policy of the expert cache" },
    { "host_bytes", K_SIZE, OFF(host_bytes), 0, 0, (int64_t)1 << 50, false, NULL,
      "host-RAM tier below the expert cache (0: none)" },
    { "prefetch", K_ENUM, OFF(prefetch), CAP(prefetch), 0, 0, false, "none|gate|history",
      "expert prefetch predictor" },
    { "prefetch_depth", K_INT, OFF(prefetch_depth), 0, 1, 8, false, NULL,
      "layers ahead the prefetcher predicts" },
    { "prefetch_always", K_BOOL, OFF(prefetch_always), 0, 0, 1, false, NULL,
      "prefetch on every decode step (default: a governor keeps it only while it makes decoding faster)" },
    { "backend", K_ENUM, OFF(backend), CAP(backend), 0, 0, false, "cpu|cuda",
      "compute backend (cuda: device 0; not yet run on a GPU, see doc/cuda.md)" },
    { "force_pread", K_BOOL, OFF(force_pread), 0, 0, 1, false, NULL,
      "read experts with pread instead of io_uring" },
    { "chat_template", K_STR, OFF(chat_template), CAP(chat_template), 0, 0, false, NULL,
      "chat template by name (chatml, llama2, mistral-v7, deepseek3, ...); empty: from the model" },
    { "socket", K_STR, OFF(socket), CAP(socket), 0, 0, false, NULL,
      "Unix socket path (default $XDG_RUNTIME_DIR/moed.sock, else ./moed.sock)" },
    { "socket_mode", K_MODE, OFF(socket_mode), 0, 0, 0777, false, NULL,
      "permissions of the socket, octal" },
    { "tcp_port", K_INT, OFF(tcp_port), 0, 0, 65535, false, NULL,
      "also listen on 127.0.0.1:PORT (0: off)" },
    { "prefill_chunk", K_INT, OFF(prefill_chunk), 0, 1, 8192, true, NULL,
      "prompt tokens per step for one sequence, so long prompts do not stall streams" },
    { "queue_size", K_INT, OFF(queue_size), 0, 0, 1 << 16, true, NULL,
      "requests waiting for a sequence before new ones get 503" },
    { "max_body_bytes", K_SIZE, OFF(max_body_bytes), 0, 1024, (int64_t)1 << 30, true, NULL,
      "largest request body (413 above)" },
    { "max_header_bytes", K_INT, OFF(max_header_bytes), 0, 1024, 1 << 20, true, NULL,
      "largest request line + headers (431 above)" },
    { "max_connections", K_INT, OFF(max_connections), 0, 1, 1 << 20, true, NULL,
      "open client connections; the next one gets 503 and is closed" },
    { "max_output_bytes", K_SIZE, OFF(max_output_bytes), 0, 65536, (int64_t)1 << 32, true, NULL,
      "response bytes queued for a client that does not read: its generation pauses, and it is"
      " dropped after read_timeout_ms without progress" },
    { "read_timeout_ms", K_INT, OFF(read_timeout_ms), 0, 100, 3600000, true, NULL,
      "time to receive a whole request once it has started (408 after)" },
    { "idle_timeout_ms", K_INT, OFF(idle_timeout_ms), 0, 100, 3600000, true, NULL,
      "keep-alive connection closed after this long without a request" },
    { "request_timeout_s", K_INT, OFF(request_timeout_s), 0, 0, 86400, true, NULL,
      "generation time limit per request (0: none); the answer ends with finish_reason length" },
    { "max_tokens_default", K_INT, OFF(max_tokens_default), 0, 1, 1 << 20, true, NULL,
      "max_tokens when a request gives none" },
    { "shutdown_grace_s", K_INT, OFF(shutdown_grace_s), 0, 0, 3600, true, NULL,
      "on SIGTERM, time in-flight requests get to finish before they are cancelled" },
    { "log_level", K_ENUM, OFF(log_level), CAP(log_level), 0, 0, true, "error|warn|info|debug",
      "log verbosity" },
};

#define N_KEYS (sizeof(keys) / sizeof(keys[0]))

void moed_config_defaults(struct moed_config *c)
{
    memset(c, 0, sizeof(*c));
    c->threads = 0;
    c->ctx_size = 4096;
    c->batch_size = 512;
    c->max_seqs = 16;
    strcpy(c->cache_policy, "layer");
    strcpy(c->prefetch, "none");
    strcpy(c->backend, "cpu");
    c->prefetch_depth = 1;
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    if (xdg && xdg[0] && strlen(xdg) + sizeof("/moed.sock") < sizeof(c->socket))
        snprintf(c->socket, sizeof(c->socket), "%s/moed.sock", xdg);
    else
        strcpy(c->socket, "./moed.sock");
    c->socket_mode = 0600;
    c->prefill_chunk = 256;
    c->queue_size = 64;
    c->max_body_bytes = 8 << 20;
    c->max_header_bytes = 16 << 10;
    c->read_timeout_ms = 30000;
    c->max_connections = 1024;
    c->max_output_bytes = 4 << 20;
    c->idle_timeout_ms = 60000;
    c->request_timeout_s = 0;
    c->max_tokens_default = 256;
    c->shutdown_grace_s = 10;
    strcpy(c->log_level, "info");
}

int moed_parse_size(const char *s, int64_t *out)
{
    char *end;
    errno = 0;
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

static const struct key *find_key(const char *name)
{
    char norm[64];
    size_t n = strlen(name);
    if (n >= sizeof(norm))
        return NULL;
    for (size_t i = 0; i <= n; i++)
        norm[i] = name[i] == '-' ? '_' : name[i];
    for (size_t i = 0; i < N_KEYS; i++)
        if (strcmp(keys[i].name, norm) == 0)
            return &keys[i];
    return NULL;
}

static int set_key(struct moed_config *c, const struct key *k, const char *v, struct moe_diag *d)
{
    char *base = (char *)c + k->off;
    char *end;
    switch (k->kind) {
    case K_STR:
        if (strlen(v) >= k->cap)
            return moe_diag_set(d, -EINVAL, "%s: value is %zu bytes, at most %zu allowed", k->name,
                                strlen(v), k->cap - 1);
        strcpy(base, v);
        return 0;
    case K_ENUM: {
        const char *p = k->choices;
        size_t n = strlen(v);
        while (p && *p) {
            const char *bar = strchr(p, '|');
            size_t len = bar ? (size_t)(bar - p) : strlen(p);
            if (len == n && strncmp(p, v, n) == 0 && n < k->cap) {
                strcpy(base, v);
                return 0;
            }
            p = bar ? bar + 1 : NULL;
        }
        return moe_diag_set(d, -EINVAL, "%s: '%s' is not one of %s", k->name, v, k->choices);
    }
    case K_BOOL:
        if (!strcmp(v, "1") || !strcmp(v, "true") || !strcmp(v, "yes") || !strcmp(v, "on"))
            *(bool *)base = true;
        else if (!strcmp(v, "0") || !strcmp(v, "false") || !strcmp(v, "no") || !strcmp(v, "off"))
            *(bool *)base = false;
        else
            return moe_diag_set(d, -EINVAL, "%s: '%s' is not a boolean (true/false, 1/0, yes/no,"
                                " on/off)", k->name, v);
        return 0;
    case K_INT: {
        errno = 0;
        long long x = strtoll(v, &end, 10);
        if (end == v || *end != '\0' || errno)
            return moe_diag_set(d, -EINVAL, "%s: '%s' is not an integer", k->name, v);
        if (x < k->min || x > k->max)
            return moe_diag_set(d, -ERANGE, "%s: %lld is out of range %lld..%lld", k->name, x,
                                (long long)k->min, (long long)k->max);
        *(int *)base = (int)x;
        return 0;
    }
    case K_SIZE: {
        int64_t x;
        if (moed_parse_size(v, &x))
            return moe_diag_set(d, -EINVAL, "%s: '%s' is not a size (bytes, or with K/M/G/T)",
                                k->name, v);
        if (x < k->min || x > k->max)
            return moe_diag_set(d, -ERANGE, "%s: %s is out of range %lld..%lld bytes", k->name, v,
                                (long long)k->min, (long long)k->max);
        *(int64_t *)base = x;
        return 0;
    }
    case K_MODE: {
        errno = 0;
        unsigned long x = strtoul(v, &end, 8);
        if (end == v || *end != '\0' || errno || x > (unsigned long)k->max)
            return moe_diag_set(d, -EINVAL, "%s: '%s' is not an octal mode 0..0777", k->name, v);
        *(unsigned *)base = (unsigned)x;
        return 0;
    }
    }
    return -EINVAL;
}

int moed_config_set(struct moed_config *c, const char *key, const char *value, struct moe_diag *d)
{
    const struct key *k = find_key(key);
    if (k == NULL)
        return moe_diag_set(d, -EINVAL, "unknown key '%s' (moed --help lists them)", key);
    return set_key(c, k, value, d);
}

struct ini_ctx {
    struct moed_config *c;
    int rc;
    char msg[MOE_DIAG_MSG_MAX];
};

/* Returns 0 on a bad pair: inih then reports that line as the first error. */
static int on_ini_pair(void *user, const char *section, const char *name, const char *value)
{
    struct ini_ctx *x = user;
    if (x->rc)
        return 1;
    if (section[0] && strcmp(section, "moed") != 0) {
        x->rc = -EINVAL;
        snprintf(x->msg, sizeof(x->msg), "section [%s]: only [moed] (or no section) is read", section);
        return 0;
    }
    struct moe_diag kd = { 0 };
    int rc = moed_config_set(x->c, name, value, &kd);
    if (rc) {
        x->rc = rc;
        snprintf(x->msg, sizeof(x->msg), "%s", kd.msg);
        return 0;
    }
    return 1;
}

static int ini_result(const struct ini_ctx *x, int line, const char *name, struct moe_diag *d)
{
    if (x->rc)
        return moe_diag_set(d, x->rc, "%s:%d: %s", name, line, x->msg);
    if (line != 0)
        return moe_diag_set(d, -EINVAL, "%s:%d: not `key = value` or `[section]`", name, line);
    return 0;
}

/* A config file is a few KiB; this bounds what a wrong path can cost. */
#define CONFIG_FILE_MAX (1 << 20)

struct text_reader {
    const char *p, *end;
};

/* inih's reader over bytes in memory with fgets' semantics (a line up to
 * '\n' or num - 1 bytes, NUL bytes included), so a file parses exactly as
 * ini_parse_file would parse it. */
static char *read_line(char *str, int num, void *stream)
{
    struct text_reader *t = stream;
    if (t->p == t->end || num < 2)
        return NULL;
    int n = 0;
    while (n < num - 1 && t->p < t->end) {
        const char ch = *t->p++;
        str[n++] = ch;
        if (ch == '\n')
            break;
    }
    str[n] = '\0';
    return str;
}

int moed_config_load_file(struct moed_config *c, const char *path, struct moe_diag *d)
{
    struct moe_buf b;
    moe_buf_init(&b, CONFIG_FILE_MAX);
    int rc = moe_buf_read_file(&b, path);
    if (rc) {
        moe_buf_free(&b);
        if (rc == MOE_ELIMIT)
            return moe_diag_set(d, rc, "%s: larger than %d bytes; not a config file", path,
                                CONFIG_FILE_MAX);
        return moe_diag_set(d, rc, "%s: %s", path, moe_strerror(rc));
    }
    struct text_reader t = { .p = b.data, .end = b.data ? b.data + b.len : NULL };
    struct ini_ctx x = { .c = c };
    int line = ini_parse_stream(read_line, &t, on_ini_pair, &x);
    moe_buf_free(&b);
    return ini_result(&x, line, path, d);
}

int moed_config_load_string(struct moed_config *c, const char *text, const char *name,
                            struct moe_diag *d)
{
    struct ini_ctx x = { .c = c };
    int line = ini_parse_string(text, on_ini_pair, &x);
    return ini_result(&x, line, name, d);
}

int moed_config_n_keys(void)
{
    return (int)N_KEYS;
}

bool moed_config_key(int i, struct moed_key_info *out)
{
    if (i < 0 || i >= (int)N_KEYS)
        return false;
    static const char kinds[] = { [K_STR] = 's', [K_INT] = 'i', [K_SIZE] = 'z', [K_BOOL] = 'b',
                                  [K_MODE] = 'm', [K_ENUM] = 'e' };
    out->name = keys[i].name;
    out->kind = kinds[keys[i].kind];
    out->min = keys[i].min;
    out->max = keys[i].max;
    out->runtime = keys[i].runtime;
    return true;
}

int moed_config_from_args(struct moed_config *c, int argc, char **argv, struct moed_args *a,
                          struct moe_diag *d)
{
    memset(a, 0, sizeof(*a));
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            a->help = true;
            return 0;
        }
        if (!strcmp(argv[i], "--version")) {
            a->version = true;
            return 0;
        }
        if (!strcmp(argv[i], "--config")) {
            if (i + 1 >= argc)
                return moe_diag_set(d, -EINVAL, "--config needs a file");
            a->config_path = argv[++i];
        } else if (!strncmp(argv[i], "--config=", 9)) {
            a->config_path = argv[i] + 9;
        }
    }
    if (a->config_path) {
        int rc = moed_config_load_file(c, a->config_path, d);
        if (rc)
            return rc;
    }
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (!strcmp(arg, "--config")) {
            i++;
            continue;
        }
        if (!strncmp(arg, "--config=", 9))
            continue;
        if (!strcmp(arg, "--check-config")) {
            a->check_only = true;
            continue;
        }
        if (strncmp(arg, "--", 2) != 0)
            return moe_diag_set(d, -EINVAL, "unexpected argument '%s' (flags are --key value)", arg);
        char name[64];
        const char *eq = strchr(arg + 2, '=');
        size_t nl = eq ? (size_t)(eq - arg - 2) : strlen(arg + 2);
        if (nl >= sizeof(name))
            return moe_diag_set(d, -EINVAL, "unknown flag '%s'", arg);
        memcpy(name, arg + 2, nl);
        name[nl] = '\0';
        const struct key *k = find_key(name);
        if (k == NULL)
            return moe_diag_set(d, -EINVAL, "unknown flag '--%s' (moed --help lists them)", name);
        const char *val;
        if (eq)
            val = eq + 1;
        else if (k->kind == K_BOOL && (i + 1 >= argc || strncmp(argv[i + 1], "--", 2) == 0))
            val = "true";
        else if (i + 1 < argc)
            val = argv[++i];
        else
            return moe_diag_set(d, -EINVAL, "--%s needs a value", name);
        struct moe_diag kd = { 0 };
        int rc = set_key(c, k, val, &kd);
        if (rc)
            return moe_diag_set(d, rc, "--%s", kd.msg);
    }
    return 0;
}

int moed_config_validate(const struct moed_config *c, struct moe_diag *d)
{
    if (c->model[0] == '\0')
        return moe_diag_set(d, -EINVAL, "model: no model given (--model FILE or `model =` in the"
                            " config)");
    if (c->socket[0] == '\0')
        return moe_diag_set(d, -EINVAL, "socket: empty path");
    if (strlen(c->socket) >= 108)
        return moe_diag_set(d, -EINVAL, "socket: path '%s' is %zu bytes, a Unix socket path has"
                            " at most 107", c->socket, strlen(c->socket));
    if (c->cache_bytes > 0 && c->cache_experts > 0)
        return moe_diag_set(d, -EINVAL, "cache_bytes and cache_experts: give one of them");
    if (c->ctx_size < 2)
        return moe_diag_set(d, -EINVAL, "ctx_size: %d is too small", c->ctx_size);
    return 0;
}

static void print_value(const struct moed_config *c, const struct key *k, char *buf, size_t cap)
{
    const char *base = (const char *)c + k->off;
    switch (k->kind) {
    case K_STR:
    case K_ENUM:
        snprintf(buf, cap, "%s", base);
        break;
    case K_INT:
        snprintf(buf, cap, "%d", *(const int *)base);
        break;
    case K_SIZE:
        snprintf(buf, cap, "%lld", (long long)*(const int64_t *)base);
        break;
    case K_BOOL:
        snprintf(buf, cap, "%s", *(const bool *)base ? "true" : "false");
        break;
    case K_MODE:
        snprintf(buf, cap, "0%03o", *(const unsigned *)base);
        break;
    }
}

void moed_config_print(const struct moed_config *c, FILE *f)
{
    fprintf(f, "[moed]\n");
    for (size_t i = 0; i < N_KEYS; i++) {
        char v[PATH_MAX + 32];
        print_value(c, &keys[i], v, sizeof(v));
        fprintf(f, "%s = %s%s\n", keys[i].name, v, keys[i].runtime ? "" : "    ; restart to change");
    }
}

void moed_config_apply_reload(struct moed_config *cur, const struct moed_config *next,
                              void (*restart_cb)(void *ud, const char *key), void *ud)
{
    for (size_t i = 0; i < N_KEYS; i++) {
        const struct key *k = &keys[i];
        char a[PATH_MAX + 32], b[PATH_MAX + 32];
        print_value(cur, k, a, sizeof(a));
        print_value(next, k, b, sizeof(b));
        if (strcmp(a, b) == 0)
            continue;
        if (!k->runtime) {
            if (restart_cb)
                restart_cb(ud, k->name);
            continue;
        }
        struct moe_diag d = { 0 };
        set_key(cur, k, b, &d);   /* b came from a valid config */
    }
}

void moed_config_usage(FILE *f)
{
    for (size_t i = 0; i < N_KEYS; i++) {
        char flag[80];
        snprintf(flag, sizeof(flag), "--%s", keys[i].name);
        for (char *p = flag + 2; *p; p++)
            if (*p == '_')
                *p = '-';
        const char *arg = keys[i].kind == K_BOOL ? "" : keys[i].kind == K_SIZE ? " SIZE"
                          : keys[i].kind == K_INT ? " N" : keys[i].kind == K_MODE ? " MODE"
                          : keys[i].kind == K_ENUM ? " WORD" : " TEXT";
        char left[100];
        snprintf(left, sizeof(left), "%s%s", flag, arg);
        fprintf(f, "  %-26s %s%s\n", left, keys[i].help, keys[i].runtime ? " [reloadable]" : "");
        if (keys[i].kind == K_ENUM)
            fprintf(f, "  %-26s   one of %s\n", "", keys[i].choices);
    }
}
