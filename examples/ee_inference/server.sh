#!/usr/bin/env bash
# Serve a checkpoint over HTTP with 2 processes (PP=2) on CPU; stop with Ctrl-C / SIGTERM.
#   CKPT=outputs/demo/checkpoint PORT=5000 bash examples/ee_inference/server.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
CKPT=${CKPT:-outputs/demo/checkpoint}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" -m torch.distributed.run --nproc-per-node "${NPROC:-2}" \
  --master-addr 127.0.0.1 --master-port "${MASTER_PORT:-29561}" \
  tools/run_text_generation_server.py --load "$CKPT" \
  --pipeline-model-parallel-size "${PP:-2}" --tensor-model-parallel-size "${TP:-1}" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-5000}" "$@"
