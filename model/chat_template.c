/* Chat templates, after llama.cpp's src/llama-chat.cpp (detection order and
 * rendering of each template kept as there). One addition: OLMoE-Instruct's
 * Tulu template, which llama.cpp's heuristics would render as "glmedge"
 * (no newline after turns, no EOS), is detected and rendered as its Jinja
 * source does. */
#include <ctype.h>
#include <errno.h>
#include <string.h>

#include "common/alloc.h"
#include "common/buf.h"
#include "model/chat_template.h"

static const char *const names[MOE_CHAT_TMPL_COUNT] = {
    [MOE_CHAT_TMPL_UNKNOWN] = "unknown",
    [MOE_CHAT_TMPL_CHATML] = "chatml",
    [MOE_CHAT_TMPL_LLAMA2] = "llama2",
    [MOE_CHAT_TMPL_LLAMA2_SYS] = "llama2-sys",
    [MOE_CHAT_TMPL_LLAMA2_SYS_BOS] = "llama2-sys-bos",
    [MOE_CHAT_TMPL_LLAMA2_SYS_STRIP] = "llama2-sys-strip",
    [MOE_CHAT_TMPL_MISTRAL_V1] = "mistral-v1",
    [MOE_CHAT_TMPL_MISTRAL_V3] = "mistral-v3",
    [MOE_CHAT_TMPL_MISTRAL_V3_TEKKEN] = "mistral-v3-tekken",
    [MOE_CHAT_TMPL_MISTRAL_V7] = "mistral-v7",
    [MOE_CHAT_TMPL_OLMOE] = "olmoe",
    [MOE_CHAT_TMPL_DEEPSEEK] = "deepseek",
    [MOE_CHAT_TMPL_DEEPSEEK2] = "deepseek2",
    [MOE_CHAT_TMPL_DEEPSEEK3] = "deepseek3",
};

#define NAME_LIST "chatml, llama2, llama2-sys, llama2-sys-bos, llama2-sys-strip, mistral-v1, mistral-v3, " \
                  "mistral-v3-tekken, mistral-v7, olmoe, deepseek, deepseek2, deepseek3"

const char *moe_chat_template_name(enum moe_chat_template t)
{
    return (unsigned)t < MOE_CHAT_TMPL_COUNT ? names[t] : "unknown";
}

int moe_chat_template_from_name(const char *name, enum moe_chat_template *out, struct moe_diag *diag)
{
    *out = MOE_CHAT_TMPL_UNKNOWN;
    for (int i = 1; i < MOE_CHAT_TMPL_COUNT; i++) {
        if (name != NULL && strcmp(name, names[i]) == 0) {
            *out = (enum moe_chat_template)i;
            return 0;
        }
    }
    return moe_diag_set(diag, MOE_EUNSUPPORTED, "chat template '%.64s' is not built in; known names: " NAME_LIST,
                        name ? name : "(null)");
}

static bool has(const char *s, size_t len, const char *needle)
{
    return memmem(s, len, needle, strlen(needle)) != NULL;
}

int moe_chat_template_detect(const char *s, size_t len, enum moe_chat_template *out, struct moe_diag *diag)
{
    *out = MOE_CHAT_TMPL_UNKNOWN;
    if (s == NULL || len == 0)
        return moe_diag_set(diag, MOE_EUNSUPPORTED,
                            "the model has no tokenizer.chat_template; choose a built-in template by name with "
                            "the config key chat_template or the flag --chat-template (" NAME_LIST "), or "
                            "a Jinja template file with chat_template_file / --chat-template-file");
    for (int i = 1; i < MOE_CHAT_TMPL_COUNT; i++) {
        if (strlen(names[i]) == len && memcmp(s, names[i], len) == 0) {
            *out = (enum moe_chat_template)i;
            return 0;
        }
    }
    enum moe_chat_template t = MOE_CHAT_TMPL_UNKNOWN;
    if (has(s, len, "<|im_start|>")) {
        if (!has(s, len, "<|im_sep|>") && !has(s, len, "<end_of_utterance>"))
            t = MOE_CHAT_TMPL_CHATML;
    } else if ((len >= 7 && memcmp(s, "mistral", 7) == 0) || has(s, len, "[INST]")) {
        if (has(s, len, "[SYSTEM_PROMPT]")) {
            t = MOE_CHAT_TMPL_MISTRAL_V7;
        } else if (has(s, len, "' [INST] ' + system_message") || has(s, len, "[AVAILABLE_TOOLS]")) {
            if (has(s, len, " [INST]"))
                t = MOE_CHAT_TMPL_MISTRAL_V1;
            else if (has(s, len, "\"[INST]\""))
                t = MOE_CHAT_TMPL_MISTRAL_V3_TEKKEN;
            else
                t = MOE_CHAT_TMPL_MISTRAL_V3;
        } else if (has(s, len, "content.strip()")) {
            t = MOE_CHAT_TMPL_LLAMA2_SYS_STRIP;
        } else if (has(s, len, "bos_token + '[INST]")) {
            t = MOE_CHAT_TMPL_LLAMA2_SYS_BOS;
        } else if (has(s, len, "<<SYS>>")) {
            t = MOE_CHAT_TMPL_LLAMA2_SYS;
        } else {
            t = MOE_CHAT_TMPL_LLAMA2;
        }
    } else if (has(s, len, "<|user|>") && has(s, len, "<|assistant|>") && has(s, len, "eos_token") &&
               !has(s, len, "<|end|>") && !has(s, len, "</s>")) {
        t = MOE_CHAT_TMPL_OLMOE;
    } else if (has(s, len, "### Instruction:") && has(s, len, "<|EOT|>")) {
        t = MOE_CHAT_TMPL_DEEPSEEK;
    } else if (has(s, len, "'Assistant: ' + message['content'] + eos_token")) {
        t = MOE_CHAT_TMPL_DEEPSEEK2;
    } else if (has(s, len, "<\xef\xbd\x9c" "Assistant\xef\xbd\x9c>") && has(s, len, "<\xef\xbd\x9c" "User\xef\xbd\x9c>") &&
               has(s, len, "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>")) {
        t = MOE_CHAT_TMPL_DEEPSEEK3;
    }
    if (t == MOE_CHAT_TMPL_UNKNOWN)
        return moe_diag_set(diag, MOE_EUNSUPPORTED,
                            "tokenizer.chat_template is not one of the built-in templates; choose one by name with "
                            "the config key chat_template or the flag --chat-template (" NAME_LIST ")");
    *out = t;
    return 0;
}

/* ---- rendering ------------------------------------------------------------- */

/* The renderers append without checking each call: the first error
 * sticks and is reported once at the end. */
struct sb {
    struct moe_buf buf;     /* no limit of its own: the messages bound it */
    int err;
};

static void put_n(struct sb *b, const char *s, size_t n)
{
    if (b->err == 0)
        b->err = moe_buf_append(&b->buf, s, n);
}

static void put(struct sb *b, const char *s)
{
    put_n(b, s, strlen(s));
}

/* llama-chat.cpp trim(): isspace at both ends */
static void put_trim(struct sb *b, const char *s)
{
    size_t st = 0, end = strlen(s);
    while (st < end && isspace((unsigned char)s[st]))
        st++;
    while (end > st && isspace((unsigned char)s[end - 1]))
        end--;
    put_n(b, s + st, end - st);
}

static void render_llama2(struct sb *b, enum moe_chat_template t, const struct moe_chat_msg *m, size_t n)
{
    bool sys = t != MOE_CHAT_TMPL_LLAMA2;
    bool bos_inside = t == MOE_CHAT_TMPL_LLAMA2_SYS_BOS;
    bool strip = t == MOE_CHAT_TMPL_LLAMA2_SYS_STRIP;
    bool inside = true;
    put(b, "[INST] ");
    for (size_t i = 0; i < n; i++) {
        if (!inside) {
            inside = true;
            put(b, bos_inside ? "<s>[INST] " : "[INST] ");
        }
        void (*content)(struct sb *, const char *) = strip ? put_trim : put;
        if (strcmp(m[i].role, "system") == 0) {
            if (sys) {
                put(b, "<<SYS>>\n");
                content(b, m[i].content);
                put(b, "\n<</SYS>>\n\n");
            } else {
                content(b, m[i].content);
                put(b, "\n");
            }
        } else if (strcmp(m[i].role, "user") == 0) {
            content(b, m[i].content);
            put(b, " [/INST]");
        } else {
            content(b, m[i].content);
            put(b, "</s>");
            inside = false;
        }
    }
}

static void render_mistral(struct sb *b, enum moe_chat_template t, const struct moe_chat_msg *m, size_t n)
{
    if (t == MOE_CHAT_TMPL_MISTRAL_V7) {
        for (size_t i = 0; i < n; i++) {
            if (strcmp(m[i].role, "system") == 0) {
                put(b, "[SYSTEM_PROMPT] ");
                put(b, m[i].content);
                put(b, "[/SYSTEM_PROMPT]");
            } else if (strcmp(m[i].role, "user") == 0) {
                put(b, "[INST] ");
                put(b, m[i].content);
                put(b, "[/INST]");
            } else {
                put(b, " ");
                put(b, m[i].content);
                put(b, "</s>");
            }
        }
        return;
    }
    const char *lead = t == MOE_CHAT_TMPL_MISTRAL_V1 ? " " : "";
    const char *trail = t == MOE_CHAT_TMPL_MISTRAL_V3_TEKKEN ? "" : " ";
    bool trim_asst = t == MOE_CHAT_TMPL_MISTRAL_V3;
    bool inside = false;
    for (size_t i = 0; i < n; i++) {
        if (!inside) {
            put(b, lead);
            put(b, "[INST]");
            put(b, trail);
            inside = true;
        }
        if (strcmp(m[i].role, "system") == 0) {
            put(b, m[i].content);
            put(b, "\n\n");
        } else if (strcmp(m[i].role, "user") == 0) {
            put(b, m[i].content);
            put(b, lead);
            put(b, "[/INST]");
        } else {
            put(b, trail);
            (trim_asst ? put_trim : put)(b, m[i].content);
            put(b, "</s>");
            inside = false;
        }
    }
}

int moe_chat_template_apply(enum moe_chat_template t, const struct moe_chat_msg *m, size_t n,
                            bool add_assistant, const char *eos_text, char **out, size_t *len,
                            struct moe_diag *diag)
{
    *out = NULL;
    *len = 0;
    for (size_t i = 0; i < n; i++)
        if (m[i].role == NULL || m[i].content == NULL)
            return moe_diag_set(diag, -EINVAL, "chat message %zu: role and content are required", i);
    if (eos_text == NULL)
        eos_text = "<|endoftext|>";
    struct sb b = { 0 };
    put(&b, "");    /* an empty conversation still gives "" */
    switch (t) {
    case MOE_CHAT_TMPL_CHATML:
        for (size_t i = 0; i < n; i++) {
            put(&b, "<|im_start|>");
            put(&b, m[i].role);
            put(&b, "\n");
            put(&b, m[i].content);
            put(&b, "<|im_end|>\n");
        }
        if (add_assistant)
            put(&b, "<|im_start|>assistant\n");
        break;
    case MOE_CHAT_TMPL_LLAMA2:
    case MOE_CHAT_TMPL_LLAMA2_SYS:
    case MOE_CHAT_TMPL_LLAMA2_SYS_BOS:
    case MOE_CHAT_TMPL_LLAMA2_SYS_STRIP:
        render_llama2(&b, t, m, n);
        break;
    case MOE_CHAT_TMPL_MISTRAL_V1:
    case MOE_CHAT_TMPL_MISTRAL_V3:
    case MOE_CHAT_TMPL_MISTRAL_V3_TEKKEN:
    case MOE_CHAT_TMPL_MISTRAL_V7:
        render_mistral(&b, t, m, n);
        break;
    case MOE_CHAT_TMPL_OLMOE:
        /* allenai/OLMoE-1B-7B-0924-Instruct tokenizer_config.json */
        for (size_t i = 0; i < n; i++) {
            bool last = i + 1 == n;
            if (strcmp(m[i].role, "system") == 0 || strcmp(m[i].role, "user") == 0) {
                put(&b, "<|");
                put(&b, m[i].role);
                put(&b, "|>\n");
                put(&b, m[i].content);
                put(&b, "\n");
            } else if (strcmp(m[i].role, "assistant") == 0) {
                put(&b, "<|assistant|>\n");
                put(&b, m[i].content);
                put(&b, eos_text);
                if (!last)
                    put(&b, "\n");
            }
        }
        if (add_assistant && n > 0)     /* emitted inside the Jinja loop */
            put(&b, "<|assistant|>\n");
        break;
    case MOE_CHAT_TMPL_DEEPSEEK:
        for (size_t i = 0; i < n; i++) {
            if (strcmp(m[i].role, "system") == 0) {
                put(&b, m[i].content);
            } else if (strcmp(m[i].role, "user") == 0) {
                put(&b, "### Instruction:\n");
                put(&b, m[i].content);
                put(&b, "\n");
            } else if (strcmp(m[i].role, "assistant") == 0) {
                put(&b, "### Response:\n");
                put(&b, m[i].content);
                put(&b, "\n<|EOT|>\n");
            }
        }
        if (add_assistant)
            put(&b, "### Response:\n");
        break;
    case MOE_CHAT_TMPL_DEEPSEEK2:
        for (size_t i = 0; i < n; i++) {
            if (strcmp(m[i].role, "system") == 0) {
                put(&b, m[i].content);
                put(&b, "\n\n");
            } else if (strcmp(m[i].role, "user") == 0) {
                put(&b, "User: ");
                put(&b, m[i].content);
                put(&b, "\n\n");
            } else if (strcmp(m[i].role, "assistant") == 0) {
                put(&b, "Assistant: ");
                put(&b, m[i].content);
                put(&b, "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>");
            }
        }
        if (add_assistant)
            put(&b, "Assistant:");
        break;
    case MOE_CHAT_TMPL_DEEPSEEK3:
        for (size_t i = 0; i < n; i++) {
            if (strcmp(m[i].role, "system") == 0) {
                put(&b, m[i].content);
                put(&b, "\n\n");
            } else if (strcmp(m[i].role, "user") == 0) {
                put(&b, "<\xef\xbd\x9c" "User\xef\xbd\x9c>");
                put(&b, m[i].content);
            } else if (strcmp(m[i].role, "assistant") == 0) {
                put(&b, "<\xef\xbd\x9c" "Assistant\xef\xbd\x9c>");
                put(&b, m[i].content);
                put(&b, "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>");
            }
        }
        if (add_assistant)
            put(&b, "<\xef\xbd\x9c" "Assistant\xef\xbd\x9c>");
        break;
    default:
        moe_buf_free(&b.buf);
        return moe_diag_set(diag, -EINVAL, "chat template %d is not a built-in template", (int)t);
    }
    if (b.err) {
        moe_buf_free(&b.buf);
        return moe_diag_set(diag, b.err, "chat template %s: out of memory", names[t]);
    }
    *out = moe_buf_take(&b.buf, len);
    return 0;
}
