#include "daemon/config.h"

#include "common/log.h"
#include "common/opt.h"
#include "daemon/log.h"
#include "model/options.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ini.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/buf.h"

/* moed's own keys; the engine's are model/options.c's table, read here at
 * the offset of moed_config.engine. Both tables are common/opt.h rows. */
#define OFF(f) offsetof(struct moed_config, f)
#define CAP(f) sizeof(((struct moed_config *)0)->f)
#define RT MOE_OPT_RUNTIME

static const struct moe_opt_choice log_levels[] = {
    { "error", MOED_LOG_ERROR }, { "warn", MOED_LOG_WARN }, { "info", MOED_LOG_INFO },
    { "debug", MOED_LOG_DEBUG }, { NULL, 0 },
};

static const struct moe_opt daemon_keys[] = {
    { "model", NULL, MOE_OPT_STR, OFF(model), CAP(model), 0, 0, NULL, NULL, 0,
      "model file: a GGUF, or a .moe pack made by `moectl pack`" },
    { "model_name", NULL, MOE_OPT_STR, OFF(model_name), CAP(model_name), 0, 0, NULL, NULL, 0,
      "model id reported by /v1/models (default: the file name)" },
    { "max_seqs", NULL, MOE_OPT_INT, OFF(max_seqs), 0, 1, 256, NULL, "16", 0,
      "sequences decoded together (continuous batching); each has its own KV cache" },
    { "chat_template", NULL, MOE_OPT_STR, OFF(chat_template), CAP(chat_template), 0, 0, NULL, NULL, 0,
      "chat template by name (chatml, llama2, mistral-v7, deepseek3, ...); empty: from the model" },
    { "chat_template_file", NULL, MOE_OPT_STR, OFF(chat_template_file), CAP(chat_template_file), 0, 0, NULL,
      NULL, 0, "a Jinja chat template file rendered instead of the model's tokenizer.chat_template"
      " (doc/templates.md)" },
    { "socket", NULL, MOE_OPT_STR, OFF(socket), CAP(socket), 0, 0, NULL, NULL, 0,
      "Unix socket path (default $XDG_RUNTIME_DIR/moed.sock, else ./moed.sock)" },
    { "socket_mode", NULL, MOE_OPT_MODE, OFF(socket_mode), 0, 0, 0777, NULL, "0600", 0,
      "permissions of the socket, octal" },
    { "tcp_port", NULL, MOE_OPT_INT, OFF(tcp_port), 0, 0, 65535, NULL, "0", 0,
      "also listen for HTTP on tcp_host:PORT (0: off)" },
    { "tcp_host", NULL, MOE_OPT_STR, OFF(tcp_host), CAP(tcp_host), 0, 0, NULL, "127.0.0.1", 0,
      "address tcp_port listens on: an IPv4 or IPv6 literal (0.0.0.0 or :: for every interface);"
      " beyond loopback an api_key is required" },
    { "api_key", NULL, MOE_OPT_STR, OFF(api_key), CAP(api_key), 0, 0, NULL, NULL,
      RT | MOE_OPT_SECRET,
      "Bearer token every TCP client must send (Authorization: Bearer KEY, or x-api-key: KEY);"
      " 401 otherwise; /health stays open; the Unix socket is guarded by socket_mode instead" },
    { "api_key_file", NULL, MOE_OPT_STR, OFF(api_key_file), CAP(api_key_file), 0, 0, NULL, NULL,
      RT, "file whose first line is the api_key (keeps the key out of the config and ps)" },
    { "prefill_chunk", NULL, MOE_OPT_INT, OFF(prefill_chunk), 0, 1, 8192, NULL, "256", RT,
      "prompt tokens per step for one sequence, so long prompts do not stall streams" },
    { "queue_size", NULL, MOE_OPT_INT, OFF(queue_size), 0, 0, 1 << 16, NULL, "64", RT,
      "requests waiting for a sequence before new ones get 503" },
    { "max_body_bytes", NULL, MOE_OPT_SIZE, OFF(max_body_bytes), 0, 1024, (int64_t)1 << 30, NULL,
      "8M", RT, "largest request body (413 above)" },
    { "max_header_bytes", NULL, MOE_OPT_INT, OFF(max_header_bytes), 0, 1024, 1 << 20, NULL, "16384",
      RT, "largest request line + headers (431 above)" },
    { "max_connections", NULL, MOE_OPT_INT, OFF(max_connections), 0, 1, 1 << 20, NULL, "1024", RT,
      "open client connections; the next one gets 503 and is closed" },
    { "max_output_bytes", NULL, MOE_OPT_SIZE, OFF(max_output_bytes), 0, 65536, (int64_t)1 << 32,
      NULL, "4M", RT,
      "response bytes queued for a client that does not read: its generation pauses, and it is"
      " dropped after read_timeout_ms without progress" },
    { "read_timeout_ms", NULL, MOE_OPT_INT, OFF(read_timeout_ms), 0, 100, 3600000, NULL, "30000", RT,
      "time to receive a whole request once it has started (408 after)" },
    { "idle_timeout_ms", NULL, MOE_OPT_INT, OFF(idle_timeout_ms), 0, 100, 3600000, NULL, "60000", RT,
      "keep-alive connection closed after this long without a request" },
    { "request_timeout_s", NULL, MOE_OPT_INT, OFF(request_timeout_s), 0, 0, 86400, NULL, "0", RT,
      "generation time limit per request (0: none); the answer ends with finish_reason length" },
    { "max_tokens_default", NULL, MOE_OPT_INT, OFF(max_tokens_default), 0, 1, 1 << 20, NULL, "256",
      RT, "max_tokens when a request gives none" },
    { "shutdown_grace_s", NULL, MOE_OPT_INT, OFF(shutdown_grace_s), 0, 0, 3600, NULL, "10", RT,
      "on SIGTERM, time in-flight requests get to finish before they are cancelled" },
    { "log_level", NULL, MOE_OPT_ENUM, OFF(log_level), 0, 0, 0, log_levels, "info", RT,
      "log verbosity" },
};

/* The two tables as one list of keys: moed's own, then the engine's. */
struct table {
    const struct moe_opt *rows;
    size_t n;
    size_t base;              /* offset of the struct the rows address */
};

static size_t tables(struct table t[2])
{
    t[0] = (struct table){ daemon_keys, sizeof(daemon_keys) / sizeof(daemon_keys[0]), 0 };
    t[1].rows = moe_model_opt_table(&t[1].n);
    t[1].base = OFF(engine);
    return 2;
}

/* The i-th key of both tables, and where its struct starts in c. */
static const struct moe_opt *key_at(size_t i, size_t *base)
{
    struct table t[2];
    const size_t nt = tables(t);
    for (size_t k = 0; k < nt; k++) {
        if (i < t[k].n) {
            *base = t[k].base;
            return &t[k].rows[i];
        }
        i -= t[k].n;
    }
    return NULL;
}

static size_t n_keys(void)
{
    struct table t[2];
    return tables(t) ? t[0].n + t[1].n : 0;
}

static const struct moe_opt *find_key(const char *name, size_t *base)
{
    struct table t[2];
    const size_t nt = tables(t);
    for (size_t k = 0; k < nt; k++) {
        const struct moe_opt *o = moe_opt_find(t[k].rows, t[k].n, name);
        if (o) {
            *base = t[k].base;
            return o;
        }
    }
    return NULL;
}

static int set_key(struct moed_config *c, const struct moe_opt *k, size_t base, const char *v,
                   struct moe_diag *d)
{
    return moe_opt_set(k, (char *)c + base, v, d);
}

void moed_config_defaults(struct moed_config *c)
{
    memset(c, 0, sizeof(*c));
    struct moe_diag d = { 0 };
    if (moe_opt_defaults(daemon_keys, sizeof(daemon_keys) / sizeof(daemon_keys[0]), c, &d) != 0)
        moe_assert_fail(d.msg, __FILE__, __LINE__);   /* a default outside its own bounds */
    moe_model_opts_defaults(&c->engine);
    c->engine.warm_start = true;   /* a daemon keeps what its cache learned across restarts */
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    if (xdg && xdg[0] && strlen(xdg) + sizeof("/moed.sock") < sizeof(c->socket))
        snprintf(c->socket, sizeof(c->socket), "%s/moed.sock", xdg);
    else
        strcpy(c->socket, "./moed.sock");
}

int moed_config_set(struct moed_config *c, const char *key, const char *value, struct moe_diag *d)
{
    size_t base = 0;
    const struct moe_opt *k = find_key(key, &base);
    if (k == NULL)
        return moe_diag_set(d, -EINVAL, "unknown key '%s' (moed --help lists them)", key);
    return set_key(c, k, base, value, d);
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
    return (int)n_keys();
}

bool moed_config_key(int i, struct moed_key_info *out)
{
    size_t base;
    const struct moe_opt *k = i >= 0 ? key_at((size_t)i, &base) : NULL;
    if (k == NULL)
        return false;
    static const char kinds[] = { [MOE_OPT_STR] = 's', [MOE_OPT_INT] = 'i', [MOE_OPT_SIZE] = 'z',
                                  [MOE_OPT_BOOL] = 'b', [MOE_OPT_MODE] = 'm', [MOE_OPT_ENUM] = 'e' };
    out->name = k->name;
    out->kind = kinds[k->kind];
    out->min = k->min;
    out->max = k->max;
    out->runtime = (k->flags & MOE_OPT_RUNTIME) != 0;
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
        if (!strcmp(argv[i], "--keys-mdoc")) {
            a->keys_mdoc = true;
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
        size_t base = 0;
        const struct moe_opt *k = find_key(name, &base);
        if (k == NULL)
            return moe_diag_set(d, -EINVAL, "unknown flag '--%s' (moed --help lists them)", name);
        const char *val;
        if (eq)
            val = eq + 1;
        else if (moe_opt_bare_ok(k) && (i + 1 >= argc || strncmp(argv[i + 1], "--", 2) == 0))
            val = "true";
        else if (i + 1 < argc)
            val = argv[++i];
        else
            return moe_diag_set(d, -EINVAL, "--%s needs a value", name);
        struct moe_diag kd = { 0 };
        int rc = set_key(c, k, base, val, &kd);
        if (rc)
            return moe_diag_set(d, rc, "--%s", kd.msg);
    }
    return 0;
}

bool moed_host_is_loopback(const char *host)
{
    unsigned char a[16];
    if (inet_pton(AF_INET, host, a) == 1)
        return a[0] == 127;
    if (inet_pton(AF_INET6, host, a) == 1) {
        static const unsigned char one[16] = { [15] = 1 };
        return memcmp(a, one, sizeof(one)) == 0;
    }
    return false;
}

bool moed_key_equal(const char *expected, const char *given, size_t given_len)
{
    const size_t n = strlen(expected);
    unsigned diff = (unsigned)(n != given_len);
    for (size_t i = 0; i < n; i++)
        diff |= (unsigned char)expected[i] ^ (unsigned char)(given_len ? given[i % given_len] : 0);
    return n > 0 && diff == 0;
}

/* A key is what a client sends in a header: visible ASCII, no spaces. */
static int check_key(const char *key, const char *what, struct moe_diag *d)
{
    if (key[0] == '\0')
        return moe_diag_set(d, -EINVAL, "%s: the key is empty", what);
    for (const char *p = key; *p; p++)
        if (*p < 0x21 || *p > 0x7e)
            return moe_diag_set(d, -EINVAL, "%s: the key has a byte 0x%02x; expected visible ASCII"
                                " without spaces", what, (unsigned char)*p);
    return 0;
}

/* api_key_file's first line (trailing blanks and CR/LF dropped) into out. */
static int read_key_file(const char *path, char *out, size_t cap, struct moe_diag *d)
{
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return moe_diag_set(d, -errno, "api_key_file: cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && (st.st_mode & 0077))
        moe_log(MOE_LOG_WARN, "api_key_file: %s is readable by others (mode %03o); chmod 600 it", path,
              (unsigned)(st.st_mode & 0777));
    char line[512];
    const bool got = fgets(line, sizeof(line), f) != NULL;
    fclose(f);
    size_t n = got ? strlen(line) : 0;
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r' || line[n - 1] == ' ' ||
                     line[n - 1] == '\t'))
        line[--n] = '\0';
    if (n >= cap)
        return moe_diag_set(d, -EINVAL, "api_key_file: %s: the key is %zu bytes; at most %zu", path,
                            n, cap - 1);
    char what[PATH_MAX + 16];
    snprintf(what, sizeof(what), "api_key_file %s", path);
    int rc = check_key(got ? line : "", what, d);
    if (rc != 0)
        return rc;
    memcpy(out, line, n + 1);
    return 0;
}

static int resolve_auth(struct moed_config *c, struct moe_diag *d)
{
    c->auth_key[0] = '\0';
    if (c->api_key[0] && c->api_key_file[0])
        return moe_diag_set(d, -EINVAL, "api_key and api_key_file are both set; set one");
    if (c->api_key_file[0])
        return read_key_file(c->api_key_file, c->auth_key, sizeof(c->auth_key), d);
    if (c->api_key[0]) {
        int rc = check_key(c->api_key, "api_key", d);
        if (rc != 0)
            return rc;
        snprintf(c->auth_key, sizeof(c->auth_key), "%s", c->api_key);
    }
    return 0;
}

static int check_tcp(const struct moed_config *c, struct moe_diag *d)
{
    unsigned char a[16];
    if (inet_pton(AF_INET, c->tcp_host, a) != 1 && inet_pton(AF_INET6, c->tcp_host, a) != 1)
        return moe_diag_set(d, -EINVAL, "tcp_host: '%s' is not an IPv4 or IPv6 address (a host"
                            " name is not resolved; give 127.0.0.1, 0.0.0.0, ::1 or ::)", c->tcp_host);
    if (c->tcp_port > 0 && !moed_host_is_loopback(c->tcp_host) && c->auth_key[0] == '\0')
        return moe_diag_set(d, -EINVAL, "tcp_host: %s listens beyond loopback; set api_key or"
                            " api_key_file so that clients must authenticate", c->tcp_host);
    return 0;
}

int moed_config_validate(struct moed_config *c, struct moe_diag *d)
{
    if (c->model[0] == '\0')
        return moe_diag_set(d, -EINVAL, "model: no model given (--model FILE or `model =` in the"
                            " config)");
    if (c->socket[0] == '\0')
        return moe_diag_set(d, -EINVAL, "socket: empty path");
    if (strlen(c->socket) >= 108)
        return moe_diag_set(d, -EINVAL, "socket: path '%s' is %zu bytes, a Unix socket path has"
                            " at most 107", c->socket, strlen(c->socket));
    int rc = resolve_auth(c, d);
    if (rc == 0)
        rc = check_tcp(c, d);
    if (rc != 0)
        return rc;
    return moe_model_opts_check(&c->engine, d);
}

void moed_config_print(const struct moed_config *c, FILE *f)
{
    fprintf(f, "[moed]\n");
    for (size_t i = 0; i < n_keys(); i++) {
        size_t base;
        const struct moe_opt *k = key_at(i, &base);
        char v[PATH_MAX + 32];
        moe_opt_format(k, (const char *)c + base, v, sizeof(v));
        if ((k->flags & MOE_OPT_SECRET) && v[0])
            snprintf(v, sizeof(v), "(set)");
        fprintf(f, "%s = %s%s\n", k->name, v, k->flags & MOE_OPT_RUNTIME ? "" : "    ; restart to change");
    }
}

void moed_config_apply_reload(struct moed_config *cur, const struct moed_config *next,
                              void (*restart_cb)(void *ud, const char *key), void *ud)
{
    for (size_t i = 0; i < n_keys(); i++) {
        size_t base;
        const struct moe_opt *k = key_at(i, &base);
        char a[PATH_MAX + 32], b[PATH_MAX + 32];
        moe_opt_format(k, (const char *)cur + base, a, sizeof(a));
        moe_opt_format(k, (const char *)next + base, b, sizeof(b));
        if (strcmp(a, b) == 0)
            continue;
        if (!(k->flags & MOE_OPT_RUNTIME)) {
            if (restart_cb)
                restart_cb(ud, k->name);
            continue;
        }
        struct moe_diag d = { 0 };
        set_key(cur, k, base, b, &d);   /* b came from a valid config */
    }
    memcpy(cur->auth_key, next->auth_key, sizeof(cur->auth_key));   /* derived, runtime */
}

void moed_config_usage(FILE *f)
{
    for (size_t i = 0; i < n_keys(); i++) {
        size_t base;
        const struct moe_opt *k = key_at(i, &base);
        char flag[80];
        snprintf(flag, sizeof(flag), "--%s", k->name);
        for (char *p = flag + 2; *p; p++)
            if (*p == '_')
                *p = '-';
        const char *arg = k->kind == MOE_OPT_BOOL ? "" : k->kind == MOE_OPT_SIZE ? " SIZE"
                          : k->kind == MOE_OPT_INT ? " N" : k->kind == MOE_OPT_MODE ? " MODE"
                          : k->kind == MOE_OPT_ENUM ? " WORD" : " TEXT";
        char left[100];
        snprintf(left, sizeof(left), "%s%s", flag, arg);
        fprintf(f, "  %-26s %s%s\n", left, k->help, k->flags & MOE_OPT_RUNTIME ? " [reloadable]" : "");
        if (k->kind == MOE_OPT_ENUM) {
            char choices[128];
            fprintf(f, "  %-26s   one of %s\n", "", moe_opt_choices(k, choices, sizeof(choices)));
        }
    }
}

/* mdoc escapes: a backslash, and a leading dot or quote on a line. */
static void mdoc_text(FILE *f, const char *t)
{
    for (; *t; t++) {
        if (*t == '\\')
            fputs("\\e", f);
        else
            fputc(*t, f);
    }
}

void moed_config_keys_mdoc(FILE *f)
{
    struct moed_config defaults;
    moed_config_defaults(&defaults);
    for (size_t i = 0; i < n_keys(); i++) {
        size_t base;
        const struct moe_opt *k = key_at(i, &base);
        static const char *const kinds[] = { [MOE_OPT_STR] = "text", [MOE_OPT_INT] = "integer",
                                             [MOE_OPT_SIZE] = "size", [MOE_OPT_BOOL] = "boolean",
                                             [MOE_OPT_ENUM] = "word", [MOE_OPT_MODE] = "octal mode" };
        fprintf(f, ".It Cm %s Ns = Ns Ar %s\n", k->name, kinds[k->kind]);
        mdoc_text(f, k->help);
        fputs(".\n", f);
        if (k->kind == MOE_OPT_ENUM) {
            char choices[128];
            fprintf(f, "One of\n.Cm %s .\n", moe_opt_choices(k, choices, sizeof(choices)));
        }
        if (k->kind == MOE_OPT_INT || k->kind == MOE_OPT_SIZE)
            fprintf(f, "Range %lld to %lld.\n", (long long)k->min, (long long)k->max);
        char def[PATH_MAX + 32];
        moe_opt_format(k, (const char *)&defaults + base, def, sizeof(def));
        /* the socket's default depends on the environment: its help says it */
        if (def[0] && strcmp(k->name, "socket") != 0)
            fprintf(f, "Default\n.Ql %s .\n", def);
        fprintf(f, "%s\n", k->flags & MOE_OPT_RUNTIME ? "SIGHUP applies a change at once."
                                                     : "A change takes effect after a restart.");
    }
}
