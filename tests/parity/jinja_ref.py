#!/usr/bin/env python3
"""Reference renders for tests/parity/test_jinja_ref: every */*.jinja under
TEMPLATES (shared/ref/templates) over every fixture under FIXTURES
(tests/fixtures/chat/*.json), rendered with Python's jinja2 in the
environment of shared/ref/templates/render.py (transformers'
apply_chat_template: ImmutableSandboxedEnvironment, trim_blocks,
lstrip_blocks, loopcontrols, {% generation %}, tojson = json.dumps,
raise_exception, strftime_now on a fixed clock) and that file's bos/eos per
family. Prints one JSON object:
  {"clock": EPOCH_SECONDS_UTC, "renders": {template: {fixture: {"status", "output", "bos", "eos"}}}}
status: OK, RAISE (the template's raise_exception; output = its message),
ERROR (any other exception; output = its text).
usage: jinja_ref.py TEMPLATES FIXTURES
"""
import calendar, copy, glob, json, os, sys

templates, fixtures = sys.argv[1], sys.argv[2]
sys.path.insert(0, templates)
sys.dont_write_bytecode = True
import jinja2  # noqa: E402
import render  # noqa: E402  (shared/ref/templates/render.py)

env = render.make_env(False)
clock = calendar.timegm(render.FIXED_NOW.timetuple())
cases = {}
for path in sorted(glob.glob(os.path.join(fixtures, "*.json"))):
    with open(path, encoding="utf-8") as f:
        cases[os.path.basename(path)[:-5]] = json.load(f)

out = {}
for path in sorted(glob.glob(os.path.join(templates, "*", "*.jinja"))):
    rel = os.path.relpath(path, templates)
    bos, eos = render.TOKENS.get(rel.split(os.sep)[0], ("<s>", "</s>"))
    with open(path, encoding="utf-8") as f:
        src = f.read()
    out[rel] = {}
    for name, case in cases.items():
        kw = dict(messages=copy.deepcopy(case["messages"]), tools=copy.deepcopy(case["tools"]), documents=None,
                  add_generation_prompt=case["add_generation_prompt"], bos_token=bos, eos_token=eos)
        kw.update(case.get("vars") or {})
        try:
            status, text = "OK", env.from_string(src).render(**kw)
        except jinja2.exceptions.TemplateError as e:
            status = "RAISE" if type(e) is jinja2.exceptions.TemplateError else "ERROR"
            text = str(e) if status == "RAISE" else f"{type(e).__name__}: {e}"
        except Exception as e:
            status, text = "ERROR", f"{type(e).__name__}: {e}"
        out[rel][name] = {"status": status, "output": text, "bos": bos, "eos": eos}
json.dump({"clock": clock, "jinja2": jinja2.__version__, "renders": out}, sys.stdout, ensure_ascii=False)
