#!/usr/bin/env bash
# EE-LLM 13B: 40 layers, hidden 5120, 40 heads; exits after layers 10 and 20 (loss weights
# 0.1 / 0.2), untied exit and LM heads; TP=2 (with sequence parallelism), PP=4.
# Usage and environment: see common.sh (DRY_RUN=1 checks it without GPUs).
MODEL_NAME=EE-LLM-13B
TP=2 PP=4 MICRO_BATCH=1
DEFAULT_NNODES=1 DEFAULT_TRAIN_ITERS=192000  # 800B tokens
MODEL_ARGS=(--num-layers 40 --hidden-size 5120 --num-attention-heads 40
  --untie-embeddings-and-output-weights
  # Recompute the attention core (and each exit head's logits) in backward: see the
  # dry run's memory estimate per GPU; add EXTRA_ARGS="--recompute-granularity full
  # --recompute-method uniform --recompute-num-layers 1" if a stage still does not fit.
  --recompute-granularity selective)
EXIT_ARGS=(--exit-layer-nums 10 20 --exit-layer-weight 0.1 0.2 --untie-exit-output-weights)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
