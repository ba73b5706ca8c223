#!/usr/bin/env python3
"""Chat through Jinja templates against a real moed (doc/templates.md):
- a GGUF's own tokenizer.chat_template (tiny-qwen3moe) is used without any
  flag, and the prompt moed tokenizes is exactly what `moectl template`
  prints (same token count through /tokenize, a leading BOS text dropped as
  the tokenizer adds its own);
- the reference GGUFs without a template (mixtral, deepseek2, gpt-oss), which
  moed refuses for chat by default, chat with chat_template_file set to
  their family's template from shared/ref/templates;
- a template's raise_exception is a 400 carrying its message;
- chat_template_kwargs reach the template, and a non-object is a 400.
Skips (77) without shared/ref, except in CI."""
import json
import os
import subprocess
import sys
import tempfile


from moed_test import Daemon as _Daemon, check, failures, skip

MOED, MOECTL = os.environ.get("MOED"), os.environ.get("MOECTL")
REF = os.environ.get("MOE_REF_DIR", "")
MODELS = os.path.join(REF, "models")
TEMPLATES = os.path.join(REF, "templates")
if not MOED or not MOECTL or not os.path.isdir(MODELS) or not os.path.isdir(TEMPLATES):
    skip("MOED, MOECTL or shared/ref (models, templates) missing")


class Daemon(_Daemon):
    def __init__(self, tmp, model, *extra):
        super().__init__(tmp, model, *extra, seqs=1)

    def chat(self, messages, **kw):
        body = dict(messages=messages, max_tokens=2, temperature=0)
        body.update(kw)
        return self.call("POST", "/v1/chat/completions", body)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2+2?"}]


def rendered(tmp, model, template=None, kwargs=None):
    path = os.path.join(tmp, "messages.json")
    with open(path, "w") as f:
        json.dump(MESSAGES, f)
    cmd = [MOECTL, "template", "--model", model, "--messages", path, "--add-generation-prompt"]
    if template:
        cmd += ["--template", template]
    if kwargs:
        cmd += ["--vars", json.dumps(kwargs)]
    return subprocess.run(cmd, check=True, capture_output=True).stdout.decode("utf-8")


def same_prompt(d, tmp, name, model, template=None, kwargs=None):
    """moed's prompt_tokens equals the tokens of moectl template's text."""
    text = rendered(tmp, model, template, kwargs)
    st, bos = d.call("POST", "/tokenize", {"content": "", "add_special": True})
    st, toks = d.call("POST", "/tokenize", {"content": text, "add_special": True, "parse_special": True})
    n = len(toks["tokens"])
    if bos["tokens"] and toks["tokens"][:2] == bos["tokens"][:1] * 2:
        n -= 1   # the template wrote the BOS text; moed drops it as llama.cpp does
    kw = {"chat_template_kwargs": kwargs} if kwargs else {}
    st, r = d.chat(MESSAGES, **kw)
    check(st == 200, "%s: chat status %s %s" % (name, st, r))
    if st == 200:
        check(r["usage"]["prompt_tokens"] == n, "%s: prompt_tokens %d, moectl template's text gives %d"
              % (name, r["usage"]["prompt_tokens"], n))
    return text


with tempfile.TemporaryDirectory() as tmp:
    # the GGUF's own template, no flag
    qwen = os.path.join(MODELS, "tiny-qwen3moe-Q8_0.gguf")
    d = Daemon(tmp, qwen)
    try:
        log = open(d.log_path).read()
        check("the model's own" in log, "qwen3moe: moed says it uses the model's own template")
        text = same_prompt(d, tmp, "qwen3moe", qwen)
        check(text.endswith("<|im_start|>assistant\n"), "qwen3moe: the template's generation prompt")
        st, r = d.chat(MESSAGES, chat_template_kwargs=["x"])
        check(st == 400 and r["error"]["param"] == "chat_template_kwargs", "chat_template_kwargs array: %s %s"
              % (st, r))
    finally:
        d.stop()

    # a template file for GGUFs that carry none; kwargs reach the template
    flag = os.path.join(tmp, "flag.jinja")
    with open(flag, "w") as f:
        f.write("{% if shout %}{{ raise_exception('shouting: ' ~ messages[-1].content) }}{% endif %}"
                "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>")
    cases = [("mixtral", "tiny-mixtral-Q4_0.gguf", "mistral/mistral-common-v3_spm.jinja"),
             ("deepseek2", "tiny-deepseek2-F32.gguf", "deepseek/DeepSeek-V2-Lite_Coder-V2-Lite.gguf.jinja"),
             ("gpt-oss", "tiny-gptoss-MXFP4_MOE.gguf", "gpt-oss/gpt-oss-120b.jinja")]
    for name, gguf, tpl in cases:
        model = os.path.join(MODELS, gguf)
        d = Daemon(tmp, model)
        try:
            st, r = d.chat(MESSAGES)
            check(st == 400 and "chat template" in r["error"]["message"],
                  "%s without a template: refused as before (%s)" % (name, st))
        finally:
            d.stop()
        d = Daemon(tmp, model, "--chat-template-file", os.path.join(TEMPLATES, tpl))
        try:
            same_prompt(d, tmp, name, model, os.path.join(TEMPLATES, tpl))
            if name == "gpt-oss":
                st, r = d.chat([{"role": "user", "content": "x"}, {"role": "tool", "content": "1"}])
                check(st == 400 and "Message has tool role, but there was no previous assistant message with a"
                      " tool call!" in r["error"]["message"], "gpt-oss raise_exception: %s %s" % (st, r))
        finally:
            d.stop()
        if name == "mixtral":
            d = Daemon(tmp, model, "--chat-template-file", flag)
            try:
                same_prompt(d, tmp, "flag", model, flag, {"shout": False})
                st, r = d.chat(MESSAGES, chat_template_kwargs={"shout": True})
                check(st == 400 and r["error"]["message"].endswith("shouting: What is 2+2?"),
                      "kwargs + raise_exception: %s %s" % (st, r))
            finally:
                d.stop()

print("%d failures" % len(failures))
sys.exit(1 if failures else 0)
