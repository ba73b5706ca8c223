/* The Anthropic Messages API (POST /v1/messages) on top of the chat path:
 * a request is translated into the chat request it means (system turn,
 * text / tool_use / tool_result blocks, tools with input_schema,
 * tool_choice, stop_sequences, thinking) and goes through the same checks,
 * rendering, grammar and engine; api.c writes the answer as Anthropic's
 * content blocks and stream events. Pure function of the body, so it can be
 * fuzzed with the request parser. */
#ifndef MOE_DAEMON_ANTHROPIC_H
#define MOE_DAEMON_ANTHROPIC_H

#include <jansson.h>
#include <stddef.h>

/* The chat request (a new object) for an Anthropic body, or NULL with msg
 * and *param (the Anthropic field at fault) set. */
json_t *moed_anthropic_to_chat(json_t *body, char *msg, size_t cap, const char **param);

#endif
