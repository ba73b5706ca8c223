/* Fuzz entry for model/jinja (the chat-template interpreter).
 *
 * Input: the template source. It is compiled and, when it compiles,
 * rendered twice over a conversation with a system prompt, a tool
 * definition, an assistant tool call and a tool result: once as
 * transformers would (strict) and once with llama.cpp's extensions, with
 * small limits so that every input finishes quickly.
 *
 * Checked: compile and render return 0 or an error with a message and a
 * kind that matches the code; a rendered prompt is exactly *len bytes
 * with a NUL after; the same input renders the same way twice; nothing
 * leaks (ASan). */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/alloc.h"
#include "common/error.h"
#include "model/jinja.h"

static const char *const MSGS =
    "[{\"role\":\"system\",\"content\":\"You are helpful.\"},"
    "{\"role\":\"user\",\"content\":\"Weather in Paris?\"},"
    "{\"role\":\"assistant\",\"content\":\"\",\"reasoning_content\":\"think\",\"tool_calls\":[{\"id\":\"call00001\","
    "\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\"}}}]},"
    "{\"role\":\"tool\",\"tool_call_id\":\"call00001\",\"content\":\"21 C\"},"
    "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"thanks\"}]}]";
static const char *const TOOLS =
    "[{\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"description\":\"Weather.\","
    "\"parameters\":{\"type\":\"object\",\"properties\":{\"city\":{\"type\":\"string\"}},\"required\":[\"city\"]}}}]";

static void check_err(int rc, const struct moe_jinja_err *err)
{
    if (err->msg[0] == '\0' || err->kind == MOE_JINJA_OK)
        abort();
    int want = err->kind == MOE_JINJA_SYNTAX || err->kind == MOE_JINJA_INPUT ? MOE_EFORMAT
               : err->kind == MOE_JINJA_LIMIT ? MOE_ELIMIT : -EINVAL;
    if (rc != want && rc != -ENOMEM)
        abort();
}

static void render(const struct moe_jinja *t, bool ext)
{
    struct moe_jinja_opts o;
    moe_jinja_opts_default(&o);
    o.max_output = 1 << 20;
    o.max_memory = 64 << 20;
    o.max_iterations = 20000;
    o.max_depth = 16;
    o.llama_ext = ext;
    o.clock = 1768469400;
    char *out[2] = { NULL, NULL };
    size_t len[2] = { 0, 0 };
    int rc[2];
    for (int k = 0; k < 2; k++) {
        struct moe_jinja_err err;
        rc[k] = moe_jinja_render_chat(t, MSGS, TOOLS, true, "<s>", "</s>", "{\"enable_thinking\":false}", &o,
                                      &out[k], &len[k], &err);
        if (rc[k] != 0)
            check_err(rc[k], &err);
        else if (out[k] == NULL || out[k][len[k]] != '\0')
            abort();
    }
    if (rc[0] != rc[1] || len[0] != len[1] || (rc[0] == 0 && memcmp(out[0], out[1], len[0]) != 0))
        abort();
    moe_free(out[0]);
    moe_free(out[1]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct moe_jinja *t = NULL;
    struct moe_jinja_err err;
    int rc = moe_jinja_compile((const char *)data, size, &t, &err);
    if (rc != 0) {
        check_err(rc, &err);
        if (t != NULL)
            abort();
        return 0;
    }
    render(t, false);
    render(t, true);
    moe_jinja_free(t);
    return 0;
}
