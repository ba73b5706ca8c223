/* Allocation-failure sweep over moe_model_load (shared/RELIABILITY.md row
 * 3): for N = 0, 1, 2, ... the Nth allocation fails; every load must either
 * succeed or fail with -ENOMEM and a message, leave *out NULL, and leak
 * nothing (moe_alloc_live back to where it was). Over shared/ref models with
 * experts resident, through the expert cache with the host tier, and on the
 * device path (weights uploaded, loads staged). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/alloc.h"
#include "model/model.h"
#include "tests/harness.h"

static void sweep(const char *file, const struct moe_model_opts *o)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/models/%s", moe_test_ref_dir(), file);
    for (long n = 0; n < 100000; n++) {
        const long live = moe_alloc_live();
        struct moe_model *m = (struct moe_model *)(uintptr_t)1;
        struct moe_diag d = { 0 };
        moe_alloc_fail_after(n);
        int rc = moe_model_load(&m, path, o, &d);
        moe_alloc_fail_after(-1);
        if (rc == 0) {
            CHECK(m != NULL);
            moe_model_free(m);
            CHECK_MSG(moe_alloc_live() == live, "%s: after free, %ld allocations leaked", file,
                      moe_alloc_live() - live);
            printf("  %s: loaded after %ld injected failures\n", file, n);
            CHECK(n > 10);
            return;
        }
        CHECK_MSG(rc == -ENOMEM, "%s N=%ld: rc %d (%s): %s", file, n, rc, moe_strerror(rc), d.msg);
        CHECK_MSG(m == NULL, "%s N=%ld: *out not NULL after a failure", file, n);
        CHECK_MSG(d.msg[0] != '\0', "%s N=%ld: no message", file, n);
        CHECK_MSG(moe_alloc_live() == live, "%s N=%ld: %ld allocations leaked (%s)", file, n,
                  moe_alloc_live() - live, d.msg);
    }
    MOE_FAIL_AT("never loaded");
}

static void test_resident(void)
{
    struct moe_model_opts o = { .n_threads = 1, .n_ctx = 64 };
    sweep("tiny-mixtral-Q4_0.gguf", &o);
}

static void test_cache_host_tier(void)
{
    struct moe_model_opts o = { .n_threads = 1, .n_ctx = 64, .cache_experts = 4,
                                .host_bytes = 8 << 20, .prefetch = MOE_PREFETCH_HISTORY };
    sweep("tiny-qwen3moe-Q8_0.gguf", &o);
}

static void test_device_path(void)
{
    struct moe_model_opts o = { .n_threads = 1, .n_ctx = 64, .cache_experts = 6,
                                .upload_weights = true };
    sweep("tiny-deepseek2-F32.gguf", &o);
}

static void test_gptoss(void)
{
    struct moe_model_opts o = { .n_threads = 1, .n_ctx = 64, .upload_weights = true };
    sweep("tiny-gptoss-MXFP4_MOE.gguf", &o);
}

int main(void)
{
    if (moe_test_ref_dir() == NULL)
        return 77;
    moe_test_run("mixtral, experts resident", test_resident);
    moe_test_run("qwen3moe, cache + host tier + history", test_cache_host_tier);
    moe_test_run("deepseek2, device path + cache", test_device_path);
    moe_test_run("gpt-oss, device path", test_gptoss);
    return moe_test_exit_code();
}
