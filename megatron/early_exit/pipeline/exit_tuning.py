"""EE-Tuning schedule: a forward-only pipeline for the frozen backbone, plus a local
exit-head backward on each stage.

The backbone runs under `torch.no_grad()`: no activations are kept for backward and no
gradient ever travels between stages, so a stage sends microbatch i forward and, while
the next stage works on it, trains its own exits on it. The exit heads see the captured
hidden states detached, so each stage's backward touches only its exit-head parameters.
The result is exactly the gradient of sum_i w_i * L_i^exit w.r.t. the exit heads (the
backbone has none), averaged over microbatches like the other schedules.

With virtual stages the backbone runs the forward-only interleaved schedule
(interleaved.py) and each chunk trains its own exits on each microbatch it forwards; with
exit distillation the chunks that need the last chunk's teacher train after the forwards,
as the teachers come down the ring.

Same contract as `schedules.py`: `forward_step_func(data_iterator, model)` returns
`(output, loss_func)` and `loss_func(output)` returns `(local_loss | None, metrics)`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron.early_exit.pipeline.interleaved import forward_backward_interleaved
from megatron.early_exit.pipeline.schedules import (
    ForwardStepFunc,
    _forward,
    _sent_tensor,
    _timed,
)
from megatron.early_exit.pipeline.teacher import TeacherRoute


def forward_backward_exit_tuning(
    forward_step_func: ForwardStepFunc,
    data_iterator: Iterator,
    model: torch.nn.Module,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    config: TransformerConfig,
    forward_only: bool = False,
) -> list[dict[str, torch.Tensor]]:
    if parallel_state.get_virtual_pipeline_model_parallel_world_size() is not None:
        metrics = forward_backward_interleaved(
            forward_step_func, data_iterator, model, num_microbatches, seq_length,
            micro_batch_size, config, forward_only=True,
            local_losses=functools.partial(_exit_heads, config, num_microbatches, forward_only),
        )  # fmt: skip
        if not forward_only and config.finalize_model_grads_func is not None:
            config.finalize_model_grads_func(list(model))
        return metrics
    size = parallel_state.get_pipeline_model_parallel_world_size()
    rank = parallel_state.get_pipeline_model_parallel_rank()
    first, last = rank == 0, rank == size - 1
    p2p = None
    if size > 1:
        p2p = P2PCommunicator(
            pp_group=parallel_state.get_pipeline_model_parallel_group(), config=config
        )
    tp = parallel_state.get_tensor_model_parallel_world_size()
    seq = seq_length // tp if config.sequence_parallel else seq_length
    shape = (seq, micro_batch_size, config.hidden_size)

    # Exit distillation at PP > 1: stages whose exits need the last stage's teacher keep
    # their microbatches (exit states only) until the teacher phase after the forwards.
    teacher = TeacherRoute(model, config, seq_length, micro_batch_size)
    pending = []

    metrics = []

    def heads(output, loss_func):
        metrics.append(_exit_heads(config, num_microbatches, forward_only, output, loss_func))

    for _ in range(num_microbatches):
        input_tensor = p2p.recv_forward(shape, first) if p2p is not None else None
        with torch.no_grad():  # frozen backbone: no graph, nothing kept for backward
            output, loss_func = _forward(forward_step_func, data_iterator, model, input_tensor)
        if p2p is not None:
            p2p.send_forward(_sent_tensor(output), last)
        if not teacher.defers:
            heads(output, loss_func)
        if teacher.active:  # keep the output only where the loss still has to run
            pending.append((output if teacher.defers else None, loss_func))
    if teacher.active:
        teacher.drain(pending, heads)
    if not forward_only and config.finalize_model_grads_func is not None:
        config.finalize_model_grads_func([model])
    return metrics


def _exit_heads(config, num_microbatches: int, forward_only: bool, output, loss_func) -> dict:
    """One microbatch's exit losses on this stage (chunk) and, training, their backward into
    the exit heads; returns its metrics."""
    with torch.no_grad() if forward_only else contextlib.nullcontext():
        local_loss, metrics = loss_func(output)
    if not forward_only and local_loss is not None:
        loss = local_loss / num_microbatches
        if config.grad_scale_func is not None:  # fp16 loss scaling
            loss = config.grad_scale_func(loss)
        with _timed(config, "backward-compute"):
            loss.backward()
    return metrics
