#!/usr/bin/env bash
# EE-LLM 7B: 32 layers, hidden 4096, 32 heads; exits after layers 8 and 16 (loss weights
# 0.1 / 0.2) with their own (untied) output projections, untied LM head; PP=4, TP=1.
# Usage and environment: see common.sh (DRY_RUN=1 checks it without GPUs).
MODEL_NAME=EE-LLM-7B
TP=1 PP=4 MICRO_BATCH=2
DEFAULT_NNODES=1 DEFAULT_TRAIN_ITERS=192000  # 800B tokens
MODEL_ARGS=(--num-layers 32 --hidden-size 4096 --num-attention-heads 32
  --untie-embeddings-and-output-weights
  # Recompute the attention core (and each exit head's logits) in backward: see the
  # dry run's memory estimate per GPU; add EXTRA_ARGS="--recompute-granularity full
  # --recompute-method uniform --recompute-num-layers 1" if a stage still does not fit.
  --recompute-granularity selective)
EXIT_ARGS=(--exit-layer-nums 8 16 --exit-layer-weight 0.1 0.2 --untie-exit-output-weights)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
