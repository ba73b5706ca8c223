#!/usr/bin/env bash
# Installs moed's build and test dependencies on Debian 12 with apt-get and
# configures + builds it. Idempotent: packages already present are not
# reinstalled, an existing build directory is reused.
#
#   tools/setup.sh [--no-build] [--build-dir DIR] [--train-demo] [-- extra meson options]
#
# --train-demo: only the packages that tools/train_demo/train.sh needs to
# retrain the demo model (Debian's CPU-only python3-torch with OpenBLAS, the
# World English Bible and its SWORD exporter; gguf and tokenizers from PyPI);
# the runtime and the tests never need them.
#
# CUDA: the backend is compiled when nvcc is found (meson option cuda=auto;
# /usr/local/cuda/bin is added to PATH if present). Debian's own
# nvidia-cuda-toolkit (non-free) is not installed by this script.
set -euo pipefail
cd "$(dirname "$0")/.."

build=1
train=0
builddir=build
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) build=0 ;;
    --train-demo) train=1; build=0 ;;
    --build-dir) builddir="$2"; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "setup.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
  shift
done

pkgs=(
  build-essential pkg-config meson ninja-build
  liburing-dev libzstd-dev libuv1-dev libhttp-parser-dev libjansson-dev
  libinih-dev libxxhash-dev libpcre2-dev libsystemd-dev
  man-db groff-base systemd haproxy
  fio clang libclang-rt-14-dev python3 python3-pip curl cmake
)

if [ "$train" = 1 ]; then
  pkgs=(python3-torch python3-numpy libopenblas0-openmp sword-text-web libsword-utils python3-pip)
fi

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "setup: need root or sudo to apt-get install" >&2; exit 1; }
    sudo=sudo
  fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ "$train" = 1 ]; then
  # Debian's torch is built for the system interpreter; gguf (llama.cpp's
  # writer) and tokenizers (BPE training) come from PyPI for that interpreter.
  if ! /usr/bin/python3 -c 'import gguf, tokenizers' >/dev/null 2>&1; then
    /usr/bin/python3 -m pip install -q gguf tokenizers 2>/dev/null ||
      /usr/bin/python3 -m pip install -q --break-system-packages gguf tokenizers
  fi
  exit 0
fi

# The daemon's integration tests drive moed with the official openai client
# and check structured output with jsonschema (PyPI); without them those
# cases skip (CI requires them).
for pkg in openai jsonschema anthropic; do
  if ! python3 -c "import $pkg" >/dev/null 2>&1; then
    python3 -m pip install -q "$pkg" >/dev/null 2>&1 ||
      python3 -m pip install -q --break-system-packages "$pkg" >/dev/null 2>&1 ||
      echo "setup: could not pip install $pkg; the tests that use it will skip" >&2
  fi
done

# tests/parity/test_jinja_ref renders the reference chat templates with
# Python's jinja2 (required there in CI).
if ! python3 -c 'import jinja2' >/dev/null 2>&1; then
  python3 -m pip install -q jinja2 >/dev/null 2>&1 ||
    python3 -m pip install -q --break-system-packages jinja2 >/dev/null 2>&1 ||
    echo "setup: could not pip install jinja2; the chat-template parity test will skip" >&2
fi

# tests/parity/test_quant_llama.py compares moe-gen's quantized files with
# llama.cpp's quantizer through llama-cpp-python (built from source by pip:
# minutes) and reads them with gguf-py; it skips without them, except in CI.
# cmake (apt, above) builds it.
if ! python3 -c 'import llama_cpp, gguf' >/dev/null 2>&1; then
  python3 -m pip install -q llama-cpp-python==0.3.36 gguf >/dev/null 2>&1 ||
    python3 -m pip install -q --break-system-packages llama-cpp-python==0.3.36 gguf >/dev/null 2>&1 ||
    echo "setup: could not pip install llama-cpp-python and gguf; test_quant_llama will skip" >&2
fi

if [ -x /usr/local/cuda/bin/nvcc ] && ! command -v nvcc >/dev/null; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi

if [ "$build" = 1 ]; then
  if [ ! -f "$builddir/build.ninja" ]; then
    meson setup "$builddir" "${extra[@]}"
  elif [ ${#extra[@]} -gt 0 ]; then
    meson configure "$builddir" "${extra[@]}"
  fi
  ninja -C "$builddir"
fi
