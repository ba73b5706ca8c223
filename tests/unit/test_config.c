/* moed's configuration (daemon/config.c), RELIABILITY.md row 16: every key
 * of the table at min-1, min, max, max+1 and with a value of the wrong type,
 * as a flag and in a file; messages name the key and the range; unknown keys,
 * sections and syntax errors name file:line; flags override the file; the
 * reload split between run-time and restart keys. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/config.h"
#include "tests/harness.h"

static void test_bounds_every_key(void)
{
    const int n = moed_config_n_keys();
    CHECK(n >= 25);
    int checked = 0;
    for (int i = 0; i < n; i++) {
        struct moed_key_info k;
        CHECK(moed_config_key(i, &k));
        struct moed_config c;
        moed_config_defaults(&c);
        struct moe_diag d = { 0 };
        char v[64];
        if (k.kind == 'i' || k.kind == 'z') {
            snprintf(v, sizeof(v), "%lld", k.min);
            CHECK_MSG(moed_config_set(&c, k.name, v, &d) == 0, "%s = min %s: %s", k.name, v, d.msg);
            snprintf(v, sizeof(v), "%lld", k.max);
            CHECK_MSG(moed_config_set(&c, k.name, v, &d) == 0, "%s = max %s: %s", k.name, v, d.msg);
            if (k.min > 0 || k.kind == 'i') {
                snprintf(v, sizeof(v), "%lld", k.min - 1);
                moe_diag_clear(&d);
                CHECK_MSG(moed_config_set(&c, k.name, v, &d) != 0, "%s = min-1 accepted", k.name);
                CHECK_MSG(strstr(d.msg, k.name) && (strstr(d.msg, "out of range") ||
                          strstr(d.msg, "not a size")), "%s min-1: '%s'", k.name, d.msg);
            }
            if (k.max < (1LL << 62)) {
                snprintf(v, sizeof(v), "%lld", k.max + 1);
                moe_diag_clear(&d);
                CHECK_MSG(moed_config_set(&c, k.name, v, &d) != 0, "%s = max+1 accepted", k.name);
                char range[64];
                snprintf(range, sizeof(range), "%lld..%lld", k.min, k.max);
                CHECK_MSG(strstr(d.msg, k.name) && strstr(d.msg, range), "%s max+1: '%s'", k.name,
                          d.msg);
            }
        }
        if (k.kind != 's') {
            moe_diag_clear(&d);
            CHECK_MSG(moed_config_set(&c, k.name, "banana", &d) != 0, "%s = banana accepted", k.name);
            CHECK_MSG(strstr(d.msg, k.name) && strstr(d.msg, "banana"), "%s wrong type: '%s'", k.name,
                      d.msg);
        }
        checked++;
    }
    printf("  %d keys checked at their bounds\n", checked);
}

static void test_file_and_flags(void)
{
    struct moed_config c;
    struct moe_diag d = { 0 };
    moed_config_defaults(&c);
    CHECK(moed_config_load_string(&c, "model = /m.gguf\n[moed]\ncache_bytes = 1.5G\nkv_f16 = yes\n"
                                  "socket_mode = 0660\nprefetch = gate\n", "a.ini", &d) == 0);
    CHECK_INT(c.engine.cache_bytes, ==, 1610612736LL);
    CHECK(c.engine.kv_type == MOE_KV_F16 && c.socket_mode == 0660 && c.engine.prefetch == MOE_PREFETCH_GATE);
    moed_config_defaults(&c);
    CHECK(moed_config_load_string(&c, "[other]\nx = 1\n", "b.ini", &d) != 0);
    CHECK_MSG(strstr(d.msg, "b.ini:2") && strstr(d.msg, "[other]"), "%s", d.msg);
    moe_diag_clear(&d);
    CHECK(moed_config_load_string(&c, "\n\nno equals sign here\n", "c.ini", &d) != 0);
    CHECK_MSG(strstr(d.msg, "c.ini:3"), "%s", d.msg);
    moe_diag_clear(&d);
    CHECK(moed_config_load_string(&c, "threads = 2\nfrobnicate = 1\n", "e.ini", &d) != 0);
    CHECK_MSG(strstr(d.msg, "e.ini:2") && strstr(d.msg, "unknown key 'frobnicate'"), "%s", d.msg);

    /* flags: --key value, --key=value, bare booleans; the file first, flags win */
    char path[512];
    snprintf(path, sizeof(path), "%s/f.ini", moe_test_tmpdir());
    FILE *f = fopen(path, "w");
    fputs("model = /from/file.gguf\nqueue_size = 5\nmax_seqs = 3\n", f);
    fclose(f);
    char *argv[] = { "moed", "--queue-size", "9", "--config", path, "--kv-f16", "--max_seqs=7",
                     "--check-config", NULL };
    struct moed_args a;
    moed_config_defaults(&c);
    moe_diag_clear(&d);
    CHECK_MSG(moed_config_from_args(&c, 8, argv, &a, &d) == 0, "%s", d.msg);
    CHECK(a.check_only && a.config_path && strcmp(c.model, "/from/file.gguf") == 0);
    CHECK_INT(c.queue_size, ==, 9);
    CHECK_INT(c.max_seqs, ==, 7);
    CHECK(c.engine.kv_type == MOE_KV_F16);
    CHECK(moed_config_validate(&c, &d) == 0);
    char *bad[] = { "moed", "--no-such-flag", "1", NULL };
    moed_config_defaults(&c);
    CHECK(moed_config_from_args(&c, 3, bad, &a, &d) != 0);
    CHECK(strstr(d.msg, "--no-such-flag") != NULL);
    char *novalue[] = { "moed", "--threads", NULL };
    moe_diag_clear(&d);
    CHECK(moed_config_from_args(&c, 2, novalue, &a, &d) != 0);
    CHECK(strstr(d.msg, "needs a value") != NULL);
    /* cross-key checks */
    moed_config_defaults(&c);
    moe_diag_clear(&d);
    CHECK(moed_config_validate(&c, &d) != 0 && strstr(d.msg, "model"));
    strcpy(c.model, "/m");
    c.engine.cache_bytes = 1;
    c.engine.cache_experts = 1;
    moe_diag_clear(&d);
    CHECK(moed_config_validate(&c, &d) != 0 && strstr(d.msg, "give one of them"));
}

static int restarts;
static char last_restart[64];

static void on_restart(void *ud, const char *key)
{
    (void)ud;
    restarts++;
    snprintf(last_restart, sizeof(last_restart), "%s", key);
}

static void test_reload_split(void)
{
    struct moed_config cur, next;
    moed_config_defaults(&cur);
    strcpy(cur.model, "/m");
    next = cur;
    next.queue_size = 3;          /* run time */
    next.max_body_bytes = 4096;   /* run time */
    next.engine.n_ctx = 8192;     /* restart */
    moed_config_apply_reload(&cur, &next, on_restart, NULL);
    CHECK_INT(cur.queue_size, ==, 3);
    CHECK_INT(cur.max_body_bytes, ==, 4096);
    CHECK_INT(cur.engine.n_ctx, ==, 4096);
    CHECK_INT(restarts, ==, 1);
    CHECK_STR(last_restart, "ctx_size");
}

/* api_key comparison and the loopback rule of tcp_host. */
static void test_auth_rules(void)
{
    CHECK(moed_key_equal("k1", "k1", 2));
    CHECK(!moed_key_equal("k1", "k", 1));
    CHECK(!moed_key_equal("k1", "k1x", 3));
    CHECK(!moed_key_equal("k1", "", 0));
    CHECK(!moed_key_equal("", "", 0));            /* no key configured never matches */
    CHECK(!moed_key_equal("abcd", "abcdabcd", 4 + 4));
    CHECK(!moed_key_equal("abab", "ab", 2));       /* the wrap-around is not a match */
    CHECK(moed_host_is_loopback("127.0.0.1") && moed_host_is_loopback("127.3.2.1"));
    CHECK(moed_host_is_loopback("::1"));
    CHECK(!moed_host_is_loopback("0.0.0.0") && !moed_host_is_loopback("::"));
    CHECK(!moed_host_is_loopback("10.0.0.1") && !moed_host_is_loopback("localhost"));

    struct moed_config c;
    struct moe_diag d = { 0 };
    moed_config_defaults(&c);
    CHECK_STR(c.tcp_host, "127.0.0.1");
    CHECK(moed_config_set(&c, "model", "m.gguf", &d) == 0);
    CHECK(moed_config_set(&c, "tcp_port", "8080", &d) == 0);
    CHECK(moed_config_validate(&c, &d) == 0);
    CHECK(moed_config_set(&c, "tcp_host", "::", &d) == 0);
    CHECK(moed_config_validate(&c, &d) != 0 && strstr(d.msg, "tcp_host: :: listens beyond"));
    CHECK(moed_config_set(&c, "api_key", "sk-1", &d) == 0);
    moe_diag_clear(&d);
    CHECK_MSG(moed_config_validate(&c, &d) == 0, "%s", d.msg);
    CHECK_STR(c.auth_key, "sk-1");
    CHECK(moed_config_set(&c, "api_key", "sk\x01", &d) == 0);
    CHECK(moed_config_validate(&c, &d) != 0 && strstr(d.msg, "api_key: the key has a byte 0x01"));
}

int main(void)
{
    moe_test_run("api key and tcp_host rules", test_auth_rules);
    moe_test_run("every key at its bounds", test_bounds_every_key);
    moe_test_run("file and flags", test_file_and_flags);
    moe_test_run("reload: run-time and restart keys", test_reload_split);
    return moe_test_exit_code();
}
