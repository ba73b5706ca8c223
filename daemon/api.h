/* moed's HTTP API (api.c): the OpenAI-compatible endpoints and moed's own,
 * one route table served through the transport's handler table
 * (server.h). Everything runs on the loop thread. */
#ifndef MOE_DAEMON_API_H
#define MOE_DAEMON_API_H

#include "daemon/engine.h"
#include "daemon/server.h"

struct moed_api;

/* srv and eng are borrowed and outlive the api; the api reads the server's
 * configuration and counters and drives the engine. NULL when out of
 * memory. */
struct moed_api *moed_api_new(struct moed_server *srv, struct moed_engine *eng);
void moed_api_free(struct moed_api *a);
/* The id /v1/models reports: model_name, else the model file's base name. */
const char *moed_api_model_id(const struct moed_api *a);

/* The handlers to give moed_server_run, with the api as their ud. */
extern const struct moed_handlers moed_api_handlers;

#endif
