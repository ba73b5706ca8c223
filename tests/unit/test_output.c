/* Splitting a chat answer (daemon/output.c): reasoning in <think>, content,
 * and tool calls in the Hermes/Qwen JSON, Qwen3-Coder XML, GLM-4.5 and
 * MiniMax-M2 formats; every case is also fed one byte at a time (as a
 * stream grows) and must give the same reasoning, content and calls as the
 * whole text at once. */
#include <stdio.h>
#include <string.h>

#include "common/rng.h"
#include "daemon/output.h"
#include "tests/harness.h"

struct split {
    char reasoning[1024], content[1024];
    json_t *calls;
};

static void run(const char *text, bool reasoning, bool think_open, enum moed_tool_fmt f, size_t step,
                struct split *out)
{
    struct moed_out o;
    moed_out_init(&o, reasoning, think_open, f, 0xabc);
    struct moe_buf r = { 0 }, c = { 0 };
    out->calls = json_array();
    const size_t n = strlen(text);
    for (size_t len = step ? 0 : n; len <= n; len += step ? step : 1) {
        if (moed_out_feed(&o, text, len, len == n, &r, &c, out->calls) != 0)
            break;
        if (len == n)
            break;
    }
    snprintf(out->reasoning, sizeof(out->reasoning), "%.*s", (int)r.len, r.data ? r.data : "");
    snprintf(out->content, sizeof(out->content), "%.*s", (int)c.len, c.data ? c.data : "");
    moe_buf_free(&r);
    moe_buf_free(&c);
}

/* The answer split whole and streamed byte by byte agree; returns whole. */
static bool both(const char *text, bool reasoning, bool think_open, enum moed_tool_fmt f,
                 struct split *whole)
{
    struct split s;
    run(text, reasoning, think_open, f, 0, whole);
    run(text, reasoning, think_open, f, 1, &s);
    const bool same = strcmp(s.reasoning, whole->reasoning) == 0 &&
                      strcmp(s.content, whole->content) == 0 && json_equal(s.calls, whole->calls);
    if (!same)
        fprintf(stderr, "streamed: r='%s' c='%s' vs whole r='%s' c='%s'\n", s.reasoning, s.content,
                whole->reasoning, whole->content);
    json_decref(s.calls);
    return same;
}

static const char *call_field(json_t *calls, size_t i, const char *key)
{
    json_t *f = json_object_get(json_array_get(calls, i), "function");
    return json_string_value(json_object_get(f, key));
}

static void test_reasoning(void)
{
    struct split s;
    CHECK(both("<think>let me see</think>\n\nHello.", true, false, MOED_TOOLS_NONE, &s));
    CHECK_STR(s.reasoning, "let me see");
    CHECK_STR(s.content, "Hello.");
    json_decref(s.calls);
    CHECK(both("opened by the prompt</think>Answer", true, true, MOED_TOOLS_NONE, &s));
    CHECK_STR(s.reasoning, "opened by the prompt");
    CHECK_STR(s.content, "Answer");
    json_decref(s.calls);
    CHECK(both("<think>never closed", true, false, MOED_TOOLS_NONE, &s));   /* cut by max_tokens */
    CHECK_STR(s.reasoning, "never closed");
    CHECK_STR(s.content, "");
    json_decref(s.calls);
    CHECK(both("<thin", true, false, MOED_TOOLS_NONE, &s));                  /* not the tag */
    CHECK_STR(s.content, "<thin");
    json_decref(s.calls);
    CHECK(both("Plain <think>inline</think>", true, false, MOED_TOOLS_NONE, &s));
    CHECK_STR(s.reasoning, "");
    CHECK_STR(s.content, "Plain <think>inline</think>");   /* only at the start */
    json_decref(s.calls);
    CHECK(both("<think>x</think>y", false, false, MOED_TOOLS_NONE, &s));      /* reasoning_format none */
    CHECK_STR(s.content, "<think>x</think>y");
    json_decref(s.calls);
}

static void test_hermes(void)
{
    struct split s;
    CHECK(both("<think>plan</think>Sure.<tool_call>\n{\"name\": \"get_weather\", \"arguments\":"
               " {\"city\": \"Paris\", \"days\": 2}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\","
               " \"arguments\": \"{}\"}\n</tool_call>", true, false, MOED_TOOLS_TAG, &s));
    CHECK_STR(s.reasoning, "plan");
    CHECK_STR(s.content, "Sure.\n");
    CHECK_INT(json_array_size(s.calls), ==, 2);
    CHECK_STR(call_field(s.calls, 0, "name"), "get_weather");
    CHECK_STR(call_field(s.calls, 0, "arguments"), "{\"city\":\"Paris\",\"days\":2}");
    CHECK_STR(call_field(s.calls, 1, "name"), "now");
    CHECK_STR(call_field(s.calls, 1, "arguments"), "{}");
    CHECK_STR(json_string_value(json_object_get(json_array_get(s.calls, 1), "id")), "call_abc_1");
    json_decref(s.calls);
    /* a block that is not a call stays text; an unterminated one at the end is parsed */
    CHECK(both("a<tool_call>not json</tool_call>b", false, false, MOED_TOOLS_TAG, &s));
    CHECK_STR(s.content, "a<tool_call>not json</tool_call>b");
    CHECK_INT(json_array_size(s.calls), ==, 0);
    json_decref(s.calls);
    CHECK(both("<tool_call>{\"name\": \"f\", \"arguments\": {}}", false, false, MOED_TOOLS_TAG, &s));
    CHECK_INT(json_array_size(s.calls), ==, 1);
    CHECK_STR(s.content, "");
    json_decref(s.calls);
    CHECK(both("no call <tool_c", false, false, MOED_TOOLS_TAG, &s));
    CHECK_STR(s.content, "no call <tool_c");
    json_decref(s.calls);
}

static void test_other_formats(void)
{
    struct split s;
    CHECK(both("<tool_call>\n<function=search>\n<parameter=query>\nmoe cache\n</parameter>\n"
               "<parameter=limit>\n5\n</parameter>\n</function>\n</tool_call>", false, false,
               MOED_TOOLS_TAG, &s));
    CHECK_STR(call_field(s.calls, 0, "name"), "search");
    CHECK_STR(call_field(s.calls, 0, "arguments"), "{\"query\":\"moe cache\",\"limit\":5}");
    json_decref(s.calls);
    CHECK(both("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Beijing</arg_value>\n"
               "<arg_key>n</arg_key><arg_value>[1,2]</arg_value>\n</tool_call>", false, false,
               MOED_TOOLS_TAG, &s));
    CHECK_STR(call_field(s.calls, 0, "name"), "get_weather");
    CHECK_STR(call_field(s.calls, 0, "arguments"), "{\"city\":\"Beijing\",\"n\":[1,2]}");
    json_decref(s.calls);
    CHECK(both("Let me check.<minimax:tool_call>\n<invoke name=\"get\">\n<parameter name=\"id\">"
               "42</parameter>\n</invoke>\n<invoke name=\"put\">\n</invoke>\n</minimax:tool_call>",
               false, false, MOED_TOOLS_MINIMAX, &s));
    CHECK_STR(s.content, "Let me check.");
    CHECK_INT(json_array_size(s.calls), ==, 2);
    CHECK_STR(call_field(s.calls, 0, "arguments"), "{\"id\":42}");
    CHECK_STR(call_field(s.calls, 1, "name"), "put");
    json_decref(s.calls);
    CHECK(moed_tool_fmt_of_template("{% if tools %}<tool_call>{% endif %}") == MOED_TOOLS_TAG);
    CHECK(moed_tool_fmt_of_template("<minimax:tool_call>") == MOED_TOOLS_MINIMAX);
    CHECK(moed_tool_fmt_of_template("[TOOL_CALLS]") == MOED_TOOLS_NONE);
}

/* Random answers made of tag fragments, JSON pieces and text: never a crash
 * or an over-read (ASan in CI), and streaming byte by byte equals the whole,
 * in every mode. */
static void test_random(void)
{
    static const char *const frag[] = {
        "<think>", "</think>", "<tool_call>", "</tool_call>", "<minimax:tool_call>",
        "</minimax:tool_call>", "<invoke name=\"f\">", "</invoke>", "<parameter name=\"k\">",
        "</parameter>", "<function=g>", "<parameter=x>", "</function>", "<arg_key>", "</arg_key>",
        "<arg_value>", "</arg_value>", "{\"name\": \"f\", \"arguments\": {\"a\": 1}}", "{", "}",
        "\"", "\n", " ", "text", "<", "</", "<tool", "é", "\xff",
    };
    uint64_t rng = 12345;
    int runs = 0;
    for (int i = 0; i < 3000; i++) {
        char text[512] = "";
        const int n = 1 + (int)(moe_splitmix64(&rng) % 12);
        for (int k = 0; k < n; k++)
            strncat(text, frag[moe_splitmix64(&rng) % (sizeof(frag) / sizeof(frag[0]))],
                    sizeof(text) - strlen(text) - 1);
        const enum moed_tool_fmt f = (enum moed_tool_fmt)(moe_splitmix64(&rng) % 3);
        struct split s;
        CHECK_MSG(both(text, i % 2, i % 3 == 0, f, &s), "random answer '%s' (format %d)", text, f);
        json_decref(s.calls);
        runs++;
    }
    printf("  %d random answers split alike whole and streamed\n", runs);
}

int main(void)
{
    MOE_TEST_RUN(test_random);
    MOE_TEST_RUN(test_reasoning);
    MOE_TEST_RUN(test_hermes);
    MOE_TEST_RUN(test_other_formats);
    return moe_test_exit_code();
}
