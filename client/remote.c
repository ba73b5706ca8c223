/* moectl's daemon commands: complete, chat (without --model), stats, health.
 * They speak to moed through client/moe_client.h. Exit codes: 0 success,
 * 1 the server answered with an error (its message printed), 2 usage error,
 * 3 cannot reach the daemon. */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/cli.h"
#include "client/moe_client.h"

enum { EXIT_SERVER = 1, EXIT_USAGE = 2, EXIT_CONNECT = 3 };

struct common {
    const char *socket;
    long n;
    double temp, top_p, min_p;
    long top_k;
    long long seed;
    bool have_temp, have_top_p, have_min_p, have_top_k, have_seed, have_n;
    bool stream, json;
    const char *prompt, *system;
    const char *stop[8];
    int n_stop;
};

enum { O_SOCKET = 1000, O_TEMP, O_TOPK, O_TOPP, O_MINP, O_SEED, O_STREAM, O_JSON, O_STOP, O_SYSTEM };

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
    { "prompt", required_argument, NULL, 'p' },
    { "help", no_argument, NULL, 'h' },
    { 0, 0, 0, 0 },
};

static int num(const char *flag, const char *v, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (end == v || *end || errno || !(x >= lo && x <= hi)) {
        fprintf(stderr, "moectl: %s: '%s' is not a number in %g..%g\n", flag, v, lo, hi);
        return -1;
    }
    *out = x;
    return 0;
}

/* Parses the shared flags; 0 ok, 1 --help, -1 usage error. */
static int parse(int argc, char **argv, struct common *o)
{
    memset(o, 0, sizeof(*o));
    optind = 1;
    opterr = 1;
    int ch;
    double x;
    while ((ch = getopt_long(argc, argv, "p:n:h", long_opts, NULL)) != -1) {
        switch (ch) {
        case 'p': o->prompt = optarg; break;
        case 'n':
            if (num("-n", optarg, 1, 1 << 20, &x)) return -1;
            o->n = (long)x;
            o->have_n = true;
            break;
        case O_SOCKET: o->socket = optarg; break;
        case O_TEMP: if (num("--temp", optarg, 0, 2, &o->temp)) return -1; o->have_temp = true; break;
        case O_TOPP: if (num("--top-p", optarg, 0, 1, &o->top_p)) return -1; o->have_top_p = true; break;
        case O_MINP: if (num("--min-p", optarg, 0, 1, &o->min_p)) return -1; o->have_min_p = true; break;
        case O_TOPK:
            if (num("--top-k", optarg, -1, 1 << 20, &x)) return -1;
            o->top_k = (long)x;
            o->have_top_k = true;
            break;
        case O_SEED:
            if (num("--seed", optarg, -9.2e18, 9.2e18, &x)) return -1;
            o->seed = (long long)x;
            o->have_seed = true;
            break;
        case O_STREAM: o->stream = true; break;
        case O_JSON: o->json = true; break;
        case O_STOP:
            if (o->n_stop == 8) {
                fprintf(stderr, "moectl: --stop: at most 8\n");
                return -1;
            }
            o->stop[o->n_stop++] = optarg;
            break;
        case O_SYSTEM: o->system = optarg; break;
        case 'h': return 1;
        default: return -1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "moectl: unexpected argument '%s'\n", argv[optind]);
        return -1;
    }
    return 0;
}

static void add_sampling(json_t *req, const struct common *o)
{
    if (o->have_n)
        json_object_set_new(req, "max_tokens", json_integer(o->n));
    if (o->have_temp)
        json_object_set_new(req, "temperature", json_real(o->temp));
    if (o->have_top_p)
        json_object_set_new(req, "top_p", json_real(o->top_p));
    if (o->have_min_p)
        json_object_set_new(req, "min_p", json_real(o->min_p));
    if (o->have_top_k)
        json_object_set_new(req, "top_k", json_integer(o->top_k));
    if (o->have_seed)
        json_object_set_new(req, "seed", json_integer(o->seed));
    if (o->n_stop) {
        json_t *a = json_array();
        for (int i = 0; i < o->n_stop; i++)
            json_array_append_new(a, json_string(o->stop[i]));
        json_object_set_new(req, "stop", a);
    }
}

static int client_for(const struct common *o, struct moe_client *c)
{
    struct moe_diag d = { 0 };
    if (moe_client_init(c, o->socket, &d) != 0) {
        fprintf(stderr, "moectl: %s\n", d.msg);
        return EXIT_USAGE;
    }
    return 0;
}

/* Exit code for a failed call, with its message. */
static int call_failed(int rc, const struct moe_diag *d)
{
    fprintf(stderr, "moectl: %s\n", d->msg);
    return rc == -ENOENT || rc == -ECONNREFUSED || rc == -EACCES || rc == -ENOTSOCK ? EXIT_CONNECT
                                                                                   : EXIT_SERVER;
}

static int server_error(const struct moe_client_resp *r)
{
    char buf[1024];
    const char *m = moe_client_error_message(r->body, buf, sizeof(buf));
    fprintf(stderr, "moectl: moed answered %d: %s%s\n", r->status, m ? m : r->body ? r->body : "",
            r->retry_after >= 0 ? " (retry later)" : "");
    return EXIT_SERVER;
}

static char *read_stdin(void)
{
    size_t cap = 4096, n = 0;
    char *b = malloc(cap);
    size_t got;
    while (b && (got = fread(b + n, 1, cap - n - 1, stdin)) > 0) {
        n += got;
        if (n + 1 == cap) {
            char *nb = realloc(b, cap *= 2);
            if (nb == NULL) {
                free(b);
                return NULL;
            }
            b = nb;
        }
    }
    if (b)
        b[n] = '\0';
    return b;
}

/* ---- streaming output ------------------------------------------------ */

struct stream_out {
    bool chat;
    char *text;            /* everything received (for the chat history) */
    size_t len;
    char err[512];
};

static int on_event(void *ud, const char *data, size_t len)
{
    struct stream_out *so = ud;
    if (len == 6 && memcmp(data, "[DONE]", 6) == 0)
        return 0;
    json_t *j = json_loadb(data, len, 0, NULL);
    if (j == NULL)
        return 0;
    const char *em = json_string_value(json_object_get(json_object_get(j, "error"), "message"));
    if (em)
        snprintf(so->err, sizeof(so->err), "%s", em);
    json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
    json_t *t = so->chat ? json_object_get(json_object_get(c0, "delta"), "content")
                         : json_object_get(c0, "text");
    if (json_is_string(t) && json_string_length(t) > 0) {
        const size_t n = json_string_length(t);
        fwrite(json_string_value(t), 1, n, stdout);
        fflush(stdout);
        char *nt = realloc(so->text, so->len + n + 1);
        if (nt) {
            memcpy(nt + so->len, json_string_value(t), n);
            so->len += n;
            nt[so->len] = '\0';
            so->text = nt;
        }
    }
    json_decref(j);
    return 0;
}

/* Sends req to target, streaming or not; prints the text (or the JSON). */
static int generate(const struct moe_client *c, const char *target, json_t *req, bool chat,
                    bool stream, bool raw_json, char **text_out)
{
    json_object_set_new(req, "stream", json_boolean(stream));
    char *body = json_dumps(req, JSON_COMPACT);
    if (body == NULL) {
        fprintf(stderr, "moectl: out of memory\n");
        return EXIT_SERVER;
    }
    struct moe_client_resp r;
    struct moe_diag d = { 0 };
    int rc, ret = 0;
    if (stream) {
        struct stream_out so = { .chat = chat };
        rc = moe_client_stream(c, target, body, strlen(body), on_event, &so, &r, &d);
        if (rc)
            ret = call_failed(rc, &d);
        else if (r.status != 200)
            ret = server_error(&r);
        else if (so.err[0]) {
            fprintf(stderr, "\nmoectl: %s\n", so.err);
            ret = EXIT_SERVER;
        } else
            printf("\n");
        if (text_out && ret == 0)
            *text_out = so.text;
        else
            free(so.text);
    } else {
        rc = moe_client_request(c, "POST", target, body, strlen(body), &r, &d);
        if (rc) {
            ret = call_failed(rc, &d);
        } else if (r.status != 200) {
            ret = server_error(&r);
        } else if (raw_json) {
            printf("%s\n", r.body);
        } else {
            json_t *j = json_loads(r.body, 0, NULL);
            json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
            json_t *t = chat ? json_object_get(json_object_get(c0, "message"), "content")
                             : json_object_get(c0, "text");
            if (!json_is_string(t)) {
                fprintf(stderr, "moectl: unexpected answer: %.200s\n", r.body);
                ret = EXIT_SERVER;
            } else {
                fwrite(json_string_value(t), 1, json_string_length(t), stdout);
                printf("\n");
                if (text_out)
                    *text_out = strdup(json_string_value(t));
            }
            json_decref(j);
        }
    }
    if (rc == 0)
        moe_client_resp_free(&r);
    free(body);
    return ret;
}

static const char sampling_help[] =
    "  -n N                 max tokens to generate (default: the daemon's max_tokens_default)\n"
    "  --temp T             temperature 0..2 (0: greedy; default 1, as OpenAI)\n"
    "  --top-k K --top-p P --min-p P --seed S --stop TEXT (repeatable)\n"
    "  --socket PATH        daemon socket (default $MOED_SOCKET, $XDG_RUNTIME_DIR/moed.sock,\n"
    "                       ./moed.sock)\n"
    "Exit codes: 0 success, 1 the daemon answered with an error, 2 usage error, 3 cannot\n"
    "reach the daemon.\n";

int moectl_complete_main(int argc, char **argv)
{
    struct common o;
    int p = parse(argc, argv, &o);
    if (p != 0) {
        FILE *f = p > 0 ? stdout : stderr;
        fprintf(f, "usage: moectl complete [-p PROMPT] [--stream] [--json] [options]\n"
                   "Sends a completion request to moed (the prompt from -p, else stdin) and prints\n"
                   "the generated text (--json: the whole response).\n%s", sampling_help);
        return p > 0 ? 0 : EXIT_USAGE;
    }
    struct moe_client c;
    int rc = client_for(&o, &c);
    if (rc)
        return rc;
    char *in = o.prompt ? NULL : read_stdin();
    if (!o.prompt && !in) {
        fprintf(stderr, "moectl: cannot read the prompt from stdin\n");
        return EXIT_USAGE;
    }
    json_t *req = json_object();
    json_t *pj = json_string(o.prompt ? o.prompt : in);
    if (pj == NULL) {
        fprintf(stderr, "moectl: the prompt is not valid UTF-8\n");
        free(in);
        json_decref(req);
        return EXIT_USAGE;
    }
    json_object_set_new(req, "prompt", pj);
    add_sampling(req, &o);
    rc = generate(&c, "/v1/completions", req, false, o.stream && !o.json, o.json, NULL);
    json_decref(req);
    free(in);
    return rc;
}

/* moectl chat: with --model, the offline command (client/eval.c); without,
 * a conversation with the daemon. */
int moectl_chat_dispatch(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--model") == 0 || strncmp(argv[i], "--model=", 8) == 0)
            return moectl_chat_main(argc, argv);
    struct common o;
    int p = parse(argc, argv, &o);
    if (p != 0) {
        FILE *f = p > 0 ? stdout : stderr;
        fprintf(f, "usage: moectl chat [-p PROMPT] [--system TEXT] [options]\n"
                   "       moectl chat --model M --prompt TEXT ...   (offline, no daemon: see\n"
                   "                                                  moectl run --help)\n"
                   "Talks to moed: with -p, one question and its streamed answer; without, an\n"
                   "interactive conversation (one line per turn, history kept; end with EOF).\n%s",
                sampling_help);
        return p > 0 ? 0 : EXIT_USAGE;
    }
    struct moe_client c;
    int rc = client_for(&o, &c);
    if (rc)
        return rc;
    json_t *msgs = json_array();
    if (o.system)
        json_array_append_new(msgs, json_pack("{s:s, s:s}", "role", "system", "content", o.system));
    char line[65536];
    for (;;) {
        const char *q = o.prompt;
        if (q == NULL) {
            fprintf(stderr, "> ");
            if (fgets(line, sizeof(line), stdin) == NULL)
                break;
            line[strcspn(line, "\n")] = '\0';
            if (line[0] == '\0')
                continue;
            q = line;
        }
        json_t *qj = json_string(q);
        if (qj == NULL) {
            fprintf(stderr, "moectl: the message is not valid UTF-8\n");
            rc = EXIT_USAGE;
            break;
        }
        json_array_append_new(msgs, json_pack("{s:s, s:o}", "role", "user", "content", qj));
        json_t *req = json_object();
        json_object_set(req, "messages", msgs);
        add_sampling(req, &o);
        char *answer = NULL;
        rc = generate(&c, "/v1/chat/completions", req, true, !o.json, o.json, &answer);
        json_decref(req);
        if (rc) {
            free(answer);
            break;
        }
        json_t *aj = json_string(answer ? answer : "");
        json_array_append_new(msgs, json_pack("{s:s, s:o}", "role", "assistant", "content",
                                              aj ? aj : json_string("")));
        free(answer);
        if (o.prompt)
            break;
    }
    json_decref(msgs);
    return rc;
}

static int get_and_print(int argc, char **argv, const char *target, const char *what)
{
    struct common o;
    int p = parse(argc, argv, &o);
    if (p != 0) {
        FILE *f = p > 0 ? stdout : stderr;
        fprintf(f, "usage: moectl %s [--socket PATH]\nPrints %s.\n%s", argv[0], what, sampling_help);
        return p > 0 ? 0 : EXIT_USAGE;
    }
    struct moe_client c;
    int rc = client_for(&o, &c);
    if (rc)
        return rc;
    struct moe_client_resp r;
    struct moe_diag d = { 0 };
    rc = moe_client_request(&c, "GET", target, NULL, 0, &r, &d);
    if (rc)
        return call_failed(rc, &d);
    int ret = 0;
    if (r.status != 200) {
        ret = server_error(&r);
    } else {
        json_t *j = json_loads(r.body, 0, NULL);
        char *pretty = j ? json_dumps(j, JSON_INDENT(2)) : NULL;
        printf("%s\n", pretty ? pretty : r.body);
        free(pretty);
        json_decref(j);
    }
    moe_client_resp_free(&r);
    return ret;
}

int moectl_stats_main(int argc, char **argv)
{
    return get_and_print(argc, argv, "/v1/moed/stats",
                         "the daemon's counters: requests, tokens, expert cache per tier and layer");
}

int moectl_health_main(int argc, char **argv)
{
    return get_and_print(argc, argv, "/health", "the daemon's health ({\"status\": \"ok\"})");
}
