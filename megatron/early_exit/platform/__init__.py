"""Device and backend selection; the only place that knows whether CUDA exists.

Call `init_platform()` once at start-up, before building models. On a machine with
CUDA it selects NCCL and the current GPU; without CUDA it selects gloo and applies
the CPU compatibility layer for megatron-core (`cpu_compat.py`).
"""

from megatron.early_exit.platform.accelerators import (
    AcceleratorStatus,
    accelerator_status,
    guard_broken_accelerators,
)
from megatron.early_exit.platform.device import Platform, current_platform, init_platform

__all__ = [
    "AcceleratorStatus",
    "Platform",
    "accelerator_status",
    "current_platform",
    "guard_broken_accelerators",
    "init_platform",
]
