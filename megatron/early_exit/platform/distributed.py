"""Distributed start-up: platform, process groups, model-parallel state, seeds."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from megatron.early_exit.config import EarlyExitTransformerConfig, RunConfig
from megatron.early_exit.platform import Platform, init_platform


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def initialize_distributed(
    run: RunConfig, transformer_config: EarlyExitTransformerConfig, platform: Platform
) -> None:
    """Create the process group (torchrun env or a single process) and megatron's groups."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron.early_exit.model import tied_embedding_ranks

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
    if dist.get_world_size() != run.parallel.world_size:
        raise RuntimeError(
            f"process group has {dist.get_world_size()} ranks but the config was validated "
            f"for {run.parallel.world_size}"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=run.parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=run.parallel.pipeline_model_parallel_size,
            get_embedding_ranks=tied_embedding_ranks(
                transformer_config, not run.model.untie_embeddings_and_output_weights
            ),
        )
    torch.manual_seed(run.training.seed)
    model_parallel_cuda_manual_seed(run.training.seed)


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


__all__ = ["destroy_distributed", "init_platform", "initialize_distributed", "world_size_from_env"]
