/* moectl: the client and the offline tools. Each subcommand lives in its
 * own file and takes its own argv (client/cli.h). */
#include <stdio.h>
#include <string.h>

#include "client/cli.h"

struct command {
    const char *name;
    int (*main)(int argc, char **argv);
    const char *help;
};

static const struct command commands[] = {
    { "info", moectl_info_main, "describe a GGUF model: arch, sizes, cache sizing numbers" },
    { "eval", moectl_eval_main, "run tokens as one batch; write logits and expert choices" },
    { "run", moectl_run_main, "generate from token ids or a text prompt" },
    { "complete", moectl_complete_main, "moed: a completion (text from -p or stdin)" },
    { "chat", moectl_chat_dispatch, "moed: chat (interactive, or -p); --model M: offline" },
    { "stats", moectl_stats_main, "moed: requests, tokens and expert cache counters" },
    { "health", moectl_health_main, "moed: is it up" },
    { "tokenize", moectl_tokenize_main, "text to token ids (one JSON array)" },
    { "detokenize", moectl_detokenize_main, "token ids to text" },
    { "template", moectl_template_main, "render messages with a model's Jinja chat template (as moed does)" },
    { "pack", moectl_pack_main, "write a compressed expert store from a GGUF (--verify checks one)" },
    { "cache-sim", moectl_cachesim_main, "replay a routing trace against cache policies and Belady" },
};

static void usage(FILE *f)
{
    fprintf(f, "usage: moectl <command> [options]    (moectl <command> --help for its options)\n\n");
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].help);
    fprintf(f, "\nExit codes: 0 success, 1 bad input or failure, 2 usage error, 3 cannot reach moed.\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    /* `moectl help CMD` is `moectl CMD --help` */
    if (strcmp(argv[1], "help") == 0 && argc == 3) {
        for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
            if (strcmp(argv[2], commands[i].name) == 0) {
                char help[] = "--help";
                char *sub[] = { argv[2], help, NULL };
                return commands[i].main(2, sub);
            }
        fprintf(stderr, "moectl: help: unknown command '%s'\n", argv[2]);
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "-V") == 0) {
        printf("moectl %s\n", MOE_VERSION);
        return 0;
    }
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        if (strcmp(argv[1], commands[i].name) == 0)
            return commands[i].main(argc - 1, argv + 1);
    fprintf(stderr, "moectl: unknown %s '%s'\n", argv[1][0] == '-' ? "option" : "command", argv[1]);
    usage(stderr);
    return 2;
}
