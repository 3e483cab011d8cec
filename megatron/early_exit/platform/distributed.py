"""Process-group start-up and teardown: torch.distributed, megatron-core's model-parallel
groups and seeds. Training, inference and conversion all start here."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron.early_exit.platform.device import Platform


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def initialize_distributed(
    platform: Platform,
    *,
    world_size: int,
    tensor_model_parallel_size: int,
    pipeline_model_parallel_size: int,
    seed: int,
    virtual_pipeline_model_parallel_size: int | None = None,
    get_embedding_ranks: Callable[[list[int], int | None], list[int]] | None = None,
) -> None:
    """Create the process group (torchrun env or a single process) and megatron's groups.

    `world_size` is what the config was validated for; `get_embedding_ranks` (megatron-core's
    hook) says which ranks share the word embeddings (see `model.tied_embedding_ranks`).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python script.py`: a world of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group(
            backend=platform.backend,
            timeout=datetime.timedelta(minutes=10),
            device_id=platform.device() if platform.is_cuda else None,
        )
    if dist.get_world_size() != world_size:
        raise RuntimeError(
            f"process group has {dist.get_world_size()} ranks but the config was validated "
            f"for {world_size}"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
            get_embedding_ranks=get_embedding_ranks,
        )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


__all__ = ["destroy_distributed", "initialize_distributed", "world_size_from_env"]
