"""Reshardable, atomic checkpoints with megatron.core.dist_checkpointing.

Layout on disk:
    ROOT/iter_0000010/                 one dist checkpoint (model, optimizer, RNG, ...)
    ROOT/latest_checkpointed_iteration.txt

A save writes into `iter_N.tmp/`, renames it to `iter_N/` once every rank finished, and
only then rewrites the tracker (temp file + os.replace). A crash at any point leaves the
previous checkpoint and tracker intact. Model and optimizer state are sharded by global
tensor, so a checkpoint loads into any TP/PP/DP layout; the RNG state is per rank and is
restored only into the same layout.
"""

from __future__ import annotations

import os
import random
import shutil
import signal

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from torch.distributed.checkpoint.api import CheckpointException

from megatron.early_exit.checkpoint.files import (  # noqa: F401  (re-exported)
    ARGS_FILE,
    TRACKER_FILE,
    CheckpointError,
    args_from_run,
    checkpoint_dir,
    read_tracker,
    write_checkpoint_args,
)
from megatron.early_exit.training.setup import TrainState

_OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


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
    state: TrainState, is_loading: bool, with_optimizer: bool, with_rng: bool, hook=None
) -> dict:
    # Keys from the bare model: independent of DDP/Float16Module wrapping.
    model_sd = state.unwrapped.sharded_state_dict()
    if hook is not None:  # e.g. EE-Tuning of the first k stages: full-model global shapes
        model_sd = hook.model_sd(model_sd, is_loading)
    sd = {"model": model_sd}
    if with_optimizer:
        sd["optimizer"] = state.optimizer.sharded_state_dict(
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
    state: TrainState,
    extra: dict | None = None,
    args: dict | None = None,
    hook=None,
):
    """Save atomically; `args` (flag values, see checkpoint/files.py) go to `ee_args.json`.

    `hook` (tuning.partial.PartialStagesCheckpoint) adapts the model's sharded state and
    adds the tensors a partial run does not hold, so the checkpoint stays complete.
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
    with_optimizer = _optimizer_has_state(state.optimizer)
    sd = _sharded_state(
        state, is_loading=False, with_optimizer=with_optimizer, with_rng=True, hook=hook
    )
    if hook is not None:
        sd["carried_over"] = hook.carry_over(sd["model"])
    sd.update(
        iteration=iteration,
        scheduler=state.scheduler.state_dict(),
        layout=_layout(),
        has_optimizer=with_optimizer,
        extra=extra or {},
    )
    dist_checkpointing.save(sd, tmp)
    _maybe_inject_fault(iteration)
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


def _maybe_inject_fault(iteration: int) -> None:
    """EE_FAULT_INJECT=kill_during_save[:ITER] SIGKILLs this process mid-save (tests only)."""
    spec = os.environ.get("EE_FAULT_INJECT", "")
    if not spec.startswith("kill_during_save"):
        return
    _, _, at = spec.partition(":")
    if not at or int(at) == iteration:
        os.kill(os.getpid(), signal.SIGKILL)


def _write_tracker(root: str, iteration: int) -> None:
    path = os.path.join(root, TRACKER_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(
    root: str, state: TrainState, load_optimizer: bool = True, load_rng: bool = True, hook=None
) -> int:
    """Load the latest checkpoint under `root` into `state`; return its iteration."""
    iteration = read_tracker(root)
    path = checkpoint_dir(root, iteration)
    if not os.path.isdir(path):
        raise CheckpointError(
            f"{TRACKER_FILE} points to iteration {iteration} but {path} is missing"
        )
    common = dist_checkpointing.load_common_state_dict(path)
    same_layout = common.get("layout") == _layout()
    if not common.get("has_optimizer", True):
        load_optimizer = False  # saved before the first optimizer step
    if load_optimizer and state.optimizer.config.use_distributed_optimizer:
        _prepare_distributed_optimizer_for_load(state.optimizer)
    sd = _sharded_state(
        state,
        is_loading=True,
        with_optimizer=load_optimizer,
        with_rng=load_rng and same_layout,
        hook=hook,
    )
    _check_model_keys(state.unwrapped, sd["model"], path)
    try:
        # A partial run (hook) reads only a subset of the layers: no full-coverage check.
        loaded = dist_checkpointing.load(sd, path, validate_access_integrity=hook is None)
    except (Exception, CheckpointException) as exc:  # re-raised with the context users need
        raise CheckpointError(
            f"could not load {path}: {exc}. Was it saved from a model with the same "
            "architecture and exit layers?"
        ) from exc
    state.unwrapped.load_state_dict(loaded["model"], strict=True)
    if hook is not None:
        hook.source = path
    if load_optimizer:
        with torch.no_grad():  # the distributed optimizer copies into views of leaf params
            state.optimizer.load_state_dict(loaded["optimizer"])
        if state.optimizer.config.use_distributed_optimizer:
            _restore_adam_steps(state.optimizer, loaded["optimizer"])
        state.scheduler.load_state_dict(loaded["scheduler"])
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
