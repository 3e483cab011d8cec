#!/usr/bin/env bash
# Early-exit generation from a checkpoint (e.g. `make demo`'s), both methods at PP=2.
#   CKPT=outputs/demo/checkpoint bash examples/ee_inference/generate.sh
# Architecture and tokenizer come from the checkpoint's ee_args.json; the checkpoint
# reshards to the TP/PP given here.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
CKPT=${CKPT:-outputs/demo/checkpoint}
PP=${PP:-2}
THRESHOLD=${THRESHOLD:-0.8}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=ignore
RUN=("$PY" -m torch.distributed.run --nproc-per-node "$PP" --master-addr 127.0.0.1 --master-port 29541)
COMMON=(tools/generate.py --load "$CKPT" --pipeline-model-parallel-size "$PP"
  --prompt "ROMEO: But soft, what light" --prompt "KING: Now is the winter"
  --max-new-tokens 48 --mode early_exit --threshold "$THRESHOLD")
echo "== kv_recompute"; "${RUN[@]}" "${COMMON[@]}" --method kv_recompute
echo "== pipeline";     "${RUN[@]}" "${COMMON[@]}" --method pipeline
echo "== full model";   "${RUN[@]}" tools/generate.py --load "$CKPT" \
  --pipeline-model-parallel-size "$PP" --prompt "ROMEO: But soft, what light" --max-new-tokens 48
