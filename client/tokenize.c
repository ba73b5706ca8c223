/* moectl tokenize / moectl detokenize: text <-> token ids with a model's (or
 * a vocab-only GGUF's) tokenizer, as llama.cpp computes them.
 *
 *   moectl tokenize --model M [--no-bos] [--special] [--file F | TEXT]
 *       prints exactly one JSON array of ids on stdout, e.g. [1, 15043]
 *       default: BOS/EOS added as the vocabulary says (llama.cpp add_special);
 *       --no-bos: none added; --special: control-token text such as
 *       <|im_start|> becomes its id (parse_special).
 *   moectl detokenize --model M [--special] [--remove-special] ID...
 *       prints the text and a newline; --special renders control tokens,
 *       --remove-special drops a leading BOS / trailing EOS.
 *
 * Exit codes: 0, 1 bad input (file, field or id named on stderr), 2 usage.
 * The entry points are declared here for client/moectl.c to wire in. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/alloc.h"
#include "common/buf.h"
#include "io/gguf.h"
#include "model/tokenizer.h"

int moectl_tokenize_main(int argc, char **argv);
int moectl_detokenize_main(int argc, char **argv);

#define TOK_USAGE "usage: moectl tokenize --model MODEL.gguf [--no-bos] [--special] [--file FILE | TEXT]\n"
#define DETOK_USAGE "usage: moectl detokenize --model MODEL.gguf [--special] [--remove-special] ID...\n"

static int load(const char *path, struct moe_tokenizer **tok)
{
    struct moe_diag diag = { 0 };
    struct moe_gguf *g = NULL;
    int rc = moe_gguf_open(&g, path, &diag);
    if (rc == 0)
        rc = moe_tokenizer_load(tok, g, &diag);
    moe_gguf_close(g);
    if (rc != 0) {
        fprintf(stderr, "moectl: %s\n", diag.msg[0] ? diag.msg : moe_strerror(rc));
        return 1;
    }
    return 0;
}

/* The whole file (or stdin for "-"), at most MOE_TOKENIZER_MAX_TEXT bytes
 * (the most moe_tokenize takes); 0 or -errno (-EFBIG past the limit). */
static int read_text(const char *path, struct moe_buf *b)
{
    moe_buf_init(b, MOE_TOKENIZER_MAX_TEXT);
    int rc = strcmp(path, "-") == 0 ? moe_buf_read_stream(b, stdin) : moe_buf_read_file(b, path);
    return rc == MOE_ELIMIT ? -EFBIG : rc;
}

int moectl_tokenize_main(int argc, char **argv)
{
    const char *model = NULL, *file = NULL, *text = NULL;
    bool add_special = true, parse_special = false;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--model") == 0 && i + 1 < argc) {
            model = argv[++i];
        } else if (strcmp(argv[i], "--file") == 0 && i + 1 < argc) {
            file = argv[++i];
        } else if (strcmp(argv[i], "--no-bos") == 0) {
            add_special = false;
        } else if (strcmp(argv[i], "--special") == 0) {
            parse_special = true;
        } else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            fputs(TOK_USAGE, stdout);
            return 0;
        } else if (strcmp(argv[i], "--") == 0 && i + 1 < argc && text == NULL) {
            text = argv[++i];
        } else if (argv[i][0] == '-' && argv[i][1] != '\0') {
            fprintf(stderr, "moectl tokenize: unknown option %s\n" TOK_USAGE, argv[i]);
            return 2;
        } else if (text == NULL) {
            text = argv[i];
        } else {
            fprintf(stderr, "moectl tokenize: one TEXT argument expected (quote it)\n" TOK_USAGE);
            return 2;
        }
    }
    if (model == NULL || (text == NULL) == (file == NULL)) {
        fputs(TOK_USAGE, stderr);
        return 2;
    }
    size_t len;
    struct moe_buf owned = { 0 };
    if (file != NULL) {
        int rc = read_text(file, &owned);
        if (rc != 0) {
            fprintf(stderr, "moectl tokenize: %s: %s\n", file, strerror(-rc));
            moe_buf_free(&owned);
            return 1;
        }
        text = owned.data ? owned.data : "";
        len = owned.len;
    } else {
        len = strlen(text);
    }
    struct moe_tokenizer *tok = NULL;
    int ret = 1;
    int32_t *ids = NULL;
    if (load(model, &tok) != 0)
        goto out;
    size_t cap = len + 8, n = 0;
    ids = malloc(cap * sizeof(int32_t));
    int rc = ids ? moe_tokenize(tok, text, len, add_special, parse_special, ids, cap, &n) : -ENOMEM;
    if (rc == -ENOSPC) {
        int32_t *nb = realloc(ids, n * sizeof(int32_t));
        rc = nb ? moe_tokenize(tok, text, len, add_special, parse_special, nb, n, &n) : -ENOMEM;
        ids = nb ? nb : ids;
    }
    if (rc != 0) {
        fprintf(stderr, "moectl tokenize: %s: %s\n", file ? file : "TEXT",
                rc == MOE_EFORMAT ? "text is not UTF-8 the tokenizer can decode (code point above U+10FFFF)"
                                  : moe_strerror(rc));
        goto out;
    }
    putchar('[');
    for (size_t i = 0; i < n; i++)
        printf(i ? ", %d" : "%d", ids[i]);
    fputs("]\n", stdout);
    ret = fflush(stdout) == 0 ? 0 : 1;
out:
    free(ids);
    moe_buf_free(&owned);
    moe_tokenizer_free(tok);
    return ret;
}

int moectl_detokenize_main(int argc, char **argv)
{
    const char *model = NULL;
    bool special = false, remove_special = false;
    size_t n = 0, ids_cap = 0;
    int32_t *ids = NULL;
    int ret = 2;
    struct moe_tokenizer *tok = NULL;
    char *buf = NULL;
    if (moe_array_grow((void **)&ids, &ids_cap, (size_t)(argc > 0 ? argc : 1), sizeof(int32_t), 0) != 0) {
        fputs("moectl detokenize: out of memory\n", stderr);
        return 1;
    }
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--model") == 0 && i + 1 < argc) {
            model = argv[++i];
        } else if (strcmp(argv[i], "--special") == 0) {
            special = true;
        } else if (strcmp(argv[i], "--remove-special") == 0) {
            remove_special = true;
        } else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            fputs(DETOK_USAGE, stdout);
            ret = 0;
            goto out;
        } else {
            /* ids: decimal, also accepted as one JSON-ish list "[1, 2]" */
            char *p = argv[i];
            for (;;) {
                while (*p == ' ' || *p == ',' || *p == '[' || *p == ']')
                    p++;
                if (*p == '\0')
                    break;
                char *end;
                errno = 0;
                long v = strtol(p, &end, 10);
                if (end == p || errno != 0 || v < INT32_MIN || v > INT32_MAX ||
                    (*end != '\0' && *end != ' ' && *end != ',' && *end != ']')) {
                    fprintf(stderr, "moectl detokenize: '%s' is not a token id\n" DETOK_USAGE, argv[i]);
                    goto out;
                }
                if (moe_array_grow((void **)&ids, &ids_cap, n + 1, sizeof(int32_t), 0) != 0) {
                    ret = 1;
                    goto out;
                }
                ids[n++] = (int32_t)v;
                p = end;
            }
        }
    }
    if (model == NULL) {
        fputs(DETOK_USAGE, stderr);
        goto out;
    }
    ret = 1;
    if (load(model, &tok) != 0)
        goto out;
    uint32_t nt = moe_tokenizer_n_tokens(tok);
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || (uint32_t)ids[i] >= nt) {
            fprintf(stderr, "moectl detokenize: token id %d out of range for %s (0..%u)\n", ids[i], model, nt - 1);
            goto out;
        }
    }
    size_t cap = n * 16 + 64, len = 0;
    buf = malloc(cap);
    int rc = buf ? moe_detokenize(tok, ids, n, buf, cap, remove_special, special, &len) : -ENOMEM;
    if (rc == -ENOSPC) {
        char *nb = realloc(buf, len + 1);
        rc = nb ? moe_detokenize(tok, ids, n, nb, len + 1, remove_special, special, &len) : -ENOMEM;
        buf = nb ? nb : buf;
    }
    if (rc != 0) {
        fprintf(stderr, "moectl detokenize: %s\n", moe_strerror(rc));
        goto out;
    }
    fwrite(buf, 1, len, stdout);
    putchar('\n');
    ret = fflush(stdout) == 0 ? 0 : 1;
out:
    free(buf);
    moe_free(ids);
    moe_tokenizer_free(tok);
    return ret;
}
