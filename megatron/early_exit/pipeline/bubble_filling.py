"""Bubble-filling 1F1B, the executor: runs one stage's action list of a `fill_plan` schedule.

The plan (`fill_plan.plan_schedule`) is one explicit list of actions per stage; this
module runs exactly that list, so what runs, what is printed and what is tested cannot
drift. Forward of an action ("F", id) uses the stage's input of microbatch id; backward
roots are the stage's own exit losses plus, below the fill's depth, the received gradient.

Messages are matched by microbatch id: each receiver knows its sender's send order from
the schedule and buffers messages that arrive before they are needed. Sends are
non-blocking, so any schedule the time model can execute (no dependency cycle) runs
without deadlock, and every stage uses, for microbatch id i, the activation, labels and
gradient of i.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from megatron.early_exit.pipeline.fill_plan import B, F, PipelineSchedule


# ---------------------------------------------------------------------------- execution
class Inbox:
    """Receives one peer's messages in that peer's send order, keyed by microbatch id.

    `recv(id)` blocks for the peer's next message (tagged `id`); messages that arrive
    before they are needed wait in the buffer.
    """

    def __init__(self, order: list[int], recv: Callable[[int], Any]) -> None:
        self.order, self.recv = order, recv
        self.next = 0
        self.buffer: dict[int, Any] = {}

    def get(self, mb: int):
        while mb not in self.buffer:
            if self.next >= len(self.order):
                raise RuntimeError(f"the peer never sends microbatch {mb}")
            want = self.order[self.next]
            self.next += 1
            self.buffer[want] = self.recv(want)
        return self.buffer.pop(mb)


def _receiver(peer: int, group, shape, dtype, device) -> Callable[[int], torch.Tensor]:
    import torch.distributed as dist

    def recv(mb: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=device)
        dist.irecv(t, src=peer, group=group, tag=mb).wait()
        return t

    return recv


def forward_backward_bubble_filling(
    forward_step_func,
    data_iterator: Iterator,
    model: torch.nn.Module,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    config,
    forward_only: bool = False,
    *,
    schedule: PipelineSchedule,
    fill_data_iterator: Callable[[int], Iterator] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Run `schedule` on this pipeline stage; megatron-core's forward_step_func contract.

    Main microbatches read `data_iterator` in order; fill slot k reads
    `fill_data_iterator(k)`. Every loss is divided by `num_microbatches` (fills included).
    Returned metrics: the main microbatches' dicts, then one per fill backward with keys
    prefixed "fill_".
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron.early_exit.pipeline import schedules as base

    if forward_only:
        return base.forward_backward_1f1b(
            forward_step_func,
            data_iterator,
            model,
            num_microbatches,
            seq_length,
            micro_batch_size,
            config,
            forward_only=True,
        )
    P = parallel_state.get_pipeline_model_parallel_world_size()
    r = parallel_state.get_pipeline_model_parallel_rank()
    M = num_microbatches
    if schedule.num_stages != P or schedule.num_microbatches != M:
        raise ValueError(
            f"schedule is for {schedule.num_stages} stages x {schedule.num_microbatches} "
            f"microbatches, the run has {P} x {M}"
        )
    if schedule.num_fill and fill_data_iterator is None:
        raise ValueError("a schedule with fill microbatches needs fill_data_iterator")
    group = parallel_state.get_pipeline_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    seq = seq_length // tp if config.sequence_parallel else seq_length
    shape = (seq, micro_batch_size, config.hidden_size)
    device = next(model.parameters()).device
    dtype = config.pipeline_dtype or torch.float32
    act_in = grad_in = None
    if r > 0:
        prev = parallel_state.get_pipeline_model_parallel_prev_rank()
        act_in = Inbox(
            schedule.activation_order(r - 1), _receiver(prev, group, shape, dtype, device)
        )
    if r < P - 1:
        nxt = parallel_state.get_pipeline_model_parallel_next_rank()
        grad_in = Inbox(schedule.gradient_order(r + 1), _receiver(nxt, group, shape, dtype, device))

    actions = schedule.stages[r]
    last_backward = max(i for i, a in enumerate(actions) if a.kind == B)
    in_flight: dict[int, tuple[Any, Any, Any]] = {}
    pending: list[tuple[Any, torch.Tensor, Any]] = []  # (work, tensor, output to free)
    main_metrics: list[dict[str, torch.Tensor]] = []
    fill_metrics: list[dict[str, torch.Tensor]] = []

    def send(tensor, dst, mb, free_output=None):
        tensor = tensor.contiguous()
        pending.append((dist.isend(tensor, dst=dst, group=group, tag=mb), tensor, free_output))

    def reap(wait: bool):
        keep = []
        for work, tensor, output in pending:
            if wait:
                work.wait()
            if wait or work.is_completed():
                if output is not None:
                    base._deallocate(output, config)
            else:
                keep.append((work, tensor, output))
        pending[:] = keep

    ddp_config = getattr(model, "ddp_config", None)
    overlap_grad_reduce = bool(getattr(ddp_config, "overlap_grad_reduce", False))
    sync_ctx = base._no_sync(model)
    sync_ctx.__enter__()
    try:
        for i, act in enumerate(actions):
            mb = act.mb
            fill = schedule.fill(mb)
            depth, floor = schedule.depth(mb), schedule.floor(mb)
            if act.kind == F:
                grad_here = r >= floor
                with base._timed(config, "forward-recv"):  # sends are async: time the waits
                    inp = act_in.get(mb) if act_in is not None else None
                if inp is not None and r > floor:
                    inp.requires_grad_(True)
                it = data_iterator if fill is None else fill_data_iterator(fill.index)
                ctx = contextlib.nullcontext() if grad_here else torch.no_grad()
                with ctx:
                    output, loss_func = base._forward(forward_step_func, it, model, inp)
                if r < depth:
                    free = output if (grad_here and r < P - 1) else None
                    send(
                        base._sent_tensor(output),
                        parallel_state.get_pipeline_model_parallel_next_rank(),
                        mb,
                        free,
                    )
                if grad_here:
                    in_flight[mb] = (inp if r > floor else None, output, loss_func)
            else:
                if i == last_backward and not overlap_grad_reduce:
                    # DDP may reduce on the last backward. With --overlap-grad-reduce we stay
                    # in no_sync: a final fill backward reaches only some parameters, so
                    # their buckets would never be ready; finalize reduces them instead.
                    sync_ctx.__exit__(None, None, None)
                    sync_ctx = None
                inp, output, loss_func = in_flight.pop(mb)
                with base._timed(config, "backward-recv"):
                    grad = grad_in.get(mb) if r < depth else None
                local_loss, mb_metrics = loss_func(output)  # deferred exit-head forward
                if fill is None:
                    main_metrics.append(mb_metrics)
                else:
                    fill_metrics.append({f"fill_{k}": v for k, v in mb_metrics.items()})
                in_grad = base._backward(
                    inp,
                    base._sent_tensor(output) if grad is not None else None,
                    local_loss,
                    grad,
                    M,
                    config,
                )
                if r > floor:
                    send(in_grad, parallel_state.get_pipeline_model_parallel_prev_rank(), mb)
            reap(wait=False)
        reap(wait=True)
    finally:
        if sync_ctx is not None:
            sync_ctx.__exit__(None, None, None)
    base._finalize(model, config, False)
    return main_metrics + fill_metrics
