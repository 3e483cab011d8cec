"""What a kind of training changes in the loop: the interface the trainer talks to.

The trainer runs any `TrainingMode`; `Pretraining` is the default. EE-Tuning
(`tuning.ExitTuning`, `--tune-exit`) implements the same interface in its own package, so
training never imports tuning: the entry point picks the mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from megatron.core.distributed import finalize_model_grads
from megatron.core.distributed.finalize_model_grads import (
    _allreduce_non_tensor_model_parallel_grads,
)
from megatron.core.utils import get_attr_wrapped_model, get_model_config

from megatron.early_exit.config import RunConfig
from megatron.early_exit.data import Batch
from megatron.early_exit.model import EarlyExitGPTModel
from megatron.early_exit.model.gpt_model import allreduce_tied_weight_grads
from megatron.early_exit.pipeline import get_forward_backward_func
from megatron.early_exit.pipeline.losses import make_loss_func


def finalize_grads(model_chunks: list[torch.nn.Module]) -> None:
    """megatron-core's DP/TP/embedding grad finalisation, plus tied exits with an untied head."""
    if len(model_chunks) > 1:
        finalize_chunk_grads(model_chunks)
        return
    finalize_model_grads(model_chunks)
    for chunk in model_chunks:
        get_attr_wrapped_model(chunk, "allreduce_tied_exit_grads")()


def finalize_chunk_grads(model_chunks: list[torch.nn.Module]) -> None:
    """Virtual stages: finalize_model_grads' DP and TP steps, then the tied word embeddings
    of all the rank's chunks together (megatron-core would reduce one chunk's per rank)."""
    config = get_model_config(model_chunks[0])
    timers = config.timers
    if timers is not None:
        timers("all-grads-sync", log_level=1).start(barrier=config.barrier_with_L1_time)
    for chunk in model_chunks:
        chunk.finish_grad_sync()
    if timers is not None:
        timers("all-grads-sync").stop()
    _allreduce_non_tensor_model_parallel_grads(model_chunks, config)
    bare = [
        get_attr_wrapped_model(c, "tied_exit_output_weight", return_model_obj=True)
        for c in model_chunks
    ]
    allreduce_tied_weight_grads(bare)


class TrainingMode(Protocol):
    """The hooks of one kind of training (see Pretraining for the default behaviour)."""

    # Saved in the checkpoint's extra state (EE-Tuning restores Adam only from its own).
    tune_exit: bool
    # The config the processes build (EE-Tuning may build only the first k stages).
    model_run: RunConfig
    # Adapts the checkpoint view of a partial model (checkpoint.store.CheckpointHook).
    checkpoint_hook: Any

    def prepare(self, model: EarlyExitGPTModel) -> None:
        """Called on the bare stage model before DDP and the optimizer see its parameters."""

    def finalize_grads(self, model_chunks: list[torch.nn.Module]) -> None:
        """Reduce the gradients of a step (megatron-core's finalize_model_grads_func)."""

    def loss_func(
        self,
        batch: Batch,
        model: EarlyExitGPTModel,
        exit_weights: dict[int, float],
        dynamic_exit_weight: bool,
        exit_distillation: bool = False,
    ) -> Callable: ...

    def schedule(self) -> Callable:
        """The forward-backward function (megatron-core's schedule contract)."""

    def load_optimizer(self, root: str) -> bool:
        """Whether the optimizer state of the checkpoint under `root` fits this mode."""


class Pretraining:
    """Every parameter trains on the LM loss plus the weighted exit losses (1F1B)."""

    tune_exit = False
    checkpoint_hook = None

    def __init__(self, run: RunConfig) -> None:
        self.model_run = run

    def prepare(self, model: EarlyExitGPTModel) -> None:
        pass

    def finalize_grads(self, model_chunks: list[torch.nn.Module]) -> None:
        finalize_grads(model_chunks)

    def loss_func(self, batch, model, exit_weights, dynamic_exit_weight, exit_distillation=False):
        return make_loss_func(batch, model, exit_weights, dynamic_exit_weight, exit_distillation)

    def schedule(self) -> Callable:
        return get_forward_backward_func()

    def load_optimizer(self, root: str) -> bool:
        return True
