#!/bin/sh
# Tokenizer benchmark: ~1 MiB of mixed text (code, prose, CJK), one core,
# moed's tokenizer vs llama.cpp's (llama-cpp-python, vocab_only) on the same
# text and vocabulary. Prints a Markdown table for doc/benchmarks.md.
#
# usage: tools/bench/tokenize.sh [BUILD_DIR] [REF_DIR]
#   BUILD_DIR: a meson build of this tree (default build-tok); REF_DIR:
#   shared/ref (default ../shared/ref). Needs python3; the llama.cpp column
#   needs `pip install llama-cpp-python` and is "-" without it. VOCABS picks
#   rows (default: the six of shared/ref and gemma4, the test vocabulary of
#   tests/fixtures/tokenizer/gemma4-vocab.gguf).
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$root/build-tok}
ref=${2:-$root/../shared/ref}
runs=${RUNS:-5}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 "$root/tools/bench/tokenize_text.py" "$root" "$ref" "$work/text.txt"
# shellcheck disable=SC2046
cc -O2 -std=c11 -D_GNU_SOURCE -I"$root" "$root/tools/bench/tokenize_bench.c" "$build/libmoe.a" \
   $(pkg-config --libs libpcre2-8 libzstd liburing libxxhash) -lm -lpthread -o "$work/tokenize_bench"

pin=""
command -v taskset >/dev/null 2>&1 && pin="taskset -c 0"
have_llama=0
python3 -c 'import llama_cpp' 2>/dev/null && have_llama=1

echo "text: $(wc -c < "$work/text.txt") bytes, sha256 $(sha256sum "$work/text.txt" | cut -c1-16), best of $runs runs, one core ($pin)"
echo
echo "| vocab | tokens | moed tokens/s | moed MB/s | llama.cpp tokens/s | llama.cpp MB/s | same ids |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | --- |"
for v in ${VOCABS:-llama-spm qwen2 llama-bpe gpt-2 deepseek-llm deepseek-coder gemma4}; do
    g="$ref/vocab/ggml-vocab-$v.gguf"
    [ "$v" = gemma4 ] && g="$root/tests/fixtures/tokenizer/gemma4-vocab.gguf"
    m=$($pin "$work/tokenize_bench" "$g" "$work/text.txt" "$runs" "$work/moe_ids.json")
    mt=$(echo "$m" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["tokens"], d["tokens_per_s"], d["mb_per_s"])')
    set -- $mt
    if [ $have_llama = 1 ]; then
        l=$($pin python3 "$root/tools/bench/tokenize_llama.py" "$g" "$work/text.txt" "$runs" "$work/ids.json" 2>/dev/null)
        lt=$(echo "$l" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["tokens"], d["tokens_per_s"], d["mb_per_s"])')
        # shellcheck disable=SC2086
        set -- "$1" "$2" "$3" $lt
        same=$(python3 -c 'import json,sys; print("yes" if json.load(open(sys.argv[1])) == json.load(open(sys.argv[2])) else "NO")' \
               "$work/moe_ids.json" "$work/ids.json")
        echo "| $v | $1 | $2 | $3 | $5 | $6 | $same |"
    else
        echo "| $v | $1 | $2 | $3 | - | - | - |"
    fi
done
