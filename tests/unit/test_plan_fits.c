/* moe_model_plan_fits (model/plan.h), the check moed runs before it loads
 * anything (shared/RELIABILITY.md row 19): a plan within the host's memory
 * and, on a GPU, within the device's free memory passes; one over either
 * is refused with MOE_ELIMIT and a message listing the MiB of each
 * component and what to lower. Plans built by hand: no file, no GPU. */
#include <string.h>

#include "model/plan.h"
#include "tests/harness.h"

#define MiB (1024ull * 1024ull)

static struct moe_model_plan plan(void)
{
    struct moe_model_plan p;
    memset(&p, 0, sizeof(p));
    p.n_ctx = 4096;
    p.n_seqs = 4;
    p.dense_bytes = 1000 * MiB;
    p.expert_cache = true;
    p.expert_bytes = 20000 * MiB;
    p.kv_bytes_per_seq = 128 * MiB;
    p.kv_bytes = 4 * 128 * MiB;
    p.cache_bytes = 3000 * MiB;
    p.staging_bytes = 100 * MiB;
    p.workspace_bytes = 200 * MiB;
    p.host_bytes = 0;
    return p;
}

static void test_cpu_host_memory(void)
{
    struct moe_model_plan p = plan();
    struct moe_diag d = { 0 };
    /* CPU: KV 512 + cache 3000 + staging 100 + workspace 200 = 3812 MiB */
    CHECK_INT(moe_model_plan_host_bytes(&p, MOE_BACKEND_CPU), ==, 3812 * MiB);
    CHECK_INT(moe_model_plan_fits(&p, MOE_BACKEND_CPU, 3812 * MiB, NULL, &d), ==, 0);
    CHECK_INT(moe_model_plan_fits(&p, MOE_BACKEND_CPU, 0, NULL, &d), ==, 0);  /* unknown RAM */
    CHECK_INT(moe_model_plan_fits(&p, MOE_BACKEND_CPU, 3811 * MiB, NULL, &d), ==, MOE_ELIMIT);
    CHECK_MSG(strstr(d.msg, "KV pool 512.0 MiB (4 sequences (max_seqs) of ctx_size 4096") &&
              strstr(d.msg, "expert cache 3000.0 MiB") && strstr(d.msg, "read buffers 100.0 MiB") &&
              strstr(d.msg, "workspace 200.0 MiB") && strstr(d.msg, "3812.0 MiB in all") &&
              strstr(d.msg, "host's memory of 3811.0 MiB") && strstr(d.msg, "lower max_seqs"),
              "%s", d.msg);
    /* dense weights copied into memory (an expert cache on the CPU) count */
    p.dense_copied = true;
    CHECK_INT(moe_model_plan_host_bytes(&p, MOE_BACKEND_CPU), ==, 4812 * MiB);
    moe_diag_clear(&d);
    CHECK_INT(moe_model_plan_fits(&p, MOE_BACKEND_CPU, 4811 * MiB, NULL, &d), ==, MOE_ELIMIT);
    CHECK_MSG(strstr(d.msg, "dense weights 1000.0 MiB") && strstr(d.msg, "4812.0 MiB in all"), "%s", d.msg);
    CHECK_INT(moe_model_plan_host_bytes(&p, MOE_BACKEND_CUDA), ==, 3100 * MiB);  /* uploaded there */
}

static void test_gpu_device_memory(void)
{
    struct moe_model_plan p = plan();
    struct moe_device_memory dev = { .free_bytes = 4712 * MiB, .total_bytes = 8000 * MiB };
    strcpy(dev.name, "Fake GPU");
    struct moe_diag d = { 0 };
    /* device: dense 1000 + KV 512 + cache 3000 + workspace 200 = 4712 MiB */
    CHECK_INT(moe_model_plan_device_bytes(&p), ==, 4712 * MiB);
    CHECK_INT(moe_model_plan_fits(&p, MOE_BACKEND_CUDA, 64000 * MiB, &dev, &d), ==, 0);
    dev.free_bytes = 4711 * MiB;
    CHECK_INT(moe_model_plan_fits(&p, MOE_BACKEND_CUDA, 64000 * MiB, &dev, &d), ==, MOE_ELIMIT);
    CHECK_MSG(strstr(d.msg, "the plan needs 4712 MiB of GPU memory (dense weights 1000, KV pool 512,"
                     " expert cache 3000, workspace 200 MiB), 4711 MiB are free on Fake GPU") &&
              strstr(d.msg, "lower cache_bytes"), "%s", d.msg);
    /* experts resident on the device: they count, the cache does not */
    p.expert_cache = false;
    p.cache_bytes = 0;
    dev.free_bytes = 64000 * MiB;
    moe_diag_clear(&d);
    CHECK_INT(moe_model_plan_fits(&p, MOE_BACKEND_CUDA, 64000 * MiB, &dev, &d), ==, 0);
    dev.free_bytes = 1000 * MiB;
    CHECK_INT(moe_model_plan_fits(&p, MOE_BACKEND_CUDA, 64000 * MiB, &dev, &d), ==, MOE_ELIMIT);
    CHECK_MSG(strstr(d.msg, "resident experts 20000"), "%s", d.msg);
    /* the host side of a GPU plan: the tier and staging, checked first */
    p.host_bytes = 50000 * MiB;
    moe_diag_clear(&d);
    CHECK_INT(moe_model_plan_fits(&p, MOE_BACKEND_CUDA, 40000 * MiB, &dev, &d), ==, MOE_ELIMIT);
    CHECK_MSG(strstr(d.msg, "host tier 50000.0 MiB") && strstr(d.msg, "host's memory"), "%s", d.msg);
}

int main(void)
{
    moe_test_run("CPU plan against the host's memory", test_cpu_host_memory);
    moe_test_run("GPU plan against the device's free memory", test_gpu_device_memory);
    return moe_test_exit_code();
}
