/* moed's configuration: one table of keys, read from an INI file (inih) and
 * from flags of the same names (`cache_bytes` in the file is `--cache-bytes`
 * on the command line; flags win). Every key has a type, bounds and a note
 * of whether SIGHUP can change it while the daemon runs (doc/config.md). */
#ifndef MOE_DAEMON_CONFIG_H
#define MOE_DAEMON_CONFIG_H

#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "common/error.h"
#include "model/model.h"

struct moed_config {
    /* model (restart) */
    char model[PATH_MAX];
    char model_name[128];      /* id in /v1/models; default: the file's base name */
    int max_seqs;              /* sequences decoded together */
    char chat_template[32];    /* "" = from the model */
    char chat_template_file[PATH_MAX];   /* a Jinja template file; "" = none */
    /* the engine's options (restart): model/options.c's table, the same keys
     * and flags as moectl's; engine.n_seqs follows max_seqs */
    struct moe_model_opts engine;
    /* server (restart) */
    char socket[PATH_MAX];
    unsigned socket_mode;
    int tcp_port;              /* 0 = off */
    char tcp_host[64];         /* address tcp_port listens on (IPv4 or IPv6 literal) */
    /* clients on TCP (SIGHUP) */
    char api_key[256];         /* Bearer token TCP clients must send; "" = none */
    char api_key_file[PATH_MAX];   /* file holding it (first line) */
    char auth_key[256];        /* derived: api_key, or api_key_file's line; not a key */
    /* run time (SIGHUP) */
    int prefill_chunk;
    int queue_size;
    uint64_t max_body_bytes;
    int max_header_bytes;
    int max_connections;
    uint64_t max_output_bytes;
    int read_timeout_ms;
    int idle_timeout_ms;
    int request_timeout_s;
    int max_tokens_default;
    int shutdown_grace_s;
    int log_level;             /* enum moed_log_level */
};

/* Defaults (the socket path depends on $XDG_RUNTIME_DIR). */
void moed_config_defaults(struct moed_config *c);

/* Sets one key from text; key may use '_' or '-'. Errors name the key, the
 * value and what was expected. */
int moed_config_set(struct moed_config *c, const char *key, const char *value, struct moe_diag *d);

/* Reads an INI file: keys at the top or in a [moed] section. */
int moed_config_load_file(struct moed_config *c, const char *path, struct moe_diag *d);
/* The same from text (name is used in messages). */
int moed_config_load_string(struct moed_config *c, const char *text, const char *name,
                            struct moe_diag *d);

/* The key table, for tests and docs: index 0..n-1. kind: 's' string, 'i'
 * int, 'z' size, 'b' bool, 'm' mode, 'e' enum. */
struct moed_key_info {
    const char *name;
    char kind;
    long long min, max;
    bool runtime;
};
int moed_config_n_keys(void);
bool moed_config_key(int i, struct moed_key_info *out);

/* Command line: --config FILE is read first (wherever it appears), then the
 * other flags in order. *check_only is set by --check-config; *help and
 * *version by those flags (parsing stops there). */
struct moed_args {
    const char *config_path;
    bool check_only, help, version;
    bool keys_mdoc;            /* --keys-mdoc: the key list for moed.conf(5), then exit */
};
int moed_config_from_args(struct moed_config *c, int argc, char **argv, struct moed_args *a,
                          struct moe_diag *d);

/* Cross-key checks once everything is read (model given, ...), and the
 * derived auth_key (api_key_file read here). A TCP listener beyond loopback
 * without a key is refused. */
int moed_config_validate(struct moed_config *c, struct moe_diag *d);

/* True when host (an IP literal) is a loopback address (127.0.0.0/8, ::1). */
bool moed_host_is_loopback(const char *host);

/* Compares a client's key with the configured one in time that depends only
 * on the configured key's length. */
bool moed_key_equal(const char *expected, const char *given, size_t given_len);

/* Prints `key = value` for every key, with a comment for keys that need a
 * restart to change. */
void moed_config_print(const struct moed_config *c, FILE *f);

/* After a reload: copies the run-time keys of next into cur and calls
 * restart_cb for every other key whose value differs (left unchanged). */
void moed_config_apply_reload(struct moed_config *cur, const struct moed_config *next,
                              void (*restart_cb)(void *ud, const char *key), void *ud);

/* Flag help text for every key. */
void moed_config_usage(FILE *f);
/* Every key as an mdoc tag list item (the body of moed.conf(5)'s KEYS). */
void moed_config_keys_mdoc(FILE *f);

/* Parses "12G", "512M", "4096", "1.5G" (binary units). */

#endif
