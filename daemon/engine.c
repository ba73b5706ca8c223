#include "daemon/engine.h"
#include "daemon/log.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/alloc.h"
#include "common/buf.h"
#include "model/chat_jinja.h"
#include "model/model.h"
#include "model/options.h"
#include "model/tokenizer.h"

double moed_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- requests -------------------------------------------------------- */

struct moed_req *moed_req_new(void)
{
    struct moed_req *r = moe_calloc(1, sizeof(*r));
    if (r == NULL)
        return NULL;
    pthread_mutex_init(&r->mu, NULL);
    atomic_init(&r->refs, 1);
    r->slot = -1;
    r->logprobs = -1;
    r->stop_hit = -1;
    atomic_init(&r->cancel, false);
    atomic_init(&r->paused, false);
    return r;
}

/* A new reference is taken from one the caller holds: nothing to order. */
void moed_req_ref(struct moed_req *r)
{
    atomic_fetch_add_explicit(&r->refs, 1, memory_order_relaxed);
}

void moed_req_unref(struct moed_req *r)
{
    if (r == NULL)
        return;
    /* release: this thread's writes to r happen before the free; acquire:
     * the last one sees every other thread's */
    if (atomic_fetch_sub_explicit(&r->refs, 1, memory_order_acq_rel) > 1)
        return;
    pthread_mutex_destroy(&r->mu);
    moe_free(r->prompt);
    moe_free(r->bias_id);
    moe_grammar_free(r->grammar);
    moe_free(r->bias);
    for (int i = 0; i < r->n_stop; i++)
        moe_free(r->stop[i]);
    moe_buf_free(&r->text);
    moe_free(r->lps);
    moe_free(r->tok_end);
    moe_free(r->out);
    moe_free(r);
}

/* ---- engine ---------------------------------------------------------- */

struct slot {
    struct moe_seq *seq;
    struct moe_sampler *smp;
    struct moe_detok_stream ds;
    struct moed_req *req;
    int32_t *hist;
    int64_t n_hist;
    float *logits;
    struct moe_gmatch *gm;        /* the request's grammar, followed token by token */
};

struct moed_engine {
    struct moed_config cfg;       /* under mu for the run-time keys */
    struct moe_model *model;
    struct moe_tokenizer *tok;
    bool have_tpl;
    enum moe_chat_template tpl;
    struct moe_chat_jinja *jinja; /* the GGUF's own template; NULL: the built-in tpl */
    const char *jinja_src;        /* its text (the tokenizer's, or jinja_owned) */
    char *jinja_owned;            /* chat_template_file's text */
    char eos_text[128];
    int n_ctx, n_vocab;
    int kv_blocks, kv_block;

    struct slot *slots;
    int n_slots;

    pthread_t thread;
    bool started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct moe_queue queue;       /* requests waiting for a slot, FIFO */
    bool stopping;
    /* The loop's news queue has its own lock, taken last: the engine pushes
     * while holding a request's mu (notify_locked), and it takes a
     * request's mu while holding e->mu (start_slot under admit_locked), so
     * e->mu cannot be the one (lock order: e->mu, then r->mu, then nmu). */
    pthread_mutex_t nmu;
    struct moe_queue notified;    /* requests with news for the loop (under nmu) */
    moed_notify_fn notify;
    void *notify_ud;
    struct moed_engine_stats st;
    int rr;                       /* round-robin start among prefilling slots */
    atomic_bool fatal;
    long fault_fatal_at;          /* test hook: MOED_FAULT_FATAL_STEP, else -1 */
    float *lp_tmp;
    struct moe_gvocab *gvocab;    /* the vocabulary for grammar masks, built on first use */
    int32_t *script;              /* test hook MOED_TEST_SCRIPT: every answer is this text */
    size_t n_script;
    uint8_t *allowed;             /* per token, the last mask */
};

static void free_slots(struct moed_engine *e)
{
    if (e->slots == NULL)
        return;
    for (int i = 0; i < e->n_slots; i++) {
        moe_seq_free(e->slots[i].seq);
        moe_sampler_free(e->slots[i].smp);
        moe_gmatch_free(e->slots[i].gm);
        moe_free(e->slots[i].hist);
        moe_free(e->slots[i].logits);
    }
    moe_free(e->slots);
    e->slots = NULL;
}

/* Test hook: with MOED_TEST_SCRIPT set, every answer that no grammar
 * constrains is that text's tokens, then the end of generation, whatever
 * the logits say (random-weight test models cannot be asked for a tool call
 * or for reasoning). Never set in production; doc/daemon.md. */
static int load_script(struct moed_engine *e)
{
    const char *text = getenv("MOED_TEST_SCRIPT");
    if (text == NULL || text[0] == '\0')
        return 0;
    size_t need = 0;
    int rc = moe_tokenize(e->tok, text, strlen(text), false, false, NULL, 0, &need);
    if (rc != 0 && rc != -ENOSPC)
        return rc;
    e->script = moe_malloc((need ? need : 1) * sizeof(int32_t));
    if (e->script == NULL)
        return -ENOMEM;
    e->n_script = need;
    LOG_W("MOED_TEST_SCRIPT is set: every answer is its %zu tokens (a test hook)", need);
    return moe_tokenize(e->tok, text, strlen(text), false, false, e->script, need, &need);
}

/* chat_template_file: compiled once; its text is kept for the tool format. */
static int load_template_file(struct moed_engine *e, const char *path, struct moe_diag *d)
{
    struct moe_buf b;
    moe_buf_init(&b, 4u << 20);
    int rc = moe_buf_read_file(&b, path);
    if (rc == 0 && b.data == NULL)
        rc = moe_buf_append(&b, "", 0);
    if (rc != 0) {
        moe_buf_free(&b);
        return moe_diag_set(d, rc, "chat_template_file %s: %s", path, rc == MOE_ELIMIT ? "larger than 4 MiB"
                            : moe_strerror(rc));
    }
    struct moe_diag td = { 0 };
    rc = moe_chat_jinja_open(&e->jinja, b.data, b.len, e->tok, &td);
    if (rc != 0) {
        moe_buf_free(&b);
        return moe_diag_set(d, rc, "chat_template_file %s: %s", path, td.msg);
    }
    e->jinja_owned = moe_buf_take(&b, NULL);
    if (e->jinja_owned == NULL) {
        moe_buf_free(&b);
        return moe_diag_set(d, -ENOMEM, "out of memory");
    }
    e->jinja_src = e->jinja_owned;
    e->have_tpl = true;
    LOG_I("chat template: %s (Jinja)", path);
    return 0;
}

int moed_engine_create(struct moed_engine **out, const struct moed_config *cfg, moed_notify_fn notify,
                       void *notify_ud, struct moe_diag *d)
{
    *out = NULL;
    struct moed_engine *e = moe_calloc(1, sizeof(*e));
    if (e == NULL)
        return moe_diag_set(d, -ENOMEM, "out of memory");
    e->cfg = *cfg;
    atomic_init(&e->fatal, false);
    /* test hook: only a plain non-negative number arms it */
    const char *ff = getenv("MOED_FAULT_FATAL_STEP");
    char *ffe = NULL;
    e->fault_fatal_at = -1;
    if (ff && ff[0]) {
        long v = strtol(ff, &ffe, 10);
        if (*ffe == '\0' && v >= 0)
            e->fault_fatal_at = v;
    }
    e->notify = notify;
    e->notify_ud = notify_ud;
    pthread_mutex_init(&e->mu, NULL);
    pthread_mutex_init(&e->nmu, NULL);
    pthread_cond_init(&e->cv, NULL);
    struct moe_model_opts mo = cfg->engine;
    mo.n_seqs = cfg->max_seqs;
    mo.progress = moed_log_progress;
    int rc = moe_model_load(&e->model, cfg->model, &mo, d);
    if (rc)
        goto fail;
    e->n_ctx = moe_model_n_ctx(e->model);
    moe_model_kv_stats(e->model, &e->st.kv);
    e->kv_blocks = e->st.kv.n_blocks;
    e->kv_block = e->st.kv.block_tokens;
    e->n_vocab = moe_model_cfg(e->model)->n_vocab;
    rc = moe_tokenizer_load(&e->tok, moe_model_gguf(e->model), d);
    if (rc)
        goto fail;
    if (cfg->chat_template[0] && cfg->chat_template_file[0]) {
        rc = moe_diag_set(d, -EINVAL, "chat_template and chat_template_file: set one of them");
        goto fail;
    }
    if (cfg->chat_template_file[0]) {
        rc = load_template_file(e, cfg->chat_template_file, d);
        if (rc)
            goto fail;
    } else if (cfg->chat_template[0]) {
        rc = moe_chat_template_from_name(cfg->chat_template, &e->tpl, d);
        if (rc)
            goto fail;
        e->have_tpl = true;
    } else {
        const char *src = moe_tokenizer_chat_template(e->tok);
        struct moe_diag td = { 0 };
        if (src && moe_chat_jinja_open(&e->jinja, src, strlen(src), e->tok, &td) == 0) {
            e->jinja_src = src;
            e->have_tpl = true;
            LOG_I("chat template: the model's own (tokenizer.chat_template, %zu bytes, Jinja)", strlen(src));
        } else {
            if (src)
                LOG_W("the model's tokenizer.chat_template cannot be used (%s); falling back to a built-in"
                      " renderer", td.msg);
            moe_diag_clear(&td);
            e->have_tpl = src && moe_chat_template_detect(src, strlen(src), &e->tpl, &td) == 0;
        }
    }
    if (load_script(e) != 0) {
        rc = moe_diag_set(d, -EINVAL, "MOED_TEST_SCRIPT: cannot tokenize it");
        goto fail;
    }
    int32_t eos = moe_tokenizer_eos(e->tok);
    if (eos >= 0) {
        size_t el = 0;
        const char *et = moe_tokenizer_token_text(e->tok, eos, &el);
        if (et && el < sizeof(e->eos_text)) {
            memcpy(e->eos_text, et, el);
            e->eos_text[el] = '\0';
        }
    }
    e->n_slots = cfg->max_seqs;
    e->slots = moe_calloc((size_t)e->n_slots, sizeof(struct slot));
    e->lp_tmp = moe_malloc((size_t)e->n_vocab * sizeof(float));
    if (e->slots == NULL || e->lp_tmp == NULL) {
        rc = moe_diag_set(d, -ENOMEM, "out of memory");
        goto fail;
    }
    for (int i = 0; i < e->n_slots; i++) {
        struct slot *s = &e->slots[i];
        rc = moe_seq_create(&s->seq, e->model, d);
        if (rc) {
            moe_diag_clear(d);
            rc = moe_diag_set(d, rc, "KV cache for sequence %d of max_seqs %d (ctx_size %d): %s",
                              i + 1, e->n_slots, e->n_ctx, moe_strerror(rc));
            goto fail;
        }
        s->hist = moe_malloc((size_t)(e->n_ctx + 1) * sizeof(int32_t));
        s->logits = moe_malloc((size_t)e->n_vocab * sizeof(float));
        if (s->hist == NULL || s->logits == NULL) {
            rc = moe_diag_set(d, -ENOMEM, "out of memory");
            goto fail;
        }
    }
    *out = e;
    return 0;
fail:
    moed_engine_free(e);
    return rc;
}

void moed_engine_free(struct moed_engine *e)
{
    if (e == NULL)
        return;
    moed_engine_stop(e);
    free_slots(e);
    moe_chat_jinja_free(e->jinja);
    moe_free(e->jinja_owned);
    moe_tokenizer_free(e->tok);
    moe_model_free(e->model);
    moe_free(e->lp_tmp);
    moe_gvocab_free(e->gvocab);
    moe_free(e->script);
    moe_free(e->allowed);
    pthread_mutex_destroy(&e->mu);
    pthread_mutex_destroy(&e->nmu);
    pthread_cond_destroy(&e->cv);
    moe_free(e);
}

struct moe_model *moed_engine_model(struct moed_engine *e) { return e->model; }
bool moed_engine_fatal(struct moed_engine *e) { return atomic_load(&e->fatal); }
const struct moe_tokenizer *moed_engine_tokenizer(struct moed_engine *e) { return e->tok; }
int moed_engine_n_ctx(struct moed_engine *e) { return e->n_ctx; }

void moed_engine_kv_geometry(struct moed_engine *e, int *n_blocks, int *block_tokens)
{
    *n_blocks = e->kv_blocks;
    *block_tokens = e->kv_block;
}
int moed_engine_n_vocab(struct moed_engine *e) { return e->n_vocab; }

const struct moe_chat_jinja *moed_engine_chat_jinja(struct moed_engine *e, const char **src)
{
    if (src)
        *src = e->jinja_src;
    return e->jinja;
}

bool moed_engine_chat_template(struct moed_engine *e, enum moe_chat_template *t, const char **eos_text)
{
    *t = e->tpl;
    *eos_text = e->eos_text[0] ? e->eos_text : NULL;
    return e->have_tpl;
}

/* Queues r for the loop (caller holds r->mu). */
static void notify_locked(struct moed_engine *e, struct moed_req *r)
{
    if (r->queued_notify)
        return;
    r->queued_notify = true;
    moed_req_ref(r);
    pthread_mutex_lock(&e->nmu);
    moe_queue_push(&e->notified, &r->notify_node);
    pthread_mutex_unlock(&e->nmu);
}

void moed_engine_take_notified(struct moed_engine *e, struct moe_queue *out)
{
    pthread_mutex_lock(&e->nmu);
    *out = e->notified;
    e->notified = (struct moe_queue){ 0 };
    pthread_mutex_unlock(&e->nmu);
}

struct moed_req *moed_req_pop_notified(struct moe_queue *batch)
{
    struct moe_qnode *n = moe_queue_pop(batch);
    if (n == NULL)
        return NULL;
    /* Only now may the engine queue it again: its node is out of the batch.
     * News that arrives before the loop reads the request is read with it. */
    struct moed_req *r = moe_container_of(n, struct moed_req, notify_node);
    pthread_mutex_lock(&r->mu);
    r->queued_notify = false;
    pthread_mutex_unlock(&r->mu);
    return r;
}

int moed_engine_submit(struct moed_engine *e, struct moed_req *r)
{
    pthread_mutex_lock(&e->mu);
    if (e->stopping) {
        pthread_mutex_unlock(&e->mu);
        return -ESHUTDOWN;
    }
    int running = e->st.running;
    if (running >= e->n_slots && e->queue.n >= (size_t)e->cfg.queue_size) {
        e->st.requests_rejected++;
        pthread_mutex_unlock(&e->mu);
        return -EBUSY;
    }
    moed_req_ref(r);
    moe_queue_push(&e->queue, &r->q_node);
    e->st.queue_depth = (int)e->queue.n;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    return 0;
}

void moed_engine_cancel(struct moed_engine *e, struct moed_req *r)
{
    atomic_store(&r->cancel, true);
    pthread_mutex_lock(&e->mu);
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

void moed_engine_kick(struct moed_engine *e)
{
    pthread_mutex_lock(&e->mu);
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

void moed_engine_cancel_all(struct moed_engine *e)
{
    pthread_mutex_lock(&e->mu);
    for (struct moe_qnode *n = e->queue.head; n; n = n->next)
        atomic_store(&moe_container_of(n, struct moed_req, q_node)->cancel, true);
    for (int i = 0; i < e->n_slots; i++)
        if (e->slots[i].req)
            atomic_store(&e->slots[i].req->cancel, true);
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

void moed_engine_reconfigure(struct moed_engine *e, const struct moed_config *cfg)
{
    pthread_mutex_lock(&e->mu);
    e->cfg.prefill_chunk = cfg->prefill_chunk;
    e->cfg.queue_size = cfg->queue_size;
    pthread_mutex_unlock(&e->mu);
}

void moed_engine_stats(struct moed_engine *e, struct moed_engine_stats *out)
{
    pthread_mutex_lock(&e->mu);
    *out = e->st;
    pthread_mutex_unlock(&e->mu);
}

/* Ends r: final state, flag, notification; frees its slot. */
static void finish(struct moed_engine *e, struct moed_req *r, enum moed_finish f, const char *err)
{
    pthread_mutex_lock(&r->mu);
    if (r->finish == MOED_RUNNING) {
        r->finish = f;
        r->ready = r->text.len;
        if (err)
            snprintf(r->err, sizeof(r->err), "%s", err);
    }
    notify_locked(e, r);
    pthread_mutex_unlock(&r->mu);
    pthread_mutex_lock(&e->mu);
    if (f == MOED_CANCELLED)
        e->st.requests_cancelled++;
    else if (f == MOED_ERROR)
        e->st.requests_failed++;
    else
        e->st.requests_done++;
    if (r->slot >= 0) {
        e->slots[r->slot].req = NULL;
        e->st.running--;
        /* its blocks go back to the pool (the full ones stay cached) */
        moe_seq_reset(e->slots[r->slot].seq);
        moe_model_kv_stats(e->model, &e->st.kv);
    }
    pthread_mutex_unlock(&e->mu);
    r->slot = -1;
    moed_req_unref(r);
    e->notify(e->notify_ud);
}

/* Appends generated bytes (caller holds r->mu). */
static int append_text(struct moed_req *r, const char *p, size_t n)
{
    return n == 0 ? 0 : moe_buf_append(&r->text, p, n);
}

/* Applies the stop strings to the text (caller holds r->mu): true when one
 * matched (text cut before it); otherwise moves `ready` up to the longest
 * tail that could still begin a stop string. */
static bool check_stop(struct moed_req *r)
{
    const char *text = r->text.data;
    const size_t len = r->text.len;
    if (r->n_stop == 0) {
        r->ready = len;
        return false;
    }
    size_t best = SIZE_MAX;
    for (int i = 0; i < r->n_stop; i++) {
        const size_t sl = strlen(r->stop[i]);
        if (sl == 0 || len - r->ready < sl)
            continue;
        const char *p = memmem(text + r->ready, len - r->ready, r->stop[i], sl);
        if (p && (size_t)(p - text) < best) {
            best = (size_t)(p - text);
            r->stop_hit = i;
        }
    }
    if (best != SIZE_MAX) {
        /* cut the text before the stop string (the buffer keeps its memory) */
        r->text.len = best;
        r->text.data[best] = '\0';
        r->ready = best;
        return true;
    }
    size_t hold = 0;
    for (int i = 0; i < r->n_stop; i++) {
        const size_t sl = strlen(r->stop[i]);
        for (size_t k = sl - 1; k > hold; k--)
            if (k <= len - r->ready && memcmp(text + len - k, r->stop[i], k) == 0) {
                hold = k;
                break;
            }
    }
    r->ready = len - hold;
    return false;
}

static void fill_logprobs(struct moed_engine *e, struct moed_req *r, const float *logits, int32_t tok)
{
    const int V = e->n_vocab;
    float mx = -INFINITY;
    for (int i = 0; i < V; i++)
        mx = fmaxf(mx, logits[i]);
    double sum = 0;
    for (int i = 0; i < V; i++)
        sum += exp((double)(logits[i] - mx));
    const float lse = mx + (float)log(sum);
    if (moe_array_grow((void **)&r->lps, &r->cap_lps, (size_t)r->n_lps + 1, sizeof(*r->lps), 0))
        return;
    struct moed_logprob *lp = &r->lps[r->n_lps++];
    lp->id = tok;
    lp->lp = logits[tok] - lse;
    lp->n_top = 0;
    const int n = r->logprobs < MOED_MAX_TOP_LOGPROBS ? r->logprobs : MOED_MAX_TOP_LOGPROBS;
    for (int k = 0; k < n && k < V; k++) {
        int best = -1;
        for (int i = 0; i < V; i++) {
            bool taken = false;
            for (int j = 0; j < k; j++)
                taken |= lp->top_id[j] == i;
            if (!taken && (best < 0 || logits[i] > logits[best]))
                best = i;
        }
        lp->top_id[k] = best;
        lp->top_lp[k] = logits[best] - lse;
        lp->n_top = k + 1;
    }
}

/* What the output text gets for a token (the detokenizer's piece). */
static int token_piece(void *ud, int32_t id, char *buf, size_t cap, size_t *len)
{
    return moe_token_to_piece(ud, id, buf, cap, 0, false, len);
}

/* response_format: tokens the grammar cannot take next get -inf; the end
 * of generation only once the text is complete. */
static int constrain(struct moed_engine *e, struct slot *s)
{
    const int n = moe_gmatch_mask(s->gm, e->gvocab, e->allowed);
    if (n < 0)
        return n;
    const bool can_end = moe_gmatch_can_end(s->gm);
    if (n == 0 && !can_end)
        return MOE_EFORMAT;
    for (int i = 0; i < e->n_vocab; i++)
        if (!e->allowed[i] && !(can_end && moe_tokenizer_is_eog(e->tok, i)))
            s->logits[i] = -INFINITY;
    return 0;
}

static int grammar_accept(struct moed_engine *e, struct slot *s, int32_t t)
{
    if (s->gm == NULL || moe_tokenizer_is_eog(e->tok, t))
        return 0;
    char piece[1024];
    size_t len = 0;
    int rc = token_piece(e->tok, t, piece, sizeof(piece), &len);
    return rc ? rc : moe_gmatch_accept(s->gm, piece, len);
}

/* Samples the next token of the request in slot si after its logits. */
static void after_logits(struct moed_engine *e, int si)
{
    struct slot *s = &e->slots[si];
    struct moed_req *r = s->req;
    if (r->logprobs >= 0)
        memcpy(e->lp_tmp, s->logits, (size_t)e->n_vocab * sizeof(float));
    if (s->gm && constrain(e, s) != 0) {
        finish(e, r, MOED_ERROR, "response_format: no token of the vocabulary can continue the"
               " output within the schema");
        return;
    }
    int32_t t;
    if (e->script && s->gm == NULL)
        t = (size_t)r->n_gen < e->n_script ? e->script[r->n_gen] : moe_tokenizer_eos(e->tok);
    else
        t = moe_sampler_sample(s->smp, s->logits, s->hist, s->n_hist);
    s->hist[s->n_hist++] = t;
    if (grammar_accept(e, s, t) != 0) {
        finish(e, r, MOED_ERROR, "response_format: the grammar refused the sampled token");
        return;
    }
    const double now = moed_now();
    pthread_mutex_lock(&r->mu);
    if (r->t_first == 0)
        r->t_first = now;
    r->n_gen++;
    enum moed_finish f = MOED_RUNNING;
    char piece[1024];
    size_t pl = 0;
    if (moe_tokenizer_is_eog(e->tok, t)) {
        /* like moectl run: what the stream still holds, then stop */
        if (moe_detok_stream_flush(&s->ds, piece, sizeof(piece), &pl) == 0)
            append_text(r, piece, pl);
        check_stop(r);
        f = MOED_STOP;
    } else {
        if (r->logprobs >= 0)
            fill_logprobs(e, r, e->lp_tmp, t);
        if (moe_detok_stream_push(&s->ds, t, piece, sizeof(piece), &pl) == 0 &&
            append_text(r, piece, pl) != 0)
            f = MOED_ERROR;
        if (moe_array_grow((void **)&r->tok_end, &r->cap_tok, (size_t)r->n_tok + 1,
                           sizeof(*r->tok_end), 0) == 0)
            r->tok_end[r->n_tok++] = r->text.len;
        if (f == MOED_RUNNING && check_stop(r))
            f = MOED_STOP;
        if (f == MOED_RUNNING && (r->n_gen >= r->max_tokens || moe_seq_pos(s->seq) + 1 >= e->n_ctx))
            f = MOED_LENGTH;
        if (f == MOED_RUNNING && r->deadline > 0 && now > r->deadline)
            f = MOED_LENGTH;
        if (f == MOED_LENGTH) {
            pl = 0;
            if (moe_detok_stream_flush(&s->ds, piece, sizeof(piece), &pl) == 0)
                append_text(r, piece, pl);
            if (check_stop(r))
                f = MOED_STOP;
        }
    }
    r->last = t;
    if (f == MOED_RUNNING)
        notify_locked(e, r);
    pthread_mutex_unlock(&r->mu);
    pthread_mutex_lock(&e->mu);
    e->st.tokens_out++;
    pthread_mutex_unlock(&e->mu);
    if (f != MOED_RUNNING)
        finish(e, r, f, f == MOED_ERROR ? "out of memory for the output" : NULL);
    else
        e->notify(e->notify_ud);
}

/* Starts r in slot si: the longest cached prefix of its prompt is reused
 * and the KV blocks for its prompt and max_tokens are reserved; -EAGAIN
 * when the pool cannot reserve them yet (r stays queued). */
static int start_slot(struct moed_engine *e, int si, struct moed_req *r, struct moe_diag *d)
{
    struct slot *s = &e->slots[si];
    const int total = r->n_prompt + r->max_tokens < e->n_ctx ? r->n_prompt + r->max_tokens : e->n_ctx;
    int cached = 0;
    int rc = moe_seq_begin(s->seq, r->prompt, r->n_prompt, total, &cached, d);
    if (rc)
        return rc;
    moe_sampler_free(s->smp);
    s->smp = NULL;
    rc = moe_sampler_create(&s->smp, &r->sp, e->n_vocab, d);
    if (rc) {
        moe_seq_reset(s->seq);
        return rc;
    }
    moe_gmatch_free(s->gm);
    s->gm = NULL;
    if (r->grammar) {
        if (e->gvocab == NULL &&
            (rc = moe_gvocab_new(&e->gvocab, e->n_vocab, token_piece, e->tok)) != 0)
            return moe_diag_set(d, rc, "response_format: cannot index the vocabulary: %s",
                                moe_strerror(rc));
        if (e->allowed == NULL && (e->allowed = moe_malloc((size_t)e->n_vocab)) == NULL)
            return moe_diag_set(d, -ENOMEM, "response_format: out of memory");
        if ((rc = moe_gmatch_new(&s->gm, r->grammar)) != 0)
            return moe_diag_set(d, rc, "response_format: %s", moe_strerror(rc));
    }
    moe_detok_stream_init(&s->ds, e->tok, false);
    memcpy(s->hist, r->prompt, (size_t)r->n_prompt * sizeof(int32_t));
    s->n_hist = r->n_prompt;
    s->req = r;
    r->slot = si;
    r->n_fed = cached;
    pthread_mutex_lock(&r->mu);
    r->cached_tokens = cached;
    pthread_mutex_unlock(&r->mu);
    e->st.tokens_cached += (uint64_t)cached;
    moe_model_kv_stats(e->model, &e->st.kv);
    return 0;
}

/* One engine step; false when every running request is paused. */
static bool step(struct moed_engine *e)
{
    struct moe_batch_seg segs[256];
    int owner[256];
    int ns = 0;
    pthread_mutex_lock(&e->mu);
    int budget = moe_model_n_batch(e->model);   /* batch_size, at most ctx_size */
    const int chunk = e->cfg.prefill_chunk;
    pthread_mutex_unlock(&e->mu);
    const double now = moed_now();

    /* cancelled and timed-out requests leave first */
    for (int i = 0; i < e->n_slots; i++) {
        struct moed_req *r = e->slots[i].req;
        if (r == NULL)
            continue;
        if (atomic_load(&r->cancel))
            finish(e, r, MOED_CANCELLED, NULL);
        else if (r->deadline > 0 && now > r->deadline && r->n_fed < r->n_prompt)
            finish(e, r, MOED_LENGTH, NULL);
    }
    /* decoding sequences: one token each */
    for (int i = 0; i < e->n_slots && budget > 0; i++) {
        struct moed_req *r = e->slots[i].req;
        if (r == NULL || r->n_fed < r->n_prompt || atomic_load(&r->paused))
            continue;
        segs[ns] = (struct moe_batch_seg){ .seq = e->slots[i].seq, .tokens = &r->last, .n = 1,
                                           .logits = e->slots[i].logits };
        owner[ns++] = i;
        budget--;
    }
    /* prefilling sequences: chunks, round-robin */
    for (int k = 0; k < e->n_slots && budget > 0; k++) {
        const int i = (e->rr + k) % e->n_slots;
        struct moed_req *r = e->slots[i].req;
        if (r == NULL || r->n_fed >= r->n_prompt)
            continue;
        int n = r->n_prompt - r->n_fed;
        if (n > chunk)
            n = chunk;
        if (n > budget)
            n = budget;
        const bool last = r->n_fed + n == r->n_prompt;
        segs[ns] = (struct moe_batch_seg){ .seq = e->slots[i].seq, .tokens = r->prompt + r->n_fed,
                                           .n = n, .logits = last ? e->slots[i].logits : NULL };
        owner[ns++] = i;
        budget -= n;
    }
    e->rr = (e->rr + 1) % e->n_slots;
    if (ns == 0)
        return false;

    struct moe_cache_stats c0 = { 0 }, c1 = { 0 };
    const bool cached = moe_model_cache_stats(e->model, &c0);
    struct moe_diag d = { 0 };
    const double t0 = moed_now();
    const int frc = atomic_load(&e->fatal) ? MOE_EGPU_FATAL : moe_model_forward_multi(e->model, segs, ns, &d);
    int rc = frc;
    if (rc == 0 && e->fault_fatal_at >= 0 && (long)e->st.steps >= e->fault_fatal_at)
        rc = moe_diag_set(&d, MOE_EGPU_FATAL, "injected fatal backend error (MOED_FAULT_FATAL_STEP)");
    if (rc == MOE_EGPU_FATAL && !atomic_exchange(&e->fatal, true))
        fprintf(stderr, "moed: the compute backend failed for good: %s\n", d.msg[0] ? d.msg : "sticky"
                " device error");
    const double t1 = moed_now();
    if (cached)
        moe_model_cache_stats(e->model, &c1);
    pthread_mutex_lock(&e->mu);
    e->st.steps++;
    e->st.busy_s += t1 - t0;
    moe_model_kv_stats(e->model, &e->st.kv);
    pthread_mutex_unlock(&e->mu);
    for (int j = 0; j < ns; j++) {
        struct moed_req *r = e->slots[owner[j]].req;
        pthread_mutex_lock(&r->mu);
        r->hits += c1.hits - c0.hits;
        r->misses += c1.misses - c0.misses;
        pthread_mutex_unlock(&r->mu);
        if (rc) {
            /* a failed expert load fails only the sequences routed to it
             * (moe_model_forward_failed); any other error fails them all */
            struct moe_diag sd = { 0 };
            const int src = frc != 0 && rc != MOE_EGPU_FATAL && frc != MOE_EGPU_FATAL
                                ? moe_model_forward_failed(e->model, j, &sd) : rc;
            if (src != 0) {
                const char *msg = src == rc && frc == 0 ? d.msg : sd.msg[0] ? sd.msg : d.msg;
                LOG_W("req=%llu failed: %s", (unsigned long long)r->id, msg);
                finish(e, r, MOED_ERROR, msg);
                continue;
            }
        }
        if (r->n_fed < r->n_prompt) {
            r->n_fed += segs[j].n;
            pthread_mutex_lock(&e->mu);
            e->st.tokens_in += (uint64_t)segs[j].n;
            pthread_mutex_unlock(&e->mu);
        }
        if (segs[j].logits)
            after_logits(e, owner[j]);
    }
    return true;
}

/* Ends the queued requests whose client went away (caller holds e->mu; it
 * is released while they finish). */
static void drop_cancelled_locked(struct moed_engine *e)
{
    struct moe_queue dropped = { 0 };
    for (size_t k = e->queue.n; k > 0; k--) {
        struct moe_qnode *n = moe_queue_pop(&e->queue);
        const bool cancel = atomic_load(&moe_container_of(n, struct moed_req, q_node)->cancel);
        moe_queue_push(cancel ? &dropped : &e->queue, n);
    }
    if (moe_queue_empty(&dropped))
        return;
    pthread_mutex_unlock(&e->mu);
    for (struct moe_qnode *n; (n = moe_queue_pop(&dropped)) != NULL;)
        finish(e, moe_container_of(n, struct moed_req, q_node), MOED_CANCELLED, NULL);
    pthread_mutex_lock(&e->mu);
}

/* Moves queued requests into free slots, oldest first, while the KV pool
 * can reserve what the oldest needs (caller holds e->mu). */
static void admit_locked(struct moed_engine *e)
{
    for (int i = 0; i < e->n_slots && !moe_queue_empty(&e->queue); i++) {
        if (e->slots[i].req)
            continue;
        struct moed_req *r = moe_container_of(e->queue.head, struct moed_req, q_node);
        struct moe_diag d = { 0 };
        int rc = start_slot(e, i, r, &d);
        if (rc == -EAGAIN && e->st.running > 0)
            break;   /* it waits, first in line, for running requests to free blocks */
        if (rc == -EAGAIN)   /* nothing runs, so it can never fit (request.c refuses these) */
            moe_diag_set(&d, MOE_ELIMIT, "the KV pool cannot hold this request's %d prompt tokens"
                         " and max_tokens %d", r->n_prompt, r->max_tokens);
        moe_queue_pop(&e->queue);
        if (rc) {
            pthread_mutex_unlock(&e->mu);
            finish(e, r, MOED_ERROR, d.msg);
            pthread_mutex_lock(&e->mu);
            continue;
        }
        e->st.running++;
    }
    e->st.queue_depth = (int)e->queue.n;
}

static void *engine_main(void *arg)
{
    struct moed_engine *e = arg;
    for (;;) {
        pthread_mutex_lock(&e->mu);
        for (;;) {
            drop_cancelled_locked(e);
            admit_locked(e);
            if (e->st.running > 0 || (e->stopping && moe_queue_empty(&e->queue)))
                break;
            if (moe_queue_empty(&e->queue))
                pthread_cond_wait(&e->cv, &e->mu);
        }
        const bool quit = e->stopping && e->st.running == 0 && moe_queue_empty(&e->queue);
        pthread_mutex_unlock(&e->mu);
        if (quit)
            break;
        if (!step(e)) {
            /* every running request waits for its client: sleep until a
             * kick (resume, cancel, new request) or 50 ms */
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 50000000;
            if (ts.tv_nsec >= 1000000000) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000;
            }
            pthread_mutex_lock(&e->mu);
            pthread_cond_timedwait(&e->cv, &e->mu, &ts);
            pthread_mutex_unlock(&e->mu);
        }
    }
    return NULL;
}

int moed_engine_start(struct moed_engine *e, struct moe_diag *d)
{
    int rc = pthread_create(&e->thread, NULL, engine_main, e);
    if (rc)
        return moe_diag_set(d, -rc, "cannot start the engine thread: %s", strerror(rc));
    e->started = true;
    return 0;
}

void moed_engine_stop(struct moed_engine *e)
{
    if (!e->started)
        return;
    pthread_mutex_lock(&e->mu);
    e->stopping = true;
    pthread_mutex_unlock(&e->mu);
    moed_engine_cancel_all(e);
    pthread_join(e->thread, NULL);
    e->started = false;
    /* notifications nobody will take */
    struct moe_queue batch;
    moed_engine_take_notified(e, &batch);
    for (struct moed_req *r; (r = moed_req_pop_notified(&batch)) != NULL;)
        moed_req_unref(r);
}
