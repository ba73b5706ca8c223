/* Built-in chat templates: render a list of messages to prompt text the way
 * llama.cpp's llm_chat_apply_template does (src/llama-chat.cpp), without a
 * Jinja interpreter.
 *
 * A template is chosen from the model's `tokenizer.chat_template` by the
 * same substring heuristics as llama.cpp's llm_chat_detect_template
 * (moe_chat_template_detect), or by name (moe_chat_template_from_name) from
 * the config key `chat_template` / the flag `--chat-template NAME`. An
 * unknown template is an error whose message lists the names.
 *
 * The rendered text contains special-token text (e.g. "<|im_start|>"); tokenize
 * it with parse_special = true. BOS is not part of the text: the tokenizer
 * adds it when the vocabulary says so.
 * Pure functions; thread-safe.
 */
#ifndef MOE_MODEL_CHAT_TEMPLATE_H
#define MOE_MODEL_CHAT_TEMPLATE_H

#include <stdbool.h>
#include <stddef.h>

#include "common/error.h"

#ifdef __cplusplus
extern "C" {
#endif

enum moe_chat_template {
    MOE_CHAT_TMPL_UNKNOWN = 0,
    MOE_CHAT_TMPL_CHATML,            /* Qwen, Qwen-MoE: <|im_start|>role\n...<|im_end|>\n */
    MOE_CHAT_TMPL_LLAMA2,            /* Mixtral-Instruct: [INST] ... [/INST]answer</s> */
    MOE_CHAT_TMPL_LLAMA2_SYS,        /* with <<SYS>> */
    MOE_CHAT_TMPL_LLAMA2_SYS_BOS,
    MOE_CHAT_TMPL_LLAMA2_SYS_STRIP,
    MOE_CHAT_TMPL_MISTRAL_V1,
    MOE_CHAT_TMPL_MISTRAL_V3,
    MOE_CHAT_TMPL_MISTRAL_V3_TEKKEN,
    MOE_CHAT_TMPL_MISTRAL_V7,
    MOE_CHAT_TMPL_OLMOE,             /* OLMoE-Instruct (Tulu): <|user|>\n...\n<|assistant|>\n */
    MOE_CHAT_TMPL_DEEPSEEK,          /* deepseek-coder-instruct: ### Instruction: / ### Response: */
    MOE_CHAT_TMPL_DEEPSEEK2,         /* DeepSeek-V2 / V2-Lite: User: ...\n\nAssistant: */
    MOE_CHAT_TMPL_DEEPSEEK3,         /* DeepSeek-V3: <｜User｜>...<｜Assistant｜> */
    MOE_CHAT_TMPL_COUNT
};

struct moe_chat_msg {
    const char *role;     /* "system", "user", "assistant" (others rendered as assistant turns where llama.cpp does) */
    const char *content;  /* NUL-terminated UTF-8 */
};

/* Name as accepted by moe_chat_template_from_name ("chatml", "llama2", ...). */
const char *moe_chat_template_name(enum moe_chat_template t);

/* Exact name -> template; MOE_EUNSUPPORTED (diag lists the names) if none. */
int moe_chat_template_from_name(const char *name, enum moe_chat_template *out, struct moe_diag *diag);

/* Picks the template for a model's tokenizer.chat_template text (len bytes;
 * a template's own name is accepted too). NULL/empty or unrecognised:
 * MOE_EUNSUPPORTED with a message saying how to choose one by name. */
int moe_chat_template_detect(const char *src, size_t len, enum moe_chat_template *out, struct moe_diag *diag);

/* Renders msgs; add_assistant appends the opening of an assistant turn.
 * eos_text is the vocabulary's EOS text (OLMoE writes it after assistant
 * turns); NULL means "<|endoftext|>". *out is allocated with moe_malloc and
 * NUL-terminated; *len excludes the NUL. Errors: -EINVAL (NULL role or
 * content, unknown template), -ENOMEM. */
int moe_chat_template_apply(enum moe_chat_template t, const struct moe_chat_msg *msgs, size_t n,
                            bool add_assistant, const char *eos_text, char **out, size_t *len,
                            struct moe_diag *diag);

#ifdef __cplusplus
}
#endif

#endif
