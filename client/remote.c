/* moectl's daemon commands: complete, chat (without --model), stats, health.
 * They talk to moed through client/moe_client.h. Exit codes: 0 success,
 * 1 the daemon answered with an error (its message printed) or with something
 * that is not a valid answer, 2 usage error, 3 the daemon cannot be reached.
 *
 * Sampling values are checked to be numbers here and judged by the daemon:
 * one place decides the ranges, and its error message says what it expects. */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "client/cli.h"
#include "client/moe_client.h"
#include "common/alloc.h"
#include "common/buf.h"

enum { EXIT_OK = 0, EXIT_SERVER = 1, EXIT_USAGE = 2, EXIT_CONNECT = 3 };

#define MAX_STOP 8

/* What the four commands accept; each takes the subset its usage names. */
enum {
    F_GEN = 1,              /* -n and the sampling flags, --stop */
    F_PROMPT = 2,           /* -p */
    F_STREAM = 4,           /* --stream */
    F_JSON = 8,             /* --json */
    F_SYSTEM = 16,          /* --system */
    F_LOGPROBS = 32,        /* --logprobs */
};

struct opts {
    const char *socket;
    const char *prompt, *system;
    bool stream, json;
    struct moe_client_params p;
    const char *stop[MAX_STOP];
};

enum { O_SOCKET = 1000, O_TEMP, O_TOPK, O_TOPP, O_MINP, O_SEED, O_STREAM, O_JSON, O_STOP,
       O_SYSTEM, O_LOGPROBS };

static const struct option long_opts[] = {
    { "socket", required_argument, NULL, O_SOCKET },
    { "temp", required_argument, NULL, O_TEMP },
    { "top-k", required_argument, NULL, O_TOPK },
    { "top-p", required_argument, NULL, O_TOPP },
    { "min-p", required_argument, NULL, O_MINP },
    { "seed", required_argument, NULL, O_SEED },
    { "stream", no_argument, NULL, O_STREAM },
    { "json", no_argument, NULL, O_JSON },
    { "stop", required_argument, NULL, O_STOP },
    { "system", required_argument, NULL, O_SYSTEM },
    { "logprobs", required_argument, NULL, O_LOGPROBS },
    { "prompt", required_argument, NULL, 'p' },
    { "help", no_argument, NULL, 'h' },
    { 0, 0, 0, 0 },
};

static int parse_real(const char *flag, const char *v, double *out)
{
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (end == v || *end || errno || !isfinite(x)) {
        fprintf(stderr, "moectl: %s '%s': expected a number\n", flag, v);
        return -1;
    }
    *out = x;
    return 0;
}

static int parse_ll(const char *flag, const char *v, long long lo, long long hi, long long *out)
{
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (end == v || *end || errno || x < lo || x > hi) {
        fprintf(stderr, "moectl: %s '%s': expected an integer in %lld..%lld\n", flag, v, lo, hi);
        return -1;
    }
    *out = x;
    return 0;
}

/* 0 ok, 1 --help, -1 usage error (already reported). */
static int parse(int argc, char **argv, unsigned allowed, struct opts *o)
{
    memset(o, 0, sizeof(*o));
    o->p.stop = o->stop;
    optind = 1;
    opterr = 1;
    int ch;
    long long v;
    int li = -1;
    while ((ch = getopt_long(argc, argv, "p:n:h", long_opts, &li)) != -1) {
        unsigned need = 0;
        switch (ch) {
        case 'p': need = F_PROMPT; o->prompt = optarg; break;
        case 'n':
            need = F_GEN;
            if (parse_ll("-n", optarg, 1, INT_MAX, &v))
                return -1;
            o->p.max_tokens = (int)v;
            break;
        case O_TEMP:
            need = F_GEN;
            if (parse_real("--temp", optarg, &o->p.temperature))
                return -1;
            o->p.has_temperature = true;
            break;
        case O_TOPP:
            need = F_GEN;
            if (parse_real("--top-p", optarg, &o->p.top_p))
                return -1;
            o->p.has_top_p = true;
            break;
        case O_MINP:
            need = F_GEN;
            if (parse_real("--min-p", optarg, &o->p.min_p))
                return -1;
            o->p.has_min_p = true;
            break;
        case O_TOPK:
            need = F_GEN;
            if (parse_ll("--top-k", optarg, INT_MIN, INT_MAX, &v))
                return -1;
            o->p.top_k = (int)v;
            o->p.has_top_k = true;
            break;
        case O_SEED:
            need = F_GEN;
            if (parse_ll("--seed", optarg, LLONG_MIN, LLONG_MAX, &v))
                return -1;
            o->p.seed = v;
            o->p.has_seed = true;
            break;
        case O_STOP:
            need = F_GEN;
            if (o->p.n_stop == MAX_STOP) {
                fprintf(stderr, "moectl: --stop: at most %d\n", MAX_STOP);
                return -1;
            }
            o->stop[o->p.n_stop++] = optarg;
            break;
        case O_LOGPROBS:
            need = F_LOGPROBS;
            if (parse_ll("--logprobs", optarg, 0, INT_MAX, &v))
                return -1;
            o->p.logprobs = (int)v;
            break;
        case O_SOCKET: o->socket = optarg; break;
        case O_STREAM: need = F_STREAM; o->stream = true; break;
        case O_JSON: need = F_JSON; o->json = true; break;
        case O_SYSTEM: need = F_SYSTEM; o->system = optarg; break;
        case 'h': return 1;
        default: return -1;   /* getopt printed why */
        }
        if ((need & allowed) != need) {
            if (ch == 'p' || ch == 'n')
                fprintf(stderr, "moectl %s: option '-%c' does not apply here\n", argv[0], ch);
            else
                fprintf(stderr, "moectl %s: option '--%s' does not apply here\n", argv[0],
                        long_opts[li].name);
            return -1;
        }
        li = -1;
    }
    if (optind < argc) {
        fprintf(stderr, "moectl %s: unexpected argument '%s'\n", argv[0], argv[optind]);
        return -1;
    }
    return 0;
}

static int client_for(const struct opts *o, struct moe_client *c)
{
    struct moe_diag d = { 0 };
    if (moe_client_init(c, o->socket, &d) != 0) {
        fprintf(stderr, "moectl: --socket: %s\n", d.msg);
        return EXIT_USAGE;
    }
    return EXIT_OK;
}

/* The exit code for a failed call, its message printed. */
static int failed(const struct moe_client_err *e)
{
    fprintf(stderr, "moectl: %s\n", e->msg);
    return e->connect ? EXIT_CONNECT : EXIT_SERVER;
}

/* A prompt from stdin is bounded (just under 1 GiB, as before), so that a
 * runaway pipe ends in an error instead of exhausting memory. */
#define STDIN_PROMPT_MAX (((size_t)1 << 30) - 1)

/* ud: a bool set once something was printed */
static int on_delta(void *ud, const char *text, size_t len)
{
    *(bool *)ud = true;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    return 0;
}

/* --json --stream: each event's JSON on a line of its own (JSON lines). */
static int on_raw_event(void *ud, const char *data, size_t len)
{
    (void)ud;
    fwrite(data, 1, len, stdout);
    fputc('\n', stdout);
    fflush(stdout);
    return 0;
}

static const char gen_help[] =
    "  -n N                 max tokens to generate (default: the daemon's max_tokens_default)\n"
    "  --temp T             temperature (0: greedy; the daemon's default is 1, as OpenAI's)\n"
    "  --top-k K --top-p P --min-p P --seed S\n"
    "                       sampling, as moectl run; the daemon checks the ranges\n"
    "  --stop TEXT          stop before TEXT (repeatable, at most 8)\n";

static const char socket_help[] =
    "  --socket PATH|URL    moed's socket, or http://HOST:PORT for its TCP listener\n"
    "                       (default $MOED_HOST, else $MOED_SOCKET, else\n"
    "                       $XDG_RUNTIME_DIR/moed.sock, else ./moed.sock); the API key\n"
    "                       (Bearer) is $MOED_API_KEY\n"
    "Exit codes: 0 success, 1 moed answered with an error, 2 usage error, 3 moed cannot be\n"
    "reached.\n";

/* ---- complete ----------------------------------------------------------------- */

int moectl_complete_main(int argc, char **argv)
{
    struct opts o;
    int p = parse(argc, argv, F_GEN | F_PROMPT | F_STREAM | F_JSON | F_LOGPROBS, &o);
    if (p != 0) {
        FILE *f = p > 0 ? stdout : stderr;
        fprintf(f, "usage: moectl complete [-p PROMPT] [-n N] [--stream] [--json] [options]\n"
                   "Sends a completion request (POST /v1/completions) to moed, the prompt from -p\n"
                   "or else all of stdin, and prints the generated text and a newline.\n"
                   "  -p, --prompt TEXT    the prompt (default: read stdin to its end)\n"
                   "  --stream             print the text as it is generated\n"
                   "  --json               print moed's JSON answer instead of the text (with\n"
                   "                       --stream: each event's JSON on a line of its own)\n"
                   "  --logprobs N         ask for the N most likely tokens at each position\n"
                   "                       (seen with --json)\n%s%s", gen_help, socket_help);
        return p > 0 ? EXIT_OK : EXIT_USAGE;
    }
    struct moe_client c;
    int rc = client_for(&o, &c);
    if (rc)
        return rc;
    char *in = NULL;
    if (o.prompt == NULL) {
        struct moe_buf b;
        moe_buf_init(&b, STDIN_PROMPT_MAX);
        size_t in_len = 0;
        int e = moe_buf_read_stream(&b, stdin);
        if (e == 0 && (in = moe_buf_take(&b, &in_len)) == NULL)
            e = -ENOMEM;
        moe_buf_free(&b);
        if (e != 0) {
            fprintf(stderr, "moectl: cannot read the prompt from stdin: %s\n",
                    e == MOE_ELIMIT ? "longer than 1 GiB" : moe_strerror(e));
            return EXIT_USAGE;
        }
        if (strlen(in) != in_len) {
            fprintf(stderr, "moectl: the prompt on stdin contains a NUL byte\n");
            moe_free(in);
            return EXIT_USAGE;
        }
    }
    const char *prompt = o.prompt ? o.prompt : in;
    struct moe_client_err e;
    if (o.json) {
        struct moe_diag d = { 0 };
        char *body = NULL, *answer = NULL;
        if (moe_client_completion_body(prompt, &o.p, o.stream, &body, &d) != 0) {
            fprintf(stderr, "moectl: %s\n", d.msg);
            rc = EXIT_USAGE;
        } else if (o.stream) {
            rc = moe_client_call_stream(&c, "/v1/completions", body, strlen(body), on_raw_event,
                                        NULL, &e) ? failed(&e) : EXIT_OK;
        } else {
            rc = moe_client_call(&c, "POST", "/v1/completions", body, strlen(body), &answer, &e)
                     ? failed(&e) : EXIT_OK;
            if (rc == EXIT_OK)
                printf("%s\n", answer);
        }
        free(answer);
        free(body);
        moe_free(in);
        return rc;
    }
    struct moe_client_result res;
    bool printed = false;
    int crc = moe_client_complete(&c, prompt, &o.p, o.stream ? on_delta : NULL, &printed, &res, &e);
    if (crc == -EINVAL) {
        fprintf(stderr, "moectl: %s\n", e.msg);
        rc = EXIT_USAGE;
    } else if (crc) {
        if (printed)
            fputc('\n', stdout);   /* end what was printed of a broken stream */
        rc = failed(&e);
    } else {
        if (!o.stream)
            fwrite(res.text, 1, res.len, stdout);
        fputc('\n', stdout);
        moe_client_result_free(&res);
    }
    moe_free(in);
    return rc;
}

/* ---- chat ---------------------------------------------------------------------- */

struct history {
    struct moe_client_message *m;
    char **owned;           /* the strings behind m[i].content */
    size_t n, cap;
};

static int history_push(struct history *h, const char *role, const char *content)
{
    /* m and owned share one capacity: both grow together */
    size_t cap_m = h->cap, cap_o = h->cap;
    if (moe_array_grow((void **)&h->m, &cap_m, h->n + 1, sizeof(*h->m), 0) != 0 ||
        moe_array_grow((void **)&h->owned, &cap_o, cap_m, sizeof(*h->owned), 0) != 0)
        return -ENOMEM;
    h->cap = cap_m;
    char *s = strdup(content);
    if (s == NULL)
        return -ENOMEM;
    h->owned[h->n] = s;
    h->m[h->n++] = (struct moe_client_message){ .role = role, .content = s };
    return 0;
}

static void history_pop(struct history *h)
{
    free(h->owned[--h->n]);
}

static void history_free(struct history *h)
{
    while (h->n)
        history_pop(h);
    moe_free(h->m);
    moe_free(h->owned);
}

/* One turn: the answer streamed to stdout (or the JSON printed) and kept. */
static int chat_turn(const struct moe_client *c, const struct opts *o, struct history *h)
{
    struct moe_client_err e;
    struct moe_client_result res;
    int rc;
    if (o->json) {
        /* the JSON printed, the reply taken from it for the next turn */
        rc = moe_client_chat(c, h->m, h->n, &o->p, NULL, NULL, &res, &e);
        if (rc == -EINVAL) {
            fprintf(stderr, "moectl: %s\n", e.msg);
            return EXIT_USAGE;
        }
        if (rc)
            return failed(&e);
        printf("%s\n", res.raw);
    } else {
        bool printed = false;
        rc = moe_client_chat(c, h->m, h->n, &o->p, on_delta, &printed, &res, &e);
        if (rc == -EINVAL) {
            fprintf(stderr, "moectl: %s\n", e.msg);
            return EXIT_USAGE;
        }
        if (rc == 0 || printed)
            fputc('\n', stdout);
        fflush(stdout);
        if (rc)
            return failed(&e);
    }
    rc = history_push(h, "assistant", res.text);
    moe_client_result_free(&res);
    if (rc) {
        fprintf(stderr, "moectl: out of memory\n");
        return EXIT_SERVER;
    }
    return EXIT_OK;
}

/* moectl chat: with --model, the offline command (client/eval.c); without,
 * a conversation with the daemon. */
int moectl_chat_dispatch(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0)
            break;
        if (strcmp(argv[i], "--model") == 0 || strncmp(argv[i], "--model=", 8) == 0)
            return moectl_chat_main(argc, argv);
    }
    struct opts o;
    int p = parse(argc, argv, F_GEN | F_PROMPT | F_JSON | F_SYSTEM, &o);
    if (p != 0) {
        FILE *f = p > 0 ? stdout : stderr;
        fprintf(f, "usage: moectl chat [-p PROMPT] [--system TEXT] [-n N] [--json] [options]\n"
                   "       moectl chat --model M --prompt TEXT ...   (offline, no daemon; see\n"
                   "                                                  moectl run --help)\n"
                   "Talks to moed (POST /v1/chat/completions), the answer streamed as it is\n"
                   "generated. With -p, one question; without, a conversation read from stdin,\n"
                   "one line per turn, the history kept and sent with each turn, until EOF.\n"
                   "In a conversation an error from moed ends the turn, not the conversation\n"
                   "(the exit code is then 1).\n"
                   "  -p, --prompt TEXT    one question\n"
                   "  --system TEXT        a system message before the first turn\n"
                   "  --json               print moed's JSON answer to each turn (not streamed)\n"
                   "%s%s", gen_help, socket_help);
        return p > 0 ? EXIT_OK : EXIT_USAGE;
    }
    struct moe_client c;
    int rc = client_for(&o, &c);
    if (rc)
        return rc;
    struct history h = { 0 };
    if (o.system && history_push(&h, "system", o.system) != 0) {
        fprintf(stderr, "moectl: out of memory\n");
        return EXIT_SERVER;
    }
    if (o.prompt) {
        rc = history_push(&h, "user", o.prompt) ? EXIT_SERVER : chat_turn(&c, &o, &h);
        history_free(&h);
        return rc;
    }
    const bool tty = isatty(STDIN_FILENO);
    char *line = NULL;
    size_t cap = 0;
    int worst = EXIT_OK;
    for (;;) {
        if (tty) {
            fputs("> ", stderr);
            fflush(stderr);
        }
        ssize_t n = getline(&line, &cap, stdin);
        if (n < 0)
            break;
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
            line[--n] = '\0';
        if (n == 0)
            continue;
        json_t *valid = strlen(line) == (size_t)n ? json_string(line) : NULL;
        json_decref(valid);
        if (valid == NULL) {
            fprintf(stderr, "moectl: a line that is not valid UTF-8 (or holds a NUL byte), "
                            "skipped\n");
            if (worst == EXIT_OK)
                worst = EXIT_USAGE;
            continue;
        }
        if (history_push(&h, "user", line) != 0) {
            fprintf(stderr, "moectl: out of memory\n");
            worst = EXIT_SERVER;
            break;
        }
        rc = chat_turn(&c, &o, &h);
        if (rc == EXIT_OK)
            continue;
        history_pop(&h);   /* the turn failed: the question is not part of the history */
        if (rc == EXIT_CONNECT) {
            worst = rc;
            break;         /* moed is gone */
        }
        if (worst == EXIT_OK || rc == EXIT_SERVER)
            worst = rc;   /* a server error outranks a usage error */
    }
    free(line);
    history_free(&h);
    return worst;
}

/* ---- stats, health --------------------------------------------------------------- */

static void print_pretty(const char *body)
{
    json_t *j = json_loads(body, JSON_ALLOW_NUL, NULL);
    char *pretty = j ? json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER) : NULL;
    printf("%s\n", pretty ? pretty : body);
    free(pretty);
    json_decref(j);
}

int moectl_stats_main(int argc, char **argv)
{
    struct opts o;
    int p = parse(argc, argv, 0, &o);
    if (p != 0) {
        FILE *f = p > 0 ? stdout : stderr;
        fprintf(f, "usage: moectl stats [--socket PATH]\n"
                   "Prints moed's counters (GET /v1/moed/stats) as indented JSON: the server,\n"
                   "requests and tokens, the expert cache per tier and layer.\n%s", socket_help);
        return p > 0 ? EXIT_OK : EXIT_USAGE;
    }
    struct moe_client c;
    int rc = client_for(&o, &c);
    if (rc)
        return rc;
    struct moe_client_err e;
    char *json;
    if (moe_client_stats(&c, &json, &e) != 0)
        return failed(&e);
    print_pretty(json);
    free(json);
    return EXIT_OK;
}

int moectl_health_main(int argc, char **argv)
{
    struct opts o;
    int p = parse(argc, argv, 0, &o);
    if (p != 0) {
        FILE *f = p > 0 ? stdout : stderr;
        fprintf(f, "usage: moectl health [--socket PATH]\n"
                   "Asks moed whether it is up (GET /health) and prints its answer,\n"
                   "{\"status\": \"ok\"}. While the model loads moed answers 503 (exit code 1).\n%s",
                socket_help);
        return p > 0 ? EXIT_OK : EXIT_USAGE;
    }
    struct moe_client c;
    int rc = client_for(&o, &c);
    if (rc)
        return rc;
    struct moe_client_err e;
    char *body;
    if (moe_client_call(&c, "GET", "/health", NULL, 0, &body, &e) != 0)
        return failed(&e);
    print_pretty(body);
    free(body);
    return EXIT_OK;
}
