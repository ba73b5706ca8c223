/* Fuzz entry for the daemon's request parser (daemon/request.c): any bytes
 * as the body of /v1/completions and of /v1/chat/completions. The parser must
 * never crash or over-read, and what it accepts must be runnable: a prompt of
 * 1..ctx-1 valid token ids, max_tokens within what the context leaves, at
 * most 8 stop strings. Model: MOE_FUZZ_MODEL, else shared/ref's
 * tiny-mixtral-Q4_0 under MOE_REF_DIR (the engine is loaded once, its thread
 * never started). */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/anthropic.h"
#include "daemon/config.h"
#include "daemon/engine.h"
#include "daemon/request.h"
#include "model/grammar.h"
#include "model/tokenizer.h"

static struct moed_engine *eng;
static struct moed_config cfg;
static int loaded;

static void no_notify(void *ud) { (void)ud; }

static void load_once(void)
{
    if (loaded)
        return;
    loaded = 1;
    moed_config_defaults(&cfg);
    const char *m = getenv("MOE_FUZZ_MODEL"), *ref = getenv("MOE_REF_DIR");
    if (m)
        snprintf(cfg.model, sizeof(cfg.model), "%s", m);
    else if (ref)
        snprintf(cfg.model, sizeof(cfg.model), "%s/models/tiny-mixtral-Q4_0.gguf", ref);
    else
        return;
    strcpy(cfg.chat_template, "chatml");
    cfg.max_seqs = 1;
    cfg.engine.n_ctx = 256;
    cfg.engine.n_threads = 1;
    struct moe_diag d = { 0 };
    if (moed_engine_create(&eng, &cfg, no_notify, NULL, &d) != 0) {
        fprintf(stderr, "fuzz_request: %s\n", d.msg);
        abort();
    }
}

static int piece(void *ud, int32_t id, char *buf, size_t cap, size_t *len)
{
    return moe_token_to_piece(ud, id, buf, cap, 0, false, len);
}

/* A compiled response_format: a matcher follows the input's own bytes as
 * far as the grammar allows, taking the vocabulary's mask on the way; the
 * mask must never allow a token the matcher then refuses. */
static void run_grammar(const struct moe_grammar *g, const uint8_t *data, size_t size)
{
    static struct moe_gvocab *gv;
    static uint8_t *allowed;
    const struct moe_tokenizer *tok = moed_engine_tokenizer(eng);
    const int V = moed_engine_n_vocab(eng);
    if (gv == NULL && (moe_gvocab_new(&gv, V, piece, (void *)tok) != 0 ||
                       (allowed = malloc((size_t)V)) == NULL))
        abort();
    struct moe_gmatch *m;
    if (moe_gmatch_new(&m, g) != 0)
        return;
    for (size_t i = 0; i < size && i < 64; i++)
        if (moe_gmatch_accept(m, (const char *)data + i, 1) != 0)
            break;
    if (moe_gmatch_mask(m, gv, allowed) > 0) {
        for (int t = 0; t < V; t++) {
            if (!allowed[t])
                continue;
            char buf[1024];
            size_t len = 0;
            if (piece((void *)tok, t, buf, sizeof(buf), &len) != 0 ||
                moe_gmatch_accept(m, buf, len) != 0)
                abort();   /* the mask allowed a token the grammar refuses */
            break;
        }
    }
    moe_gmatch_free(m);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    load_once();
    if (eng == NULL)
        return 0;
    json_error_t jerr;
    json_t *root = json_loadb((const char *)data, size, JSON_REJECT_DUPLICATES, &jerr);
    if (root == NULL)
        return 0;
    const int n_ctx = moed_engine_n_ctx(eng), V = moed_engine_n_vocab(eng);
    /* the same bytes as an Anthropic body: translated, then parsed as chat */
    char amsg[512];
    const char *aparam = NULL;
    json_t *as_chat = moed_anthropic_to_chat(root, amsg, sizeof(amsg), &aparam);
    if (as_chat == NULL && amsg[0] == '\0')
        abort();
    json_t *inputs[3] = { root, root, as_chat };
    for (int chat = 0; chat < 3; chat++) {
        if (inputs[chat] == NULL)
            continue;
        struct moed_req *r = moed_req_new();
        if (r == NULL)
            break;
        struct moed_parse_error pe;
        if (moed_parse_generate(eng, &cfg, inputs[chat], chat > 0, r, &pe)) {
            if (r->n_prompt < 1 || r->n_prompt >= n_ctx || r->max_tokens < 1 ||
                r->n_prompt + r->max_tokens > n_ctx || r->n_stop > MOED_MAX_STOP ||
                r->logprobs > MOED_MAX_TOP_LOGPROBS)
                abort();
            for (int i = 0; i < r->n_prompt; i++)
                if (r->prompt[i] < 0 || r->prompt[i] >= V)
                    abort();
            for (int i = 0; i < r->n_stop; i++)
                if (r->stop[i] == NULL || r->stop[i][0] == '\0')
                    abort();
            if (r->grammar)
                run_grammar(r->grammar, data, size);
        } else if (pe.msg[0] == '\0') {
            abort();   /* every refusal says why */
        }
        moed_req_unref(r);
    }
    json_decref(as_chat);
    json_decref(root);
    return 0;
}
