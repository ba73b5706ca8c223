/* A model's own Jinja chat template (tokenizer.chat_template in its GGUF,
 * or a file), ready to render OpenAI-style messages the way llama.cpp's
 * --jinja mode does: transformers' variables (messages, tools,
 * add_generation_prompt, bos_token, eos_token, extra kwargs such as
 * enable_thinking), llama.cpp's extensions (from_json, list.append), and
 * tool-call `arguments` passed as objects to templates that need them
 * (probed once at open: a template that fails on a JSON-string argument
 * and renders with an object gets objects).
 *
 * Ownership: open copies what it needs (the tokenizer may be freed);
 * rendering is read-only and may run on several threads at once.
 */
#ifndef MOE_MODEL_CHAT_JINJA_H
#define MOE_MODEL_CHAT_JINJA_H

#include <stdbool.h>
#include <stddef.h>

#include "common/error.h"
#include "model/jinja.h"

#ifdef __cplusplus
extern "C" {
#endif

struct moe_tokenizer;
struct moe_gguf;

struct moe_chat_jinja;

/* Compiles src; bos/eos texts from tok (NULL: ""). MOE_EFORMAT with the
 * template's line in diag when it does not parse. */
int moe_chat_jinja_open(struct moe_chat_jinja **out, const char *src, size_t len,
                        const struct moe_tokenizer *tok, struct moe_diag *diag);
void moe_chat_jinja_free(struct moe_chat_jinja *cj);

/* The template text in g: tokenizer.chat_template, or with a name
 * tokenizer.chat_template.<name>. *out borrowed from g. MOE_EUNSUPPORTED
 * (naming the key) when absent. */
int moe_chat_jinja_source(const struct moe_gguf *g, const char *name, const char **out, size_t *len,
                          struct moe_diag *diag);

/* Renders; messages_json an array of OpenAI messages, tools_json an array
 * or NULL, extra_json an object of extra variables or NULL. Errors as
 * moe_jinja_render_chat (err->kind MOE_JINJA_RAISE: the template refused
 * the conversation, err->msg its message). */
int moe_chat_jinja_apply(const struct moe_chat_jinja *cj, const char *messages_json, const char *tools_json,
                         bool add_generation_prompt, const char *extra_json, char **out, size_t *len,
                         struct moe_jinja_err *err);

/* Whether tool-call arguments are passed as objects (the probe's result). */
bool moe_chat_jinja_object_args(const struct moe_chat_jinja *cj);

#ifdef __cplusplus
}
#endif

#endif
