#!/usr/bin/env bash
# `make demo`: pretrain a tiny early-exit GPT with 2 CPU processes (pipeline parallel, PP=2,
# one exit on each stage), then resume it from its checkpoint. Everything goes under one
# output folder. Uses seeded mock data until the real-text pipeline lands.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/demo}
rm -rf "$OUT"; mkdir -p "$OUT"
export OMP_NUM_THREADS=1
MODEL=(
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 64
  --mock-data --tokenizer-type NullTokenizer --vocab-size 512
  --exit-layer-nums 1 3 --use-exit-norm --exit-layer-weight 0.5 1.0
  --pipeline-model-parallel-size 2 --micro-batch-size 4 --global-batch-size 16
  --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 10 --train-iters 80 --log-interval 10
)
echo "== pretraining (PP=2 on 2 CPU processes); output: $OUT"
"$PY" -m torch.distributed.run --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29533 \
  pretrain_early_exit_gpt.py "${MODEL[@]}" --exit-interval 60 --save "$OUT/checkpoint" \
  --metrics-file "$OUT/metrics.jsonl"
echo "== resuming from $OUT/checkpoint for the last 20 iterations"
"$PY" -m torch.distributed.run --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29533 \
  pretrain_early_exit_gpt.py "${MODEL[@]}" --load "$OUT/checkpoint" --save "$OUT/checkpoint" \
  --metrics-file "$OUT/metrics.jsonl"
"$PY" - "$OUT/metrics.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
first, last = rows[0], rows[-1]
print(f"\nlm loss {first['lm_loss']:.3f} -> {last['lm_loss']:.3f}")
for k in first["exit_losses"]:
    print(f"exit after layer {k}: {first['exit_losses'][k]:.3f} -> {last['exit_losses'][k]:.3f}")
PYEOF
echo "outputs: $OUT (checkpoint/, metrics.jsonl)"
