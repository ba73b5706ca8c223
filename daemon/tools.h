/* OpenAI tools in chat requests: the `tools` / `tool_choice` /
 * `parallel_tool_calls` fields checked, the Hermes rendering used when the
 * model's template is moed's built-in chatml (Qwen2.5's layout: the tool
 * signatures in the system turn, calls as <tool_call> JSON, results as
 * <tool_response> in a user turn), and the grammar that forces a call when
 * tool_choice is "required" or names a function. */
#ifndef MOE_DAEMON_TOOLS_H
#define MOE_DAEMON_TOOLS_H

#include <jansson.h>
#include <stdbool.h>

#include "common/error.h"
#include "model/grammar.h"

enum moed_tool_choice { MOED_TC_AUTO, MOED_TC_NONE, MOED_TC_REQUIRED, MOED_TC_NAMED };

struct moed_tools {
    json_t *tools;             /* the request's array (borrowed), NULL when none */
    enum moed_tool_choice choice;
    const char *named;         /* MOED_TC_NAMED: the function (borrowed) */
    bool parallel;
};

#define MOED_MAX_TOOLS 128

/* Checks the fields; on error returns false with msg and *param set. */
bool moed_tools_parse(json_t *root, struct moed_tools *t, char *msg, size_t cap,
                      const char **param);

/* Hermes texts (malloc'd; NULL on allocation failure): the system turn's
 * tool section, an assistant turn's text with its calls, a tool result. */
char *moed_tools_hermes_system(const struct moed_tools *t, const char *system);
char *moed_tools_hermes_calls(const char *content, json_t *tool_calls, char *msg, size_t cap);
char *moed_tools_hermes_result(const char *content);

/* A grammar for exactly one Hermes call of one of the allowed functions,
 * its arguments following the function's parameters schema. */
int moed_tools_grammar(const struct moed_tools *t, struct moe_grammar **out, struct moe_diag *d);

#endif
