"""Which forward-backward schedule a layout runs (megatron-core's get_forward_backward_func)."""

from __future__ import annotations

from megatron.core import parallel_state

from megatron.early_exit.pipeline.interleaved import forward_backward_interleaved
from megatron.early_exit.pipeline.schedules import (
    forward_backward_1f1b,
    forward_backward_no_pipelining,
)


def get_forward_backward_func(pipeline_parallel_size: int | None = None):
    """No pipelining, 1F1B, or the interleaved schedule when there are virtual stages."""
    if pipeline_parallel_size is None:
        pipeline_parallel_size = parallel_state.get_pipeline_model_parallel_world_size()
    if pipeline_parallel_size == 1:
        return forward_backward_no_pipelining
    if parallel_state.get_virtual_pipeline_model_parallel_world_size() is not None:
        return forward_backward_interleaved
    return forward_backward_1f1b
