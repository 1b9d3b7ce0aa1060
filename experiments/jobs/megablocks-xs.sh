#!/usr/bin/env bash
# GPU: the MegaBlocks reproduction at the XS preset (1000 steps of 32 x 1024 tokens), some
# variants per call (a call has 10 min),
# on the tokenized corpus carried in .carry/ (python-bpe50304.npy, tokenizer.json: made by
# jaxmoe.corpus.load("python", "bpe", vocab_size=50304) on the CPU machine).
# Usage: OUT=... bash experiments/jobs/megablocks-xs.sh VARIANT [VARIANT ...]
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
for v in "$@"; do
  timeout 150 python3 -m experiments.reproduce_megablocks --out /tmp/mb --preset xs --steps 1000 \
      --variants "$v" --data .carry/python-bpe50304.npy --tokenizer .carry/tokenizer.json \
      > "$OUT/mb-$v.log" 2>&1
  echo "$v: exit $?"; tail -4 "$OUT/mb-$v.log"
  cp /tmp/mb/"$v"/metrics.jsonl "$OUT/mb-$v-metrics.jsonl" 2>/dev/null
done
