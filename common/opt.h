/* Option tables: one row per option (key, kind, bounds, default, help),
 * read by every consumer. The engine's options (model/options.h) and
 * moed's own (daemon/config.c) are such tables; moed reads them from an
 * INI file and from flags, moectl from flags, with the same names, bounds
 * and parsers. A key `ctx_size` is the flag `--ctx-size`; '-' and '_' are
 * the same in keys. Enums are parsed once here into ints.
 *
 * Values live in a caller's struct at each row's offset: STR a char array
 * of `cap` bytes, INT an int, SIZE a uint64_t, BOOL a bool, ENUM an int
 * (the choice's value), MODE an unsigned. Errors name the key, the value
 * and what was expected. Thread-safe (tables are constant).
 */
#ifndef MOE_COMMON_OPT_H
#define MOE_COMMON_OPT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

#ifdef __cplusplus
extern "C" {
#endif

enum moe_opt_kind { MOE_OPT_STR, MOE_OPT_INT, MOE_OPT_SIZE, MOE_OPT_BOOL, MOE_OPT_ENUM, MOE_OPT_MODE };

struct moe_opt_choice {
    const char *name;
    int value;
    bool hidden;                 /* accepted, never listed nor printed (an old spelling) */
};

enum {
    MOE_OPT_RUNTIME = 1u << 0,   /* moed: SIGHUP can change it */
    MOE_OPT_SECRET = 1u << 1,    /* never printed (--check-config shows "(set)") */
};

struct moe_opt {
    const char *name;            /* key, e.g. "ctx_size" (flag --ctx-size) */
    const char *alias;           /* an older spelling also accepted ("ctx"), or NULL */
    enum moe_opt_kind kind;
    size_t off;                  /* into the options struct */
    size_t cap;                  /* STR: buffer bytes */
    int64_t min, max;            /* INT, SIZE, MODE */
    const struct moe_opt_choice *choices;   /* ENUM: terminated by a NULL name */
    const char *def;             /* default, as text ("" / NULL: zero) */
    unsigned flags;
    const char *help;
};

/* "12G", "512M", "1.5g", "4096", "2GiB", "64kb": bytes (binary multiples). */
int moe_opt_parse_size(const char *s, int64_t *out);

/* The row named `name` (key or alias; '-' and '_' alike), or NULL. */
const struct moe_opt *moe_opt_find(const struct moe_opt *t, size_t n, const char *name);
/* Parses value into base (the struct the table describes). */
int moe_opt_set(const struct moe_opt *o, void *base, const char *value, struct moe_diag *d);
/* Every row's default into base. 0, or the first row's error (a table bug). */
int moe_opt_defaults(const struct moe_opt *t, size_t n, void *base, struct moe_diag *d);
/* The value at base as text (an enum's name, a size in bytes). */
void moe_opt_format(const struct moe_opt *o, const void *base, char *buf, size_t cap);
/* "lru|lfu|..." for an enum row, into buf. */
const char *moe_opt_choices(const struct moe_opt *o, char *buf, size_t cap);
/* Whether the flag may stand alone, meaning "true": a BOOL, or an ENUM
 * that accepts "true" (an enum that replaced a bool, kv_f16 -> kv_type). */
bool moe_opt_bare_ok(const struct moe_opt *o);
/* The name of an enum value (NULL when none). */
const char *moe_opt_choice_name(const struct moe_opt_choice *c, int value);

#ifdef __cplusplus
}
#endif

#endif
