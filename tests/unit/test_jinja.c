/* model/jinja: the interpreter against outputs of Python's jinja2 3.1 in
 * transformers' environment (shared/ref/templates/render.py's make_env),
 * recorded here case by case; its limits, error kinds and llama.cpp
 * extensions; model/chat_jinja's tool-call argument probe. The parity test
 * (tests/parity/test_jinja_ref) renders real templates against jinja2 live. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/alloc.h"
#include "model/chat_jinja.h"
#include "model/jinja.h"
#include "tests/harness.h"

#define ERR_ANY 100   /* any error that is not a raise (jinja2 raised something else) */

/* Variables of every case: x, messages, the chat globals. 2026-01-15 09:30 UTC. */
static const char *const VARS =
    "{\"x\": {\"a\": 1, \"b\": \"two\", \"c\": [1, 2, 3]},"
    " \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}],"
    " \"tools\": null, \"add_generation_prompt\": true, \"bos_token\": \"<s>\", \"eos_token\": \"</s>\"}";
#define CLOCK 1768469400

static const struct { const char *src; int kind; const char *out; } cases[] = {
    { "{{ 'a' ~ 1 ~ none ~ true }}",
      MOE_JINJA_OK, "a1NoneTrue" },
    { "{% for i in range(5) if i is odd %}{{ loop.index }}/{{ loop.length }}:{{ i }} {% else %}empty{% endfor %}",
      MOE_JINJA_OK, "1/2:1 2/2:3 " },
    { "{% for i in [] %}x{% else %}empty{% endfor %}",
      MOE_JINJA_OK, "empty" },
    { "{% set ns = namespace(a=1) %}{% for i in range(3) %}{% set ns.a = ns.a * 2 %}{% endfor %}{{ ns.a }}",
      MOE_JINJA_OK, "8" },
    { "{% set x = 0 %}{% for i in [1,2] %}{% set x = x + i %}{{ x }}{% endfor %}{{ x }}",
      MOE_JINJA_OK, "120" },
    { "{{ [3,1,2]|sort|join(',') }} {{ ['b','A','c']|sort }} {{ {'b':1,'a':2}|dictsort }}",
      MOE_JINJA_OK, "1,2,3 ['A', 'b', 'c'] [('a', 2), ('b', 1)]" },
    { "{{ 'Hello World'.split() }} {{ 'a,b,,c'.split(',') }} {{ 'a b c'.split(None, 1) }} {{ '  x  '.strip() }}|{{ 'xxhixx'.strip('x') }}",
      MOE_JINJA_OK, "['Hello', 'World'] ['a', 'b', '', 'c'] ['a', 'b c'] x|hi" },
    { "{{ 'abc'[::-1] }} {{ [1,2,3,4][1:3] }} {{ 'hello'[1:-1] }} {{ [1,2,3][-1] }} {{ 'h\xc3""\xa9""llo'[1] }} {{ 'h\xc3""\xa9""llo'|length }}",
      MOE_JINJA_OK, "cba [2, 3] ell 3 \xc3""\xa9"" 5" },
    { "{{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 2 ** 10 }} {{ 1.5 + 1 }} {{ 10 / 4 }}",
      MOE_JINJA_OK, "3 -4 1 2 3.5 1024 2.5 2.5" },
    { "{{ x|tojson }} {{ x|tojson(indent=2) }} {{ x|tojson(sort_keys=true) }} {{ '\xc3""\xa9""'|tojson(ensure_ascii=true) }}",
      MOE_JINJA_OK, "{\"a\": 1, \"b\": \"two\", \"c\": [1, 2, 3]} {\n  \"a\": 1,\n  \"b\": \"two\",\n  \"c\": [\n    1,\n    2,\n    3\n  ]\n} {\"a\": 1, \"b\": \"two\", \"c\": [1, 2, 3]} \"\\u00e9\"" },
    { "{{ x }} {{ x.a }} {{ x['b'] }} {{ x.missing is defined }} {{ x.items()|list }}",
      MOE_JINJA_OK, "{'a': 1, 'b': 'two', 'c': [1, 2, 3]} 1 two False [('a', 1), ('b', 'two'), ('c', [1, 2, 3])]" },
    { "{% macro m(a, b='B', c=none) %}[{{ a }}|{{ b }}|{{ c }}]{% endmacro %}{{ m(1) }}{{ m(1, 2) }}{{ m(1, c=3) }}",
      MOE_JINJA_OK, "[1|B|None][1|2|None][1|B|3]" },
    { "{%- if true -%}\n  yes\n{%- endif -%}\n  after",
      MOE_JINJA_OK, "yesafter" },
    { "  {% if true %}\n    line\n  {% endif %}\nend",
      MOE_JINJA_OK, "    line\nend" },
    { "{# comment #}\n{% set a %}block {{ 1 + 1 }}{% endset %}{{ a|upper }}",
      MOE_JINJA_OK, "BLOCK 2" },
    { "{{ 'x' if false }}|{{ 'y' if true else 'z' }}|{{ none is none }}|{{ 1 in [1,2] }}|{{ 'a' not in 'abc' }}",
      MOE_JINJA_OK, "|y|True|True|False" },
    { "{{ [1,2,3]|map('string')|join('-') }} {{ [{'a':1},{'a':2}]|map(attribute='a')|list }} {{ [{'a':1},{'b':2}]|selectattr('a')|list }}",
      MOE_JINJA_OK, "1-2-3 [1, 2] [{'a': 1}]" },
    { "{{ [{'a':1},{'a':2}]|selectattr('a', 'equalto', 2)|list }} {{ [1,2,3,4]|select('even')|list }} {{ [1,2,3]|reject('odd')|list }}",
      MOE_JINJA_OK, "[{'a': 2}] [2, 4] [2]" },
    { "{{ 'abc'.startswith('a') }} {{ 'abc'.endswith(('x','c')) }} {{ 'a-b'.replace('-', '+') }} {{ 'hello world'.title() }} {{ 'hello'.capitalize() }}",
      MOE_JINJA_OK, "True True a+b Hello World Hello" },
    { "{{ '{} is {}'.format('x', 2) }} {{ 'abcabc'.count('b') }} {{ 'abc'.find('c') }} {{ 'abc'.upper() }} {{ 'a\\nb'.splitlines() }}",
      MOE_JINJA_OK, "x is 2 2 2 ABC ['a', 'b']" },
    { "{{ 1 == 1.0 }} {{ true == 1 }} {{ 'a' < 'b' }} {{ [1,2] < [1,3] }} {{ 1 < 2 < 3 }} {{ (1, 2) }} {{ (1,) }} {{ () }}",
      MOE_JINJA_OK, "True True True True True (1, 2) (1,) ()" },
    { "{{ 0.1 + 0.2 }} {{ 1e20 }} {{ 1e-5 }} {{ 3.0 }} {{ -0.5 }} {{ 1/3 }} {{ 123456789.125 }} {{ 2.5|round }} {{ 3.14159|round(2) }}",
      MOE_JINJA_OK, "0.30000000000000004 1e+20 1e-05 3.0 -0.5 0.3333333333333333 123456789.125 2.0 3.14" },
    { "{{ x.c|length }} {{ x|length }} {{ 'abc'|list }} {{ x|list }} {{ x.c|first }} {{ x.c|last }} {{ x.c|reverse|list }}",
      MOE_JINJA_OK, "3 3 ['a', 'b', 'c'] ['a', 'b', 'c'] 1 3 [3, 2, 1]" },
    { "{{ '5'|int + 1 }} {{ 'x'|int }} {{ 2.7|int }} {{ '2.5'|float }} {{ 3|float }} {{ -3|abs }}",
      MOE_JINJA_OK, "6 0 2 2.5 3.0 3" },
    { "{{ undefined_thing|default('dflt') }} {{ ''|default('e', true) }} {{ none|default('n') }} {{ x.c|join }} {{ x.c|sum }} {{ x.c|max }} {{ x.c|min }}",
      MOE_JINJA_OK, "dflt e None 123 6 3 1" },
    { "{% for k, v in x.items() %}{{ k }}={{ v }};{% endfor %}",
      MOE_JINJA_OK, "a=1;b=two;c=[1, 2, 3];" },
    { "{% for a in [1,2,3] %}{% if a == 2 %}{% continue %}{% endif %}{% if a == 3 %}{% break %}{% endif %}{{ a }}{% endfor %}",
      MOE_JINJA_OK, "1" },
    { "{% for a in 'xyz' %}{{ loop.previtem }}{{ a }}{{ loop.nextitem }}|{{ loop.first }}{{ loop.last }}{{ loop.revindex }} {% endfor %}",
      MOE_JINJA_OK, "xy|TrueFalse3 xyz|FalseFalse2 yz|FalseTrue1 " },
    { "{{ raise_exception('boom') }}",
      MOE_JINJA_RAISE, "boom" },
    { "{{ x.a.b.c }}",
      ERR_ANY, "" },
    { "{{ strftime_now('%Y-%m-%d %H:%M %A %b') }}",
      MOE_JINJA_OK, "2026-01-15 09:30 Thursday Jan" },
    { "{{ 'ab' * 3 }} {{ [1] * 2 }} {{ '%' }} {{ \"it's\" }} {{ 'say \"hi\"' }} {{ 'a\\tb' }}",
      MOE_JINJA_OK, "ababab [1, 1] % it's say \"hi\" a\tb" },
    { "{{ {'a': [1, 'x', none, true, 1.5, {'k': 'v'}]} }} {{ ['it\\'s', \"q\\\"\"] }} {{ 'x'|string }} {{ 1|string }}",
      MOE_JINJA_OK, "{'a': [1, 'x', None, True, 1.5, {'k': 'v'}]} [\"it's\", 'q\"'] x 1" },
    { "{% set a, b = [1, 2] %}{{ a }}{{ b }} {% set t = (1, 2) %}{{ t[0] }}",
      MOE_JINJA_OK, "12 1" },
    { "{{ ('a' + 'b')|safe + '<&>' }} {{ '<&>'|e }} {{ '<'|safe ~ '<' }}",
      MOE_JINJA_OK, "ab&lt;&amp;&gt; &lt;&amp;&gt; <<" },
    { "{% raw %}{{ not rendered }}{% endraw %} done",
      MOE_JINJA_OK, "{{ not rendered }} done" },
    { "{{ 'Hello World'|title }} {{ 'hello-world foo'|title }} {{ 'ABC'|lower }} {{ 'abc'|capitalize }} {{ 'a b'|replace(' ', '_') }}",
      MOE_JINJA_OK, "Hello World Hello-World Foo abc Abc a_b" },
    { "{{ x.c|tojson(separators=(',', ':')) }} {{ [1, [2, []], {}]|tojson(indent=1) }}",
      MOE_JINJA_OK, "[1,2,3] [\n 1,\n [\n  2,\n  []\n ],\n {}\n]" },
    { "{{ range(3)|list }} {{ range(1, 10, 3)|list }} {{ dict(a=1, b=2) }} {{ x.get('a') }} {{ x.get('zz', 'd') }} {{ x.get('zz') }}",
      MOE_JINJA_OK, "[0, 1, 2] [1, 4, 7] {'a': 1, 'b': 2} 1 d None" },
    { "{{ x is mapping }} {{ x.c is sequence }} {{ 'a' is string }} {{ 1 is number }} {{ 1.0 is float }} {{ 1 is integer }} {{ true is boolean }} {{ none is none }} {{ x.c is iterable }}",
      MOE_JINJA_OK, "True True True True True True True True True" },
    { "{{ 'a' in x }} {{ 1 in x.c }} {{ [1,2,3]|unique|list }} {{ [3,1]|sort(reverse=true) }} {{ x|dictsort(reverse=true) }}",
      MOE_JINJA_OK, "True True [1, 2, 3] [3, 1] [('c', [1, 2, 3]), ('b', 'two'), ('a', 1)]" },
    { "{%- for m in messages -%}\n{{ m.role }}:{{ m.content }}\n{%- endfor %}",
      MOE_JINJA_OK, "user:hiassistant:yo" },
    { "{{ -1 }} {{ -x.a }} {{ not x }} {{ x and 'y' }} {{ 0 or 'z' }} {{ '' or [] }}",
      MOE_JINJA_OK, "-1 -1 False y z []" },
    { "{{ 1 + 'a' }}",
      ERR_ANY, "" },
    { "{{ none + 1 }}",
      ERR_ANY, "" },
    { "{{ x.nope() }}",
      ERR_ANY, "" },
    { "{{ [1,2].append(3) }}",
      ERR_ANY, "" },
    { "{% for i in 5 %}{% endfor %}",
      ERR_ANY, "" },
    { "{{ 'abc' | from_json }}",
      ERR_ANY, "" },
    { "{% if %}",
      ERR_ANY, "" },
    { "{{ 'a' }",
      ERR_ANY, "" },
};

static int render(const char *src, const char *vars, const struct moe_jinja_opts *o, char **out,
                  struct moe_jinja_err *err)
{
    struct moe_jinja *t = NULL;
    size_t len;
    *out = NULL;
    int rc = moe_jinja_compile(src, strlen(src), &t, err);
    if (rc == 0)
        rc = moe_jinja_render(t, vars, o, out, &len, err);
    if (rc == 0 && strlen(*out) != len)
        rc = -EPROTO;
    moe_jinja_free(t);
    return rc;
}

static void test_against_jinja2(void)
{
    struct moe_jinja_opts o;
    moe_jinja_opts_default(&o);
    o.clock = CLOCK;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char *out = NULL;
        struct moe_jinja_err err;
        int rc = render(cases[i].src, VARS, &o, &out, &err);
        if (cases[i].kind == MOE_JINJA_OK) {
            CHECK_MSG(rc == 0, "case %zu %s: error %s", i, cases[i].src, err.msg);
            CHECK_MSG(strcmp(out, cases[i].out) == 0, "case %zu %s:\n got  '%s'\n want '%s'", i, cases[i].src, out,
                      cases[i].out);
        } else if (cases[i].kind == MOE_JINJA_RAISE) {
            CHECK_MSG(rc == -EINVAL && err.kind == MOE_JINJA_RAISE, "case %zu %s: rc %d kind %d", i,
                      cases[i].src, rc, err.kind);
            CHECK_STR(err.msg, cases[i].out);
        } else {
            CHECK_MSG(rc != 0 && err.kind != MOE_JINJA_RAISE && err.msg[0], "case %zu %s: rendered '%s'", i,
                      cases[i].src, out ? out : "");
        }
        moe_free(out);
    }
}

static void test_errors_name_line(void)
{
    char *out;
    struct moe_jinja_err err;
    CHECK_INT(render("a\nb\n{% if x %}\n{% endfor %}", NULL, NULL, &out, &err), ==, MOE_EFORMAT);
    CHECK_INT(err.kind, ==, MOE_JINJA_SYNTAX);
    CHECK_INT(err.line, ==, 4);
    CHECK_INT(render("{{ 'unterminated }}", NULL, NULL, &out, &err), ==, MOE_EFORMAT);
    CHECK(strstr(err.msg, "unterminated string") != NULL);
    CHECK_INT(render("ok\n{{ nothing.here }}", NULL, NULL, &out, &err), ==, -EINVAL);
    CHECK_INT(err.kind, ==, MOE_JINJA_RENDER);
    CHECK_INT(err.line, ==, 2);
    CHECK_STR(err.msg, "'nothing' is undefined");
    CHECK_INT(render("{{ 1 }}", "[1]", NULL, &out, &err), ==, MOE_EFORMAT);
    CHECK_INT(err.kind, ==, MOE_JINJA_INPUT);
    CHECK_INT(render("{{ 1 }}", "{\"a\": ", NULL, &out, &err), ==, MOE_EFORMAT);
    CHECK(strstr(err.msg, "not valid JSON") != NULL);
}

static void test_limits(void)
{
    struct moe_jinja_opts o;
    char *out;
    struct moe_jinja_err err;
    moe_jinja_opts_default(&o);
    o.max_output = 1000;
    CHECK_INT(render("{% for i in range(2000) %}x{% endfor %}", NULL, &o, &out, &err), ==, MOE_ELIMIT);
    CHECK_INT(err.kind, ==, MOE_JINJA_LIMIT);
    CHECK(strstr(err.msg, "1000 bytes") != NULL);
    CHECK_INT(render("{% for i in range(999) %}x{% endfor %}", NULL, &o, &out, &err), ==, 0);
    CHECK_INT(strlen(out), ==, 999);
    moe_free(out);

    moe_jinja_opts_default(&o);
    o.max_iterations = 5000;
    CHECK_INT(render("{% for i in range(100) %}{% for j in range(100) %}{% endfor %}{% endfor %}", NULL, &o, &out,
                     &err), ==, MOE_ELIMIT);
    CHECK(strstr(err.msg, "loop iterations") != NULL);

    moe_jinja_opts_default(&o);
    CHECK_INT(render("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", NULL, &o, &out, &err), ==,
              MOE_ELIMIT);
    CHECK(strstr(err.msg, "nested deeper") != NULL);

    o.max_memory = 1 << 20;
    CHECK_INT(render("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                     "{% endfor %}", NULL, &o, &out, &err), ==, MOE_ELIMIT);
    CHECK_INT(err.kind, ==, MOE_JINJA_LIMIT);

    moe_jinja_opts_default(&o);
    CHECK_INT(render("{{ range(100001)|length }}", NULL, &o, &out, &err), ==, -EINVAL);
    CHECK(strstr(err.msg, "Range too big") != NULL);

    /* deep nesting is refused at compile time, not by a stack overflow */
    size_t n = 5000;
    char *deep = malloc(2 * n + 16);
    CHECK(deep != NULL);
    strcpy(deep, "{{ ");
    for (size_t i = 0; i < n; i++)
        strcat(deep, "(");
    strcat(deep, "1");
    for (size_t i = 0; i < n; i++)
        strcat(deep, ")");
    strcat(deep, " }}");
    int rc = render(deep, NULL, &o, &out, &err);
    free(deep);
    CHECK_INT(rc, ==, MOE_EFORMAT);
    CHECK(strstr(err.msg, "nested deeper") != NULL);
}

/* an error inside a macro or a set block (output redirected) frees everything */
static void test_error_paths_free(void)
{
    static const char *const srcs[] = {
        "x{% macro m() %}a{{ raise_exception('r') }}{% endmacro %}{{ m() }}",
        "x{% set b %}a{{ undefined_name.attr }}{% endset %}",
        "x{% macro m() %}{% set b %}{{ 1 + 'a' }}{% endset %}{% endmacro %}{{ m() }}",
    };
    for (size_t i = 0; i < sizeof(srcs) / sizeof(srcs[0]); i++) {
        long live = moe_alloc_live();
        char *out;
        struct moe_jinja_err err;
        CHECK_INT(render(srcs[i], NULL, NULL, &out, &err), ==, -EINVAL);
        CHECK_INT(moe_alloc_live(), ==, live);
    }
}

static void test_llama_ext(void)
{
    struct moe_jinja_opts o;
    char *out;
    struct moe_jinja_err err;
    moe_jinja_opts_default(&o);
    const char *src = "{% set l = [1] %}{% set _ = l.append(2) %}{{ l }} {{ '{\"a\": [1]}'|from_json }}";
    CHECK_INT(render(src, NULL, &o, &out, &err), ==, -EINVAL);     /* transformers refuses both */
    o.llama_ext = true;
    CHECK_INT(render(src, NULL, &o, &out, &err), ==, 0);
    CHECK_STR(out, "[1, 2] {'a': [1]}");
    moe_free(out);
}

static void test_chat(void)
{
    /* needs objects: .items() on the arguments */
    const char *tpl = "{% for m in messages %}{% for tc in m.tool_calls or [] %}{{ tc.function.name }}("
                      "{% for k, v in tc.function.arguments.items() %}{{ k }}={{ v }}{% endfor %}){% endfor %}"
                      "{% endfor %}{{ bos_token }}{{ tools[0].function.name }}{{ flag }}";
    struct moe_chat_jinja *cj = NULL;
    struct moe_diag d = { 0 };
    CHECK_INT(moe_chat_jinja_open(&cj, tpl, strlen(tpl), NULL, &d), ==, 0);
    CHECK(moe_chat_jinja_object_args(cj));
    const char *msgs = "[{\"role\":\"assistant\",\"tool_calls\":[{\"type\":\"function\",\"function\":"
                       "{\"name\":\"f\",\"arguments\":\"{\\\"city\\\":\\\"Paris\\\"}\"}}]}]";
    char *out = NULL;
    size_t len;
    struct moe_jinja_err err;
    CHECK_INT(moe_chat_jinja_apply(cj, msgs, "[{\"function\":{\"name\":\"t\"}}]", true, "{\"flag\":\"!\"}",
                                   &out, &len, &err), ==, 0);
    CHECK_STR(out, "f(city=Paris)t!");
    moe_free(out);
    moe_chat_jinja_free(cj);

    /* needs strings: concatenation */
    const char *tpl2 = "{% for m in messages %}{% for tc in m.tool_calls %}{{ tc.function.name + ':' + "
                       "tc.function.arguments }}{% endfor %}{% endfor %}{% if messages[0].content == 'no' %}"
                       "{{ raise_exception('refused: ' ~ messages[0].content) }}{% endif %}";
    CHECK_INT(moe_chat_jinja_open(&cj, tpl2, strlen(tpl2), NULL, &d), ==, 0);
    CHECK(!moe_chat_jinja_object_args(cj));
    CHECK_INT(moe_chat_jinja_apply(cj, msgs, NULL, false, NULL, &out, &len, &err), ==, 0);
    CHECK_STR(out, "f:{\"city\":\"Paris\"}");
    moe_free(out);
    CHECK_INT(moe_chat_jinja_apply(cj, "[{\"role\":\"user\",\"content\":\"no\",\"tool_calls\":[]}]", NULL, false,
                                   NULL, &out, &len, &err), ==, -EINVAL);
    CHECK_INT(err.kind, ==, MOE_JINJA_RAISE);
    CHECK_STR(err.msg, "refused: no");
    moe_chat_jinja_free(cj);

    CHECK_INT(moe_chat_jinja_open(&cj, "{% if %}", 8, NULL, &d), ==, MOE_EFORMAT);
    CHECK(strstr(d.msg, "line 1") != NULL);
}

/* every allocation failure is an error, never a leak or a crash */
static void test_alloc_failures(void)
{
    const char *src = "{% for m in messages %}{{ m.role|upper }}:{{ m.content ~ '!' }}{% endfor %}{{ x|tojson }}";
    for (long k = 0; k < 40; k++) {
        long live = moe_alloc_live();
        moe_alloc_fail_after(k);
        char *out = NULL;
        struct moe_jinja_err err;
        int rc = render(src, VARS, NULL, &out, &err);
        moe_alloc_fail_after(-1);
        moe_free(out);
        CHECK_MSG(rc == 0 || rc == -ENOMEM || rc == MOE_ELIMIT, "fail after %ld: rc %d", k, rc);
        CHECK_INT(moe_alloc_live(), ==, live);
    }
}

int main(void)
{
    MOE_TEST_RUN(test_against_jinja2);
    MOE_TEST_RUN(test_errors_name_line);
    MOE_TEST_RUN(test_limits);
    MOE_TEST_RUN(test_error_paths_free);
    MOE_TEST_RUN(test_llama_ext);
    MOE_TEST_RUN(test_chat);
    MOE_TEST_RUN(test_alloc_failures);
    return moe_test_exit_code();
}
