/* A Jinja interpreter for chat templates: the subset that the templates real
 * GGUFs carry in tokenizer.chat_template use, rendered the way Hugging Face
 * transformers' apply_chat_template renders them (jinja2's
 * ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks, the
 * loopcontrols extension, a pass-through {% generation %} tag, tojson as
 * json.dumps, raise_exception and strftime_now). doc/templates.md lists the
 * subset and the limits.
 *
 * Contract: moe_jinja_compile parses once; a compiled template is immutable
 * and may be rendered from several threads at once. Every render allocates
 * from its own arena, bounded by opts (output bytes, memory, loop
 * iterations, call depth); exceeding a bound is an error of kind
 * MOE_JINJA_LIMIT, never a crash. Errors fill struct moe_jinja_err: kind
 * says whose fault it is (a template's raise_exception is the caller's
 * input refused by the template: HTTP 400 in moed; a syntax or runtime
 * error is the template's own).
 */
#ifndef MOE_MODEL_JINJA_H
#define MOE_MODEL_JINJA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum moe_jinja_err_kind {
    MOE_JINJA_OK = 0,
    MOE_JINJA_SYNTAX,    /* the template does not parse */
    MOE_JINJA_RENDER,    /* runtime error: undefined value used, wrong type, ... */
    MOE_JINJA_RAISE,     /* the template called raise_exception(msg): msg is the message */
    MOE_JINJA_LIMIT,     /* output, memory, loop or depth bound exceeded */
    MOE_JINJA_INPUT,     /* messages/tools/extra JSON malformed */
};

struct moe_jinja_err {
    enum moe_jinja_err_kind kind;
    int line;            /* template line (1-based), 0 if none */
    char msg[512];
};

struct moe_jinja_opts {
    size_t max_output;       /* bytes of rendered text (default 8 MiB) */
    size_t max_memory;       /* arena bytes one render may use (default 256 MiB) */
    uint64_t max_iterations; /* loop iterations in one render, all loops (default 1e6) */
    int max_depth;           /* macro call depth (default 64) */
    /* llama.cpp's extensions: the from_json filter and mutable lists and
     * dicts (list.append, dict.update, ...). Off: exactly transformers. */
    bool llama_ext;
    /* strftime_now's clock: 0 = now (local time); else these seconds since
     * the epoch, read as UTC (tests use a fixed clock). */
    int64_t clock;
};

struct moe_jinja;

void moe_jinja_opts_default(struct moe_jinja_opts *o);

/* Parses src (len bytes, UTF-8). On success *out is owned by the caller
 * (moe_jinja_free). Errors: MOE_EFORMAT (err kind SYNTAX, line), -ENOMEM,
 * MOE_ELIMIT (template too large or nested too deep). */
int moe_jinja_compile(const char *src, size_t len, struct moe_jinja **out, struct moe_jinja_err *err);
void moe_jinja_free(struct moe_jinja *t);

/* Renders with the variables of transformers' apply_chat_template:
 * messages (a JSON array), tools (a JSON array, or NULL/"" for none),
 * add_generation_prompt, bos_token, eos_token (NULL: ""), and every member
 * of extra_json (a JSON object or NULL: e.g. {"enable_thinking": false}).
 * *out (moe_malloc, NUL-terminated, *len bytes) on success.
 * Errors: MOE_EFORMAT (INPUT), -EINVAL (RENDER or RAISE), MOE_ELIMIT
 * (LIMIT), -ENOMEM. opts NULL: defaults. */
int moe_jinja_render_chat(const struct moe_jinja *t, const char *messages_json, const char *tools_json,
                          bool add_generation_prompt, const char *bos, const char *eos,
                          const char *extra_json, const struct moe_jinja_opts *opts,
                          char **out, size_t *len, struct moe_jinja_err *err);

/* Renders with the members of vars_json (a JSON object, or NULL) as the
 * variables; otherwise as moe_jinja_render_chat. */
int moe_jinja_render(const struct moe_jinja *t, const char *vars_json, const struct moe_jinja_opts *opts,
                     char **out, size_t *len, struct moe_jinja_err *err);

/* Whether the template's source mentions `name` as a word (e.g. "tools"):
 * a cheap capability probe. */
bool moe_jinja_mentions(const struct moe_jinja *t, const char *name);

#ifdef __cplusplus
}
#endif

#endif
