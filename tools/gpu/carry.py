#!/usr/bin/env python3
"""What tools/gpu_check.sh needs on the GPU machine, which receives the checkout
(tracked files and untracked ones git does not ignore) plus the git-ignored
folders named in the device tool's `carry`, 64 MiB in all, and reaches no
package registry:

  ref/       shared/ref's manifest, models and goldens, as many models as fit
             (smallest first), with the goldens the gpu suite reads for them
  sysroot/   the build's C libraries as this machine has them installed
             (headers, shared objects, pkg-config files of liburing, zstd,
             libuv, jansson, inih, xxhash, pcre2-8, http-parser) and pkgconf:
             gpu_check.sh uses them only where the GPU machine lacks them
  wheels/    meson and ninja, installed there only if it has none
  MANIFEST.json  what was carried, what was left out and why, the sizes

  carry.py prepare --ref ../shared/ref --out gpu-carry [--limit-mib 64] [--margin-mib 3]
  carry.py size [--out gpu-carry]      checkout + carry against the limit
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

LIMIT_MIB = 64
# the gpu suite's models, most valuable first when sizes tie; the prepare
# step takes them smallest first until the budget is spent
VARIANTS = [
    ("tiny-mixtral", "F32"), ("tiny-mixtral", "F16"), ("tiny-mixtral", "Q8_0"),
    ("tiny-mixtral", "Q4_0"), ("tiny-qwen3moe", "F16"), ("tiny-qwen3moe", "Q8_0"),
    ("tiny-qwen3moe", "Q4_K_M"), ("tiny-deepseek2", "F32"), ("tiny-gptoss", "F32"),
    ("tiny-gptoss", "MXFP4_MOE"),
]
GOLDENS = ["len33.logits.f32", "len33.greedy.json", "len7.logits.f32", "len7.greedy.json"]
# Debian packages whose headers, libraries and pkg-config files the build
# links (meson.build's dependency() and find_library() calls), and pkgconf
DEB_PACKAGES = [
    "liburing-dev", "liburing2", "libzstd-dev", "libzstd1", "libuv1-dev", "libuv1",
    "libjansson-dev", "libjansson4", "libinih-dev", "libinih1", "libxxhash-dev", "libxxhash0",
    "libpcre2-dev", "libpcre2-8-0", "libhttp-parser-dev", "libhttp-parser2.9",
    "pkgconf-bin", "libpkgconf3",
]
KEEP_PREFIXES = ("/usr/include/", "/usr/lib/x86_64-linux-gnu/", "/usr/share/pkgconfig/", "/usr/bin/pkgconf")
# pcre2's 16/32-bit and POSIX variants are not linked
SKIP_PARTS = ("pcre2-16", "pcre2-32", "pcre2-posix", "pcre2posix")


def repo_root():
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def checkout_bytes(root):
    """Bytes of what travels besides the carry: tracked files and untracked
    files git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, capture_output=True, check=True).stdout
    total = 0
    for name in out.split(b"\0"):
        if name:
            p = os.path.join(root, name.decode())
            if os.path.isfile(p) and not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def tree_bytes(path):
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def copy_sysroot(out, notes):
    """Copies the installed packages' build files into out/sysroot."""
    dst = os.path.join(out, "sysroot")
    missing = []
    n = 0
    for pkg in DEB_PACKAGES:
        r = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True)
        if r.returncode != 0:
            missing.append(pkg)
            continue
        for f in r.stdout.splitlines():
            if not f.startswith(KEEP_PREFIXES) or any(s in f for s in SKIP_PARTS) or f.endswith(".a"):
                continue
            if os.path.isdir(f) and not os.path.islink(f):
                continue
            if not os.path.lexists(f):
                continue
            t = dst + f
            os.makedirs(os.path.dirname(t), exist_ok=True)
            if os.path.lexists(t):
                os.remove(t)
            if os.path.islink(f):
                os.symlink(os.readlink(f), t)
            else:
                shutil.copy2(f, t)
            n += 1
    if missing:
        notes.append("sysroot: packages not installed here, not carried: " + ", ".join(missing))
    return n, missing


def fetch_wheels(out, notes):
    """meson and ninja wheels, for a GPU machine without them (best effort)."""
    dst = os.path.join(out, "wheels")
    os.makedirs(dst, exist_ok=True)
    if any(f.endswith(".whl") for f in os.listdir(dst)):
        return True
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_17_x86_64",
           "--platform", "manylinux2014_x86_64", "--platform", "any", "-d", dst, "meson==1.0.1", "ninja"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        ok = r.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        notes.append("wheels: pip download of meson/ninja failed here (the GPU machine's own are used)")
    return ok


def prepare(a):
    root = repo_root()
    out = os.path.abspath(a.out)
    ref = os.path.abspath(a.ref)
    if not os.path.isfile(os.path.join(ref, "manifest.json")):
        print("carry: no shared/ref at %s" % ref, file=sys.stderr)
        return 1
    notes = []
    os.makedirs(out, exist_ok=True)
    n_sys, missing = copy_sysroot(out, notes) if not a.no_sysroot else (0, [])
    if not a.no_wheels:
        fetch_wheels(out, notes)
    limit = a.limit_mib * (1 << 20) - a.margin_mib * (1 << 20)
    base = checkout_bytes(root) + tree_bytes(os.path.join(out, "sysroot")) + tree_bytes(os.path.join(out, "wheels"))
    rdst = os.path.join(out, "ref")
    if os.path.isdir(rdst):
        shutil.rmtree(rdst)
    os.makedirs(os.path.join(rdst, "models"))
    shutil.copy2(os.path.join(ref, "manifest.json"), rdst)
    shutil.copy2(os.path.join(ref, "README.md"), rdst)
    used = base + tree_bytes(rdst)
    cand = []
    for model, var in VARIANTS:
        m = os.path.join(ref, "models", "%s-%s.gguf" % (model, var))
        if not os.path.isfile(m):
            notes.append("%s-%s: not in %s" % (model, var, ref))
            continue
        gold = [os.path.join(ref, "goldens", "%s-%s" % (model, var), g) for g in GOLDENS]
        gold = [g for g in gold if os.path.isfile(g)]
        size = os.path.getsize(m) + sum(os.path.getsize(g) for g in gold)
        cand.append((size, model, var, m, gold))
    carried, left = [], []
    for size, model, var, m, gold in sorted(cand):
        if used + size > limit:
            left.append({"model": "%s-%s" % (model, var), "bytes": size,
                         "why": "does not fit: %.1f MiB carried so far, limit %d MiB less a %d MiB margin"
                                % (used / 2**20, a.limit_mib, a.margin_mib)})
            continue
        shutil.copy2(m, os.path.join(rdst, "models"))
        gd = os.path.join(rdst, "goldens", "%s-%s" % (model, var))
        os.makedirs(gd, exist_ok=True)
        for g in gold:
            shutil.copy2(g, gd)
        used += size
        carried.append({"model": "%s-%s" % (model, var), "bytes": size})
    man = {
        "limit_mib": a.limit_mib, "margin_mib": a.margin_mib,
        "checkout_bytes": checkout_bytes(root), "carry_bytes": tree_bytes(out),
        "total_bytes": checkout_bytes(root) + tree_bytes(out),
        "models_carried": carried, "models_left_out": left,
        "sysroot_files": n_sys, "sysroot_missing_packages": missing, "notes": notes,
    }
    with open(os.path.join(out, "MANIFEST.json"), "w") as f:
        json.dump(man, f, indent=1)
    man["total_bytes"] = checkout_bytes(root) + tree_bytes(out)
    with open(os.path.join(out, "MANIFEST.json"), "w") as f:
        json.dump(man, f, indent=1)
    print("carry: %s: %d models (%s), %d left out (%s); sysroot %d files; checkout %.1f MiB + carry %.1f MiB"
          " = %.1f MiB of %d" % (out, len(carried), ", ".join(c["model"] for c in carried), len(left),
                                 ", ".join(x["model"] for x in left) or "none", n_sys,
                                 man["checkout_bytes"] / 2**20, tree_bytes(out) / 2**20,
                                 man["total_bytes"] / 2**20, a.limit_mib))
    for n in notes:
        print("carry: note: " + n)
    return 0 if man["total_bytes"] <= a.limit_mib * (1 << 20) else 1


def size(a):
    root = repo_root()
    c = checkout_bytes(root)
    t = tree_bytes(os.path.abspath(a.out)) if os.path.isdir(a.out) else 0
    print("checkout %.1f MiB + %s %.1f MiB = %.1f MiB of %d" % (c / 2**20, a.out, t / 2**20, (c + t) / 2**20,
                                                               a.limit_mib))
    return 0 if c + t <= a.limit_mib * (1 << 20) else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--ref", default=os.path.join(repo_root(), "..", "shared", "ref"))
    p.add_argument("--out", default=os.path.join(repo_root(), "gpu-carry"))
    p.add_argument("--limit-mib", type=int, default=LIMIT_MIB)
    p.add_argument("--margin-mib", type=int, default=3)
    p.add_argument("--no-sysroot", action="store_true")
    p.add_argument("--no-wheels", action="store_true")
    s = sub.add_parser("size")
    s.add_argument("--out", default=os.path.join(repo_root(), "gpu-carry"))
    s.add_argument("--limit-mib", type=int, default=LIMIT_MIB)
    a = ap.parse_args()
    return prepare(a) if a.cmd == "prepare" else size(a)


if __name__ == "__main__":
    sys.exit(main())
