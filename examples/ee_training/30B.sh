#!/usr/bin/env bash
# EE-LLM 30B: 60 layers, hidden 6656, 52 heads; exits after layers 15 and 30 (loss weights
# 0.1 / 0.2), untied exit and LM heads; TP=4 (with sequence parallelism), PP=4: 16 GPUs
# per model replica, so at least 2 nodes of 8.
# Usage and environment: see common.sh (DRY_RUN=1 checks it without GPUs).
MODEL_NAME=EE-LLM-30B
TP=4 PP=4 MICRO_BATCH=1
DEFAULT_NNODES=2 DEFAULT_TRAIN_ITERS=192000  # 800B tokens
MODEL_ARGS=(--num-layers 60 --hidden-size 6656 --num-attention-heads 52
  --untie-embeddings-and-output-weights
  # Recompute the attention core (and each exit head's logits) in backward: see the
  # dry run's memory estimate per GPU; add EXTRA_ARGS="--recompute-granularity full
  # --recompute-method uniform --recompute-num-layers 1" if a stage still does not fit.
  --recompute-granularity selective)
EXIT_ARGS=(--exit-layer-nums 15 30 --exit-layer-weight 0.1 0.2 --untie-exit-output-weights)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
