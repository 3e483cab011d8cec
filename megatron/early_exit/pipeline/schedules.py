"""No-pipelining and 1F1B schedules in which every stage trains its own exits.

The contract is megatron-core's: `forward_step_func(data_iterator, model)` returns
`(output, loss_func)`. Here `output` is an `ExitForwardOutput` and `loss_func(output)`
returns `(local_loss, metrics)`: the stage's own loss for that microbatch (the LM loss
on the last stage plus the weighted losses of the exits that live on this stage; None
when a stage has neither) and detached metrics.

Exit losses need no extra communication. Stage i outputs x_i, receives g_i = dL/dx_i
from stage i+1 and owns local exit losses L_i. One backward over the two roots
(L_i, x_i) with gradients (1, g_i) yields exactly the parameter gradients of the total
loss and the gradient to send upstream. We call the autograd engine directly, as
megatron-core does, so that x_i may have been pseudo-deallocated after sending.

`loss_func` runs right before the microbatch's backward, so exit logits (s*b*V) exist
only for the microbatch being backpropagated, not for every microbatch in flight. With
exit distillation at PP > 1 that is also when the teacher has arrived: it travels upstream
right behind each gradient (pipeline/teacher.py).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_attr_wrapped_model
from torch.autograd import Variable

from megatron.early_exit.pipeline.teacher import TeacherRoute

LossFunc = Callable[[Any], tuple[torch.Tensor | None, dict[str, torch.Tensor]]]
ForwardStepFunc = Callable[[Iterator, torch.nn.Module], tuple[Any, LossFunc]]


def _sent_tensor(output: Any) -> torch.Tensor:
    return output.output if hasattr(output, "output") else output


@contextlib.contextmanager
def _timed(config, name: str):
    """megatron-core's `config.timers(name, log_level=2)` around a block, if timing is on."""
    timers = getattr(config, "timers", None)
    if timers is None:
        yield
        return
    timers(name, log_level=2).start()
    try:
        yield
    finally:
        timers(name).stop()


def _forward(forward_step_func, data_iterator, model, input_tensor):
    set_input_tensor = get_attr_wrapped_model(model, "set_input_tensor")
    set_input_tensor(input_tensor)
    # DDP and megatron-core modules carry the TransformerConfig (a bare test module may not).
    config = getattr(model, "config", None)
    with _timed(config, "forward-compute"):
        output, loss_func = forward_step_func(data_iterator, model)
    if getattr(config, "timers", None) is None:
        return output, loss_func

    @functools.wraps(loss_func)  # keeps its attributes (the distillation teacher box)
    def timed_loss_func(out):  # exit heads (and the LM loss) run here, deferred
        with _timed(config, "exit-heads"):
            return loss_func(out)

    return output, timed_loss_func


def _backward(
    input_tensor: torch.Tensor | None,
    output_tensor: torch.Tensor | None,
    local_loss: torch.Tensor | None,
    output_tensor_grad: torch.Tensor | None,
    num_microbatches: int,
    config: TransformerConfig,
) -> torch.Tensor | None:
    if input_tensor is not None:
        input_tensor.retain_grad()
    roots, grads = [], []
    if local_loss is not None:
        loss = local_loss / num_microbatches
        if config.grad_scale_func is not None:  # fp16 loss scaling, exit losses included
            loss = config.grad_scale_func(loss)
        roots.append(loss)
        grads.append(torch.ones_like(loss))
    if output_tensor_grad is not None:
        roots.append(output_tensor)
        grads.append(output_tensor_grad)
    if roots:
        with _timed(config, "backward-compute"):
            _run_backward(roots, grads)
    if input_tensor is None:
        return None
    if input_tensor.grad is None:  # nothing downstream depended on the input
        return torch.zeros_like(input_tensor)
    return input_tensor.grad


def _run_backward(roots: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    Variable._execution_engine.run_backward(
        tensors=tuple(roots),
        grad_tensors=tuple(grads),
        keep_graph=False,
        create_graph=False,
        inputs=tuple(),
        allow_unreachable=True,
        accumulate_grad=True,
    )


def _deallocate(output: Any, config: TransformerConfig) -> None:
    """Free the sent activation's data unless an exit head still needs it."""
    tensor = _sent_tensor(output)
    if not config.deallocate_pipeline_outputs or tensor is None or tensor._base is not None:
        return
    states = getattr(output, "exit_states", {}) or {}
    if any(state.hidden is tensor for state in states.values()):
        return
    tensor.data = torch.empty((1,), device=tensor.device, dtype=tensor.dtype)


def _no_sync(model):
    no_sync = getattr(model, "no_sync", None)
    return no_sync() if no_sync is not None else contextlib.nullcontext()


def _finalize(model, config: TransformerConfig, forward_only: bool) -> None:
    if not forward_only and config.finalize_model_grads_func is not None:
        config.finalize_model_grads_func([model])


def forward_backward_no_pipelining(
    forward_step_func: ForwardStepFunc,
    data_iterator: Iterator,
    model: torch.nn.Module,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    config: TransformerConfig,
    forward_only: bool = False,
) -> list[dict[str, torch.Tensor]]:
    metrics = []
    sync_ctx = _no_sync(model)
    sync_ctx.__enter__()
    try:
        for i in range(num_microbatches):
            if i == num_microbatches - 1:
                sync_ctx.__exit__(None, None, None)
                sync_ctx = None
            context = torch.no_grad() if forward_only else contextlib.nullcontext()
            with context:
                output, loss_func = _forward(forward_step_func, data_iterator, model, None)
                local_loss, mb_metrics = loss_func(output)
            metrics.append(mb_metrics)
            if not forward_only:
                _backward(None, None, local_loss, None, num_microbatches, config)
    finally:
        if sync_ctx is not None:
            sync_ctx.__exit__(None, None, None)
    _finalize(model, config, forward_only)
    return metrics


def forward_backward_1f1b(
    forward_step_func: ForwardStepFunc,
    data_iterator: Iterator,
    model: torch.nn.Module,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    config: TransformerConfig,
    forward_only: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """One-forward-one-backward with every stage adding its exit losses to its backward."""
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    p2p = P2PCommunicator(pp_group=pp_group, config=config)
    rank = parallel_state.get_pipeline_model_parallel_rank()
    size = parallel_state.get_pipeline_model_parallel_world_size()
    first, last = rank == 0, rank == size - 1
    tp = parallel_state.get_tensor_model_parallel_world_size()
    seq = seq_length // tp if config.sequence_parallel else seq_length
    shape = (seq, micro_batch_size, config.hidden_size)

    num_warmup = min(size - rank - 1, num_microbatches)
    num_steady = num_microbatches - num_warmup
    metrics: list[dict[str, torch.Tensor]] = []
    in_flight: list[tuple[torch.Tensor | None, Any, LossFunc]] = []
    backward_count = 0

    teacher = TeacherRoute(model, config, seq_length, micro_batch_size)
    teacher_pending: list = []  # forward-only: microbatches awaiting the teacher phase
    backpropagated: list[LossFunc] = []  # their teachers go upstream after the gradient

    sync_ctx = None if forward_only else _no_sync(model)
    if sync_ctx is not None:
        sync_ctx.__enter__()

    def eval_loss(output, loss_func):
        with torch.no_grad():
            _, mb_metrics = loss_func(output)
        metrics.append(mb_metrics)

    def forward_one(input_tensor):
        context = torch.no_grad() if forward_only else contextlib.nullcontext()
        with context:
            output, loss_func = _forward(forward_step_func, data_iterator, model, input_tensor)
        if forward_only:
            if not teacher.defers:
                eval_loss(output, loss_func)
            if teacher.active:  # keep the output only where the loss still has to run
                teacher_pending.append((output if teacher.defers else None, loss_func))
        return output, loss_func

    def send_teacher():  # right after the gradient crossed the same link
        teacher.send(backpropagated.pop(0))

    def backward_one(output_grad):
        nonlocal backward_count, sync_ctx
        input_tensor, output, loss_func = in_flight.pop(0)
        teacher.receive(loss_func)  # right after the gradient of this microbatch
        backward_count += 1
        if backward_count == num_microbatches and sync_ctx is not None:
            sync_ctx.__exit__(None, None, None)  # let DDP reduce grads on the last backward
            sync_ctx = None
        local_loss, mb_metrics = loss_func(output)  # deferred exit-head forward
        metrics.append(mb_metrics)
        backpropagated.append(loss_func)
        return _backward(
            input_tensor,
            _sent_tensor(output),
            local_loss,
            None if last else output_grad,
            num_microbatches,
            config,
        )

    def requires_grad(t):
        if t is not None and not forward_only:
            t.requires_grad_(True)
        return t

    try:
        for _ in range(num_warmup):
            input_tensor = requires_grad(p2p.recv_forward(shape, first))
            output, loss_func = forward_one(input_tensor)
            p2p.send_forward(_sent_tensor(output), last)
            if not forward_only:
                in_flight.append((input_tensor, output, loss_func))
                if not last:  # the last stage's output is its loss, needed by loss_func
                    _deallocate(output, config)

        input_tensor = requires_grad(p2p.recv_forward(shape, first)) if num_steady > 0 else None
        for i in range(num_steady):
            final = i == num_steady - 1
            output, loss_func = forward_one(input_tensor)
            if forward_only:
                p2p.send_forward(_sent_tensor(output), last)
                if not final:
                    input_tensor = p2p.recv_forward(shape, first)
                continue
            output_grad = p2p.send_forward_recv_backward(_sent_tensor(output), shape, last)
            in_flight.append((input_tensor, output, loss_func))
            if not last:
                _deallocate(output, config)
            input_grad = backward_one(output_grad)
            if final:
                input_tensor = None
                p2p.send_backward(input_grad, first)
            else:
                input_tensor = requires_grad(
                    p2p.send_backward_recv_forward(input_grad, shape, first)
                )
            send_teacher()

        if not forward_only:
            for _ in range(num_warmup):
                output_grad = p2p.recv_backward(shape, last)
                input_grad = backward_one(output_grad)
                p2p.send_backward(input_grad, first)
                send_teacher()
        elif teacher.active:
            teacher.drain(teacher_pending, eval_loss)
    finally:
        if sync_ctx is not None:
            sync_ctx.__exit__(None, None, None)

    _finalize(model, config, forward_only)
    return metrics
