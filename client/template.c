/* moectl template: render a conversation with a model's own Jinja chat
 * template (or a template file), printing the prompt exactly as moed would
 * build it, with no newline added.
 *
 *   moectl template [--model M] [--template FILE] [--name NAME]
 *                   --messages FILE.json [--tools FILE.json]
 *                   [--add-generation-prompt] [--vars JSON] [--bos TEXT] [--eos TEXT]
 *
 * --model takes the template from M's tokenizer.chat_template (--name NAME:
 * tokenizer.chat_template.NAME) and bos/eos from its vocabulary;
 * --template FILE overrides the template (then --model is optional);
 * --vars adds template variables (e.g. '{"enable_thinking": false}').
 * For comparing with Python's jinja2 (tests/parity/test_jinja_ref):
 * --strict renders exactly as transformers does (no llama.cpp extensions,
 * tool-call arguments as given), --bos/--eos set those texts and
 * --clock SECONDS fixes strftime_now's clock (UTC).
 * Exit codes: 0; 1 the template failed (syntax, runtime error or its
 * raise_exception, on stderr) or an input could not be read; 2 usage. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/cli.h"
#include "common/alloc.h"
#include "common/buf.h"
#include "io/gguf.h"
#include "model/chat_jinja.h"
#include "model/tokenizer.h"

#define USAGE "usage: moectl template [--model MODEL.gguf] [--template FILE] [--name NAME] --messages FILE.json\n" \
              "                       [--tools FILE.json] [--add-generation-prompt] [--vars JSON]\n" \
              "                       [--strict] [--bos TEXT] [--eos TEXT] [--clock SECONDS]\n"

struct targs {
    const char *model, *tfile, *name, *messages, *tools, *vars, *bos, *eos, *clock;
    bool add_gen, strict;
};

static int parse(int argc, char **argv, struct targs *a)
{
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i];
        const char **dst = !strcmp(o, "--model") ? &a->model : !strcmp(o, "--template") ? &a->tfile
                           : !strcmp(o, "--name") ? &a->name : !strcmp(o, "--messages") ? &a->messages
                           : !strcmp(o, "--tools") ? &a->tools : !strcmp(o, "--vars") ? &a->vars
                           : !strcmp(o, "--bos") ? &a->bos : !strcmp(o, "--eos") ? &a->eos
                           : !strcmp(o, "--clock") ? &a->clock : NULL;
        if (dst && i + 1 < argc) {
            *dst = argv[++i];
        } else if (!strcmp(o, "--add-generation-prompt")) {
            a->add_gen = true;
        } else if (!strcmp(o, "--strict")) {
            a->strict = true;
        } else if (!strcmp(o, "--help") || !strcmp(o, "-h")) {
            fputs(USAGE, stdout);
            return 0;
        } else {
            fprintf(stderr, "moectl template: unknown option or missing value: %s\n" USAGE, o);
            return 2;
        }
    }
    if (a->messages == NULL || (a->model == NULL && a->tfile == NULL)) {
        fputs(USAGE, stderr);
        return 2;
    }
    return -1;
}

static int read_file(const char *path, struct moe_buf *b)
{
    moe_buf_init(b, 64u << 20);
    int rc = moe_buf_read_file(b, path);
    if (rc == 0 && b->data == NULL)
        rc = moe_buf_append(b, "", 0);
    if (rc != 0)
        fprintf(stderr, "moectl template: %s: %s\n", path, rc == MOE_ELIMIT ? "larger than 64 MiB" :
                rc < 0 && rc > -4000 ? strerror(-rc) : moe_strerror(rc));
    return rc;
}

static void print_err(const struct moe_jinja_err *err)
{
    const char *what = err->kind == MOE_JINJA_RAISE ? "the template raised an exception"
                       : err->kind == MOE_JINJA_INPUT ? "bad input" : err->kind == MOE_JINJA_LIMIT ? "limit"
                       : err->kind == MOE_JINJA_SYNTAX ? "syntax error" : "error";
    if (err->line)
        fprintf(stderr, "moectl template: %s (line %d): %s\n", what, err->line, err->msg);
    else
        fprintf(stderr, "moectl template: %s: %s\n", what, err->msg);
}

/* transformers' environment exactly: exit 3 when the template raised */
static int render_strict(const struct targs *a, const char *src, size_t len, const struct moe_buf *msgs,
                         const struct moe_buf *tools)
{
    struct moe_jinja *t = NULL;
    struct moe_jinja_err err;
    struct moe_jinja_opts o;
    moe_jinja_opts_default(&o);
    o.clock = a->clock ? strtoll(a->clock, NULL, 10) : 0;
    char *out = NULL;
    size_t n = 0;
    int rc = moe_jinja_compile(src, len, &t, &err);
    if (rc == 0)
        rc = moe_jinja_render_chat(t, msgs->data, a->tools ? tools->data : NULL, a->add_gen, a->bos ? a->bos : "",
                                   a->eos ? a->eos : "", a->vars, &o, &out, &n, &err);
    moe_jinja_free(t);
    if (rc != 0) {
        print_err(&err);
        return err.kind == MOE_JINJA_RAISE ? 3 : 1;
    }
    rc = fwrite(out, 1, n, stdout) == n && fflush(stdout) == 0 ? 0 : 1;
    moe_free(out);
    return rc;
}

static int render(const struct targs *a, const char *src, size_t len, const struct moe_tokenizer *tok)
{
    struct moe_buf msgs = { 0 }, tools = { 0 };
    struct moe_chat_jinja *cj = NULL;
    struct moe_diag d = { 0 };
    char *out = NULL;
    size_t n = 0;
    int ret = 1;
    if (read_file(a->messages, &msgs) != 0 || (a->tools && read_file(a->tools, &tools) != 0))
        goto done;
    if (a->strict) {
        ret = render_strict(a, src, len, &msgs, &tools);
        goto done;
    }
    if (moe_chat_jinja_open(&cj, src, len, tok, &d) != 0) {
        fprintf(stderr, "moectl template: %s: %s\n", a->tfile ? a->tfile : a->model, d.msg);
        goto done;
    }
    struct moe_jinja_err err;
    if (moe_chat_jinja_apply(cj, msgs.data, a->tools ? tools.data : NULL, a->add_gen, a->vars, &out, &n,
                             &err) != 0) {
        print_err(&err);
        goto done;
    }
    ret = fwrite(out, 1, n, stdout) == n && fflush(stdout) == 0 ? 0 : 1;
done:
    moe_free(out);
    moe_chat_jinja_free(cj);
    moe_buf_free(&msgs);
    moe_buf_free(&tools);
    return ret;
}

int moectl_template_main(int argc, char **argv)
{
    struct targs a = { 0 };
    int rc = parse(argc, argv, &a);
    if (rc >= 0)
        return rc;
    struct moe_gguf *g = NULL;
    struct moe_tokenizer *tok = NULL;
    struct moe_buf tsrc = { 0 };
    struct moe_diag d = { 0 };
    const char *src = NULL;
    size_t len = 0;
    int ret = 1;
    if (a.model) {
        if (moe_gguf_open(&g, a.model, &d) != 0 || moe_tokenizer_load(&tok, g, &d) != 0) {
            fprintf(stderr, "moectl template: %s: %s\n", a.model, d.msg);
            goto done;
        }
    }
    if (a.tfile) {
        if (read_file(a.tfile, &tsrc) != 0)
            goto done;
        src = tsrc.data;
        len = tsrc.len;
    } else if (moe_chat_jinja_source(g, a.name, &src, &len, &d) != 0) {
        fprintf(stderr, "moectl template: %s: %s\n", a.model, d.msg);
        goto done;
    }
    ret = render(&a, src, len, tok);
done:
    moe_tokenizer_free(tok);
    moe_gguf_close(g);
    moe_buf_free(&tsrc);
    return ret;
}
