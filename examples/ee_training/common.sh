#!/usr/bin/env bash
# Shared launcher of the EE-LLM paper configurations (1.3B.sh, 7B.sh, 13B.sh, 30B.sh).
# A model script sets MODEL_NAME, TP, PP, MICRO_BATCH, DEFAULT_NNODES, DEFAULT_TRAIN_ITERS,
# MODEL_ARGS=(...) and EXIT_ARGS=(...), then sources this file. Run one copy per node:
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 GPUS_PER_NODE=8 \
#   DATA_PATH="0.5 /data/a_text_document 0.5 /data/b_text_document" \
#   TOKENIZER_MODEL=/data/llama2/tokenizer.model CHECKPOINT_PATH=/ckpt/ee-1.3b \
#   bash examples/ee_training/1.3B.sh
#
# Environment (defaults in brackets):
#   NNODES [per model], NODE_RANK [0], GPUS_PER_NODE [8], MASTER_ADDR [127.0.0.1],
#   MASTER_PORT [29500]; Slurm's SLURM_NNODES / SLURM_NODEID are used when set.
#   DATA_PATH      indexed-dataset prefix or weighted blend "W1 P1 W2 P2 ..." (required)
#   TOKENIZER_MODEL  SentencePiece model of the paper's Llama-2 tokenizer (required)
#   TOKENIZER_TYPE [SentencePieceTokenizer]; VOCAB_FILE / MERGE_FILE for GPT2BPETokenizer
#   CHECKPOINT_PATH  save to and resume from here (optional)
#   GLOBAL_BATCH [2048], TRAIN_ITERS [per model], SAVE_INTERVAL [2400], EVAL_INTERVAL [1200],
#   LOG_INTERVAL [2], METRICS_FILE (JSONL metrics), DATA_CACHE_PATH (index cache, shared)
#   EXTRA_ARGS     more flags, word-split and appended last (they win), e.g. bubble filling
#   PYTHON [.venv/bin/python if present, else python3]
#   DRY_RUN=1      no GPUs needed: parse and validate for NNODES*GPUS_PER_NODE GPUs, print the
#                  layout (TP/PP/DP, layers and exits per stage, parameter counts), exit 0.
#                  Without DATA_PATH it uses mock data and a 32000-token vocabulary (Llama-2's).
set -euo pipefail

ROOT=${EE_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

NNODES=${NNODES:-${SLURM_NNODES:-$DEFAULT_NNODES}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
DRY_RUN=${DRY_RUN:-0}
TRAIN_ITERS=${TRAIN_ITERS:-$DEFAULT_TRAIN_ITERS}

# Shared by all four paper models: Llama-style backbone, bf16, sequence length 2048 and the
# paper's optimiser settings (Adam 0.9/0.95, lr 3e-4 -> 3e-5 cosine, 2000 warm-up steps).
COMMON_ARGS=(
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --sequence-parallel
  --seq-length 2048 --max-position-embeddings 2048
  --position-embedding-type rope --swiglu --normalization RMSNorm --disable-bias-linear
  --bf16
  --micro-batch-size "$MICRO_BATCH" --global-batch-size "${GLOBAL_BATCH:-2048}"
  --train-iters "$TRAIN_ITERS" --lr-decay-iters "$TRAIN_ITERS"
  --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000
  --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0
  --init-method-std 0.01
  --log-interval "${LOG_INTERVAL:-2}" --eval-interval "${EVAL_INTERVAL:-1200}" --eval-iters 10
)

if [[ -n "${DATA_PATH:-}" ]]; then
  # shellcheck disable=SC2206  # a blend is several words on purpose
  DATA_ARGS=(--data-path $DATA_PATH --split 990,9,1
    --tokenizer-type "${TOKENIZER_TYPE:-SentencePieceTokenizer}")
  [[ -n "${TOKENIZER_MODEL:-}" ]] && DATA_ARGS+=(--tokenizer-model "$TOKENIZER_MODEL")
  [[ -n "${VOCAB_FILE:-}" ]] && DATA_ARGS+=(--vocab-file "$VOCAB_FILE")
  [[ -n "${MERGE_FILE:-}" ]] && DATA_ARGS+=(--merge-file "$MERGE_FILE")
  [[ -n "${DATA_CACHE_PATH:-}" ]] && DATA_ARGS+=(--data-cache-path "$DATA_CACHE_PATH")
elif [[ "$DRY_RUN" == 1 ]]; then
  DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size "${VOCAB_SIZE:-32000}")
else
  echo "error: set DATA_PATH (a prefix from tools/preprocess_data.py or a weighted blend)" \
    "and TOKENIZER_MODEL; or DRY_RUN=1 to only check the configuration" >&2
  exit 2
fi

OUTPUT_ARGS=()
if [[ -n "${CHECKPOINT_PATH:-}" ]]; then
  OUTPUT_ARGS+=(--save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH"
    --save-interval "${SAVE_INTERVAL:-2400}")
fi
[[ -n "${METRICS_FILE:-}" ]] && OUTPUT_ARGS+=(--metrics-file "$METRICS_FILE")
# shellcheck disable=SC2206
EXTRA=(${EXTRA_ARGS:-})

ARGS=("${COMMON_ARGS[@]}" "${MODEL_ARGS[@]}" "${EXIT_ARGS[@]}" "${DATA_ARGS[@]}"
  "${OUTPUT_ARGS[@]}" "${EXTRA[@]}")

if [[ "$DRY_RUN" == 1 ]]; then
  echo "== $MODEL_NAME dry run: $NNODES node(s) x $GPUS_PER_NODE GPUs"
  WORLD_SIZE=$((NNODES * GPUS_PER_NODE)) PYTHONWARNINGS=ignore \
    exec "$PYTHON" pretrain_early_exit_gpt.py --dry-run "${ARGS[@]}"
fi

export CUDA_DEVICE_MAX_CONNECTIONS=1  # keeps TP/SP communication ordered with compute
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
echo "== $MODEL_NAME: node $NODE_RANK of $NNODES, $GPUS_PER_NODE GPUs each, master" \
  "$MASTER_ADDR:$MASTER_PORT"
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  pretrain_early_exit_gpt.py "${ARGS[@]}"
