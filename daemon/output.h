/* The structure of a chat answer: reasoning, content and tool calls, split
 * out of the generated text as it grows (streaming) or at once.
 *
 * Reasoning: "<think>...</think>" at the start of the answer (or from the
 * start when the prompt already opened it, as Qwen3 and DeepSeek-R1
 * templates do) becomes reasoning_content; the whitespace after the closing
 * tag is dropped. Tool calls: "<tool_call>BODY</tool_call>" blocks, where
 * BODY is Hermes/Qwen JSON {"name", "arguments"}, Qwen3-Coder's
 * "<function=NAME><parameter=KEY>VALUE</parameter></function>", or GLM-4.5's
 * "NAME<arg_key>KEY</arg_key><arg_value>VALUE</arg_value>"; and MiniMax-M2's
 * "<minimax:tool_call><invoke name=NAME><parameter name=KEY>VALUE</parameter>
 * </invoke></minimax:tool_call>". A block that does not parse stays in the
 * content as text. Text that may be the start of a tag is held back until
 * it is known (or the answer ends).
 */
#ifndef MOE_DAEMON_OUTPUT_H
#define MOE_DAEMON_OUTPUT_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "common/buf.h"

enum moed_tool_fmt {
    MOED_TOOLS_NONE = 0,       /* tool calls are not parsed */
    MOED_TOOLS_TAG,            /* <tool_call> ... </tool_call> (Hermes, Qwen3-Coder, GLM) */
    MOED_TOOLS_MINIMAX,        /* <minimax:tool_call> ... </minimax:tool_call> */
};

struct moed_out {
    bool reasoning;            /* split <think> */
    bool think_open;           /* the prompt opened <think> already */
    enum moed_tool_fmt tools;
    int state;
    size_t pos;                /* bytes of the text consumed */
    size_t tool_start;         /* where the current block's body starts */
    int n_calls;
    unsigned long long id_base;   /* tool call ids: call_<id_base>_<index> */
};

void moed_out_init(struct moed_out *o, bool reasoning, bool think_open, enum moed_tool_fmt tools,
                   unsigned long long id_base);

/* Consumes text[o->pos, len) (text is the whole answer so far); appends what
 * is now known to reasoning and content, and each completed tool call to
 * calls as {"index", "id", "type": "function", "function": {"name",
 * "arguments"}} (arguments a JSON string, as OpenAI sends it). final: the
 * answer is complete, nothing is held back. -ENOMEM on allocation failure. */
int moed_out_feed(struct moed_out *o, const char *text, size_t len, bool final,
                  struct moe_buf *reasoning, struct moe_buf *content, json_t *calls);

/* The format a chat template uses for tool calls (by the tags it writes). */
enum moed_tool_fmt moed_tool_fmt_of_template(const char *tpl);

#endif
