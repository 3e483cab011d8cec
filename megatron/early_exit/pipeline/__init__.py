"""Pipeline schedules with early-exit losses, the per-microbatch loss functions, bubble
filling (fill_plan.py plans, bubble_filling.py executes) and exit-loss weight schedules."""

from megatron.early_exit.pipeline.exit_tuning import forward_backward_exit_tuning
from megatron.early_exit.pipeline.loss_weights import ExitLossWeights
from megatron.early_exit.pipeline.schedules import (
    forward_backward_1f1b,
    forward_backward_no_pipelining,
    get_forward_backward_func,
)

__all__ = [
    "ExitLossWeights",
    "forward_backward_exit_tuning",
    "forward_backward_1f1b",
    "forward_backward_no_pipelining",
    "get_forward_backward_func",
]
