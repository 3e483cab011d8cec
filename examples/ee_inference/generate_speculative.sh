#!/usr/bin/env bash
# Lossless self-speculative decoding (PP=1): the exit at DRAFT_LAYER drafts, the full
# model verifies; output identical to the full model's greedy output.
#   CKPT=outputs/demo/checkpoint DRAFT_LAYER=1 bash examples/ee_inference/generate_speculative.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
CKPT=${CKPT:-outputs/demo/checkpoint}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=ignore
"$PY" -m torch.distributed.run --nproc-per-node 1 --master-addr 127.0.0.1 --master-port 29542 \
  tools/generate.py --load "$CKPT" --prompt "ROMEO: But soft, what light" --max-new-tokens 48 \
  --mode self_speculative --draft-exit-layer "${DRAFT_LAYER:-1}" --draft-length "${DRAFT_LENGTH:-4}"
