#!/usr/bin/env bash
# EE-Tuning recipe for a Llama-3-shaped model (Llama-3.2-1B or Llama-3.1-8B):
#   1. convert the Hugging Face folder to our checkpoint (tools/checkpoint/hf_to_megatron.py)
#   2. add exits (norm + MLP heads, copy-initialised) at a quarter, half and three quarters
#   3. tune only the exits (--tune-exit) on the frozen backbone
#
#   SIZE=1b HF=/models/Llama-3.2-1B DATA_PATH=/data/corpus_text_document \
#     bash examples/ee_tuning/llama3.sh
#   SIZE=8b HF=/models/Llama-3.1-8B TP=2 PP=2 GPUS=4 DATA_PATH=... bash examples/ee_tuning/llama3.sh
#   DRY_RUN=1 SIZE=8b bash examples/ee_tuning/llama3.sh   (no weights, data or GPUs needed)
#
# DATA_PATH must be tokenized with the model's own tokenizer (tools/preprocess_data.py
# --tokenizer-type HuggingFaceTokenizer --tokenizer-model $HF).
# Knobs (defaults in brackets): SIZE [1b], OUT [outputs/llama3-$SIZE], EXITS [quarters],
#   TP [1], PP [1], GPUS [TP*PP], SEQ [2048], MICRO_BATCH [1], GLOBAL_BATCH [32], ITERS [1000],
#   LR [1e-4], PYTHON [.venv/bin/python if present], EXTRA_ARGS (appended last).
# DRY_RUN=1 parses and validates the tuning run for the model's real shape at TP*PP*DP=GPUS
# (mock data, Llama 3's 128256-token vocabulary) and prints the layout; nothing is read.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
SIZE=${SIZE:-1b}
OUT=${OUT:-outputs/llama3-$SIZE}
TP=${TP:-1}
PP=${PP:-1}
GPUS=${GPUS:-$((TP * PP))}
SEQ=${SEQ:-2048}
DRY_RUN=${DRY_RUN:-0}

# The published config.json shapes (hf_to_megatron derives the same flags from the folder).
case "$SIZE" in
  1b)  # Llama-3.2-1B: tied embeddings, RoPE scaling factor 32
    LAYERS=16
    MODEL_ARGS=(--num-layers 16 --hidden-size 2048 --ffn-hidden-size 8192
      --num-attention-heads 32 --group-query-attention --num-query-groups 8
      --rope-scaling-factor 32) ;;
  8b)  # Llama-3.1-8B: untied output layer, RoPE scaling factor 8
    LAYERS=32
    MODEL_ARGS=(--num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336
      --num-attention-heads 32 --group-query-attention --num-query-groups 8
      --rope-scaling-factor 8 --untie-embeddings-and-output-weights) ;;
  *) echo "error: SIZE must be 1b or 8b, got '$SIZE'" >&2; exit 2 ;;
esac
MODEL_ARGS+=(--max-position-embeddings 131072 --position-embedding-type rope
  --rotary-base 500000 --use-rope-scaling --swiglu --normalization RMSNorm
  --norm-epsilon 1e-5 --disable-bias-linear)
EXITS=${EXITS:-"$((LAYERS / 4)) $((LAYERS / 2)) $((3 * LAYERS / 4))"}
# shellcheck disable=SC2206  # a list of layer numbers
EXIT_LIST=($EXITS)
EXIT_ARGS=(--exit-layer-nums "${EXIT_LIST[@]}" --use-exit-norm --use-exit-mlp)
TUNE_ARGS=(--tune-exit --bf16
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --seq-length "$SEQ" --micro-batch-size "${MICRO_BATCH:-1}"
  --global-batch-size "${GLOBAL_BATCH:-32}" --train-iters "${ITERS:-1000}"
  --lr "${LR:-1e-4}" --min-lr 1e-5 --lr-decay-style cosine --lr-warmup-iters 50
  --weight-decay 0.0 --log-interval 10 --eval-interval 200 --eval-iters 10)
# shellcheck disable=SC2206
EXTRA=(${EXTRA_ARGS:-})

if [[ "$DRY_RUN" == 1 ]]; then
  echo "== Llama-3 $SIZE EE-Tuning dry run: $GPUS GPU(s), exits after layers $EXITS"
  # --load names where step 2 writes; a dry run only records the path (nothing is read
  # unless it already exists, then its ee_args.json is checked against these flags).
  WORLD_SIZE=$GPUS PYTHONWARNINGS=ignore exec "$PYTHON" pretrain_early_exit_gpt.py --dry-run \
    --load "$OUT/with-exits" "${MODEL_ARGS[@]}" "${EXIT_ARGS[@]}" "${TUNE_ARGS[@]}" \
    --mock-data --tokenizer-type NullTokenizer --vocab-size 128256 "${EXTRA[@]}"
fi

if [[ -z "${HF:-}" || -z "${DATA_PATH:-}" ]]; then
  echo "error: set HF (a Llama-3.2-1B / Llama-3.1-8B Hugging Face folder) and DATA_PATH" \
    "(tokenized with its tokenizer); or DRY_RUN=1 to only check the configuration" >&2
  exit 2
fi
mkdir -p "$OUT"
echo "== 1/3 converting $HF"
"$PYTHON" tools/checkpoint/hf_to_megatron.py --hf-dir "$HF" --out "$OUT/base" \
  --seq-length "$SEQ" --overwrite
echo "== 2/3 adding exits after layers $EXITS"
rm -rf "$OUT/with-exits"
"$PYTHON" tools/checkpoint/add_exits.py --load "$OUT/base" --save "$OUT/with-exits" \
  --exit-layer-nums "${EXIT_LIST[@]}" --use-exit-norm --use-exit-mlp
echo "== 3/3 EE-Tuning: frozen backbone, exit heads only"
export CUDA_DEVICE_MAX_CONNECTIONS=1
# The model flags come from the checkpoint's ee_args.json (--load).
exec "$PYTHON" -m torch.distributed.run --nproc-per-node "$GPUS" \
  --master-addr 127.0.0.1 --master-port "${PORT:-29551}" pretrain_early_exit_gpt.py \
  --load "$OUT/with-exits" "${TUNE_ARGS[@]}" \
  --data-path "$DATA_PATH" --split 98,2,0 --save "$OUT/ee-tuned" \
  --metrics-file "$OUT/metrics.jsonl" "${EXTRA[@]}"
