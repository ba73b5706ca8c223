/* Fuzz entry for moed's config file parser (inih + daemon/config.c): any
 * bytes as an INI file. Never a crash or an over-read; a file that loads
 * leaves every key within its bounds. */
#include <stdlib.h>
#include <string.h>

#include "daemon/config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    if (text == NULL)
        return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    struct moed_config c;
    moed_config_defaults(&c);
    struct moe_diag d = { 0 };
    if (moed_config_load_string(&c, text, "fuzz.ini", &d) == 0) {
        if (c.engine.n_ctx < 16 || c.max_seqs < 1 || c.socket_mode > 0777 ||
            c.engine.cache_bytes > (1ull << 50) || c.engine.host_bytes > (1ull << 50) ||
            strlen(c.model) >= sizeof(c.model))
            abort();
        moed_config_validate(&c, &d);
    } else if (d.msg[0] == '\0') {
        abort();
    }
    free(text);
    return 0;
}
