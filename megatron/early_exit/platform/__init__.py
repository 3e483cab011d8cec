"""Device and backend selection, the only place that knows whether CUDA exists, and
process-group start-up.

Call `init_platform()` once at start-up, before building models. On a machine with
CUDA it selects NCCL and the current GPU; without CUDA it selects gloo and applies
the CPU compatibility layer for megatron-core (`cpu_compat.py`). `initialize_distributed`
(`distributed.py`) then creates torch.distributed and megatron-core's parallel groups.
"""

from megatron.early_exit.platform.accelerators import (
    AcceleratorStatus,
    accelerator_status,
    guard_broken_accelerators,
)
from megatron.early_exit.platform.device import Platform, current_platform, init_platform
from megatron.early_exit.platform.distributed import (
    destroy_distributed,
    initialize_distributed,
    world_size_from_env,
)

__all__ = [
    "AcceleratorStatus",
    "Platform",
    "accelerator_status",
    "current_platform",
    "destroy_distributed",
    "guard_broken_accelerators",
    "init_platform",
    "initialize_distributed",
    "world_size_from_env",
]
