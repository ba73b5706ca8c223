/* Allocation-failure sweeps over the daemon's parsers (RELIABILITY.md row 3):
 * moed_config_load_file / moed_config_from_args, and request validation
 * (daemon/request.c) with jansson routed through moe_malloc as moed does, and
 * admission and generation on a running engine thread.
 * For N = 0, 1, 2... the Nth allocation fails: the call returns a clean
 * error (or, where nothing failed, the reference result), and
 * moe_alloc_live() is back at its baseline. */
#include <errno.h>
#include <pthread.h>
#include <unistd.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache/policy.h"
#include "common/alloc.h"
#include "daemon/config.h"
#include "daemon/engine.h"
#include "daemon/request.h"
#include "tests/harness.h"

/* After a run under moe_alloc_fail_after(n): true when some allocation of
 * the run failed (the budget is spent), false when the run needed fewer
 * than n, i.e. the sweep is complete. Disables the hook. */
static bool budget_spent(void)
{
    void *p = moe_malloc(1);
    moe_alloc_fail_after(-1);
    moe_free(p);
    return p == NULL;
}

static void test_config_load_sweep(void)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/sweep.ini", moe_test_tmpdir());
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    fprintf(f, "[moed]\nmodel = /m/x.gguf\nctx_size = 2048\nqueue_size = 7\ncache_policy = lru\n");
    fclose(f);
    char *argv[] = { "moed", "--config", path, "--max-seqs", "3", NULL };
    int failed_runs = 0;
    for (long n = 0; n < 1000; n++) {
        const long live0 = moe_alloc_live();
        struct moed_config c, def;
        moed_config_defaults(&c);
        moed_config_defaults(&def);
        struct moed_args a;
        struct moe_diag d = { 0 };
        moe_alloc_fail_after(n);
        int rc = moed_config_from_args(&c, 5, argv, &a, &d);
        const bool spent = budget_spent();
        CHECK_INT(moe_alloc_live(), ==, live0);
        if (rc != 0) {
            CHECK_MSG(rc == -ENOMEM && strstr(d.msg, path) != NULL, "n=%ld: rc %d '%s'", n, rc, d.msg);
            /* nothing of the file was applied */
            CHECK(memcmp(&c, &def, sizeof(c)) == 0);
            failed_runs++;
            continue;
        }
        CHECK_STR(c.model, "/m/x.gguf");
        CHECK_INT(c.engine.n_ctx, ==, 2048);
        CHECK_INT(c.queue_size, ==, 7);
        CHECK_INT(c.max_seqs, ==, 3);
        CHECK_INT(c.engine.cache_policy, ==, MOE_POLICY_LRU);
        if (!spent)
            break;
    }
    CHECK(failed_runs >= 1);
    printf("  config load: %d run(s) failed cleanly before it went through\n", failed_runs);
}

static struct moed_engine *eng;
static struct moed_config cfg;

static void no_notify(void *ud) { (void)ud; }

/* The engine (tokenizer, template, context) that request parsing reads;
 * its thread never starts. */
static bool load_engine(void)
{
    if (eng)
        return true;
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        return false;
    moed_config_defaults(&cfg);
    snprintf(cfg.model, sizeof(cfg.model), "%s/models/tiny-mixtral-Q4_0.gguf", ref);
    strcpy(cfg.chat_template, "chatml");
    cfg.max_seqs = 1;
    cfg.engine.n_ctx = 256;
    cfg.engine.n_threads = 1;
    struct moe_diag d = { 0 };
    if (moed_engine_create(&eng, &cfg, no_notify, NULL, &d) != 0) {
        fprintf(stderr, "  engine: %s\n", d.msg);
        return false;
    }
    return true;
}

struct outcome {
    bool parsed;            /* the JSON loaded and the request was allocated */
    bool ok;
    int status;             /* the HTTP status moed answers a refusal with */
    int n_prompt, max_tokens, n_stop, logprobs;
    char msg[512];
};

static void parse_once(const char *body, bool chat, struct outcome *o)
{
    memset(o, 0, sizeof(*o));
    json_t *root = json_loads(body, JSON_REJECT_DUPLICATES, NULL);
    struct moed_req *r = root ? moed_req_new() : NULL;
    if (r) {
        struct moed_parse_error pe = { .msg = "" };
        o->parsed = true;
        o->ok = moed_parse_generate(eng, &cfg, root, chat, r, &pe);
        o->n_prompt = r->n_prompt;
        o->max_tokens = r->max_tokens;
        o->n_stop = r->n_stop;
        o->logprobs = r->logprobs;
        o->status = o->ok ? 200 : pe.status;
        snprintf(o->msg, sizeof(o->msg), "%s", pe.msg);
    }
    moed_req_unref(r);
    json_decref(root);
}

static void sweep_request(const char *body, bool chat)
{
    struct outcome ref, got;
    parse_once(body, chat, &ref);
    CHECK_MSG(ref.parsed, "%s", body);
    int failed_runs = 0;
    for (long n = 0; n < 100000; n++) {
        const long live0 = moe_alloc_live();
        moe_alloc_fail_after(n);
        parse_once(body, chat, &got);
        const bool spent = budget_spent();
        CHECK_MSG(moe_alloc_live() == live0, "n=%ld: %ld allocation(s) leaked (%s)", n,
                  moe_alloc_live() - live0, body);
        if (!spent) {
            /* nothing failed: the reference result */
            CHECK_INT(got.ok, ==, ref.ok);
            CHECK_STR(got.msg, ref.msg);
            break;
        }
        if (!got.parsed || got.ok != ref.ok || strcmp(got.msg, ref.msg) != 0) {
            /* a refusal caused by the failed allocation says so */
            CHECK_MSG(!got.parsed || (!got.ok && (strstr(got.msg, "out of memory") ||
                                                   strstr(got.msg, "Cannot allocate memory"))),
                      "n=%ld: ok %d '%s' (reference: ok %d '%s')", n, got.ok, got.msg, ref.ok, ref.msg);
            /* ... and is the server's error (500), not the client's (400) */
            CHECK_MSG(!got.parsed || got.status == 500, "n=%ld: status %d for '%s'", n, got.status,
                      got.msg);
            failed_runs++;
            continue;
        }
        /* an allocation failed but the result is the reference: every field */
        CHECK_INT(got.n_prompt, ==, ref.n_prompt);
        CHECK_INT(got.max_tokens, ==, ref.max_tokens);
        CHECK_INT(got.n_stop, ==, ref.n_stop);
        CHECK_INT(got.logprobs, ==, ref.logprobs);
    }
    CHECK(failed_runs >= 2);
    printf("  %s: %d run(s) failed cleanly\n", chat ? "chat" : "completion", failed_runs);
}

static void test_request_sweep(void)
{
    if (!load_engine())
        MOE_SKIP("no shared/ref model");
    sweep_request("{\"prompt\": \"Once upon a time\", \"max_tokens\": 8, \"stop\": [\"x\", \"yz\"],"
                  " \"temperature\": 0.5, \"logprobs\": 2}", false);
    sweep_request("{\"prompt\": [1, 2, 3, 4], \"stop\": \"\\n\", \"seed\": 7}", false);
    sweep_request("{\"messages\": [{\"role\": \"system\", \"content\": \"be brief\"},"
                  " {\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"hi \"},"
                  " {\"type\": \"text\", \"text\": \"there\"}]}], \"logprobs\": true,"
                  " \"top_logprobs\": 3, \"stream\": true}", true);
    /* refusals too: the error path of a field after allocations */
    sweep_request("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"},"
                  " {\"role\": \"robot\", \"content\": \"x\"}], \"stop\": [\"a\"]}", true);
}

/* ---- admission and generation ----------------------------------------- */

/* Submits one parsed request to the running engine and waits until it
 * finished; returns it (one reference) or NULL. */
static struct moed_req *run_request(const char *body, long fail_at)
{
    json_t *root = json_loads(body, JSON_REJECT_DUPLICATES, NULL);
    struct moed_req *r = moed_req_new();
    struct moed_parse_error pe;
    if (root == NULL || r == NULL || !moed_parse_generate(eng, &cfg, root, false, r, &pe)) {
        json_decref(root);
        moed_req_unref(r);
        return NULL;
    }
    json_decref(root);
    moe_alloc_fail_after(fail_at);
    int rc = moed_engine_submit(eng, r);
    for (int i = 0; rc == 0 && i < 20000; i++) {
        pthread_mutex_lock(&r->mu);
        const bool done = r->finish != MOED_RUNNING;
        pthread_mutex_unlock(&r->mu);
        if (done)
            break;
        usleep(500);
    }
    moe_alloc_fail_after(-1);
    /* the engine's notifications hold references: drop them as the loop does */
    for (int i = 0; i < 5000; i++) {   /* up to 5 s */
        struct moed_engine_stats st;
        moed_engine_stats(eng, &st);
        struct moe_queue batch;
        moed_engine_take_notified(eng, &batch);
        for (struct moed_req *q; (q = moed_req_pop_notified(&batch)) != NULL;)
            moed_req_unref(q);
        /* the engine's own reference goes last, after it counted the
         * request out of `running`: wait for it too, or what it frees
         * after this returns would count as leaked (seen under TSan) */
        if (st.running == 0 && st.queue_depth == 0 &&
            atomic_load_explicit(&r->refs, memory_order_acquire) == 1)
            break;
        usleep(1000);
    }
    if (rc != 0) {
        moed_req_unref(r);
        return NULL;
    }
    return r;
}

static void test_admission_sweep(void)
{
    if (!load_engine())
        MOE_SKIP("no shared/ref model");
    struct moe_diag d = { 0 };
    static bool started;
    if (!started) {
        CHECK_MSG(moed_engine_start(eng, &d) == 0, "%s", d.msg);
        started = true;
    }
    const char *body = "{\"prompt\": \"Once upon a time\", \"max_tokens\": 6, \"temperature\": 0,"
                       " \"stop\": [\"zzz\"], \"logprobs\": 1}";
    struct moed_req *ref = run_request(body, -1);
    CHECK(ref != NULL && ref->finish == MOED_LENGTH && ref->text.len > 0);
    /* the engine's per-slot state (sampler) stays allocated between
     * requests: measure after a clean run */
    const long live0 = moe_alloc_live();
    int failed_runs = 0, ok_runs = 0;
    for (long n = 0; n < 64; n++) {   /* a request makes a handful of allocations */
        struct moed_req *r = run_request(body, n);
        CHECK_MSG(r != NULL, "n=%ld: not admitted", n);
        if (r->finish == MOED_ERROR) {
            CHECK_MSG(strstr(r->err, "memory") != NULL, "n=%ld: error '%s'", n, r->err);
            failed_runs++;
        } else {
            /* an allocation that failed did not change the answer */
            CHECK_MSG(r->finish == MOED_LENGTH && r->text.len == ref->text.len &&
                      memcmp(r->text.data, ref->text.data, ref->text.len) == 0,
                      "n=%ld: finish %d, '%.*s' vs '%.*s'", n, r->finish, (int)r->text.len,
                      r->text.data ? r->text.data : "", (int)ref->text.len, ref->text.data);
            ok_runs++;
        }
        moed_req_unref(r);
        /* the engine serves the next request normally, and nothing leaked */
        struct moed_req *again = run_request(body, -1);
        CHECK_MSG(again && again->finish == MOED_LENGTH && again->text.len == ref->text.len &&
                  memcmp(again->text.data, ref->text.data, ref->text.len) == 0, "n=%ld: the next"
                  " request was not served", n);
        moed_req_unref(again);
        CHECK_MSG(moe_alloc_live() == live0, "n=%ld: %ld allocation(s) leaked", n,
                  moe_alloc_live() - live0);
    }
    moed_req_unref(ref);
    CHECK(failed_runs >= 1);
    printf("  admission and generation: %d run(s) failed cleanly, %d unaffected\n", failed_runs,
           ok_runs);
}

int main(void)
{
    /* as moed does (daemon/moed.c), so the sweeps reach JSON too */
    json_set_alloc_funcs(moe_malloc, moe_free);
    MOE_TEST_RUN(test_config_load_sweep);
    MOE_TEST_RUN(test_request_sweep);
    MOE_TEST_RUN(test_admission_sweep);
    moed_engine_free(eng);
    return moe_test_exit_code();
}
