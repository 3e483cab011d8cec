"""Pipeline schedules with early-exit losses (no pipelining, 1F1B, interleaved), the
per-microbatch loss functions, bubble filling (fill_plan.py plans, bubble_filling.py
executes) and exit-loss weight schedules."""

from megatron.early_exit.pipeline.exit_tuning import forward_backward_exit_tuning
from megatron.early_exit.pipeline.interleaved import forward_backward_interleaved
from megatron.early_exit.pipeline.loss_weights import ExitLossWeights
from megatron.early_exit.pipeline.schedules import (
    forward_backward_1f1b,
    forward_backward_no_pipelining,
)
from megatron.early_exit.pipeline.select import get_forward_backward_func

__all__ = [
    "ExitLossWeights",
    "forward_backward_exit_tuning",
    "forward_backward_1f1b",
    "forward_backward_interleaved",
    "forward_backward_no_pipelining",
    "get_forward_backward_func",
]
