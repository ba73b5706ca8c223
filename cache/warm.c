#include "cache/warm.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "common/alloc.h"
#include "common/fault.h"
#include "io/file.h"

#define WARM_MAGIC "MOEWARM1"
#define WARM_VERSION 1u
/* a file beyond this is not one we wrote: 2 x 4096 layers x 1024^2 would
 * be absurd; 2 GiB bounds any real model's tables */
#define WARM_MAX_PAYLOAD (2ull << 30)
#define WARM_HISTORY 1u   /* tr_tok, tr_layer */
#define WARM_POLICY 2u    /* pol_trans, pol_follows, pol_stats */
#define STATS_BYTES (MOE_WARM_POLICY_STATS * sizeof(double))

struct warm_header {
    char magic[8];
    uint32_t version;
    uint32_t header_size;
    uint32_t n_layer, n_expert, k;
    uint32_t tables;          /* WARM_HISTORY | WARM_POLICY */
    uint64_t model_id;
    uint64_t payload_bytes;
    uint64_t payload_xxh3;
    uint64_t header_xxh3;     /* of the bytes above */
};
_Static_assert(sizeof(struct warm_header) == 64, "warm header layout");

static uint64_t table_bytes(const struct moe_warm *w)
{
    return (uint64_t)w->n_layer * w->n_expert * w->n_expert * sizeof(uint32_t);
}

static uint64_t uses_bytes(const struct moe_warm *w)
{
    return (uint64_t)w->n_layer * w->n_expert * sizeof(uint32_t);
}

/* The directory of path must see the rename before we call it done. */
static void sync_dir(const char *path)
{
    char copy[4096];
    snprintf(copy, sizeof(copy), "%s", path);
    int fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

/* The payload after the header, in file order: up to 6 arrays. */
struct part {
    const void *p;
    uint64_t bytes;
};

static int parts_of(const struct moe_warm *w, uint32_t tables, struct part *out)
{
    int n = 0;
    out[n++] = (struct part){ w->uses, uses_bytes(w) };
    if (tables & WARM_HISTORY) {
        out[n++] = (struct part){ w->tr_tok, table_bytes(w) };
        out[n++] = (struct part){ w->tr_layer, table_bytes(w) };
    }
    if (tables & WARM_POLICY) {
        out[n++] = (struct part){ w->pol_trans, table_bytes(w) };
        out[n++] = (struct part){ w->pol_follows, uses_bytes(w) };
        out[n++] = (struct part){ w->pol_stats, STATS_BYTES };
    }
    return n;
}

static uint64_t payload_bytes(const struct moe_warm *w, uint32_t tables)
{
    return uses_bytes(w) + (tables & WARM_HISTORY ? 2 * table_bytes(w) : 0) +
           (tables & WARM_POLICY ? table_bytes(w) + uses_bytes(w) + STATS_BYTES : 0);
}

int moe_warm_write(const char *path, const struct moe_warm *w, struct moe_diag *diag)
{
    const uint32_t tables = (w->tr_tok != NULL && w->tr_layer != NULL ? WARM_HISTORY : 0) |
                            (w->pol_trans != NULL && w->pol_follows != NULL && w->pol_stats != NULL
                                 ? WARM_POLICY : 0);
    struct warm_header h = { .version = WARM_VERSION, .header_size = sizeof(h), .n_layer = w->n_layer,
                             .n_expert = w->n_expert, .k = w->k, .tables = tables,
                             .model_id = w->model_id };
    memcpy(h.magic, WARM_MAGIC, 8);
    h.payload_bytes = payload_bytes(w, tables);
    struct part parts[6];
    const int n_parts = parts_of(w, tables, parts);
    XXH3_state_t *xs = XXH3_createState();
    if (xs == NULL)
        return moe_diag_set(diag, -ENOMEM, "%s: out of memory", path);
    XXH3_64bits_reset(xs);
    for (int i = 0; i < n_parts; i++)
        XXH3_64bits_update(xs, parts[i].p, (size_t)parts[i].bytes);
    h.payload_xxh3 = XXH3_64bits_digest(xs);
    XXH3_freeState(xs);
    h.header_xxh3 = XXH3_64bits(&h, offsetof(struct warm_header, header_xxh3));

    char tmp[4200];
    snprintf(tmp, sizeof(tmp), "%s.tmp.%ld", path, (long)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return moe_diag_set(diag, -errno, "%s: %s", tmp, strerror(errno));
    uint64_t off = 0;
    int rc = moe_file_pwrite(fd, &h, sizeof(h), off);
    off += sizeof(h);
    /* fault injection (common/fault.h): the disk fills after the header */
    if (rc == 0)
        rc = moe_fault_fire(MOE_FAULT_ENOSPC, -1, -1) ? -ENOSPC
                                                      : moe_file_pwrite(fd, w->uses, (size_t)uses_bytes(w), off);
    off += uses_bytes(w);
    for (int i = 1; rc == 0 && i < n_parts; i++) {
        rc = moe_file_pwrite(fd, parts[i].p, (size_t)parts[i].bytes, off);
        off += parts[i].bytes;
    }
    if (rc == 0 && fsync(fd) != 0)
        rc = -errno;
    if (close(fd) != 0 && rc == 0)
        rc = -errno;
    if (rc == 0 && rename(tmp, path) != 0)
        rc = -errno;
    if (rc != 0) {
        unlink(tmp);
        return moe_diag_set(diag, rc, "%s: writing the warm-start statistics: %s", path, strerror(-rc));
    }
    sync_dir(path);
    return 0;
}

void moe_warm_free(struct moe_warm *w)
{
    moe_free(w->uses);
    moe_free(w->tr_tok);
    moe_free(w->tr_layer);
    moe_free(w->pol_trans);
    moe_free(w->pol_follows);
    moe_free(w->pol_stats);
    w->uses = w->tr_tok = w->tr_layer = w->pol_trans = w->pol_follows = NULL;
    w->pol_stats = NULL;
}

static int check_header(const char *path, const struct warm_header *h, const struct moe_warm *w,
                        uint64_t file_size, struct moe_diag *diag)
{
    if (memcmp(h->magic, WARM_MAGIC, 8) != 0)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: not a warm-start file (bad magic)", path);
    if (h->header_xxh3 != XXH3_64bits(h, offsetof(struct warm_header, header_xxh3)))
        return moe_diag_set(diag, MOE_ECHECKSUM, "%s: header checksum mismatch (corrupt)", path);
    if (h->version != WARM_VERSION || h->header_size != sizeof(*h))
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: version %u, expected %u", path, h->version,
                            WARM_VERSION);
    if (h->model_id != w->model_id || h->n_layer != w->n_layer || h->n_expert != w->n_expert ||
        h->k != w->k)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: written for another model (%u layers x %u"
                            " experts, id %016" PRIx64 "; this one %u x %u, id %016" PRIx64 "): stale",
                            path, h->n_layer, h->n_expert, h->model_id, w->n_layer, w->n_expert,
                            w->model_id);
    if (h->tables > (WARM_HISTORY | WARM_POLICY))
        return moe_diag_set(diag, MOE_EFORMAT, "%s: tables %#x, expected a combination of 1 (history)"
                            " and 2 (policy)", path, h->tables);
    const uint64_t want = payload_bytes(w, h->tables);
    if (h->payload_bytes != want || want > WARM_MAX_PAYLOAD ||
        file_size != sizeof(*h) + want)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: %" PRIu64 " bytes, expected %" PRIu64
                            " (truncated or padded)", path, file_size, sizeof(*h) + want);
    return 0;
}

static int read_payload(int fd, const char *path, const struct warm_header *h, struct moe_warm *w,
                        struct moe_diag *diag)
{
    w->uses = moe_malloc((size_t)uses_bytes(w));
    if (h->tables & WARM_HISTORY) {
        w->tr_tok = moe_malloc((size_t)table_bytes(w));
        w->tr_layer = moe_malloc((size_t)table_bytes(w));
    }
    if (h->tables & WARM_POLICY) {
        w->pol_trans = moe_malloc((size_t)table_bytes(w));
        w->pol_follows = moe_malloc((size_t)uses_bytes(w));
        w->pol_stats = moe_malloc(STATS_BYTES);
    }
    if (w->uses == NULL || ((h->tables & WARM_HISTORY) && (w->tr_tok == NULL || w->tr_layer == NULL)) ||
        ((h->tables & WARM_POLICY) && (w->pol_trans == NULL || w->pol_follows == NULL || w->pol_stats == NULL)))
        return moe_diag_set(diag, -ENOMEM, "%s: out of memory", path);
    struct part parts[6];
    const int n_parts = parts_of(w, h->tables, parts);
    uint64_t off = sizeof(*h);
    int rc = 0;
    for (int i = 0; rc == 0 && i < n_parts; i++) {
        rc = moe_file_pread(fd, (void *)parts[i].p, (size_t)parts[i].bytes, off, NULL);
        off += parts[i].bytes;
    }
    if (rc != 0)
        return moe_diag_set(diag, rc, "%s: read: %s", path, moe_strerror(rc));
    XXH3_state_t *xs = XXH3_createState();
    if (xs == NULL)
        return moe_diag_set(diag, -ENOMEM, "%s: out of memory", path);
    XXH3_64bits_reset(xs);
    for (int i = 0; i < n_parts; i++)
        XXH3_64bits_update(xs, parts[i].p, (size_t)parts[i].bytes);
    const uint64_t x = XXH3_64bits_digest(xs);
    XXH3_freeState(xs);
    if (x != h->payload_xxh3)
        return moe_diag_set(diag, MOE_ECHECKSUM, "%s: contents checksum %016" PRIx64 ", header says"
                            " %016" PRIx64 " (corrupt)", path, x, h->payload_xxh3);
    return 0;
}

int moe_warm_read(const char *path, struct moe_warm *w, struct moe_diag *diag)
{
    w->uses = w->tr_tok = w->tr_layer = w->pol_trans = w->pol_follows = NULL;
    w->pol_stats = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? -ENOENT : moe_diag_set(diag, -errno, "%s: %s", path, strerror(errno));
    struct stat st;
    struct warm_header h;
    int rc = fstat(fd, &st) != 0 ? -errno : 0;
    if (rc == 0 && (uint64_t)st.st_size < sizeof(h))
        rc = moe_diag_set(diag, MOE_EFORMAT, "%s: %lld bytes, shorter than its header", path,
                          (long long)st.st_size);
    else if (rc == 0)
        rc = moe_file_pread(fd, &h, sizeof(h), 0, NULL);
    if (rc == 0)
        rc = check_header(path, &h, w, (uint64_t)st.st_size, diag);
    if (rc == 0)
        rc = read_payload(fd, path, &h, w, diag);
    close(fd);
    if (rc != 0) {
        moe_diag_set(diag, rc, "%s: %s", path, moe_strerror(rc));
        moe_warm_free(w);
    }
    return rc;
}
