/* Structured output: OpenAI's response_format compiled into a grammar
 * (model/grammar.h) that the engine enforces token by token.
 *
 * JSON Schema subset (doc/daemon.md, "Structured output"): type (one or a
 * list), properties / required / additionalProperties false (absent counts
 * as false: only the listed properties are written, in their order, the
 * required ones always), items / minItems / maxItems, enum, const, anyOf,
 * oneOf (as anyOf), allOf of one schema, $ref into $defs or definitions
 * (recursion allowed), minLength / maxLength, and the annotations title,
 * description, default, examples, $schema, $id, $comment, deprecated,
 * readOnly, writeOnly. Any other keyword is refused with its path, so a
 * constraint is never dropped silently. The output is compact JSON (at most
 * one space between tokens), numbers have at most 16 digits in each part.
 */
#ifndef MOE_DAEMON_SCHEMA_H
#define MOE_DAEMON_SCHEMA_H

#include <jansson.h>

#include "common/error.h"
#include "model/grammar.h"

/* The grammar of the JSON values schema accepts; diag names the keyword's
 * path, starting with where (e.g. "response_format.json_schema.schema"). */
int moed_schema_grammar(json_t *schema, const char *where, struct moe_grammar **out,
                        struct moe_diag *diag);

/* The same between two literal texts (a tool call's tags). */
int moed_schema_grammar_wrap(json_t *schema, const char *where, const char *prefix,
                             const char *suffix, struct moe_grammar **out, struct moe_diag *diag);

/* Any JSON object (response_format json_object). */
int moed_json_object_grammar(struct moe_grammar **out, struct moe_diag *diag);

#endif
