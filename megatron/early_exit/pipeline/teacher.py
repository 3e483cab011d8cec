"""Exit distillation across pipeline stages: the last stage's teacher travels upstream.

An exit on stage i < last needs the final layer's distribution of the same microbatch, which
exists only after the last stage's forward of it, long after stage i's own forward. The
1F1B schedule already defers every exit loss to the microbatch's backward (schedules.py),
and stage i's backward of microbatch m starts when the gradient of m arrives from stage
i + 1, i.e. after the last stage ran m. So the teacher rides upstream with the gradients:
right after the gradient of m crosses a link, the top-k teacher of m (`TopKTeacher`: log-probs
and tail mass packed as float32 [s, b, k + 1], token ids as int64 [s, b, k]) crosses the
same link, in the same order on both ends, so the two directions can never wait on each
other. Stages between the last stage and the earliest exit stage relay it.

Schedules without a backward chain (forward-only evaluation, EE-Tuning) run their forwards
first; stages that need the teacher keep their microbatches' exit states (s x b x h each,
no s x b x V) and compute the exit losses in a drain phase in which the teachers of
microbatches 0, 1, ... flow from the last stage upstream, each stage relaying before it
computes.

The interleaved schedule (interleaved.py, `RingTeacherRoute`) follows the same rule on its
ring of virtual stages: chunk c of rank r is virtual stage c * pp + r, the last one (the
last rank's last chunk) makes the teacher, and virtual stage v passes it to v - 1, which is
always on the previous rank (rank 0's chunk c hands on to the last rank's chunk c - 1, so a
chunk of the last rank gets it after a trip round the ring). The schedule's p2p calls are in
lock step along every link (a call and the neighbour's call it pairs with happen at the same
step of the ring), so right after each call a rank posts, together and non-blocking, the
teacher behind the gradient it just sent and the receive of the one behind the gradient it
just got; every such exchange pairs with the neighbours' exchanges after the same calls.
A received teacher waits with its gradient until that microbatch's backward on the chunk.
Without a backward chain (validation, EE-Tuning) the drain passes each microbatch's teacher
from virtual stage to virtual stage in decreasing order, microbatch after microbatch, so
every rank's transfers come in one global order and blocking ones cannot deadlock.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.utils import get_attr_wrapped_model

from megatron.early_exit.model.gpt_model import TopKTeacher
from megatron.early_exit.pipeline.losses import (
    earliest_exit_stage,
    earliest_exit_virtual_stage,
    resolved_top_k,
)
from megatron.early_exit.platform import current_platform


def _buffers(shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Receive buffers: log-probs and tail mass as float32 [s, b, k + 1], ids int64 [s, b, k]."""
    s, b, k = shape
    device = current_platform().device()
    packed = torch.empty((s, b, k + 1), dtype=torch.float32, device=device)
    return packed, torch.empty((s, b, k), dtype=torch.int64, device=device)


def _pack(teacher: TopKTeacher) -> tuple[torch.Tensor, torch.Tensor]:
    packed = torch.cat([teacher.log_probs, teacher.tail.unsqueeze(-1)], dim=-1).contiguous()
    return packed, teacher.ids.contiguous()


def _unpack(packed: torch.Tensor, ids: torch.Tensor) -> TopKTeacher:
    k = ids.shape[-1]
    return TopKTeacher(packed[..., :k], ids, packed[..., k])


class TeacherRoute:
    """Which teacher transfers this pipeline stage takes part in, and the transfers."""

    def __init__(self, model: torch.nn.Module, config: Any, seq_length: int, micro_batch_size: int):
        ee = getattr(config, "early_exit", None)
        size = parallel_state.get_pipeline_model_parallel_world_size()
        self.active = bool(ee is not None and ee.exit_distillation and ee.exit_layer_nums)
        self.active = self.active and size > 1
        self.receives = self.sends = False
        if not self.active:
            return
        rank = parallel_state.get_pipeline_model_parallel_rank()
        earliest = earliest_exit_stage(config)
        self.receives = earliest <= rank < size - 1
        self.sends = earliest < rank
        k = resolved_top_k(config, get_attr_wrapped_model(model, "vocab_size"))
        self.shape = (seq_length, micro_batch_size, k)
        self.group = parallel_state.get_pipeline_model_parallel_group()
        self.prev = parallel_state.get_pipeline_model_parallel_prev_rank()
        self.next = parallel_state.get_pipeline_model_parallel_next_rank()

    def receive(self, loss_func) -> None:
        """The teacher of `loss_func`'s microbatch from the next stage, into its box."""
        if not self.receives:
            return
        packed, ids = _buffers(self.shape)
        dist.recv(packed, src=self.next, group=self.group)
        dist.recv(ids, src=self.next, group=self.group)
        loss_func.teacher_box.teacher = _unpack(packed, ids)

    def send(self, loss_func) -> None:
        """The teacher of `loss_func`'s microbatch to the previous stage; frees it here."""
        if not self.sends:
            return
        box = loss_func.teacher_box
        for tensor in _pack(box.take()):
            dist.send(tensor, dst=self.prev, group=self.group)
        box.teacher = None

    @property
    def defers(self) -> bool:
        """Whether this stage's losses wait for the teacher (schedules without backward
        chain keep the microbatch until `drain`)."""
        return self.receives

    def drain(self, pending: list, compute) -> None:
        """The teacher phase of a schedule without backward chain. `pending` holds each
        microbatch's (output, loss_func) in order; `compute(output, loss_func)` runs the loss
        (and its backward, if any) of a microbatch this stage deferred."""
        for output, loss_func in pending:
            self.receive(loss_func)
            teacher = loss_func.teacher_box.teacher
            self.send(loss_func)  # relay first: the stages above work while this one computes
            if self.defers:
                loss_func.teacher_box.teacher = teacher
                compute(output, loss_func)
                loss_func.teacher_box.teacher = None


class RingTeacherRoute:
    """The teacher's route through the virtual stages of the interleaved schedule: which of
    this rank's chunks receive (and relay or use) it, which send it, and the transfers."""

    def __init__(self, chunks, config: Any, seq_length: int, micro_batch_size: int):
        ee = getattr(config, "early_exit", None)
        vpp = len(chunks)
        self.active = bool(ee is not None and ee.exit_distillation and ee.exit_layer_nums)
        self._receives = self._sends = [False] * vpp
        if not self.active:
            return
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        rank = parallel_state.get_pipeline_model_parallel_rank()
        earliest, last = earliest_exit_virtual_stage(config), pp * vpp - 1
        stages = [c * pp + rank for c in range(vpp)]
        self._receives = [earliest <= v < last for v in stages]
        self._sends = [earliest < v for v in stages]
        k = resolved_top_k(config, get_attr_wrapped_model(chunks[0], "vocab_size"))
        self.shape = (seq_length, micro_batch_size, k)
        self.group = parallel_state.get_pipeline_model_parallel_group()
        self.prev = parallel_state.get_pipeline_model_parallel_prev_rank()
        self.next = parallel_state.get_pipeline_model_parallel_next_rank()

    def receives(self, chunk: int) -> bool:
        """Whether `chunk` gets the teacher from the next virtual stage (with each gradient)."""
        return self._receives[chunk]

    def sends(self, chunk: int) -> bool:
        """Whether `chunk` passes the teacher on to the previous virtual stage."""
        return self._sends[chunk]

    def outgoing(self, chunk: int, loss_func) -> TopKTeacher | None:
        """The teacher `chunk` passes on after `loss_func`'s microbatch (None: none)."""
        if not self.sends(chunk):
            return None
        box = loss_func.teacher_box
        teacher, box.teacher = box.take(), None
        return teacher

    def exchange(self, send: TopKTeacher | None, receive: bool) -> TopKTeacher | None:
        """After a p2p call of the schedule: `send` to the previous rank and, if `receive`,
        the teacher from the next rank, posted together (the two may form a ring)."""
        ops, received = [], None
        if receive:
            received = _buffers(self.shape)
            ops += [dist.P2POp(dist.irecv, t, self.next, self.group) for t in received]
        if send is not None:
            ops += [dist.P2POp(dist.isend, t, self.prev, self.group) for t in _pack(send)]
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        return _unpack(*received) if received is not None else None

    def drain(self, pending: list[list], compute) -> None:
        """The teacher phase of the forward-only interleaved schedule. `pending[c]` holds
        chunk c's (output, loss_func) per microbatch in order (empty for chunks off the
        route); `compute(output, loss_func)` runs a receiving chunk's losses."""
        vpp = len(pending)
        for m in range(max(len(p) for p in pending)):
            for c in reversed(range(vpp)):  # this rank's virtual stages, latest first
                if not (self.receives(c) or self.sends(c)):
                    continue
                output, loss_func = pending[c][m]
                box = loss_func.teacher_box
                if self.receives(c):
                    packed, ids = _buffers(self.shape)
                    dist.recv(packed, src=self.next, group=self.group)
                    dist.recv(ids, src=self.next, group=self.group)
                    box.teacher = _unpack(packed, ids)
                teacher = box.take()
                if self.sends(c):  # relay first: the stages below work while this one computes
                    for tensor in _pack(teacher):
                        dist.send(tensor, dst=self.prev, group=self.group)
                if self.receives(c):
                    compute(output, loss_func)
                box.teacher = None
