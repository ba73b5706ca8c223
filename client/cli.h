/* Subcommands of moectl: each takes its own argv (argv[0] is the
 * subcommand's name) and returns the process exit code: 0 success, 1 bad
 * input or failure (with a message on stderr), 2 usage error. */
#ifndef MOE_CLIENT_CLI_H
#define MOE_CLIENT_CLI_H

int moectl_info_main(int argc, char **argv);
int moectl_eval_main(int argc, char **argv);
int moectl_run_main(int argc, char **argv);
int moectl_chat_main(int argc, char **argv);
int moectl_cachesim_main(int argc, char **argv);
/* cache-sim --lanes (client/lanesim.c) */
int moectl_cachesim_lanes_main(int argc, char **argv);
int moectl_pack_main(int argc, char **argv);
int moectl_tokenize_main(int argc, char **argv);
int moectl_detokenize_main(int argc, char **argv);
int moectl_template_main(int argc, char **argv);
/* daemon commands (client/remote.c); exit code 3: cannot reach moed */
int moectl_complete_main(int argc, char **argv);
int moectl_chat_dispatch(int argc, char **argv);
int moectl_stats_main(int argc, char **argv);
int moectl_health_main(int argc, char **argv);

#endif
