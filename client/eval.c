/* moectl eval and moectl run: the CPU engine from the command line.
 *
 *   moectl eval --model M --tokens 1,2,3 --logits FILE [--routing FILE] [--threads N]
 *       runs the tokens as one batch; writes the logits of every position
 *       (float32 little-endian, [n_tokens][n_vocab], row-major) and the
 *       expert choices (one line per token per MoE layer:
 *       "token layer id:weight id:weight ...", highest weight first).
 *   moectl run --model M --tokens 1,2,3 -n N [sampling flags] [--threads N]
 *       generates N tokens and prints their ids space-separated on one line.
 *
 * Output files are written to a temporary name and renamed, so a failed
 * run never leaves a half-written file under the requested name.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <jansson.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "client/cli.h"
#include "model/model.h"
#include "model/sampling.h"
#include "kernels/cpu/vecdot.h"
#include "model/options.h"
#include "model/plan.h"
#include "common/alloc.h"
#include "common/buf.h"
#include "model/chat_jinja.h"
#include "model/chat_template.h"
#include "model/tokenizer.h"

static int parse_int(const char *flag, const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end != '\0' || v < lo || v > hi) {
        fprintf(stderr, "moectl: %s '%s': expected an integer in %ld..%ld\n", flag, s, lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_float(const char *flag, const char *s, float *out)
{
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || end == s || *end != '\0') {
        fprintf(stderr, "moectl: %s '%s': expected a number\n", flag, s);
        return -1;
    }
    *out = v;
    return 0;
}

/* "1,2,3" -> ids; every element a non-negative integer. */
static int parse_tokens(const char *s, int32_t **out, int64_t *n)
{
    int64_t cap = 1;
    for (const char *p = s; *p; p++)
        cap += *p == ',';
    int32_t *ids = malloc((size_t)cap * sizeof(int32_t));
    if (ids == NULL)
        return -1;
    int64_t k = 0;
    const char *p = s;
    for (;;) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (errno || end == p || v < 0 || v > INT32_MAX || (*end != ',' && *end != '\0')) {
            fprintf(stderr, "moectl: --tokens: element %" PRId64 " ('%.20s'): expected a"
                    " non-negative integer\n", k, p);
            free(ids);
            return -1;
        }
        ids[k++] = (int32_t)v;
        if (*end == '\0')
            break;
        p = end + 1;
    }
    *out = ids;
    *n = k;
    return 0;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

struct route_out {
    FILE *f;
    int err;
    int64_t base;   /* added to token indices (generation steps) */
};

static void write_trace_header(FILE *f, const struct moe_model_cfg *c)
{
    fprintf(f, "# moe_trace v1 arch=%s n_layer=%d n_expert=%d n_expert_used=%d\n", c->arch_name,
            c->n_layer, c->n_expert, c->n_expert_used);
}

static void write_route(void *ud, int64_t token, int layer, const int32_t *ids, const float *w, int k)
{
    struct route_out *r = ud;
    /* highest weight first: ids come by selection value, which can differ
     * from the weight order when a selection bias is used */
    int order[64];
    for (int i = 0; i < k && i < 64; i++)
        order[i] = i;
    for (int i = 1; i < k && i < 64; i++)
        for (int j = i; j > 0 && w[order[j]] > w[order[j - 1]]; j--) {
            int t = order[j];
            order[j] = order[j - 1];
            order[j - 1] = t;
        }
    if (fprintf(r->f, "%" PRId64 " %d", r->base + token, layer) < 0)
        r->err = 1;
    for (int i = 0; i < k && i < 64; i++)
        if (fprintf(r->f, " %d:%.9g", ids[order[i]], (double)w[order[i]]) < 0)
            r->err = 1;
    if (fputc('\n', r->f) == EOF)
        r->err = 1;
}

/* Temporary file beside `path`, renamed over it by commit_file(). */
static FILE *open_tmp(const char *path, char *tmp, size_t tmp_len)
{
    snprintf(tmp, tmp_len, "%s.tmp.%ld", path, (long)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        fprintf(stderr, "moectl: %s: %s\n", tmp, strerror(errno));
        return NULL;
    }
    FILE *f = fdopen(fd, "wb");
    if (f == NULL)
        close(fd);
    return f;
}

static int commit_file(FILE *f, const char *tmp, const char *path, int ok)
{
    int bad = !ok || fflush(f) != 0 || fsync(fileno(f)) != 0;
    if (fclose(f) != 0)
        bad = 1;
    if (bad || rename(tmp, path) != 0) {
        fprintf(stderr, "moectl: %s: write failed: %s\n", path, strerror(errno));
        unlink(tmp);
        return -1;
    }
    return 0;
}

enum {
    OPT_MODEL = 1000, OPT_TOKENS, OPT_LOGITS, OPT_ROUTING, OPT_TEMP, OPT_TOPK, OPT_TOPP, OPT_MINP,
    OPT_PENALTY, OPT_LASTN, OPT_SEED, OPT_STATS, OPT_TRACE, OPT_PROMPT, OPT_SYSTEM, OPT_TEMPLATE,
    OPT_TEMPLATE_FILE, OPT_HELP,
    OPT_ENGINE = 2000,   /* + the row of model/options.c's table (x2 + 1 for its alias) */
};

static const struct option fixed_opts[] = {
    { "model", required_argument, NULL, OPT_MODEL },
    { "tokens", required_argument, NULL, OPT_TOKENS },
    { "logits", required_argument, NULL, OPT_LOGITS },
    { "routing", required_argument, NULL, OPT_ROUTING },
    { "temp", required_argument, NULL, OPT_TEMP },
    { "top-k", required_argument, NULL, OPT_TOPK },
    { "top-p", required_argument, NULL, OPT_TOPP },
    { "min-p", required_argument, NULL, OPT_MINP },
    { "repeat-penalty", required_argument, NULL, OPT_PENALTY },
    { "repeat-last-n", required_argument, NULL, OPT_LASTN },
    { "seed", required_argument, NULL, OPT_SEED },
    { "stats", no_argument, NULL, OPT_STATS },
    { "trace", required_argument, NULL, OPT_TRACE },
    { "prompt", required_argument, NULL, OPT_PROMPT },
    { "system", required_argument, NULL, OPT_SYSTEM },
    { "chat-template", required_argument, NULL, OPT_TEMPLATE },
    { "chat-template-file", required_argument, NULL, OPT_TEMPLATE_FILE },
    { "n-predict", required_argument, NULL, 'n' },
    { "max-tokens", required_argument, NULL, 'n' },   /* moed's name for it */
    { "help", no_argument, NULL, OPT_HELP },
};

#define N_FIXED (sizeof(fixed_opts) / sizeof(fixed_opts[0]))
#define MAX_ENGINE 64

/* What the command line asked for. */
struct eval_args {
    bool run, chat;
    const char *model, *tokens_s, *logits_path, *routing_path, *trace_path;
    const char *prompt, *system_msg, *template_name, *template_file;
    long n_predict;
    bool stats;
    struct moe_sampler_params sp;
    struct moe_model_opts mo;
};

/* The engine's flags are the rows of its option table (model/options.c),
 * the keys moed reads too: `--cache-bytes 12G` here is `cache_bytes = 12G`
 * in moed.conf, with the same bounds. Flag names are the keys with '-'. */
static void flag_name(char *buf, size_t cap, const char *key)
{
    snprintf(buf, cap, "%s", key);
    for (char *c = buf; *c; c++)
        if (*c == '_')
            *c = '-';
}

static int build_opts(struct option *opts, char names[][40])
{
    size_t n_eng;
    const struct moe_opt *eng = moe_model_opt_table(&n_eng);
    int n = 0;
    memcpy(opts, fixed_opts, sizeof(fixed_opts));
    n = (int)N_FIXED;
    for (size_t i = 0; i < n_eng && i < MAX_ENGINE; i++) {
        const char *spell[2] = { eng[i].name, eng[i].alias };
        for (int k = 0; k < 2; k++) {
            if (spell[k] == NULL)
                continue;
            flag_name(names[2 * i + (size_t)k], 40, spell[k]);
            opts[n++] = (struct option){ names[2 * i + (size_t)k],
                                         eng[i].kind == MOE_OPT_BOOL ||
                                                 (k == 1 && moe_opt_bare_ok(&eng[i]))
                                                     ? optional_argument : required_argument,
                                         NULL, OPT_ENGINE + (int)i };
        }
    }
    opts[n] = (struct option){ NULL, 0, NULL, 0 };
    return n;
}

/* The engine's options, one line each, from the table moed reads too. */
static void usage_engine(FILE *f)
{
    size_t n;
    const struct moe_opt *t = moe_model_opt_table(&n);
    fprintf(f, "engine options (the same keys as moed.conf; sizes take K/M/G/T):\n");
    for (size_t i = 0; i < n; i++) {
        char flag[48], choices[128] = "";
        flag_name(flag, sizeof(flag), t[i].name);
        if (t[i].kind == MOE_OPT_ENUM)
            moe_opt_choices(&t[i], choices, sizeof(choices));
        fprintf(f, "  --%s%s%s%s  %s%s%s\n", flag, t[i].kind == MOE_OPT_BOOL ? "" : " ",
                t[i].kind == MOE_OPT_BOOL ? "" : t[i].kind == MOE_OPT_ENUM ? choices
                : t[i].kind == MOE_OPT_SIZE ? "SIZE" : "N", "", t[i].help,
                t[i].def && t[i].def[0] ? "; default " : "", t[i].def ? t[i].def : "");
    }
}

static void usage(FILE *f, int run)
{
    if (run)
        fprintf(f, "usage: moectl run --model M (--tokens 1,2,3 | --prompt TEXT) -n N [options]\n"
                   "       moectl chat --model M --prompt TEXT [--system TEXT] [--chat-template NAME |"
                   " --chat-template-file FILE] [-n N] [options]\n"
                   "Generates N tokens (greedy unless --temp > 0): --prompt prints text (stopping at"
                   " end of generation), --tokens prints ids. MODEL: a GGUF or a .moe pack.\n"
                   "  -n, --max-tokens N    tokens to generate\n"
                   "  --temp T --top-k K --top-p P --min-p P --repeat-penalty R --repeat-last-n N"
                   " --seed S\n"
                   "  --stats               prefill and decode speed, cache statistics (JSON lines on"
                   " stderr)\n"
                   "  --trace FILE          routing trace for `moectl cache-sim`\n");
    else
        fprintf(f, "usage: moectl eval --model M --tokens 1,2,3 --logits FILE [--routing FILE]"
                   " [--trace FILE] [options]\n"
                   "Writes float32 logits [n_tokens][n_vocab] and the expert choices per token"
                   " and layer.\n");
    usage_engine(f);
}

/* A sampling flag (run and chat only): 0, or the exit code. */
static int sampling_flag(struct eval_args *a, int c, const char *arg)
{
    long v;
    struct moe_sampler_params *sp = &a->sp;
    switch (c) {
    case OPT_TEMP: return parse_float("--temp", arg, &sp->temperature) ? 2 : 0;
    case OPT_TOPP: return parse_float("--top-p", arg, &sp->top_p) ? 2 : 0;
    case OPT_MINP: return parse_float("--min-p", arg, &sp->min_p) ? 2 : 0;
    case OPT_PENALTY: return parse_float("--repeat-penalty", arg, &sp->repeat_penalty) ? 2 : 0;
    case OPT_TOPK:
        if (parse_int("--top-k", arg, 0, INT_MAX, &v))
            return 2;
        sp->top_k = (int)v;
        return 0;
    case OPT_LASTN:
        if (parse_int("--repeat-last-n", arg, 0, INT_MAX, &v))
            return 2;
        sp->repeat_last_n = (int)v;
        return 0;
    case OPT_SEED: {
        char *end;
        errno = 0;
        unsigned long long s = strtoull(arg, &end, 10);
        if (errno || end == arg || *end != '\0' || arg[0] == '-') {
            fprintf(stderr, "moectl: --seed '%s': expected a non-negative integer\n", arg);
            return 2;
        }
        sp->seed = s;
        return 0;
    }
    }
    return 2;
}

/* An engine flag: parsed by its table row. 0, or 2 with the message. */
static int engine_flag(struct eval_args *a, int row, const char *arg, const char *spelled)
{
    size_t n_eng;
    const struct moe_opt *o = &moe_model_opt_table(&n_eng)[row];
    struct moe_diag d = { 0 };
    if (moe_opt_set(o, &a->mo, arg ? arg : "true", &d) == 0)
        return 0;
    /* the table's message names the key; name the flag */
    char flag[48];
    flag_name(flag, sizeof(flag), spelled ? spelled : o->name);
    const char *why = strchr(d.msg, ':');
    fprintf(stderr, "moectl: --%s:%s\n", flag, why ? why + 1 : d.msg);
    return 2;
}

/* One flag: 0 to go on, else the exit code (-1: help printed, exit 0). */
static int one_flag(struct eval_args *a, int c, char **argv, const char *spelled)
{
    const bool run = a->run;
    if (c >= OPT_ENGINE)
        return engine_flag(a, c - OPT_ENGINE, optarg, spelled);
    switch (c) {
    case OPT_MODEL: a->model = optarg; return 0;
    case OPT_TOKENS: a->tokens_s = optarg; return 0;
    case OPT_LOGITS: if (run) break; a->logits_path = optarg; return 0;
    case OPT_ROUTING: if (run) break; a->routing_path = optarg; return 0;
    case OPT_TRACE: a->trace_path = optarg; return 0;
    case 'n':
        if (!run)
            break;
        return parse_int("-n", optarg, 0, 1 << 20, &a->n_predict) ? 2 : 0;
    case OPT_TEMP: case OPT_TOPK: case OPT_TOPP: case OPT_MINP: case OPT_PENALTY: case OPT_LASTN:
    case OPT_SEED:
        if (!run)
            break;
        return sampling_flag(a, c, optarg);
    case OPT_STATS: if (!run) break; a->stats = true; return 0;
    case OPT_PROMPT: if (!run) break; a->prompt = optarg; return 0;
    case OPT_SYSTEM: if (!a->chat) break; a->system_msg = optarg; return 0;
    case OPT_TEMPLATE: if (!a->chat) break; a->template_name = optarg; return 0;
    case OPT_TEMPLATE_FILE: if (!a->chat) break; a->template_file = optarg; return 0;
    case OPT_HELP: case 'h': usage(stdout, run); return -1;
    case ':':
        fprintf(stderr, "moectl: option %s needs a value\n", argv[optind - 1]);
        usage(stderr, run);
        return 2;
    default:
        break;
    }
    fprintf(stderr, "moectl: unknown option '%s'\n", argv[optind - 1]);
    usage(stderr, run);
    return 2;
}

/* mode: 0 eval, 1 run, 2 chat (run with the prompt as a chat turn).
 * 0 to go on, else the exit code. */
static int parse_args(int argc, char **argv, int mode, struct eval_args *a)
{
    memset(a, 0, sizeof(*a));
    a->run = mode != 0;
    a->chat = mode == 2;
    a->n_predict = -1;
    moe_sampler_defaults(&a->sp);
    moe_model_opts_defaults(&a->mo);
    struct option opts[N_FIXED + 2 * MAX_ENGINE + 1];
    char names[2 * MAX_ENGINE][40];
    build_opts(opts, names);
    int c;
    optind = 1;
    opterr = 0;
    int li = -1;
    while ((c = getopt_long(argc, argv, a->run ? ":n:h" : ":h", opts, &li)) != -1) {
        /* the spelling typed (an alias: --kv-f16), for messages */
        int rc = one_flag(a, c, argv, li >= 0 ? opts[li].name : NULL);
        li = -1;
        if (rc)
            return rc < 0 ? -1 : rc;
    }
    if (optind < argc) {
        fprintf(stderr, "moectl: unexpected argument '%s'\n", argv[optind]);
        usage(stderr, a->run);
        return 2;
    }
    if (a->chat && a->n_predict < 0)
        a->n_predict = 256;
    const char *missing = a->model == NULL ? "missing --model"
        : a->tokens_s && a->prompt ? "give --tokens or --prompt, not both"
        : a->tokens_s == NULL && a->prompt == NULL ? "missing --tokens (or --prompt)"
        : a->chat && a->prompt == NULL ? "missing --prompt"
        : a->run && a->n_predict < 0 ? "missing -n"
        : !a->run && a->logits_path == NULL ? "missing --logits" : NULL;
    if (missing) {
        fprintf(stderr, "moectl: %s\n", missing);
        usage(stderr, a->run);
        return 2;
    }
    struct moe_diag d = { 0 };
    if (moe_sampler_params_check(&a->sp, &d)) {
        fprintf(stderr, "moectl: %s\n", d.msg);
        return 2;
    }
    return 0;
}

/* What one command holds while it runs; freed by ctx_free(). */
struct eval_ctx {
    struct eval_args a;
    struct moe_model *m;
    struct moe_seq *s;
    struct moe_tokenizer *tok;
    char *rendered;
    int32_t *tokens;
    int64_t n_tok;
    float *logits;
    FILE *lf, *rf;
    char ltmp[PATH_MAX + 32], rtmp[PATH_MAX + 32];
};

static void ctx_free(struct eval_ctx *x)
{
    if (x->lf) {
        fclose(x->lf);
        unlink(x->ltmp);
    }
    if (x->rf) {
        fclose(x->rf);
        unlink(x->rtmp);
    }
    moe_tokenizer_free(x->tok);
    moe_free(x->rendered);
    free(x->logits);
    moe_seq_free(x->s);
    moe_model_free(x->m);
    free(x->tokens);
}

/* The chat turn as OpenAI messages (JSON text, jansson's memory). */
static char *messages_json(const struct eval_args *a)
{
    json_t *ms = json_array();
    if (a->system_msg)
        json_array_append_new(ms, json_pack("{s:s, s:s}", "role", "system", "content", a->system_msg));
    json_array_append_new(ms, json_pack("{s:s, s:s}", "role", "user", "content", a->prompt));
    char *s = json_dumps(ms, JSON_COMPACT);
    json_decref(ms);
    return s;
}

/* Renders with a Jinja template (the file's, else the model's own); as
 * moed does, a leading BOS text is dropped when the tokenizer adds one. */
static int render_jinja(struct eval_ctx *x, const char *src, size_t len, const char *what,
                        const char **text, size_t *text_len)
{
    struct moe_chat_jinja *cj = NULL;
    struct moe_diag d = { 0 };
    if (moe_chat_jinja_open(&cj, src, len, x->tok, &d) != 0) {
        fprintf(stderr, "moectl: %s: %s\n", what, d.msg);
        return -1;
    }
    char *msgs = messages_json(&x->a);
    struct moe_jinja_err err;
    int rc = msgs ? moe_chat_jinja_apply(cj, msgs, NULL, true, NULL, &x->rendered, text_len, &err) : -ENOMEM;
    free(msgs);
    moe_chat_jinja_free(cj);
    if (rc != 0) {
        fprintf(stderr, "moectl: %s: %s%s\n", what, err.kind == MOE_JINJA_RAISE ? "the template refused the"
                " conversation: " : "", rc == -ENOMEM ? "out of memory" : err.msg);
        return 1;
    }
    size_t bl = 0;
    const char *bos = moe_tokenizer_add_bos(x->tok) && moe_tokenizer_bos(x->tok) >= 0
                      ? moe_tokenizer_token_text(x->tok, moe_tokenizer_bos(x->tok), &bl) : NULL;
    size_t skip = bos && bl && bl <= *text_len && memcmp(x->rendered, bos, bl) == 0 ? bl : 0;
    *text = x->rendered + skip;
    *text_len -= skip;
    return 0;
}

/* The chat turn rendered with the named built-in template, a template file,
 * or the model's own Jinja template, in that order of preference. */
static int render_chat(struct eval_ctx *x, const char **text, size_t *text_len)
{
    struct moe_diag d = { 0 };
    enum moe_chat_template tpl;
    const char *src = moe_tokenizer_chat_template(x->tok);
    if (!x->a.template_name && x->a.template_file) {
        struct moe_buf b;
        moe_buf_init(&b, 4u << 20);
        int rc = moe_buf_read_file(&b, x->a.template_file);
        if (rc != 0) {
            fprintf(stderr, "moectl: %s: %s\n", x->a.template_file, rc == MOE_ELIMIT ? "larger than 4 MiB"
                    : rc > -4000 ? strerror(-rc) : moe_strerror(rc));
            moe_buf_free(&b);
            return 1;
        }
        rc = render_jinja(x, b.data ? b.data : "", b.len, x->a.template_file, text, text_len);
        moe_buf_free(&b);
        return rc < 0 ? 1 : rc;
    }
    if (!x->a.template_name && src) {
        int rc = render_jinja(x, src, strlen(src), "tokenizer.chat_template", text, text_len);
        if (rc >= 0)
            return rc;
        fprintf(stderr, "moectl: falling back to a built-in template\n");   /* as moed does */
    }
    int trc = x->a.template_name ? moe_chat_template_from_name(x->a.template_name, &tpl, &d)
                                 : moe_chat_template_detect(src, src ? strlen(src) : 0, &tpl, &d);
    if (trc) {
        fprintf(stderr, "moectl: %s\n", d.msg);
        return 2;
    }
    struct moe_chat_msg msgs[2];
    size_t nm = 0;
    if (x->a.system_msg)
        msgs[nm++] = (struct moe_chat_msg){ "system", x->a.system_msg };
    msgs[nm++] = (struct moe_chat_msg){ "user", x->a.prompt };
    size_t eos_len = 0;
    const char *eos = moe_tokenizer_eos(x->tok) >= 0
                          ? moe_tokenizer_token_text(x->tok, moe_tokenizer_eos(x->tok), &eos_len) : NULL;
    char eos_buf[128] = "";
    if (eos && eos_len < sizeof(eos_buf)) {
        memcpy(eos_buf, eos, eos_len);
        eos_buf[eos_len] = '\0';
    }
    if (moe_chat_template_apply(tpl, msgs, nm, true, eos_buf[0] ? eos_buf : NULL, &x->rendered,
                                text_len, &d)) {
        fprintf(stderr, "moectl: %s\n", d.msg);
        return 1;
    }
    *text = x->rendered;
    return 0;
}

/* --prompt (or the chat turn) into x->tokens. 0, or the exit code. */
static int prompt_tokens(struct eval_ctx *x)
{
    struct moe_diag d = { 0 };
    if (moe_tokenizer_load(&x->tok, moe_model_gguf(x->m), &d)) {
        fprintf(stderr, "moectl: %s\n", d.msg);
        return 1;
    }
    const char *text = x->a.prompt;
    size_t text_len = strlen(text);
    int rc;
    if (x->a.chat && (rc = render_chat(x, &text, &text_len)))
        return rc;
    size_t need = 0;
    int trc = moe_tokenize(x->tok, text, text_len, true, x->a.chat, NULL, 0, &need);
    if (trc == -ENOSPC || trc == 0) {
        x->tokens = malloc((need ? need : 1) * sizeof(int32_t));
        trc = x->tokens ? moe_tokenize(x->tok, text, text_len, true, x->a.chat, x->tokens, need, &need)
                        : -ENOMEM;
    }
    if (trc) {
        fprintf(stderr, "moectl: --prompt: %s\n", moe_strerror(trc));
        return 1;
    }
    x->n_tok = (int64_t)need;
    if (x->n_tok == 0) {
        fprintf(stderr, "moectl: --prompt gives no tokens\n");
        return 2;
    }
    return 0;
}

/* Loads the model, the tokens and a sequence; checks the tokens fit. */
static int prepare(struct eval_ctx *x)
{
    struct moe_diag d = { 0 };
    if (x->a.tokens_s && parse_tokens(x->a.tokens_s, &x->tokens, &x->n_tok))
        return 2;
    if (moe_model_load(&x->m, x->a.model, &x->a.mo, &d)) {
        fprintf(stderr, "moectl: %s\n", d.msg);
        return 1;
    }
    int rc;
    if (x->a.prompt != NULL && (rc = prompt_tokens(x)))
        return rc;
    const int V = moe_model_cfg(x->m)->n_vocab;
    for (int64_t i = 0; i < x->n_tok; i++) {
        if (x->tokens[i] >= V) {
            fprintf(stderr, "moectl: --tokens: element %" PRId64 " is %d, but %s has %d tokens"
                    " (ids 0..%d)\n", i, x->tokens[i], x->a.model, V, V - 1);
            return 2;
        }
    }
    const int64_t total = x->n_tok + (x->a.run ? x->a.n_predict : 0);
    if (total > moe_model_n_ctx(x->m)) {
        fprintf(stderr, "moectl: %" PRId64 " tokens exceed the context of %d (--ctx-size)\n", total,
                moe_model_n_ctx(x->m));
        return 2;
    }
    if (moe_seq_create(&x->s, x->m, &d)) {
        fprintf(stderr, "moectl: %s\n", d.msg);
        return 1;
    }
    return 0;
}

/* eval: one batch; logits of every position and the routing to files. */
static int do_eval(struct eval_ctx *x)
{
    const struct moe_model_cfg *cfg = moe_model_cfg(x->m);
    const int V = cfg->n_vocab;
    const int64_t n_tok = x->n_tok;
    struct moe_diag d = { 0 };
    x->logits = malloc((size_t)n_tok * V * sizeof(float));
    if (x->logits == NULL) {
        fprintf(stderr, "moectl: out of memory for %" PRId64 " x %d logits\n", n_tok, V);
        return 1;
    }
    struct route_out ro = { 0 };
    /* --routing: exactly the routing lines; --trace: the same with a
     * header naming the model's dims (cache-sim reads both) */
    const char *routing_path = x->a.routing_path ? x->a.routing_path : x->a.trace_path;
    if (routing_path) {
        if ((x->rf = open_tmp(routing_path, x->rtmp, sizeof(x->rtmp))) == NULL)
            return 1;
        ro.f = x->rf;
        if (x->a.routing_path == NULL)
            write_trace_header(x->rf, cfg);
    }
    if (moe_model_forward(x->m, x->s, x->tokens, n_tok, x->logits, true, x->rf ? write_route : NULL,
                          &ro, &d)) {
        fprintf(stderr, "moectl: %s\n", d.msg);
        return 1;
    }
    if ((x->lf = open_tmp(x->a.logits_path, x->ltmp, sizeof(x->ltmp))) == NULL)
        return 1;
    /* float32 little-endian: the host order on every supported target */
    size_t nw = fwrite(x->logits, sizeof(float), (size_t)n_tok * V, x->lf);
    FILE *lf = x->lf;
    x->lf = NULL;
    if (commit_file(lf, x->ltmp, x->a.logits_path, nw == (size_t)n_tok * V))
        return 1;
    if (x->rf) {
        FILE *rf = x->rf;
        x->rf = NULL;
        if (commit_file(rf, x->rtmp, routing_path, !ro.err))
            return 1;
    }
    return 0;
}

static void print_cache_stats(struct moe_model *m)
{
    struct moe_cache_stats cs;
    if (moe_model_cache_stats(m, &cs))
        fprintf(stderr, "{\"cache_slots\": %d, \"slot_bytes\": %zu, \"hits\": %llu, \"misses\": %llu,"
                " \"hit_rate\": %.4f, \"evictions\": %llu, \"bytes_loaded\": %llu, \"stall_s\": %.6f,"
                " \"load_errors\": %llu, \"prefetch_issued\": %llu, \"prefetch_used\": %llu,"
                " \"prefetch_wasted\": %llu, \"prefetch_dropped\": %llu, \"prefetch_cancelled\": %llu,"
                " \"host_hits\": %llu, \"host_inserts\": %llu}\n", cs.n_slots, cs.slot_bytes,
                (unsigned long long)cs.hits, (unsigned long long)cs.misses,
                cs.hits + cs.misses ? (double)cs.hits / (double)(cs.hits + cs.misses) : 0.0,
                (unsigned long long)cs.evictions, (unsigned long long)cs.bytes_loaded, cs.stall_s,
                (unsigned long long)cs.loads_failed, (unsigned long long)cs.prefetch_issued,
                (unsigned long long)cs.prefetch_used, (unsigned long long)cs.prefetch_wasted,
                (unsigned long long)cs.prefetch_dropped, (unsigned long long)cs.prefetch_cancelled,
                (unsigned long long)cs.host_hits, (unsigned long long)cs.host_inserts);
    if (moe_model_cache_stats(m, &cs) && cs.lane_cpu + cs.lane_copy + cs.lane_both > 0)
        fprintf(stderr, "{\"lane_cpu\": %llu, \"lane_cpu_bytes\": %llu, \"lane_cpu_s\": %.6f,"
                " \"lane_copy\": %llu, \"lane_copy_bytes\": %llu, \"lane_copy_wait_s\": %.6f,"
                " \"lane_both\": %llu, \"lane_both_bytes\": %llu, \"lane_steps_auto\": %llu,"
                " \"lane_steps_copy\": %llu, \"lane_steps_cpu\": %llu}\n", (unsigned long long)cs.lane_cpu,
                (unsigned long long)cs.lane_cpu_bytes, cs.lane_cpu_s, (unsigned long long)cs.lane_copy,
                (unsigned long long)cs.lane_copy_bytes, cs.lane_copy_wait_s,
                (unsigned long long)cs.lane_both, (unsigned long long)cs.lane_both_bytes,
                (unsigned long long)cs.lane_steps_auto, (unsigned long long)cs.lane_steps_copy,
                (unsigned long long)cs.lane_steps_cpu);
    if (moe_model_cache_stats(m, &cs))
        fprintf(stderr, "{\"io_requests\": %llu, \"io_bytes\": %llu, \"io_busy_s\": %.6f,"
                " \"io_depth_s\": %.6f, \"io_pages_s\": %.6f, \"io_max_depth\": %u,"
                " \"io_queue_depth\": %u, \"io_staging\": %u, \"io_stage_wait_s\": %.6f,"
                " \"io_load_s\": %.6f, \"loads_ok\": %llu}\n",
                (unsigned long long)cs.io_requests, (unsigned long long)cs.io_bytes, cs.io_busy_s,
                cs.io_depth_s, cs.io_pages_s, cs.io_max_depth, cs.io_queue_depth, cs.io_staging,
                cs.io_stage_wait_s, cs.io_load_s, (unsigned long long)cs.loads_ok);
    uint64_t pf_on = 0, pf_off = 0;
    if (moe_model_prefetch_steps(m, &pf_on, &pf_off))
        fprintf(stderr, "{\"prefetch_steps_on\": %llu, \"prefetch_steps_off\": %llu}\n",
                (unsigned long long)pf_on, (unsigned long long)pf_off);
    static struct moe_cache_layer_stats ls[1024];
    int nl = moe_model_cache_layer_stats(m, ls, 1024);
    if (nl <= 0)
        return;
    fprintf(stderr, "{\"layer_hit_rate\": [");
    for (int l = 0; l < nl && l < 1024; l++)
        fprintf(stderr, "%s%.3f", l ? ", " : "", ls[l].hits + ls[l].misses
                ? (double)ls[l].hits / (double)(ls[l].hits + ls[l].misses) : 0.0);
    fprintf(stderr, "], \"layer_bytes_loaded\": [");
    for (int l = 0; l < nl && l < 1024; l++)
        fprintf(stderr, "%s%llu", l ? ", " : "", (unsigned long long)ls[l].bytes_loaded);
    fprintf(stderr, "], \"layer_stall_s\": [");
    for (int l = 0; l < nl && l < 1024; l++)
        fprintf(stderr, "%s%.6f", l ? ", " : "", ls[l].stall_s);
    fprintf(stderr, "]}\n");
}

/* Bytes this process has caused to be read from storage so far
 * (/proc/self/io read_bytes: O_DIRECT reads and page faults alike); 0 when
 * unknown. Less the expert store's reads, what the mapped weights cost. */
static unsigned long long proc_read_bytes(void)
{
    FILE *f = fopen("/proc/self/io", "r");
    unsigned long long v = 0;
    char line[128];
    while (f && fgets(line, sizeof(line), f))
        if (sscanf(line, "read_bytes: %llu", &v) == 1)
            break;
    if (f)
        fclose(f);
    return v;
}

/* The plan the model was sized by, and what the process actually held at
 * its peak (resident pages, mapped weights included). */
static void print_memory(struct moe_model *m)
{
    const struct moe_model_plan *p = moe_model_plan_of(m);
    struct moe_buf b;
    moe_buf_init(&b, 1u << 16);
    if (moe_model_plan_format(p, &b) == 0)
        fprintf(stderr, "plan:\n%.*s", (int)b.len, (const char *)b.data);
    moe_buf_free(&b);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    fprintf(stderr, "{\"plan_bytes\": %" PRIu64 ", \"plan_host_bytes\": %" PRIu64 ", \"host_budget\": %"
            PRIu64 ", \"cache_slots\": %d, \"auto_sized\": %s, \"warm_loads\": %d,"
            " \"peak_rss_bytes\": %llu, \"read_bytes\": %llu}\n",
            p->dense_bytes + p->kv_bytes + p->cache_bytes + p->host_bytes + p->workspace_bytes +
            p->staging_bytes +
            (p->expert_cache ? 0 : p->expert_bytes), moe_model_plan_host_bytes(p, p->opts.backend),
            p->host_budget, p->n_slots, p->auto_sized ? "true" : "false", moe_model_warm_loads(m),
            (unsigned long long)ru.ru_maxrss * 1024ull, proc_read_bytes());
}

/* Prints sampled token t: its text with a tokenizer, else its id. */
static void emit(struct eval_ctx *x, struct moe_detok_stream *ds, int32_t t, long i)
{
    char piece[1024];
    size_t pl = 0;
    if (x->tok == NULL)
        printf(i ? " %d" : "%d", t);
    else if (moe_detok_stream_push(ds, t, piece, sizeof(piece), &pl) == 0)
        fwrite(piece, 1, pl, stdout);
    fflush(stdout);
}

/* run/chat: prefill, then sample n_predict tokens. */
static int do_run(struct eval_ctx *x)
{
    const struct moe_model_cfg *cfg = moe_model_cfg(x->m);
    const int V = cfg->n_vocab;
    const long n_predict = x->a.n_predict;
    struct moe_diag d = { 0 };
    struct moe_sampler *smp = NULL;
    int32_t *hist = malloc((size_t)(x->n_tok + n_predict + 1) * sizeof(int32_t));
    double *step = NULL;
    x->logits = malloc((size_t)V * sizeof(float));
    int ret = 1;
    if (x->logits == NULL || hist == NULL) {
        fprintf(stderr, "moectl: out of memory\n");
        goto out;
    }
    if (moe_sampler_create(&smp, &x->a.sp, V, &d)) {
        fprintf(stderr, "moectl: %s\n", d.msg);
        goto out;
    }
    memcpy(hist, x->tokens, (size_t)x->n_tok * sizeof(int32_t));
    int64_t n_hist = x->n_tok;
    struct route_out rro = { 0 };
    if (x->a.trace_path) {
        if ((x->rf = open_tmp(x->a.trace_path, x->rtmp, sizeof(x->rtmp))) == NULL)
            goto out;
        rro.f = x->rf;
        write_trace_header(x->rf, cfg);
    }
    moe_route_fn rfn = x->rf ? write_route : NULL;
    const double t0 = now_s();
    if (n_predict > 0 && moe_model_forward(x->m, x->s, x->tokens, x->n_tok, x->logits, false, rfn,
                                           &rro, &d)) {
        fprintf(stderr, "moectl: %s\n", d.msg);
        goto out;
    }
    const double t1 = now_s();
    /* --stats: the counters at the end of prefill (decode's share is the
     * final value less these) and per decode step its time, stall and
     * bytes loaded */
    struct moe_cache_stats cs0 = { 0 }, csp = { 0 };
    const bool cached = x->a.stats && moe_model_cache_stats(x->m, &cs0);
    const unsigned long long rb0 = x->a.stats ? proc_read_bytes() : 0;
    csp = cs0;
    if (x->a.stats && n_predict > 1)
        step = calloc((size_t)n_predict * 3, sizeof(double));
    double tp = t1;
    struct moe_detok_stream ds;
    if (x->tok)
        moe_detok_stream_init(&ds, x->tok, false);
    for (long i = 0; i < n_predict; i++) {
        int32_t t = moe_sampler_sample(smp, x->logits, hist, n_hist);
        hist[n_hist++] = t;
        if (x->tok && moe_tokenizer_is_eog(x->tok, t))
            break;
        emit(x, &ds, t, i);
        rro.base = n_hist - 1; /* the token's position in the routing lines */
        if (i + 1 < n_predict && moe_model_forward(x->m, x->s, &t, 1, x->logits, false, rfn, &rro, &d)) {
            fprintf(stderr, "\nmoectl: %s\n", d.msg);
            goto out;
        }
        if (step && i + 1 < n_predict) {
            struct moe_cache_stats cn = { 0 };
            const double tn = now_s();
            step[3 * i] = tn - tp;
            if (cached && moe_model_cache_stats(x->m, &cn)) {
                step[3 * i + 1] = cn.stall_s - csp.stall_s;
                step[3 * i + 2] = (double)(cn.bytes_loaded - csp.bytes_loaded);
                csp = cn;
            }
            tp = tn;
        }
    }
    char piece[1024];
    size_t pl = 0;
    if (x->tok && moe_detok_stream_flush(&ds, piece, sizeof(piece), &pl) == 0)
        fwrite(piece, 1, pl, stdout);
    printf("\n");
    fflush(stdout);
    if (x->rf) {
        FILE *rf = x->rf;
        x->rf = NULL;
        if (commit_file(rf, x->rtmp, x->a.trace_path, !rro.err))
            goto out;
    }
    if (x->a.stats) {
        const double t2 = now_s();
        print_cache_stats(x->m);
        print_memory(x->m);
        fprintf(stderr, "{\"prefill_read_bytes\": %llu}\n", rb0);
        if (cached)
            fprintf(stderr, "{\"prefill_bytes_loaded\": %llu, \"prefill_stall_s\": %.6f,"
                    " \"prefill_io_bytes\": %llu, \"prefill_io_requests\": %llu,"
                    " \"prefill_io_busy_s\": %.6f, \"prefill_io_depth_s\": %.6f,"
                    " \"prefill_io_pages_s\": %.6f, \"prefill_hits\": %llu, \"prefill_misses\": %llu}\n",
                    (unsigned long long)cs0.bytes_loaded, cs0.stall_s, (unsigned long long)cs0.io_bytes,
                    (unsigned long long)cs0.io_requests, cs0.io_busy_s, cs0.io_depth_s, cs0.io_pages_s,
                    (unsigned long long)cs0.hits, (unsigned long long)cs0.misses);
        if (step) {
            const char *names[3] = { "step_s", "step_stall_s", "step_bytes_loaded" };
            for (int k = 0; k < 3; k++) {
                fprintf(stderr, "%s\"%s\": [", k ? ", " : "{", names[k]);
                for (long i = 0; i + 1 < n_predict; i++)
                    fprintf(stderr, k == 2 ? "%s%.0f" : "%s%.4f", i ? ", " : "", step[3 * i + k]);
                fprintf(stderr, "]");
            }
            fprintf(stderr, "}\n");
        }
        /* the last sampled token is not run through the model */
        const long n_dec = n_predict > 1 ? n_predict - 1 : 0;
        fprintf(stderr, "{\"prefill_tokens\": %" PRId64 ", \"prefill_s\": %.6f, \"prefill_tok_s\": %.3f,"
                " \"decode_tokens\": %ld, \"decode_s\": %.6f, \"decode_tok_s\": %.3f, \"simd\": \"%s\"}\n",
                x->n_tok, t1 - t0, (double)x->n_tok / (t1 - t0), n_dec, t2 - t1,
                n_dec ? (double)n_dec / (t2 - t1) : 0.0, moe_vecdot_impl());
    }
    ret = 0;
out:
    moe_sampler_free(smp);
    free(step);
    free(hist);
    return ret;
}

static int eval_or_run(int argc, char **argv, int mode)
{
    struct eval_ctx x;
    memset(&x, 0, sizeof(x));
    int rc = parse_args(argc, argv, mode, &x.a);
    if (rc)
        return rc < 0 ? 0 : rc;
    rc = prepare(&x);
    if (rc == 0)
        rc = x.a.run ? do_run(&x) : do_eval(&x);
    struct moe_diag d = { 0 };
    if (rc == 0 && x.m && moe_model_warm_save(x.m, &d) != 0)
        fprintf(stderr, "moectl: warning: %s\n", d.msg);
    ctx_free(&x);
    return rc;
}

int moectl_eval_main(int argc, char **argv)
{
    return eval_or_run(argc, argv, 0);
}

int moectl_run_main(int argc, char **argv)
{
    return eval_or_run(argc, argv, 1);
}

int moectl_chat_main(int argc, char **argv)
{
    return eval_or_run(argc, argv, 2);
}
