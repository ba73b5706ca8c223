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
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "client/cli.h"
#include "model/model.h"
#include "model/sampling.h"
#include "kernels/cpu/vecdot.h"
#include "cache/expert_cache.h"
#include "common/alloc.h"
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
    OPT_MODEL = 1000, OPT_TOKENS, OPT_LOGITS, OPT_ROUTING, OPT_THREADS, OPT_TEMP, OPT_TOPK,
    OPT_TOPP, OPT_MINP, OPT_PENALTY, OPT_LASTN, OPT_SEED, OPT_CTX, OPT_STATS, OPT_KVF16, OPT_CACHE_BYTES, OPT_CACHE_EXPERTS, OPT_CACHE_POLICY,
    OPT_TRACE, OPT_PREAD, OPT_PREFETCH, OPT_PREFETCH_DEPTH, OPT_PREFETCH_ALWAYS, OPT_BACKEND, OPT_PROMPT, OPT_SYSTEM, OPT_TEMPLATE,
    OPT_HOST_BYTES, OPT_HELP,
};

static const struct option long_opts[] = {
    { "model", required_argument, NULL, OPT_MODEL },
    { "tokens", required_argument, NULL, OPT_TOKENS },
    { "logits", required_argument, NULL, OPT_LOGITS },
    { "routing", required_argument, NULL, OPT_ROUTING },
    { "threads", required_argument, NULL, OPT_THREADS },
    { "temp", required_argument, NULL, OPT_TEMP },
    { "top-k", required_argument, NULL, OPT_TOPK },
    { "top-p", required_argument, NULL, OPT_TOPP },
    { "min-p", required_argument, NULL, OPT_MINP },
    { "repeat-penalty", required_argument, NULL, OPT_PENALTY },
    { "repeat-last-n", required_argument, NULL, OPT_LASTN },
    { "seed", required_argument, NULL, OPT_SEED },
    { "ctx", required_argument, NULL, OPT_CTX },
    { "stats", no_argument, NULL, OPT_STATS },
    { "kv-f16", no_argument, NULL, OPT_KVF16 },
    { "cache-bytes", required_argument, NULL, OPT_CACHE_BYTES },
    { "cache-experts", required_argument, NULL, OPT_CACHE_EXPERTS },
    { "cache-policy", required_argument, NULL, OPT_CACHE_POLICY },
    { "trace", required_argument, NULL, OPT_TRACE },
    { "force-pread", no_argument, NULL, OPT_PREAD },
    { "prefetch", required_argument, NULL, OPT_PREFETCH },
    { "prefetch-depth", required_argument, NULL, OPT_PREFETCH_DEPTH },
    { "prefetch-always", no_argument, NULL, OPT_PREFETCH_ALWAYS },
    { "backend", required_argument, NULL, OPT_BACKEND },
    { "prompt", required_argument, NULL, OPT_PROMPT },
    { "host-bytes", required_argument, NULL, OPT_HOST_BYTES },
    { "system", required_argument, NULL, OPT_SYSTEM },
    { "chat-template", required_argument, NULL, OPT_TEMPLATE },
    { "n-predict", required_argument, NULL, 'n' },
    { "help", no_argument, NULL, OPT_HELP },
    { NULL, 0, NULL, 0 },
};

static void usage(FILE *f, int run)
{
    if (run)
        fprintf(f, "usage: moectl run --model M (--tokens 1,2,3 | --prompt TEXT) -n N [options]\n"
                   "       moectl chat --model M --prompt TEXT [--system TEXT] [--chat-template NAME]"
                   " [-n N] [options]\n"
                   "--prompt prints text (stopping at end of generation); --tokens prints ids.\n");
    if (run)
        fprintf(f, "usage: moectl run --model M --tokens 1,2,3 -n N [--temp T] [--top-k K]"
                   " [--top-p P]\n"
                   "                  [--min-p P] [--repeat-penalty R] [--repeat-last-n N]"
                   " [--seed S] [--threads N] [--ctx N] [--kv-f16] [--stats]\n"
                   "                  [--trace FILE] [--cache-bytes SIZE | --cache-experts N] [--cache-policy lru|lfu|layer]\n"
                   "                  [--prefetch none|gate|history] [--prefetch-depth D] [--prefetch-always]\n"
                   "                  [--host-bytes SIZE] [--backend cpu|cuda]\n"
                   "                  [--force-pread]\n"
                   "                  (MODEL may be a GGUF or a .moe pack)\n"
                   "Generates N tokens (greedy unless --temp > 0) and prints their ids.\n"
                   "--stats prints prefill and decode speed as one JSON line on stderr.\n");
    else
        fprintf(f, "usage: moectl eval --model M --tokens 1,2,3 --logits FILE [--routing FILE]"
                   " [--threads N] [--kv-f16]\n"
                   "                   [--trace FILE] [--cache-bytes SIZE | --cache-experts N] [--cache-policy P]\n"
                   "Writes float32 logits [n_tokens][n_vocab] and the expert choices per token"
                   " and layer.\n");
}

/* mode: 0 eval, 1 run, 2 chat (run with the prompt as a chat turn) */
static int eval_or_run(int argc, char **argv, int mode)
{
    const int run = mode != 0, chat = mode == 2;
    const char *prompt = NULL, *system_msg = NULL, *template_name = NULL;
    const char *model = NULL, *tokens_s = NULL, *logits_path = NULL, *routing_path = NULL;
    long threads = 0, n_predict = -1, ctx = 0, v;
    int stats = 0, kv_f16 = 0, force_pread = 0;
    long cache_experts = 0;
    unsigned long long cache_bytes = 0, host_bytes = 0;
    const char *cache_policy = NULL, *trace_path = NULL, *prefetch = NULL;
    long prefetch_depth = 0;
    bool prefetch_always = false;
    const char *backend = NULL;
    struct moe_sampler_params sp;
    moe_sampler_defaults(&sp);
    int c;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, run ? ":n:h" : ":h", long_opts, NULL)) != -1) {
        switch (c) {
        case OPT_MODEL: model = optarg; break;
        case OPT_TOKENS: tokens_s = optarg; break;
        case OPT_LOGITS: if (run) goto bad_opt; logits_path = optarg; break;
        case OPT_ROUTING: if (run) goto bad_opt; routing_path = optarg; break;
        case OPT_THREADS:
            if (parse_int("--threads", optarg, 1, 1024, &threads)) return 2;
            break;
        case OPT_CTX:
            if (parse_int("--ctx", optarg, 1, 1 << 20, &ctx)) return 2;
            break;
        case 'n':
            if (!run) goto bad_opt;
            if (parse_int("-n", optarg, 0, 1 << 20, &n_predict)) return 2;
            break;
        case OPT_TEMP: if (!run || parse_float("--temp", optarg, &sp.temperature)) goto bad_val; break;
        case OPT_TOPK:
            if (!run || parse_int("--top-k", optarg, 0, INT_MAX, &v)) goto bad_val;
            sp.top_k = (int)v;
            break;
        case OPT_TOPP: if (!run || parse_float("--top-p", optarg, &sp.top_p)) goto bad_val; break;
        case OPT_MINP: if (!run || parse_float("--min-p", optarg, &sp.min_p)) goto bad_val; break;
        case OPT_PENALTY:
            if (!run || parse_float("--repeat-penalty", optarg, &sp.repeat_penalty)) goto bad_val;
            break;
        case OPT_LASTN:
            if (!run || parse_int("--repeat-last-n", optarg, 0, INT_MAX, &v)) goto bad_val;
            sp.repeat_last_n = (int)v;
            break;
        case OPT_SEED: {
            char *end;
            errno = 0;
            unsigned long long s = strtoull(optarg, &end, 10);
            if (!run || errno || end == optarg || *end != '\0' || optarg[0] == '-') {
                fprintf(stderr, "moectl: --seed '%s': expected a non-negative integer\n", optarg);
                return 2;
            }
            sp.seed = s;
            break;
        }
        case OPT_STATS: if (!run) goto bad_opt; stats = 1; break;
        case OPT_KVF16: kv_f16 = 1; break;
        case OPT_PREAD: force_pread = 1; break;
        case OPT_TRACE: trace_path = optarg; break;
        case OPT_PROMPT: if (!run) goto bad_opt; prompt = optarg; break;
        case OPT_SYSTEM: if (!chat) goto bad_opt; system_msg = optarg; break;
        case OPT_TEMPLATE: if (!chat) goto bad_opt; template_name = optarg; break;
        case OPT_PREFETCH:
            if (strcmp(optarg, "none") != 0 && strcmp(optarg, "gate") != 0 && strcmp(optarg, "history") != 0) {
                fprintf(stderr, "moectl: --prefetch '%s': expected none, gate or history\n", optarg);
                return 2;
            }
            prefetch = optarg;
            break;
        case OPT_PREFETCH_ALWAYS:
            prefetch_always = true;
            break;
        case OPT_BACKEND:
            if (strcmp(optarg, "cpu") != 0 && strcmp(optarg, "cuda") != 0) {
                fprintf(stderr, "moectl: --backend: '%s', expected cpu or cuda\n", optarg);
                return 2;
            }
            backend = optarg;
            break;
        case OPT_PREFETCH_DEPTH:
            if (parse_int("--prefetch-depth", optarg, 1, 64, &prefetch_depth)) return 2;
            break;
        case OPT_CACHE_POLICY: cache_policy = optarg; break;
        case OPT_CACHE_EXPERTS:
            if (parse_int("--cache-experts", optarg, 1, 1L << 24, &cache_experts)) return 2;
            break;
        case OPT_CACHE_BYTES:
        case OPT_HOST_BYTES: {
            char *end;
            errno = 0;
            double b = strtod(optarg, &end);
            double mul = *end == 'K' || *end == 'k' ? 1024.0 : *end == 'M' || *end == 'm' ? 1048576.0
                       : *end == 'G' || *end == 'g' ? 1073741824.0 : 1.0;
            if (mul != 1.0)
                end++;
            if (errno || end == optarg || *end != '\0' || !(b * mul >= 1.0) || b * mul > 1e15) {
                fprintf(stderr, "moectl: %s '%s': expected a size like 512M or 2G\n",
                        c == OPT_HOST_BYTES ? "--host-bytes" : "--cache-bytes", optarg);
                return 2;
            }
            if (c == OPT_HOST_BYTES)
                host_bytes = (unsigned long long)(b * mul);
            else
                cache_bytes = (unsigned long long)(b * mul);
            break;
        }
        case OPT_HELP: case 'h': usage(stdout, run); return 0;
        case ':':
            fprintf(stderr, "moectl: option %s needs a value\n", argv[optind - 1]);
            usage(stderr, run);
            return 2;
        default:
        bad_opt:
            fprintf(stderr, "moectl: unknown option '%s'\n", argv[optind - 1]);
            usage(stderr, run);
            return 2;
        bad_val:
            if (!run)
                goto bad_opt;
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "moectl: unexpected argument '%s'\n", argv[optind]);
        usage(stderr, run);
        return 2;
    }
    if (chat && n_predict < 0)
        n_predict = 256;
    if (model == NULL || (tokens_s == NULL && prompt == NULL) || (chat && prompt == NULL) ||
        (tokens_s && prompt) || (!run && logits_path == NULL) || (run && n_predict < 0)) {
        fprintf(stderr, "moectl: %s\n", model == NULL ? "missing --model" : tokens_s && prompt ?
                "give --tokens or --prompt, not both" : tokens_s == NULL && prompt == NULL ?
                "missing --tokens (or --prompt)" : chat && prompt == NULL ? "missing --prompt" :
                run ? "missing -n" : "missing --logits");
        usage(stderr, run);
        return 2;
    }
    struct moe_diag d = { 0 };
    if (moe_sampler_params_check(&sp, &d)) {
        fprintf(stderr, "moectl: %s\n", d.msg);
        return 2;
    }
    int32_t *tokens = NULL;
    int64_t n_tok = 0;
    if (tokens_s && parse_tokens(tokens_s, &tokens, &n_tok))
        return 2;
    struct moe_tokenizer *tok = NULL;
    char *rendered = NULL;

    int ret = 1;
    struct moe_model *m = NULL;
    struct moe_seq *s = NULL;
    struct moe_sampler *smp = NULL;
    float *logits = NULL;
    int32_t *hist = NULL;
    FILE *lf = NULL, *rf = NULL;
    char ltmp[PATH_MAX + 32], rtmp[PATH_MAX + 32];
    struct moe_model_opts mo = {
        .n_threads = (int)threads, .n_ctx = (int)ctx, .kv_f16 = kv_f16,
        .cache_bytes = (size_t)cache_bytes, .cache_experts = (int)cache_experts,
        .cache_policy = cache_policy, .force_pread = force_pread,
        .prefetch = prefetch, .prefetch_depth = (int)prefetch_depth,
        .prefetch_always = prefetch_always, .backend = backend,
        .host_bytes = (size_t)host_bytes,
    };
    if (moe_model_load(&m, model, &mo, &d)) {
        fprintf(stderr, "moectl: %s\n", d.msg);
        goto out;
    }
    const struct moe_model_cfg *cfg = moe_model_cfg(m);
    const int V = cfg->n_vocab;
    if (prompt != NULL) {
        if (moe_tokenizer_load(&tok, moe_model_gguf(m), &d)) {
            fprintf(stderr, "moectl: %s\n", d.msg);
            goto out;
        }
        const char *text = prompt;
        size_t text_len = strlen(prompt);
        if (chat) {
            enum moe_chat_template tpl;
            const char *src = moe_tokenizer_chat_template(tok);
            int trc = template_name ? moe_chat_template_from_name(template_name, &tpl, &d)
                                    : moe_chat_template_detect(src, src ? strlen(src) : 0, &tpl, &d);
            if (trc) {
                fprintf(stderr, "moectl: %s\n", d.msg);
                ret = 2;
                goto out;
            }
            struct moe_chat_msg msgs[2];
            size_t nm = 0;
            if (system_msg)
                msgs[nm++] = (struct moe_chat_msg){ "system", system_msg };
            msgs[nm++] = (struct moe_chat_msg){ "user", prompt };
            size_t eos_len = 0;
            const char *eos = moe_tokenizer_eos(tok) >= 0
                                  ? moe_tokenizer_token_text(tok, moe_tokenizer_eos(tok), &eos_len) : NULL;
            char eos_buf[128] = "";
            if (eos && eos_len < sizeof(eos_buf)) {
                memcpy(eos_buf, eos, eos_len);
                eos_buf[eos_len] = '\0';
            }
            if (moe_chat_template_apply(tpl, msgs, nm, true, eos_buf[0] ? eos_buf : NULL, &rendered,
                                        &text_len, &d)) {
                fprintf(stderr, "moectl: %s\n", d.msg);
                goto out;
            }
            text = rendered;
        }
        size_t need = 0;
        int trc = moe_tokenize(tok, text, text_len, true, chat, NULL, 0, &need);
        if (trc == -ENOSPC || trc == 0) {
            tokens = malloc((need ? need : 1) * sizeof(int32_t));
            trc = tokens ? moe_tokenize(tok, text, text_len, true, chat, tokens, need, &need) : -ENOMEM;
        }
        if (trc) {
            fprintf(stderr, "moectl: --prompt: %s\n", moe_strerror(trc));
            goto out;
        }
        n_tok = (int64_t)need;
        if (n_tok == 0) {
            fprintf(stderr, "moectl: --prompt gives no tokens\n");
            ret = 2;
            goto out;
        }
    }
    for (int64_t i = 0; i < n_tok; i++) {
        if (tokens[i] >= V) {
            fprintf(stderr, "moectl: --tokens: element %" PRId64 " is %d, but %s has %d tokens"
                    " (ids 0..%d)\n", i, tokens[i], model, V, V - 1);
            ret = 2;
            goto out;
        }
    }
    if (n_tok + (run ? n_predict : 0) > moe_model_n_ctx(m)) {
        fprintf(stderr, "moectl: %" PRId64 " tokens exceed the context of %d (--ctx)\n",
                n_tok + (run ? n_predict : 0), moe_model_n_ctx(m));
        ret = 2;
        goto out;
    }
    if (moe_seq_create(&s, m, &d)) {
        fprintf(stderr, "moectl: %s\n", d.msg);
        goto out;
    }
    if (!run) {
        logits = malloc((size_t)n_tok * V * sizeof(float));
        if (logits == NULL) {
            fprintf(stderr, "moectl: out of memory for %" PRId64 " x %d logits\n", n_tok, V);
            goto out;
        }
        struct route_out ro = { 0 };
        /* --routing: exactly the routing lines; --trace: the same with a
         * header naming the model's dims (cache-sim reads both) */
        const int with_header = routing_path == NULL && trace_path != NULL;
        if (routing_path == NULL)
            routing_path = trace_path;
        if (routing_path) {
            if ((rf = open_tmp(routing_path, rtmp, sizeof(rtmp))) == NULL)
                goto out;
            ro.f = rf;
            if (with_header)
                write_trace_header(rf, cfg);
        }
        if (moe_model_forward(m, s, tokens, n_tok, logits, true, rf ? write_route : NULL, &ro, &d)) {
            fprintf(stderr, "moectl: %s\n", d.msg);
            goto out;
        }
        if ((lf = open_tmp(logits_path, ltmp, sizeof(ltmp))) == NULL)
            goto out;
        /* float32 little-endian: the host order on every supported target */
        size_t nw = fwrite(logits, sizeof(float), (size_t)n_tok * V, lf);
        int lok = nw == (size_t)n_tok * V;
        FILE *lf2 = lf;
        lf = NULL;
        if (commit_file(lf2, ltmp, logits_path, lok))
            goto out;
        if (rf) {
            FILE *rf2 = rf;
            rf = NULL;
            if (commit_file(rf2, rtmp, routing_path, !ro.err))
                goto out;
        }
        ret = 0;
        goto out;
    }

    logits = malloc((size_t)V * sizeof(float));
    hist = malloc((size_t)(n_tok + n_predict + 1) * sizeof(int32_t));
    if (logits == NULL || hist == NULL) {
        fprintf(stderr, "moectl: out of memory\n");
        goto out;
    }
    if (moe_sampler_create(&smp, &sp, V, &d)) {
        fprintf(stderr, "moectl: %s\n", d.msg);
        goto out;
    }
    memcpy(hist, tokens, (size_t)n_tok * sizeof(int32_t));
    int64_t n_hist = n_tok;
    struct route_out rro = { 0 };
    if (trace_path) {
        if ((rf = open_tmp(trace_path, rtmp, sizeof(rtmp))) == NULL)
            goto out;
        rro.f = rf;
        write_trace_header(rf, cfg);
    }
    moe_route_fn rfn = rf ? write_route : NULL;
    double t0 = now_s();
    if (n_predict > 0 && moe_model_forward(m, s, tokens, n_tok, logits, false, rfn, &rro, &d)) {
        fprintf(stderr, "moectl: %s\n", d.msg);
        goto out;
    }
    double t1 = now_s();
    struct moe_detok_stream ds;
    char piece[1024];
    if (tok)
        moe_detok_stream_init(&ds, tok, false);
    for (long i = 0; i < n_predict; i++) {
        int32_t t = moe_sampler_sample(smp, logits, hist, n_hist);
        hist[n_hist++] = t;
        if (tok) {
            if (moe_tokenizer_is_eog(tok, t))
                break;
            size_t pl = 0;
            if (moe_detok_stream_push(&ds, t, piece, sizeof(piece), &pl) == 0)
                fwrite(piece, 1, pl, stdout);
        } else {
            printf(i ? " %d" : "%d", t);
        }
        fflush(stdout);
        rro.base = n_hist - 1; /* the token's position in the routing lines */
        if (i + 1 < n_predict && moe_model_forward(m, s, &t, 1, logits, false, rfn, &rro, &d)) {
            fprintf(stderr, "\nmoectl: %s\n", d.msg);
            goto out;
        }
    }
    if (tok) {
        size_t pl = 0;
        if (moe_detok_stream_flush(&ds, piece, sizeof(piece), &pl) == 0)
            fwrite(piece, 1, pl, stdout);
    }
    printf("\n");
    fflush(stdout);
    if (rf) {
        FILE *rf2 = rf;
        rf = NULL;
        if (commit_file(rf2, rtmp, trace_path, !rro.err))
            goto out;
    }
    if (stats) {
        double t2 = now_s();
        struct moe_cache_stats cs;
        if (moe_model_cache_stats(m, &cs))
            fprintf(stderr, "{\"cache_slots\": %d, \"slot_bytes\": %zu, \"hits\": %llu, \"misses\": %llu,"
                    " \"hit_rate\": %.4f, \"evictions\": %llu, \"bytes_loaded\": %llu, \"stall_s\": %.6f,"
                    " \"load_errors\": %llu, \"prefetch_issued\": %llu, \"prefetch_used\": %llu,"
                    " \"prefetch_wasted\": %llu, \"prefetch_dropped\": %llu, \"prefetch_cancelled\": %llu,"
                    " \"host_hits\": %llu,"
                    " \"host_inserts\": %llu}\n", cs.n_slots, cs.slot_bytes,
                    (unsigned long long)cs.hits,
                    (unsigned long long)cs.misses,
                    cs.hits + cs.misses ? (double)cs.hits / (double)(cs.hits + cs.misses) : 0.0,
                    (unsigned long long)cs.evictions, (unsigned long long)cs.bytes_loaded, cs.stall_s,
                    (unsigned long long)cs.loads_failed, (unsigned long long)cs.prefetch_issued,
                    (unsigned long long)cs.prefetch_used, (unsigned long long)cs.prefetch_wasted,
                    (unsigned long long)cs.prefetch_dropped, (unsigned long long)cs.prefetch_cancelled,
                    (unsigned long long)cs.host_hits,
                    (unsigned long long)cs.host_inserts);
        uint64_t pf_on = 0, pf_off = 0;
        if (moe_model_prefetch_steps(m, &pf_on, &pf_off))
            fprintf(stderr, "{\"prefetch_steps_on\": %llu, \"prefetch_steps_off\": %llu}\n",
                    (unsigned long long)pf_on, (unsigned long long)pf_off);
        static struct moe_cache_layer_stats ls[1024];
        int nl = moe_model_cache_layer_stats_ex(m, ls, 1024);
        if (nl > 0) {
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
        /* the last sampled token is not run through the model */
        long n_dec = n_predict > 1 ? n_predict - 1 : 0;
        fprintf(stderr, "{\"prefill_tokens\": %" PRId64 ", \"prefill_s\": %.6f, \"prefill_tok_s\": %.3f,"
                " \"decode_tokens\": %ld, \"decode_s\": %.6f, \"decode_tok_s\": %.3f, \"simd\": \"%s\"}\n",
                n_tok, t1 - t0, (double)n_tok / (t1 - t0), n_dec, t2 - t1,
                n_dec ? (double)n_dec / (t2 - t1) : 0.0, moe_vecdot_impl());
    }
    ret = 0;
out:
    if (lf) {
        fclose(lf);
        unlink(ltmp);
    }
    if (rf) {
        fclose(rf);
        unlink(rtmp);
    }
    moe_sampler_free(smp);
    moe_tokenizer_free(tok);
    moe_free(rendered);
    free(hist);
    free(logits);
    moe_seq_free(s);
    moe_model_free(m);
    free(tokens);
    return ret;
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
