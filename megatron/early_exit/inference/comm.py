"""Point-to-point and broadcast helpers between the pipeline stages of one model replica.

Rank r of stage s talks to rank r of stage s' (same TP rank), like megatron-core's p2p.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


class Pipe:
    def __init__(self, device: torch.device):
        self.device = device
        self.size = parallel_state.get_pipeline_model_parallel_world_size()
        self.stage = parallel_state.get_pipeline_model_parallel_rank()
        self.group = parallel_state.get_pipeline_model_parallel_group()
        self.ranks = dist.get_process_group_ranks(self.group) if self.size > 1 else [0]

    def send(self, tensor: torch.Tensor, stage: int) -> None:
        dist.send(tensor.contiguous(), self.ranks[stage])

    def recv(self, shape, dtype, stage: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(t, self.ranks[stage])
        return t

    def broadcast(self, tensor: torch.Tensor, stage: int) -> torch.Tensor:
        if self.size > 1:
            dist.broadcast(tensor, self.ranks[stage], group=self.group)
        return tensor

    def broadcast_object(self, obj, stage: int):
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, self.ranks[stage], group=self.group, device=self.device)
        return box[0]
