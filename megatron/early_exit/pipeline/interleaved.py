"""The interleaved (virtual-stage) 1F1B schedule with exit losses on every model chunk.

Each rank holds `vpp` model chunks; chunk c of rank r holds the layers of virtual stage
c * pp + r, so activations go round the ring of ranks vpp times. The order of forward and
backward steps is megatron-core's (microbatches in groups of pp, each group through every
chunk in turn; warm-up of 2 (pp - r - 1) + (vpp - 1) pp steps), and so are the p2p calls
that keep neighbours paired. What differs is the backward: as in schedules.py, a chunk's
backward runs over its own roots, its output (with the gradient received from the next
virtual stage) and the weighted losses of the exits it holds, so exits may live on any
chunk. The last chunk of the last rank holds the LM head and its loss.

Received activations and gradients are consumed in the order they arrive: every rank
processes microbatches of a chunk in the same order, so the k-th tensor a rank receives
from a neighbour is the one its k-th forward (backward) needing one expects.

Exit distillation (pipeline/teacher.py, `RingTeacherRoute`): the teacher made by the last
virtual stage follows each gradient down the ring, exchanged right after the p2p call that
carried the gradient, and waits with it for the microbatch's backward on the receiving chunk.
The forward-only path (validation; EE-Tuning through `local_losses`) defers the chunks that
need the teacher to a drain after the forwards.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron.early_exit.pipeline.schedules import (
    ForwardStepFunc,
    _backward,
    _deallocate,
    _forward,
    _no_sync,
    _sent_tensor,
)
from megatron.early_exit.pipeline.teacher import RingTeacherRoute


def forward_backward_interleaved(
    forward_step_func: ForwardStepFunc,
    data_iterator: Sequence[Iterator],
    model: Sequence[torch.nn.Module],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    config: TransformerConfig,
    forward_only: bool = False,
    local_losses: Callable | None = None,
) -> list[dict[str, torch.Tensor]]:
    """`model` and `data_iterator`: one per chunk (each iterator yields every microbatch).
    `local_losses(output, loss_func) -> metrics` runs a chunk's losses in the forward-only
    path (default: evaluate them; EE-Tuning also backpropagates its exit heads there)."""
    chunks, iterators = list(model), list(data_iterator)
    vpp = len(chunks)
    if len(iterators) != vpp:
        raise ValueError(f"{vpp} model chunks but {len(iterators)} data iterators")
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    rank = parallel_state.get_pipeline_model_parallel_rank()
    if num_microbatches % pp:
        raise ValueError(
            f"the interleaved schedule needs microbatches ({num_microbatches}) divisible by "
            f"the pipeline size {pp}"
        )
    p2p = P2PCommunicator(
        pp_group=parallel_state.get_pipeline_model_parallel_group(), config=config
    )
    tp = parallel_state.get_tensor_model_parallel_world_size()
    seq = seq_length // tp if config.sequence_parallel else seq_length
    shape = (seq, micro_batch_size, config.hidden_size)
    first_rank, last_rank = rank == 0, rank == pp - 1

    total = num_microbatches * vpp
    all_warmup = forward_only or num_microbatches == pp
    if all_warmup:
        num_warmup = total
    else:
        num_warmup = min(2 * (pp - rank - 1) + (vpp - 1) * pp, total)
    num_steady = total - num_warmup

    def chunk_of(k: int, forward: bool) -> int:
        c = (k % (pp * vpp)) // pp
        return c if forward else vpp - 1 - c

    def has_input(k: int) -> bool:  # forward k receives from the previous virtual stage
        return not (first_rank and chunk_of(k, True) == 0)

    def sends_output(k: int) -> bool:  # forward k feeds a later virtual stage
        return not (last_rank and chunk_of(k, True) == vpp - 1)

    def sends_grad(k: int) -> bool:  # backward k has an upstream virtual stage
        return not (first_rank and chunk_of(k, False) == 0)

    def needs_grad(k: int) -> bool:  # backward k receives from the next virtual stage
        return not (last_rank and chunk_of(k, False) == vpp - 1)

    inputs: deque[torch.Tensor] = deque()  # received activations, in arrival order
    grads: deque[torch.Tensor] = deque()  # received output gradients, in arrival order
    in_flight: list[deque] = [deque() for _ in range(vpp)]  # (input, output, loss_func)
    backwards_done = [0] * vpp
    metrics: list[dict[str, torch.Tensor]] = []
    teacher = RingTeacherRoute(chunks, config, seq_length, micro_batch_size)
    teachers: deque = deque()  # received teachers, in the order of their gradients
    grad_for = (k for k in range(total) if needs_grad(k))  # each received gradient's backward
    pending: list[list] = [[] for _ in range(vpp)]  # forward-only: awaiting the drain
    outgoing = None  # the teacher behind the gradient the next call sends

    def evaluate(output, loss_func):
        with torch.no_grad():
            return loss_func(output)[1]

    local_losses = local_losses or evaluate

    # Gradient reduction waits for each chunk's last backward (DDP no_sync until then).
    sync_ctx: list[Any] = [None] * vpp
    if not forward_only:
        for c, chunk in enumerate(chunks):
            sync_ctx[c] = _no_sync(chunk)
            sync_ctx[c].__enter__()

    def take_input(t: torch.Tensor | None) -> None:
        if t is not None:
            if not forward_only:
                t.requires_grad_(True)
            inputs.append(t)

    def take_grad(t: torch.Tensor | None) -> bool:
        """Keep a received gradient; whether a teacher follows it."""
        if t is None:
            return False
        grads.append(t)
        return teacher.receives(chunk_of(next(grad_for), False))

    def exchange_teachers(receive: bool) -> None:  # right after each call carrying gradients
        nonlocal outgoing
        if teacher.active:
            received = teacher.exchange(outgoing, receive)
            if received is not None:
                teachers.append(received)
            outgoing = None

    def forward_step(k: int):
        c = chunk_of(k, True)
        input_tensor = inputs.popleft() if has_input(k) else None
        context = torch.no_grad() if forward_only else contextlib.nullcontext()
        with context:
            output, loss_func = _forward(forward_step_func, iterators[c], chunks[c], input_tensor)
        if forward_only:
            if not teacher.receives(c):
                metrics.append(local_losses(output, loss_func))
            if teacher.receives(c) or teacher.sends(c):  # output kept only for the losses
                pending[c].append((output if teacher.receives(c) else None, loss_func))
        else:
            in_flight[c].append((input_tensor, output, loss_func))
        return output

    def backward_step(k: int) -> torch.Tensor | None:
        nonlocal outgoing
        c = chunk_of(k, False)
        input_tensor, output, loss_func = in_flight[c].popleft()
        output_grad = grads.popleft() if needs_grad(k) else None
        backwards_done[c] += 1
        if backwards_done[c] == num_microbatches and sync_ctx[c] is not None:
            sync_ctx[c].__exit__(None, None, None)  # this chunk's grads reduce now
            sync_ctx[c] = None
        if teacher.receives(c):
            loss_func.teacher_box.teacher = teachers.popleft()
        local_loss, mb_metrics = loss_func(output)  # deferred exit-head forward
        metrics.append(mb_metrics)
        outgoing = teacher.outgoing(c, loss_func)
        return _backward(
            input_tensor, _sent_tensor(output), local_loss, output_grad, num_microbatches, config
        )

    def sent(k: int, output) -> torch.Tensor | None:
        return _sent_tensor(output) if sends_output(k) else None

    def free(k: int, output) -> None:
        if sends_output(k) and not forward_only:
            _deallocate(output, config)

    try:
        if has_input(0):
            take_input(p2p.recv_forward(shape, False))

        for k in range(num_warmup):
            output = forward_step(k)
            recv_prev = k + 1 < total and has_input(k + 1)
            if k == num_warmup - 1 and not all_warmup:
                # The first backward's gradient arrives together with the last warm-up send.
                recv_next = not last_rank
                inp, grad = p2p.send_forward_backward_recv_forward_backward(
                    sent(k, output), None, recv_prev, recv_next, shape
                )
                exchange_teachers(take_grad(grad))
            else:
                inp = p2p.send_forward_recv_forward(sent(k, output), recv_prev, shape)
            take_input(inp)
            free(k, output)

        for i in range(num_steady):
            fk, bk = i + num_warmup, i
            output = forward_step(fk)
            input_grad = backward_step(bk)
            # The first (last) rank is pp - 1 steps ahead of the last (first) in the ring:
            # it receives only when that rank's current step sends across the ring.
            if first_rank:
                recv_prev = chunk_of(fk - (pp - 1), True) != vpp - 1
            else:
                recv_prev = True
            if last_rank:
                recv_next = chunk_of(bk - (pp - 1), False) != 0
            else:
                recv_next = True
            if i == num_steady - 1:
                recv_prev = False
            inp, grad = p2p.send_forward_backward_recv_forward_backward(
                sent(fk, output),
                input_grad if sends_grad(bk) else None,
                recv_prev,
                recv_next,
                shape,
            )
            take_input(inp)
            exchange_teachers(take_grad(grad))
            free(fk, output)

        if not forward_only:
            if all_warmup and needs_grad(0):
                exchange_teachers(take_grad(p2p.recv_backward(shape, False)))
            for k in range(num_steady, total):
                input_grad = backward_step(k)
                recv_next = k + 1 < total and needs_grad(k + 1)
                grad = p2p.send_backward_recv_backward(
                    input_grad if sends_grad(k) else None, recv_next, shape
                )
                exchange_teachers(take_grad(grad))
        elif teacher.active:
            teacher.drain(pending, lambda out, f: metrics.append(local_losses(out, f)))
    finally:
        for ctx in sync_ctx:
            if ctx is not None:
                ctx.__exit__(None, None, None)

    if not forward_only and config.finalize_model_grads_func is not None:
        config.finalize_model_grads_func(chunks)
    return metrics
