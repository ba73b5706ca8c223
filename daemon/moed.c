/* moed: the daemon. Serving (socket, API, scheduler) arrives with the
 * daemon issue; until then the program answers --help and --version and
 * refuses to start with a message saying so, so that no script mistakes
 * it for a running server. */
#include <stdio.h>
#include <string.h>

static void usage(FILE *f)
{
    fprintf(f,
            "usage: moed [--config FILE] [--model MODEL]\n"
            "       moed --help | --version\n"
            "\n"
            "moed serves Mixture-of-Experts models over a Unix socket.\n"
            "This build does not serve yet: use `moectl info MODEL` to inspect a model.\n");
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 0;
        }
        if (strcmp(argv[i], "--version") == 0) {
            printf("moed %s\n", MOE_VERSION);
            return 0;
        }
    }
    fprintf(stderr, "moed: serving is not implemented in this build yet\n");
    usage(stderr);
    return 2;
}
