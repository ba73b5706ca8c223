/* Request bodies of /v1/completions and /v1/chat/completions: every field
 * checked (type, range), the prompt tokenized or the messages rendered with
 * the chat template, into a struct moed_req ready for the engine. Pure
 * functions of the body and the loaded model, so that they can be fuzzed
 * without a server (tests/fuzz/fuzz_request.c). */
#ifndef MOE_DAEMON_REQUEST_H
#define MOE_DAEMON_REQUEST_H

#include <jansson.h>
#include <stdbool.h>

#include "daemon/config.h"
#include "daemon/engine.h"

struct moed_parse_error {
    char msg[512];
    const char *param;      /* the field at fault (a static string, or a key of the
                               request's JSON: valid while that lives), or NULL */
    int status;             /* 400 (the request), or 500 (out of memory here) */
};

/* Fills r (prompt, sampling, stop, logprobs, max_tokens clipped to the
 * context) from a JSON object; false with pe set on the first bad field. */
bool moed_parse_generate(struct moed_engine *e, const struct moed_config *cfg, json_t *root,
                         bool chat, struct moed_req *r, struct moed_parse_error *pe);

/* An optional boolean field; false with pe set when it has another type. */
bool moed_get_bool(json_t *root, const char *key, bool *out, struct moed_parse_error *pe);

#endif
