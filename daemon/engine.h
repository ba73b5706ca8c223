/* The engine: one thread that owns the model, and the scheduler that feeds
 * it. Requests wait in a bounded queue for one of max_seqs sequences; every
 * step runs one forward pass over all running sequences together
 * (continuous batching): one token of each decoding sequence plus a chunk of
 * at most prefill_chunk prompt tokens of those still prefilling, within
 * batch_size tokens. Tokens of every sequence routed to one expert share its
 * load and its compute.
 *
 * Threads: the event loop submits and cancels requests and reads their
 * output under the request's mutex; the engine thread writes the output and
 * calls the notify function (uv_async_send) when there is something new. */
#ifndef MOE_DAEMON_ENGINE_H
#define MOE_DAEMON_ENGINE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "common/buf.h"
#include "common/error.h"
#include "common/queue.h"
#include "daemon/config.h"
#include "model/chat_template.h"
#include "model/kv.h"
#include "model/grammar.h"
#include "model/sampling.h"

#define MOED_MAX_STOP 8
#define MOED_MAX_TOP_LOGPROBS 20

struct moe_model;
struct moe_tokenizer;
struct moed_engine;

struct moed_logprob {
    int32_t id;
    float lp;
    int n_top;
    int32_t top_id[MOED_MAX_TOP_LOGPROBS];
    float top_lp[MOED_MAX_TOP_LOGPROBS];
};

enum moed_finish { MOED_RUNNING = 0, MOED_STOP, MOED_LENGTH, MOED_CANCELLED, MOED_ERROR };

struct moed_req {
    /* set before submit, then read-only */
    uint64_t id;
    bool chat, stream;
    int32_t *prompt;
    int n_prompt;
    int max_tokens;
    struct moe_sampler_params sp;
    char *stop[MOED_MAX_STOP];
    int n_stop;
    int stop_hit;                 /* the stop string that ended the answer, or -1 */
    int logprobs;                 /* -1: none; else top alternatives per token (0..20) */
    bool include_usage;           /* stream_options.include_usage: a last chunk with usage */
    struct moe_grammar *grammar;  /* response_format: the output must match it, or NULL */
    /* chat answers: how the text splits (daemon/output.h) */
    bool split_reasoning;         /* reasoning_format != none */
    bool think_open;              /* the rendered prompt ends inside <think> */
    int tool_fmt;                 /* enum moed_tool_fmt; 0: tool calls not parsed */
    int32_t *bias_id;             /* logit_bias (sp.bias_id/sp.bias point here) */
    float *bias;
    double t_submit;              /* monotonic seconds */
    double deadline;              /* monotonic seconds, 0 = none */

    /* references: atomic, so that taking one needs no lock (the engine
     * takes one while holding its own mutex, and notify_locked while holding
     * mu: a lock here would order the two mutexes both ways) */
    atomic_int refs;

    /* shared, under mu */
    pthread_mutex_t mu;
    struct moe_buf text;          /* generated text (after stop truncation); data NULL until
                                     the first byte */
    size_t ready;                 /* bytes of text that can be sent (no stop prefix) */
    struct moed_logprob *lps;     /* per generated token (when logprobs >= 0) */
    int n_lps;
    size_t cap_lps;
    size_t *tok_end;              /* per generated token: text length after it */
    int n_tok;
    size_t cap_tok;
    int n_gen;                    /* tokens generated */
    enum moed_finish finish;      /* set once, when done */
    char err[256];
    double t_first;               /* first token, monotonic seconds (0 = none yet) */
    int cached_tokens;            /* prompt tokens served from the KV pool's prefix cache */
    uint64_t hits, misses;        /* expert cache, over the steps it took part in */
    bool queued_notify;           /* in the engine's notify queue or the loop's batch */
    struct moe_qnode notify_node;

    atomic_bool cancel;
    atomic_bool paused;           /* the client is not reading: skip it in steps */

    /* engine side only */
    int slot;                     /* sequence slot, -1 while queued */
    int n_fed;                    /* prompt tokens run so far */
    int32_t last;                 /* the token to run next when decoding */
    struct moe_qnode q_node;      /* in the engine's queue while waiting (under its mutex) */

    /* loop side only */
    void *conn;
    size_t sent;                  /* text bytes written to the client */
    int sent_tok;                 /* tokens streamed */
    bool sent_role;               /* chat stream: the first delta named the role */
    void *out;                    /* chat: struct moed_out, the split so far (api.c) */
    int n_calls;                  /* tool calls sent */
    bool anthropic;               /* /v1/messages: Anthropic's answer shape */
    bool thinking_off;            /* Anthropic thinking disabled: no thinking blocks */
    int a_block;                  /* Anthropic stream: open block (0 none, 1 thinking, 2 text) */
    int a_index;                  /* Anthropic stream: index of the next block */
};

/* Allocates a request with one reference (moe_calloc; every buffer it owns
 * is freed with moe_free by the last unref). */
struct moed_req *moed_req_new(void);
void moed_req_ref(struct moed_req *r);
void moed_req_unref(struct moed_req *r);

struct moed_engine_stats {
    uint64_t requests_done, requests_cancelled, requests_failed, requests_rejected;
    uint64_t tokens_in, tokens_out;
    uint64_t tokens_cached;       /* prompt tokens reused from the KV pool (not in tokens_in) */
    uint64_t steps;
    double busy_s;                /* time in forward passes */
    int queue_depth, running;
    struct moe_kv_stats kv;       /* the KV pool after the last step (model/kv.h) */
};

typedef void (*moed_notify_fn)(void *ud);

/* Loads the model, tokenizer and chat template and allocates max_seqs
 * sequences. Prints nothing; diag names what failed. */
int moed_engine_create(struct moed_engine **out, const struct moed_config *cfg, moed_notify_fn notify,
                       void *notify_ud, struct moe_diag *d);
/* Starts the engine thread. */
int moed_engine_start(struct moed_engine *e, struct moe_diag *d);
/* Stops the thread: running requests end as cancelled. */
void moed_engine_stop(struct moed_engine *e);
void moed_engine_free(struct moed_engine *e);

/* Takes a reference. -EBUSY when the queue is full; -ESHUTDOWN after stop
 * was requested. */
int moed_engine_submit(struct moed_engine *e, struct moed_req *r);
/* Marks r cancelled; the engine frees its sequence at the next step. */
void moed_engine_cancel(struct moed_engine *e, struct moed_req *r);
/* Wakes the engine after a request's pause was lifted. */
void moed_engine_kick(struct moed_engine *e);
/* Cancels everything queued or running (shutdown after the grace period). */
void moed_engine_cancel_all(struct moed_engine *e);
/* Moves the requests with news since the last call, oldest first, into
 * *out (the whole queue at once: one lock per wake-up). Take them out with
 * moed_req_pop_notified(); each carries a reference the caller must drop. */
void moed_engine_take_notified(struct moed_engine *e, struct moe_queue *out);
/* The next request of a batch from moed_engine_take_notified(), or NULL.
 * From then on the engine may queue it again for later news. */
struct moed_req *moed_req_pop_notified(struct moe_queue *batch);

/* Run-time keys (SIGHUP). */
void moed_engine_reconfigure(struct moed_engine *e, const struct moed_config *cfg);

void moed_engine_stats(struct moed_engine *e, struct moed_engine_stats *out);

/* True once the backend reported an unrecoverable error (a sticky CUDA
 * error): every request fails from then on, and moed exits non-zero so that
 * its supervisor restarts it. */
bool moed_engine_fatal(struct moed_engine *e);

struct moe_model *moed_engine_model(struct moed_engine *e);
const struct moe_tokenizer *moed_engine_tokenizer(struct moed_engine *e);
/* The chat template; false when the model has none and none was configured. */
bool moed_engine_chat_template(struct moed_engine *e, enum moe_chat_template *t, const char **eos_text);
/* The model's own Jinja template (used unless the config names a built-in
 * one), and its source text in *src; NULL when there is none. Borrowed
 * until moed_engine_free. */
struct moe_chat_jinja;
const struct moe_chat_jinja *moed_engine_chat_jinja(struct moed_engine *e, const char **src);
int moed_engine_n_ctx(struct moed_engine *e);
/* The KV pool's geometry: blocks and tokens per block (constant). */
void moed_engine_kv_geometry(struct moed_engine *e, int *n_blocks, int *block_tokens);
int moed_engine_n_vocab(struct moed_engine *e);

double moed_now(void);

#endif
