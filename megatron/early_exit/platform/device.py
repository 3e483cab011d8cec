"""Platform selection: CUDA + NCCL when a GPU is present, else CPU + gloo."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

_platform: Platform | None = None


@dataclass(frozen=True)
class Platform:
    device_type: str  # "cuda" or "cpu"
    backend: str  # "nccl" or "gloo"

    @property
    def is_cuda(self) -> bool:
        return self.device_type == "cuda"

    def device(self) -> torch.device:
        if self.is_cuda:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def init_platform(force_cpu: bool | None = None) -> Platform:
    """Pick the device/backend once per process and prepare megatron-core for it.

    `force_cpu` (or EE_FORCE_CPU=1) runs on CPU even where CUDA exists; the CPU
    compatibility layer is only applied when CUDA is really absent, because it
    replaces `torch.cuda` functions that would otherwise raise.
    """
    global _platform
    if _platform is not None:
        return _platform
    if force_cpu is None:
        force_cpu = os.environ.get("EE_FORCE_CPU") == "1"
    if torch.cuda.is_available() and not force_cpu:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        _platform = Platform("cuda", "nccl")
    else:
        if not torch.cuda.is_available():
            from megatron.early_exit.platform import cpu_compat

            cpu_compat.apply()
        _platform = Platform("cpu", "gloo")
    return _platform


def current_platform() -> Platform:
    if _platform is None:
        raise RuntimeError("init_platform() has not been called in this process")
    return _platform
