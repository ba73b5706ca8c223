/* The CPU paths the kernels dispatch to at run time, as three test cases:
 *
 *   MOE_TEST_SIMD_PATHS(body)
 *
 * defines test_avx512_path, test_avx2_path and test_scalar_path, each of
 * which caps the path with MOE_CPU_SIMD, checks that the dispatcher took it
 * (skips where this CPU lacks it) and calls body(). Every MOE_TEST_RUN case
 * runs in its own process, so the setting does not outlive its case. */
#ifndef MOE_TESTS_SIMD_PATHS_H
#define MOE_TESTS_SIMD_PATHS_H

#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/vecdot.h"
#include "tests/harness.h"

#define MOE_TEST_SIMD_PATHS(body)                                                      \
    static void test_avx512_path(void)                                                 \
    {                                                                                  \
        setenv("MOE_CPU_SIMD", "avx512", 1);                                           \
        if (strcmp(moe_vecdot_impl(), "avx512vnni") != 0)                              \
            MOE_SKIP("no AVX-512 VNNI on this CPU (path %s)", moe_vecdot_impl());     \
        body();                                                                        \
    }                                                                                  \
    static void test_avx2_path(void)                                                   \
    {                                                                                  \
        setenv("MOE_CPU_SIMD", "avx2", 1);                                             \
        if (strcmp(moe_vecdot_impl(), "scalar") == 0)                                  \
            MOE_SKIP("no AVX2 on this CPU");                                           \
        CHECK_STR(moe_vecdot_impl(), "avx2");                                          \
        body();                                                                        \
    }                                                                                  \
    static void test_scalar_path(void)                                                 \
    {                                                                                  \
        setenv("MOE_CPU_SIMD", "scalar", 1);                                           \
        CHECK_STR(moe_vecdot_impl(), "scalar");                                        \
        body();                                                                        \
    }

#endif
