/* Tokenizer throughput: tokenizes one text file with one vocabulary on the
 * calling thread, best of N runs, and prints one JSON line:
 *   {"vocab": ..., "bytes": ..., "tokens": ..., "best_s": ..., "tokens_per_s": ..., "mb_per_s": ...}
 * usage: tokenize_bench VOCAB.gguf TEXT_FILE [RUNS [IDS_OUT.json]]
 * Built and run by tools/bench/tokenize.sh. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "io/gguf.h"
#include "model/tokenizer.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s VOCAB.gguf TEXT_FILE [RUNS]\n", argv[0]);
        return 2;
    }
    int runs = argc > 3 ? atoi(argv[3]) : 5;
    FILE *f = fopen(argv[2], "rb");
    if (f == NULL) {
        perror(argv[2]);
        return 1;
    }
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = malloc((size_t)len + 1);
    if (text == NULL || fread(text, 1, (size_t)len, f) != (size_t)len) {
        fprintf(stderr, "%s: read failed\n", argv[2]);
        return 1;
    }
    fclose(f);
    struct moe_diag diag = { 0 };
    struct moe_gguf *g = NULL;
    struct moe_tokenizer *tok = NULL;
    double t0 = now();
    if (moe_gguf_open(&g, argv[1], &diag) != 0 || moe_tokenizer_load(&tok, g, &diag) != 0) {
        fprintf(stderr, "%s: %s\n", argv[1], diag.msg);
        return 1;
    }
    double load_s = now() - t0;
    moe_gguf_close(g);
    size_t cap = 3 * (size_t)len + 8, n = 0;
    int32_t *ids = malloc(cap * sizeof(int32_t));
    double best = 1e30;
    for (int r = 0; r < runs; r++) {
        double s = now();
        if (moe_tokenize(tok, text, (size_t)len, false, false, ids, cap, &n) != 0) {
            fprintf(stderr, "tokenize failed\n");
            return 1;
        }
        double e = now() - s;
        if (e < best)
            best = e;
    }
    printf("{\"vocab\": \"%s\", \"bytes\": %ld, \"tokens\": %zu, \"load_s\": %.4f, \"best_s\": %.4f, "
           "\"tokens_per_s\": %.0f, \"mb_per_s\": %.2f}\n",
           argv[1], len, n, load_s, best, (double)n / best, (double)len / best / 1e6);
    if (argc > 4) {
        FILE *o = fopen(argv[4], "w");
        if (o == NULL) {
            perror(argv[4]);
            return 1;
        }
        fputc('[', o);
        for (size_t i = 0; i < n; i++)
            fprintf(o, i ? ", %d" : "%d", ids[i]);
        fputs("]\n", o);
        fclose(o);
    }
    free(ids);
    free(text);
    moe_tokenizer_free(tok);
    return 0;
}
