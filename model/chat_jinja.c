/* A model's Jinja chat template with llama.cpp's conventions (see
 * model/chat_jinja.h). */
#include <errno.h>
#include <jansson.h>
#include <string.h>

#include "common/alloc.h"
#include "io/gguf.h"
#include "model/chat_jinja.h"
#include "model/tokenizer.h"

struct moe_chat_jinja {
    struct moe_jinja *tpl;
    char *bos, *eos;
    bool object_args;
};

static char *token_text(const struct moe_tokenizer *tok, int32_t id)
{
    size_t n = 0;
    const char *s = tok && id >= 0 ? moe_tokenizer_token_text(tok, id, &n) : NULL;
    return moe_strndup(s ? s : "", s ? n : 0);
}

static struct moe_jinja_opts render_opts(void)
{
    struct moe_jinja_opts o;
    moe_jinja_opts_default(&o);
    o.llama_ext = true;
    return o;
}

/* One tool call with its arguments as a JSON string or an object: the
 * template needs objects when the string fails and the object renders. */
static bool renders(const struct moe_chat_jinja *cj, bool object)
{
    const char *msgs = object
        ? "[{\"role\":\"user\",\"content\":\"x\"},{\"role\":\"assistant\",\"content\":\"\",\"tool_calls\":"
          "[{\"id\":\"c1\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":{\"a\":1}}}]},"
          "{\"role\":\"tool\",\"tool_call_id\":\"c1\",\"name\":\"f\",\"content\":\"1\"}]"
        : "[{\"role\":\"user\",\"content\":\"x\"},{\"role\":\"assistant\",\"content\":\"\",\"tool_calls\":"
          "[{\"id\":\"c1\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"a\\\":1}\"}}]},"
          "{\"role\":\"tool\",\"tool_call_id\":\"c1\",\"name\":\"f\",\"content\":\"1\"}]";
    struct moe_jinja_opts o = render_opts();
    struct moe_jinja_err err;
    char *out = NULL;
    size_t len;
    const char *tools = "[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"description\":\"d\","
                        "\"parameters\":{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"integer\"}}}}}]";
    int rc = moe_jinja_render_chat(cj->tpl, msgs, tools, true, cj->bos, cj->eos, NULL, &o, &out, &len, &err);
    moe_free(out);
    return rc == 0;
}

int moe_chat_jinja_open(struct moe_chat_jinja **out, const char *src, size_t len,
                        const struct moe_tokenizer *tok, struct moe_diag *diag)
{
    *out = NULL;
    struct moe_chat_jinja *cj = moe_calloc(1, sizeof(*cj));
    if (cj == NULL)
        return moe_diag_set(diag, -ENOMEM, "out of memory");
    cj->bos = token_text(tok, tok ? moe_tokenizer_bos(tok) : -1);
    cj->eos = token_text(tok, tok ? moe_tokenizer_eos(tok) : -1);
    if (cj->bos == NULL || cj->eos == NULL) {
        moe_chat_jinja_free(cj);
        return moe_diag_set(diag, -ENOMEM, "out of memory");
    }
    struct moe_jinja_err err;
    int rc = moe_jinja_compile(src, len, &cj->tpl, &err);
    if (rc != 0) {
        moe_chat_jinja_free(cj);
        if (err.line)
            return moe_diag_set(diag, rc, "chat template, line %d: %s", err.line, err.msg);
        return moe_diag_set(diag, rc, "chat template: %s", err.msg);
    }
    cj->object_args = !renders(cj, false) && renders(cj, true);
    *out = cj;
    return 0;
}

void moe_chat_jinja_free(struct moe_chat_jinja *cj)
{
    if (cj == NULL)
        return;
    moe_jinja_free(cj->tpl);
    moe_free(cj->bos);
    moe_free(cj->eos);
    moe_free(cj);
}

bool moe_chat_jinja_object_args(const struct moe_chat_jinja *cj) { return cj->object_args; }

int moe_chat_jinja_source(const struct moe_gguf *g, const char *name, const char **out, size_t *len,
                          struct moe_diag *diag)
{
    char key[160];
    if (name && name[0])
        snprintf(key, sizeof(key), "tokenizer.chat_template.%.100s", name);
    else
        snprintf(key, sizeof(key), "tokenizer.chat_template");
    struct moe_gguf_str s;
    struct moe_diag d = { 0 };
    if (moe_gguf_get_str(g, key, &s, &d) != 0)
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "the model has no %s", key);
    *out = s.ptr;
    *len = s.len;
    return 0;
}

/* messages with every tool call's string arguments parsed into objects
 * (arguments that are not a JSON object stay strings) */
static char *with_object_args(const char *messages_json)
{
    json_t *ms = json_loads(messages_json, JSON_DECODE_ANY, NULL);
    if (!json_is_array(ms)) {
        json_decref(ms);
        return NULL;
    }
    size_t i, k;
    json_t *m, *tc;
    json_array_foreach(ms, i, m) {
        json_array_foreach(json_object_get(m, "tool_calls"), k, tc) {
            json_t *fn = json_object_get(tc, "function");
            json_t *args = json_object_get(fn, "arguments");
            if (!json_is_string(args))
                continue;
            json_t *obj = json_loads(json_string_value(args), 0, NULL);
            if (json_is_object(obj))
                json_object_set_new(fn, "arguments", obj);
            else
                json_decref(obj);
        }
    }
    char *s = json_dumps(ms, JSON_COMPACT | JSON_ENCODE_ANY);
    json_decref(ms);
    return s;
}

int moe_chat_jinja_apply(const struct moe_chat_jinja *cj, const char *messages_json, const char *tools_json,
                         bool add_generation_prompt, const char *extra_json, char **out, size_t *len,
                         struct moe_jinja_err *err)
{
    struct moe_jinja_opts o = render_opts();
    char *converted = cj->object_args ? with_object_args(messages_json) : NULL;
    int rc = moe_jinja_render_chat(cj->tpl, converted ? converted : messages_json, tools_json,
                                   add_generation_prompt, cj->bos, cj->eos, extra_json, &o, out, len, err);
    if (converted) {
        json_malloc_t m;
        json_free_t f;
        json_get_alloc_funcs(&m, &f);
        f(converted);
    }
    return rc;
}
