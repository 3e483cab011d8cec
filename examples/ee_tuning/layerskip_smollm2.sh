#!/usr/bin/env bash
# A short LayerSkip continual pretraining of SmolLM2-135M with exits (arXiv 2404.16710's
# recipe in our trainer): the whole model trains on the general tuning text with layer
# dropout rising linearly with depth and a cross-entropy loss at every exit (LayerSkip's
# early-exit loss), next to the final layer's loss. Compare with EE-Tuning alone on the same
# samples (tune_smollm2_general.sh with SAVE_INTERVAL = ITERS here), on held-out text:
#   benchmarks/exit_agreement.py --load DEST ... (shallow-exit agreement) and the final
#   layer's validation loss in $OUT/metrics.jsonl (iteration 0 = the original model).
# Input: GENERAL, the OUT folder of tune_smollm2_general.sh (its with-exits checkpoint and
#   tokenized text, so both runs read the same samples).
# Knobs: ITERS (default 30), RATE (layer dropout at the last layer, default 0.1), EXIT_WEIGHT
#   (each exit's loss weight, default 0.25), CURRICULUM (none|rotational|gradual), LR.
# Budget on 2 idle CPU cores: ~25 s per iteration of 4 x 256 tokens (the whole model's
#   backward), ~13 min at ITERS=30.
set -euo pipefail
# shellcheck source=examples/ee_tuning/caller_paths.sh
source "$(dirname "$0")/caller_paths.sh" GENERAL DEST OUT
GENERAL=${GENERAL:-outputs/ee_tuning_general}
DEST=${DEST:-outputs/smollm2/layerskip}
OUT=${OUT:-outputs/layerskip}
ITERS=${ITERS:-30}
RATE=${RATE:-0.1}
EXIT_WEIGHT=${EXIT_WEIGHT:-0.25}
CURRICULUM=${CURRICULUM:-none}
LR=${LR:-2e-4}
MIN_LR=$(awk -v lr="$LR" 'BEGIN { print lr / 10 }')
export OMP_NUM_THREADS=${THREADS:-2} PYTHONWARNINGS=ignore
if [ ! -d "$GENERAL/with-exits" ]; then
  echo "no $GENERAL/with-exits: run examples/ee_tuning/tune_smollm2_general.sh first" >&2
  exit 2
fi
ARGS=$(ls "$GENERAL"/with-exits/iter_*/ee_args.json 2>/dev/null | tail -1)
N_EXITS=$("$PY" -c "import json,sys; print(len(json.load(open(sys.argv[1]))['exit_layer_nums']))" \
  "${ARGS:?no ee_args.json under $GENERAL/with-exits}")
WEIGHTS=$(for _ in $(seq "$N_EXITS"); do printf '%s ' "$EXIT_WEIGHT"; done)
mkdir -p "$OUT"
rm -rf "$DEST" "$OUT/metrics.jsonl"
# shellcheck disable=SC2086
"$PY" -m torch.distributed.run --nproc-per-node 1 --master-addr 127.0.0.1 \
  --master-port "${PORT:-29545}" pretrain_early_exit_gpt.py \
  --load "$GENERAL/with-exits" --finetune --exit-confidence-head \
  --layer-dropout-rate "$RATE" --layer-dropout-depth-scale linear --layer-dropout-time-scale constant \
  --exit-loss-curriculum "$CURRICULUM" --exit-layer-weight $WEIGHTS \
  --data-path "$GENERAL/data/general_prompt_document" --split 98,2,0 \
  --data-cache-path "$GENERAL/data/cache" --seq-length 256 \
  --micro-batch-size 4 --global-batch-size 4 --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters 5 \
  --weight-decay 0.0 --train-iters "$ITERS" --log-interval 5 --eval-interval 15 --eval-iters 4 \
  --save "$DEST" --metrics-file "$OUT/metrics.jsonl"
"$PY" -c "import sys; from megatron.early_exit.tuning.add_exits import make_self_contained as m; m(sys.argv[1])" "$DEST"
echo "LayerSkip checkpoint: $DEST; validation (final layer and exits) in $OUT/metrics.jsonl"
