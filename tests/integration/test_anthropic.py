#!/usr/bin/env python3
"""The Anthropic Messages API (/v1/messages) through the anthropic package
against a real moed (issue 23 part 6):
- a plain turn (system, user), whole and streamed (message_start,
  content_block_*, message_delta, message_stop): the same text as the
  OpenAI chat endpoint gives for the same conversation;
- a turn with a tool call, forced by tool_choice {"type": "any"} on a
  random-weight model: stop_reason tool_use, a tool_use block whose input
  validates against input_schema; then the tool_result goes back and the
  model answers;
- with the test hook MOED_TEST_SCRIPT, thinking, text and tool_use blocks in
  order, streamed and whole; thinking disabled drops the thinking block;
- errors in Anthropic's shape (max_tokens missing, unknown field, bad key).
Skips (77) without anthropic/openai/jsonschema or shared/ref, except in CI."""
import json
import os
import sys
import tempfile

from moed_test import Daemon as _Daemon, check, failures, finish, skip

try:
    import anthropic
    import jsonschema
    import openai
except ImportError as e:
    skip("%s is missing (tools/setup.sh installs it)" % e.name)
MOED = os.environ.get("MOED")
MODEL = os.path.join(os.environ.get("MOE_REF_DIR", ""), "models", "tiny-qwen3moe-Q8_0.gguf")
if not MOED or not os.path.exists(MODEL):
    skip("MOED or shared/ref missing")


SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "unit": {"enum": ["c", "f"]}},
          "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"name": "get_weather", "description": "Weather of a city", "input_schema": SCHEMA}]
USER = [{"role": "user", "content": "Weather in Paris?"}]

class Daemon(_Daemon):
    def __init__(self, tmp, env=None):
        super().__init__(tmp, MODEL, "--chat-template", "chatml", env=env, key="k-test")
        self.a = anthropic.Anthropic(base_url=self.url, api_key="k-test", max_retries=0)
        self.o = openai.OpenAI(base_url=self.url + "/v1", api_key="k-test", max_retries=0)

def blocks(msg):
    return [(b.type, getattr(b, "text", None) or getattr(b, "thinking", None) or getattr(b, "name", None))
            for b in msg.content]

def streamed(client, **kw):
    """The final message of a stream, and the event types seen."""
    types = []
    with client.messages.stream(**kw) as st:
        for ev in st:
            types.append(ev.type)
        return st.get_final_message(), types

with tempfile.TemporaryDirectory() as tmp:
    d = Daemon(tmp)
    try:
        # 1. a plain turn equals the OpenAI endpoint's answer
        greedy = {"extra_body": {"temperature": 0}}   # SDK 2.x has no temperature argument
        m = d.a.messages.create(model="m", max_tokens=12, system="Be brief.", messages=USER, **greedy)
        o = d.o.chat.completions.create(model="m", max_tokens=12, temperature=0, messages=[
            {"role": "system", "content": "Be brief."}] + USER)
        check(m.type == "message" and m.role == "assistant" and m.id.startswith("msg_"), "message %s" % m)
        check(blocks(m) == [("text", o.choices[0].message.content)], "text %s vs %r" % (blocks(m),
              o.choices[0].message.content))
        check(m.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[o.choices[0].finish_reason],
              "stop_reason %s" % m.stop_reason)
        check(m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0) == o.usage.prompt_tokens and
              m.usage.output_tokens == o.usage.completion_tokens, "usage %s vs %s" % (m.usage, o.usage))
        again = d.a.messages.create(model="m", max_tokens=12, system="Be brief.", messages=USER, **greedy)
        check(again.usage.cache_read_input_tokens > 0 and
              again.usage.input_tokens + again.usage.cache_read_input_tokens == o.usage.prompt_tokens,
              "a repeated prompt reads the prefix cache: %s" % again.usage)
        f, types = streamed(d.a, model="m", max_tokens=12, system="Be brief.", messages=USER, **greedy)
        check(blocks(f) == blocks(m) and f.stop_reason == m.stop_reason, "stream %s vs %s" % (blocks(f), blocks(m)))
        check(types[0] == "message_start" and types[-1] == "message_stop" and "content_block_start" in types
              and "message_delta" in types, "events %s" % types)
        # 2. a forced tool call, then its result
        for seed in range(3):
            m = d.a.messages.create(model="m", max_tokens=200, messages=USER, tools=TOOLS,
                                    tool_choice={"type": "any"},
                                    extra_body={"temperature": 1.0, "top_k": 40} if seed else greedy["extra_body"])
            uses = [b for b in m.content if b.type == "tool_use"]
            check(m.stop_reason == "tool_use" and len(uses) == 1 and uses[0].name == "get_weather",
                  "forced: %s %s" % (m.stop_reason, m.content))
            if uses:
                try:
                    jsonschema.validate(uses[0].input, SCHEMA)
                except jsonschema.ValidationError as e:
                    check(False, "input %s: %s" % (uses[0].input, e.message))
        f, _ = streamed(d.a, model="m", max_tokens=200, messages=USER, tools=TOOLS, **greedy,
                        tool_choice={"type": "tool", "name": "get_weather"})
        use = [b for b in f.content if b.type == "tool_use"]
        check(f.stop_reason == "tool_use" and len(use) == 1, "streamed forced: %s" % f.content)
        if use:
            m2 = d.a.messages.create(model="m", max_tokens=6, tools=TOOLS, **greedy, messages=USER + [
                {"role": "assistant", "content": [{"type": "tool_use", "id": use[0].id, "name": use[0].name,
                                                   "input": use[0].input}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use[0].id,
                                              "content": "21 degrees"}]}])
            check(m2.stop_reason in ("end_turn", "max_tokens") and m2.content and m2.content[0].type == "text",
                  "answer after the result: %s" % m2)
            total = lambda u: u.input_tokens + (u.cache_read_input_tokens or 0)
            check(total(m2.usage) > total(m.usage), "the tool turn did not reach the prompt: %s vs %s" % (
                m2.usage, m.usage))
        # 3. errors in Anthropic's shape
        try:
            d.a.messages.create(model="m", max_tokens=5, messages=USER, extra_body={"top_n": 3})
            check(False, "unknown field accepted")
        except anthropic.BadRequestError as e:
            check(e.body["type"] == "error" and e.body["error"]["type"] == "invalid_request_error" and
                  "top_n" in e.body["error"]["message"], "error body %s" % e.body)
        try:
            anthropic.Anthropic(base_url="http://127.0.0.1:%d" % d.port, api_key="wrong",
                                max_retries=0).messages.create(model="m", max_tokens=5, messages=USER)
            check(False, "a wrong key was accepted")
        except anthropic.AuthenticationError:
            pass
    finally:
        d.stop()

    script = ("<think>Paris, so call the tool.</think>\n\nChecking.<tool_call>\n"
              '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>')
    d = Daemon(tmp, {"MOED_TEST_SCRIPT": script})
    try:
        m = d.a.messages.create(model="m", max_tokens=200, messages=USER, tools=TOOLS,
                                thinking={"type": "enabled", "budget_tokens": 1024})
        want = [("thinking", "Paris, so call the tool."), ("text", "Checking."), ("tool_use", "get_weather")]
        check(blocks(m) == want and m.stop_reason == "tool_use", "scripted: %s %s" % (blocks(m), m.stop_reason))
        check(m.content[-1].input == {"city": "Paris", "unit": "c"}, "input %s" % m.content[-1].input)
        f, _ = streamed(d.a, model="m", max_tokens=200, messages=USER, tools=TOOLS)
        check(blocks(f) == want and f.stop_reason == "tool_use" and f.content[-1].input == m.content[-1].input,
              "scripted stream: %s" % blocks(f))
        m = d.a.messages.create(model="m", max_tokens=200, messages=USER, tools=TOOLS,
                                thinking={"type": "disabled"})
        check(blocks(m) == want[1:], "thinking disabled: %s" % blocks(m))
    finally:
        d.stop()

finish("ok: /v1/messages (text, stream, forced tool_use, tool_result, thinking, errors)")
