#!/usr/bin/env bash
# EE-LLM 1.3B: 24 layers, hidden 2048, 16 heads; exits after layers 6 and 12 (loss weights
# 0.25 / 0.5) with output projections tied to the word embeddings; PP=4, TP=1.
# Usage and environment: see common.sh (DRY_RUN=1 checks it without GPUs).
MODEL_NAME=EE-LLM-1.3B
TP=1 PP=4 MICRO_BATCH=4
DEFAULT_NNODES=1 DEFAULT_TRAIN_ITERS=72000  # 300B tokens at 2048 x 2048 tokens per step
MODEL_ARGS=(--num-layers 24 --hidden-size 2048 --num-attention-heads 16)
EXIT_ARGS=(--exit-layer-nums 6 12 --exit-layer-weight 0.25 0.5)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
