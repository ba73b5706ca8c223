/* Fuzz entry for the .moe pack reader: open the bytes twice (with the
 * header/index checksums, and without them so that the structural checks
 * behind the checksums are reached), and when they open, read every
 * expert, the ratio statistics and the dense section, the way moectl pack
 * --verify does. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "io/pack.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void walk(const struct moe_pack *p)
{
    struct moe_pack_stats st;
    moe_pack_stats_of(p, &st);
    moe_pack_verify_dense(p, NULL);
    const struct moe_gguf *g = moe_pack_gguf(p);
    (void)moe_gguf_n_tensors(g);
    for (uint32_t l = 0; l < moe_pack_n_layer(p); l++) {
        const struct moe_expert_layout *L = moe_pack_layout(p, l);
        if (L == NULL || L->raw_size > (16u << 20))
            continue;
        uint8_t *dst = malloc((size_t)L->raw_size);
        if (dst == NULL)
            continue;
        for (uint32_t e = 0; e < moe_pack_n_expert(p) && e < 64; e++)
            moe_pack_read_expert(p, l, e, dst, (size_t)L->raw_size, NULL, NULL);
        free(dst);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    for (unsigned pass = 0; pass < 2; pass++) {
        struct moe_pack *p = NULL;
        unsigned flags = pass ? MOE_PACK_OPEN_NO_META_CHECKSUMS : 0;
        if (moe_pack_open_mem(&p, data, size, "fuzz.moe", flags, NULL) == 0) {
            walk(p);
            moe_pack_close(p);
        }
    }
    return 0;
}
