"""Reshardable, atomic checkpoints of a model stage with megatron.core.dist_checkpointing.

Layout on disk:
    ROOT/iter_0000010/                 one dist checkpoint (model, optimizer, RNG, ...)
    ROOT/latest_checkpointed_iteration.txt

A save writes into `iter_N.tmp/`, renames it to `iter_N/` once every rank finished, and
only then rewrites the tracker (temp file + os.replace). A crash at any point leaves the
previous checkpoint and tracker intact. Model and optimizer state are sharded by global
tensor, so a checkpoint loads into any TP/PP/DP layout; the RNG state is per rank and is
restored only into the same layout.

Training saves and loads model, optimizer, LR schedule and RNG; inference and conversion
pass only the model (and conversion saves without an optimizer). `hook` lets a run that
holds only part of the model (EE-Tuning of the first k stages, tuning/partial.py) adapt the
model's sharded state and carry the rest over from the checkpoint it loaded.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from torch.distributed.checkpoint.api import CheckpointException

from megatron.early_exit.checkpoint.files import (
    TRACKER_FILE,
    checkpoint_dir,
    read_tracker,
    write_checkpoint_args,
)
from megatron.early_exit.checkpoint.integrity import checked_checkpoint_dir, read_common_state
from megatron.early_exit.errors import CheckpointError
from megatron.early_exit.model.build import unwrap_chunks

_OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointHook(Protocol):
    """Adapts a partial model's checkpoint view (implemented by tuning.partial)."""

    source: str | None  # the iteration dir last loaded: where carried-over tensors come from

    def model_sd(self, model_sd: dict, is_loading: bool) -> dict: ...

    def carry_over(self, model_sd: dict) -> dict: ...


def _layout() -> dict[str, int]:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _rng_sharded_object(data) -> ShardedObject:
    layout = _layout()
    return ShardedObject(
        key="rng_state",
        data=data,
        global_shape=(layout["pp"], layout["tp"], layout["dp"]),
        global_offset=(
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_data_parallel_rank(),
        ),
        replica_id=0,
    )


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(
    model, optimizer, is_loading: bool, with_optimizer: bool, with_rng: bool, hook=None
) -> dict:
    # Keys from the bare model: independent of DDP/Float16Module wrapping. Model chunks
    # (virtual stages) use global layer numbers, so their tensors' keys are the same as
    # without virtual stages and one checkpoint loads into either layout.
    bare = unwrap_chunks(model)
    if len(bare) == 1:
        model_sd = bare[0].sharded_state_dict()
    else:
        model_sd = {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(bare)}
    if hook is not None:  # e.g. EE-Tuning of the first k stages: full-model global shapes
        model_sd = hook.model_sd(model_sd, is_loading)
    sd = {"model": model_sd}
    if with_optimizer:
        sd["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=_OPTIMIZER_SHARDING
        )
    if with_rng:
        sd["rng_state"] = _rng_sharded_object(_rng_state() if not is_loading else None)
    return sd


def _die_with_parent() -> None:
    """Runs in the results-queue manager process: exit when the trainer dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _ensure_results_queue_dies_with_us() -> None:
    """dist_checkpointing lazily spawns a multiprocessing Manager for its write results.
    If the trainer is killed, that manager outlives it (holding the job's stdout/stderr
    open). Start it ourselves with a parent-death signal instead."""
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=_die_with_parent)
        filesystem_async._results_queue = manager.Queue()
        filesystem_async._ee_results_manager = manager  # keep it referenced


def save_checkpoint(
    root: str,
    iteration: int,
    model: torch.nn.Module,
    optimizer=None,
    scheduler=None,
    *,
    extra: dict | None = None,
    args: dict | None = None,
    hook: CheckpointHook | None = None,
    on_staged: Callable[[int], None] | None = None,
) -> None:
    """Save atomically (collective); `args` (flags, see checkpoint/files.py) go to `ee_args.json`.

    `model` may be wrapped (DDP, Float16Module). Without `optimizer` (or before its first
    step) no optimizer state is written; without `scheduler` no LR-schedule state. `hook`
    (see CheckpointHook) adds the tensors a partial run does not hold, so the checkpoint
    stays complete. `on_staged(iteration)` runs on every rank once the staging directory is
    written and before it is renamed into place (tests inject faults there).
    """
    rank0 = dist.get_rank() == 0
    _ensure_results_queue_dies_with_us()
    final = checkpoint_dir(root, iteration)
    tmp = final + ".tmp"
    if rank0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted save
        os.makedirs(tmp)
    dist.barrier()
    # Before the first step torch's Adam has no state to save (e.g. an initial checkpoint).
    with_optimizer = optimizer is not None and _optimizer_has_state(optimizer)
    sd = _sharded_state(
        model, optimizer, is_loading=False, with_optimizer=with_optimizer, with_rng=True, hook=hook
    )
    if hook is not None:
        sd["carried_over"] = hook.carry_over(sd["model"])
    if scheduler is not None:
        sd["scheduler"] = scheduler.state_dict()
    sd.update(
        iteration=iteration, layout=_layout(), has_optimizer=with_optimizer, extra=extra or {}
    )
    dist_checkpointing.save(sd, tmp)
    if on_staged is not None:
        on_staged(iteration)
    dist.barrier()
    if rank0:
        if args is not None:
            write_checkpoint_args(tmp, args)
        old = final + ".old"
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        _write_tracker(root, iteration)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _write_tracker(root: str, iteration: int) -> None:
    path = os.path.join(root, TRACKER_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(
    root: str,
    model: torch.nn.Module,
    optimizer=None,
    scheduler=None,
    *,
    load_rng: bool = True,
    hook: CheckpointHook | None = None,
) -> int:
    """Load the latest checkpoint under `root` into `model` (collective); return its iteration.

    `optimizer` and `scheduler` are restored when given and the checkpoint has optimizer
    state (a checkpoint saved before the first step, or without an optimizer, has none).
    The RNG state is restored with `load_rng` into the layout it was saved from. A missing,
    truncated or mismatched checkpoint is a CheckpointError naming the file or tensors.
    """
    path = checked_checkpoint_dir(root)
    iteration = read_tracker(root)
    common = read_common_state(path)
    same_layout = common.get("layout") == _layout()
    load_optimizer = optimizer is not None and common.get("has_optimizer", True)
    if load_optimizer and optimizer.config.use_distributed_optimizer:
        _prepare_distributed_optimizer_for_load(optimizer)
    sd = _sharded_state(
        model,
        optimizer,
        is_loading=True,
        with_optimizer=load_optimizer,
        with_rng=load_rng and same_layout,
        hook=hook,
    )
    bare = unwrap_chunks(model)
    model_sds = [sd["model"]] if len(bare) == 1 else list(sd["model"].values())
    for chunk, chunk_sd in zip(bare, model_sds):
        _check_model_keys(chunk, chunk_sd, path)
    try:
        # A partial run (hook) reads only a subset of the layers: no full-coverage check.
        loaded = dist_checkpointing.load(sd, path, validate_access_integrity=hook is None)
    except (Exception, CheckpointException) as exc:  # re-raised with the context users need
        raise CheckpointError(
            f"could not load {path}: {exc}. Was it saved from a model with the same "
            "architecture and exit layers?"
        ) from exc
    if len(bare) == 1:
        bare[0].load_state_dict(loaded["model"], strict=True)
    else:
        for i, chunk in enumerate(bare):
            chunk.load_state_dict(loaded["model"][f"chunk{i}"], strict=True)
    if hook is not None:
        hook.source = path
    if load_optimizer:
        with torch.no_grad():  # the distributed optimizer copies into views of leaf params
            optimizer.load_state_dict(loaded["optimizer"])
        if optimizer.config.use_distributed_optimizer:
            _restore_adam_steps(optimizer, loaded["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(loaded["scheduler"])
    if "rng_state" in loaded:
        _restore_rng(loaded["rng_state"])
    return iteration


def _check_model_keys(model, model_sd: dict, path: str) -> None:
    """Refuse, by name, a checkpoint whose model tensors do not match this model's."""
    saved = {
        k for k in dist_checkpointing.load_tensors_metadata(path) if not k.startswith("optimizer.")
    }
    wanted = {v.key for v in nested_values(model_sd) if isinstance(v, ShardedTensor)}
    missing = sorted(wanted - saved)
    # Exit heads are stage-local: each rank checks the layers its own stage holds.
    first, last = model.layer_offset + 1, model.layer_offset + model.num_local_layers
    theirs = {int(k.split(".")[1]) for k in saved if k.startswith("exit_heads.")}
    extra = sorted(n for n in theirs - set(model.local_exit_layers) if first <= n <= last)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors of this model are not in it, e.g. {missing[:3]}")
        if extra:
            parts.append(f"it has exit heads at layers {extra} that this model lacks")
        raise CheckpointError(
            f"checkpoint {path} does not match the model: {'; '.join(parts)}. Load a "
            "checkpoint saved with the same architecture and exit layers."
        )


def _optimizer_has_state(optimizer) -> bool:
    local = any(
        len(inner.optimizer.state) > 0
        for inner in getattr(optimizer, "chained_optimizers", [optimizer])
    )
    flag = torch.tensor([1.0 if local else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # every rank must agree
    return bool(flag.item())


def _restore_adam_steps(optimizer, loaded: dict) -> None:
    """Set torch Adam's per-parameter 'step' from the checkpoint's param groups.

    The fully reshardable format keeps the step count only in the param groups; on the
    torch.optim.Adam fallback megatron-core 0.16.1 does not copy it back, which would
    silently restart Adam's bias correction.
    """
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    per_optimizer = [loaded] if "optimizer" in loaded else [loaded[i] for i in sorted(loaded)]
    for inner, sd in zip(inners, per_optimizer):
        steps = {g["step"] for g in sd["optimizer"]["param_groups"] if "step" in g}
        if len(steps) != 1:
            continue
        step = float(steps.pop())
        for param_state in inner.optimizer.state.values():
            if "step" in param_state:
                old = param_state["step"]
                param_state["step"] = (
                    torch.full_like(old, step) if torch.is_tensor(old) else type(old)(step)
                )


def _prepare_distributed_optimizer_for_load(optimizer) -> None:
    """Two megatron-core 0.16.1 gaps on the torch.optim.Adam fallback (no apex/TE):

    * torch's Adam has no state before its first step, but DistributedOptimizer's
      state_dict expects it: materialise it with dummy values before loading.
    * a fully_reshardable load skips the per-parameter 'step' entry yet copies every key
      of the Adam state: supply the current 'step' so the copy succeeds.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if not getattr(DistributedOptimizer, "_ee_step_patch", False):
        original = DistributedOptimizer._set_main_param_and_optimizer_states

        def set_states(self, model_param, tensors):
            group_index, order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][order]
            param_state = self.optimizer.state[main_param]
            if "step" in param_state and "step" not in tensors:
                tensors = dict(tensors, step=param_state["step"])
            return original(self, model_param, tensors)

        DistributedOptimizer._set_main_param_and_optimizer_states = set_states
        DistributedOptimizer._ee_step_patch = True
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer):
            opt._init_optimizer_states_with_dummy_values()
