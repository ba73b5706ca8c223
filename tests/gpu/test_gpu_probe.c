/* The CUDA toolchain end to end: a device is found and a kernel built for
 * the configured architectures runs and computes the right thing. Skips
 * (77) when the build has no CUDA or the machine has no GPU. */
#include "kernels/cuda.h"
#include "tests/harness.h"

static void test_selftest(void)
{
    if (!moe_cuda_built())
        MOE_SKIP("built without CUDA");
    struct moe_cuda_device dev[8];
    struct moe_diag d = { 0 };
    int n = moe_cuda_probe(dev, 8, &d);
    CHECK_MSG(n >= 0, "probe: %s", d.msg);
    if (n == 0)
        MOE_SKIP("no CUDA device");
    for (int i = 0; i < n && i < 8; i++) {
        printf("  device %d: %s, sm_%d%d, %d SMs, %zu MiB free of %zu\n", i, dev[i].name,
               dev[i].cc_major, dev[i].cc_minor, dev[i].n_sm, dev[i].free_mem >> 20,
               dev[i].total_mem >> 20);
        CHECK(dev[i].total_mem > 0);
    }
    int rc = moe_cuda_selftest(0, &d);
    CHECK_MSG(rc == 0, "selftest: %s", d.msg);
}

int main(void)
{
    MOE_TEST_RUN(test_selftest);
    return moe_test_exit_code();
}
