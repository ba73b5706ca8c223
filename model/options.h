/* The engine's option table: one row per field of struct moe_model_opts
 * (key, kind, bounds, default, help; common/opt.h). moed reads these keys
 * from its config file and flags, moectl eval/run/chat from flags, so a
 * name, a bound or a default is written once. Constant; thread-safe. */
#ifndef MOE_MODEL_OPTIONS_H
#define MOE_MODEL_OPTIONS_H

#include <stddef.h>

#include "common/opt.h"
#include "model/model.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The table (rows address a struct moe_model_opts) and its length. */
const struct moe_opt *moe_model_opt_table(size_t *n);
/* The table's defaults. */
void moe_model_opts_defaults(struct moe_model_opts *o);
/* Sets one option by key (or alias) from text, as a flag or config key
 * would: "cache_bytes", "12G". -EINVAL naming an unknown key. */
int moe_model_opts_set(struct moe_model_opts *o, const char *key, const char *value,
                       struct moe_diag *d);
/* Checks values set directly in the struct against the table's bounds
 * (what a flag or key would have refused). */
int moe_model_opts_check(const struct moe_model_opts *o, struct moe_diag *d);

#ifdef __cplusplus
}
#endif

#endif
