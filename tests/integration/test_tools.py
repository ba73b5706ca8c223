#!/usr/bin/env python3
"""Tool calls and reasoning through the openai package against a real moed
(issue 23 parts 3 and 5):
- tool_choice "required" and a named function force a call by grammar
  (random-weight models): finish_reason tool_calls, the arguments parse and
  validate against the function's parameters, streaming and not;
- the round trip: the assistant's tool_calls and the tool's result go back
  in, and the model answers;
- with the test hook MOED_TEST_SCRIPT (every answer is a given text), a
  model that thinks and then calls a tool in the Hermes format is split into
  reasoning_content, content and tool_calls, streamed and whole, identically;
  reasoning_format none keeps the text inline.
Skips (77) without openai/jsonschema or shared/ref, except in CI."""
import json
import os
import sys
import tempfile

from moed_test import Daemon as _Daemon, check, failures, finish, skip

try:
    import jsonschema
    import openai
except ImportError as e:
    skip("%s is missing (tools/setup.sh installs it)" % e.name)
MOED = os.environ.get("MOED")
MODEL = os.path.join(os.environ.get("MOE_REF_DIR", ""), "models", "tiny-qwen3moe-Q8_0.gguf")
if not MOED or not os.path.exists(MODEL):
    skip("MOED or shared/ref missing")


WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 16},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer"}}, "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string", "maxLength": 8}}, "required": ["tz"]}}},
]
SCHEMA = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

class Daemon(_Daemon):
    def __init__(self, tmp, env=None):
        super().__init__(tmp, MODEL, "--chat-template", "chatml", env=env)
        self.c = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

def collect(stream):
    """A stream's reasoning, content, tool calls (merged by index) and finish."""
    r, c, calls, fin, roles = "", "", {}, None, 0
    for ch in stream:
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        roles += d.role is not None
        r += getattr(d, "reasoning_content", None) or (d.model_extra or {}).get("reasoning_content") or ""
        c += d.content or ""
        for tc in d.tool_calls or []:
            e = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            e["id"] = tc.id or e["id"]
            e["name"] += tc.function.name or ""
            e["arguments"] += tc.function.arguments or ""
        fin = ch.choices[0].finish_reason or fin
    check(roles == 1, "the role came in %d chunks" % roles)
    return r, c, [calls[i] for i in sorted(calls)], fin

def reasoning_of(msg):
    return getattr(msg, "reasoning_content", None) or (msg.model_extra or {}).get("reasoning_content")

USER = [{"role": "user", "content": "What is the weather in Paris?"}]

with tempfile.TemporaryDirectory() as tmp:
    d = Daemon(tmp)
    try:
        # 1. forced calls, whole and streamed, for several seeds
        for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
            for seed in range(4):
                kw = dict(temperature=0) if seed == 0 else dict(temperature=1.0, seed=seed)
                r = d.c.chat.completions.create(model="m", messages=USER, tools=TOOLS, tool_choice=choice,
                                                max_tokens=200, **kw)
                m = r.choices[0].message
                ok = r.choices[0].finish_reason == "tool_calls" and m.tool_calls and len(m.tool_calls) == 1
                check(ok, "forced %s seed %d: %s %s" % (choice, seed, r.choices[0].finish_reason, m))
                if not ok:
                    continue
                call = m.tool_calls[0]
                want = "get_time" if isinstance(choice, dict) else call.function.name
                check(call.function.name == want and call.function.name in SCHEMA,
                      "called %s" % call.function.name)
                try:
                    jsonschema.validate(json.loads(call.function.arguments), SCHEMA[call.function.name])
                except (ValueError, jsonschema.ValidationError) as e:
                    check(False, "arguments %r: %s" % (call.function.arguments, str(e)[:200]))
                check(m.content is None and call.id.startswith("call_") and call.type == "function",
                      "message: %s" % m)
                rs, cs, calls, fin = collect(d.c.chat.completions.create(
                    model="m", messages=USER, tools=TOOLS, tool_choice=choice, max_tokens=200, stream=True, **kw))
                check(fin == "tool_calls" and len(calls) == 1 and calls[0]["name"] == call.function.name and
                      calls[0]["arguments"] == call.function.arguments and cs == "",
                      "streamed %s vs %s" % (calls, call))
        # 2. the round trip: call -> result -> answer
        r = d.c.chat.completions.create(model="m", messages=USER, tools=TOOLS, tool_choice="required",
                                        max_tokens=200, temperature=0)
        call = r.choices[0].message.tool_calls[0]
        turn = USER + [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 21})}]
        a = d.c.chat.completions.create(model="m", messages=turn, tools=TOOLS, max_tokens=8, temperature=0)
        check(a.choices[0].finish_reason in ("stop", "length") and a.choices[0].message.content,
              "answer after the tool result: %s" % a.choices[0])
        check(a.usage.prompt_tokens > r.usage.prompt_tokens + 20,
              "the tool turn did not reach the prompt (%d vs %d tokens)" % (a.usage.prompt_tokens,
                                                                              r.usage.prompt_tokens))
        rs, cs, calls, fin = collect(d.c.chat.completions.create(model="m", messages=turn, tools=TOOLS,
                                                                 max_tokens=8, temperature=0, stream=True))
        check(cs == a.choices[0].message.content, "streamed answer %r vs %r" % (cs, a.choices[0].message.content))
        # tool_choice none: no tools in the prompt, nothing parsed
        n = d.c.chat.completions.create(model="m", messages=USER, tools=TOOLS, tool_choice="none",
                                        max_tokens=4, temperature=0)
        plain = d.c.chat.completions.create(model="m", messages=USER, max_tokens=4, temperature=0)
        check(n.usage.prompt_tokens == plain.usage.prompt_tokens, "tool_choice none rendered the tools")
    finally:
        d.stop()

    # 3. a scripted model that thinks, says something and calls a tool
    script = ("<think>The user wants Paris.\nCall the tool.</think>\n\nLet me look.<tool_call>\n"
              '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>')
    d = Daemon(tmp, {"MOED_TEST_SCRIPT": script})
    try:
        r = d.c.chat.completions.create(model="m", messages=USER, tools=TOOLS, max_tokens=200)
        m = r.choices[0].message
        check(reasoning_of(m) == "The user wants Paris.\nCall the tool.", "reasoning: %r" % reasoning_of(m))
        check(m.content == "Let me look.", "content: %r" % m.content)
        check(r.choices[0].finish_reason == "tool_calls" and len(m.tool_calls or []) == 1 and
              m.tool_calls[0].function.name == "get_weather" and
              json.loads(m.tool_calls[0].function.arguments) == {"city": "Paris", "unit": "celsius"},
              "scripted call: %s %s" % (r.choices[0].finish_reason, m.tool_calls))
        rs, cs, calls, fin = collect(d.c.chat.completions.create(model="m", messages=USER, tools=TOOLS,
                                                                 max_tokens=200, stream=True))
        check((rs, cs, fin) == (reasoning_of(m), m.content, "tool_calls") and len(calls) == 1 and
              calls[0]["arguments"] == m.tool_calls[0].function.arguments,
              "scripted stream: %r %r %s %s" % (rs, cs, calls, fin))
        # without tools the block stays text; reasoning_format none keeps <think> inline
        r = d.c.chat.completions.create(model="m", messages=USER, max_tokens=200)
        check(r.choices[0].message.content.startswith("Let me look.<tool_call>") and
              r.choices[0].finish_reason == "stop", "no tools: %s" % r.choices[0].message)
        r = d.c.chat.completions.create(model="m", messages=USER, max_tokens=200,
                                        extra_body={"reasoning_format": "none"})
        check(r.choices[0].message.content.startswith("<think>The user") and not reasoning_of(r.choices[0].message),
              "reasoning_format none: %s" % r.choices[0].message)
    finally:
        d.stop()

finish("ok: tool calls (forced, streamed, round trip), reasoning split")
