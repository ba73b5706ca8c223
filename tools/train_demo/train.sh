#!/usr/bin/env bash
# Rebuilds the demo model that tools/demo.sh chats with (models/demo-moe.gguf):
# installs the training dependencies (tools/setup.sh --train-demo: Debian's CPU-only
# python3-torch with OpenBLAS, the World English Bible's SWORD module and its
# exporter; gguf and tokenizers from PyPI), fetches Jane Austen's novels
# (r-cran-janeaustenr, unpacked without installing R), builds the corpus and a
# 2048-token BPE vocabulary, trains for a wall-clock budget, and exports the GGUF.
# doc/demo.md records a run: its figures, time and sample answers.
#
#   tools/train_demo/train.sh [--minutes 50] [--work demo/train-run] [--out FILE.gguf]
#
# Training is niced and single-threaded by default (a shared machine); pass
# --threads 2 through TRAIN_ARGS on an idle one: TRAIN_ARGS="--threads 2".
set -euo pipefail
cd "$(dirname "$0")/../.."
minutes=50
work=demo/train-run
out=models/demo-moe.gguf
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes="$2"; shift ;;
    --work) work="$2"; shift ;;
    --out) out="$2"; shift ;;
    *) echo "train.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
  shift
done
bash tools/setup.sh --train-demo
py=/usr/bin/python3   # Debian's python3-torch is installed for the system interpreter
mkdir -p "$work/jane"
if [ ! -f "$work/jane/usr/lib/R/site-library/janeaustenr/data/Rdata.rdx" ]; then
  (cd "$work" && apt-get download r-cran-janeaustenr)
  dpkg-deb -x "$work"/r-cran-janeaustenr_*.deb "$work/jane"
fi
time nice -n 10 $py tools/train_demo/prepare.py --out "$work" \
  --austen-db "$work/jane/usr/lib/R/site-library/janeaustenr/data/Rdata"
# shellcheck disable=SC2086
time OMP_NUM_THREADS=1 nice -n 10 $py tools/train_demo/train.py --data "$work" --out "$work" \
  --minutes "$minutes" --steps 100000 ${TRAIN_ARGS:-}
$py tools/train_demo/export.py --ckpt "$work/model.pt" --tokenizer "$work/tokenizer.json" -o "$out"
cat "$work/result.json"
