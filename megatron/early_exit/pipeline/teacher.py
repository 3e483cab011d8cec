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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.utils import get_attr_wrapped_model

from megatron.early_exit.model.gpt_model import TopKTeacher
from megatron.early_exit.pipeline.losses import earliest_exit_stage, resolved_top_k


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
        device = torch.cuda.current_device()
        s, b, k = self.shape
        packed = torch.empty((s, b, k + 1), dtype=torch.float32, device=device)
        ids = torch.empty((s, b, k), dtype=torch.int64, device=device)
        dist.recv(packed, src=self.next, group=self.group)
        dist.recv(ids, src=self.next, group=self.group)
        loss_func.teacher_box.teacher = TopKTeacher(packed[..., :k], ids, packed[..., k])

    def send(self, loss_func) -> None:
        """The teacher of `loss_func`'s microbatch to the previous stage; frees it here."""
        if not self.sends:
            return
        box = loss_func.teacher_box
        teacher = box.take()
        packed = torch.cat([teacher.log_probs, teacher.tail.unsqueeze(-1)], dim=-1).contiguous()
        dist.send(packed, dst=self.prev, group=self.group)
        dist.send(teacher.ids.contiguous(), dst=self.prev, group=self.group)
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
