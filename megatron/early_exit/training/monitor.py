"""TensorBoard / W&B scalars, timers and memory figures of a training run.

`Timers` has megatron-core's timer interface (`timers(name, log_level).start()/.stop()`), so
megatron-core's own p2p communicator and grad finalisation time themselves once the
trainer sets `TransformerConfig.timers`; our schedules and the trainer add forward,
backward, exit heads, data and optimizer. We do not use `megatron.core.timers.Timers`: it
calls `torch.cuda.synchronize()` and gathers on a CUDA device unconditionally, and we
train on CPU too. Our timers never add barriers (a barrier only some ranks reach hangs).

Every rank gathers its timers and memory in one all-reduce (max over ranks) at the
iterations that log; the logging rank (global rank 0, which `metrics.reduce_losses`
already gives every stage's losses) writes the scalars.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

# The timers each --timing-log-level adds (megatron-core's names where it has them); every
# rank reduces this fixed list, so ranks that never ran a timer (a first stage's
# forward-recv) still take part in the collective.
LEVEL1 = ("forward-backward", "batch-generator", "all-grads-sync", "optimizer")
LEVEL2 = (
    "forward-compute", "backward-compute", "exit-heads",
    "forward-recv", "forward-send", "backward-recv", "backward-send",
    "forward-send-backward-recv", "backward-send-forward-recv",
)  # fmt: skip


class _Timer:
    def __init__(self, synchronize: Callable[[], None]) -> None:
        self._sync = synchronize
        self.elapsed_s = 0.0
        self._start: float | None = None

    def start(self, barrier: bool = False) -> None:  # barrier: megatron-core's signature
        if self._start is not None:
            raise RuntimeError("timer started twice")
        self._sync()
        self._start = time.perf_counter()

    def stop(self, barrier: bool = False) -> None:
        if self._start is None:
            raise RuntimeError("timer stopped but not started")
        self._sync()
        self.elapsed_s += time.perf_counter() - self._start
        self._start = None


class _NullTimer:
    def start(self, barrier: bool = False) -> None:
        pass

    def stop(self, barrier: bool = False) -> None:
        pass


_NULL = _NullTimer()


class Timers:
    """Named accumulating timers up to `level` (1 coarse, 2 fine); others are no-ops."""

    def __init__(self, level: int, synchronize: Callable[[], None] = lambda: None) -> None:
        self.level = level
        self._sync = synchronize
        self._timers: dict[str, _Timer] = {}

    def __call__(self, name: str, log_level: int | None = None):
        if name in self._timers:  # megatron-core stops a timer by name alone
            return self._timers[name]
        if (log_level if log_level is not None else _level_of(name)) > self.level:
            return _NULL
        if name not in self._timers:
            self._timers[name] = _Timer(self._sync)
        return self._timers[name]

    @contextlib.contextmanager
    def time(self, name: str, log_level: int | None = None):
        timer = self(name, log_level)
        timer.start()
        try:
            yield
        finally:
            timer.stop()

    def names(self) -> tuple[str, ...]:
        return LEVEL1 + (LEVEL2 if self.level >= 2 else ())

    def elapsed(self, reset: bool = True) -> dict[str, float]:
        """This rank's seconds per timer since the last reset (0 for timers never run)."""
        out = {n: (self._timers[n].elapsed_s if n in self._timers else 0.0) for n in self.names()}
        if reset:
            for t in self._timers.values():
                t.elapsed_s = 0.0
        return out


def _level_of(name: str) -> int:
    return 1 if name in LEVEL1 else 2


def memory_stats(device: torch.device) -> dict[str, float]:
    """This rank's memory in MiB: torch.cuda's allocator figures on a GPU, RSS on CPU."""
    mib = 1024.0 * 1024.0
    if device.type == "cuda":
        return {
            "allocated-mib": torch.cuda.memory_allocated(device) / mib,
            "max-allocated-mib": torch.cuda.max_memory_allocated(device) / mib,
            "reserved-mib": torch.cuda.memory_reserved(device) / mib,
            "max-reserved-mib": torch.cuda.max_memory_reserved(device) / mib,
        }
    import psutil

    return {"rss-mib": psutil.Process(os.getpid()).memory_info().rss / mib}


def gather_max(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The max over all ranks of each value (one all-reduce; every rank must call it)."""
    if not values or not (dist.is_initialized() and dist.get_world_size() > 1):
        return dict(values)
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(values, t.tolist()))


def scalars(record: dict) -> dict[str, float]:
    """TensorBoard tags -> values of one metrics record (the same numbers as its JSON line).

    Train tags are Megatron-LM's where it has one ("lm loss", "learning-rate", ...);
    validation tags carry a "validation/" prefix; each exit is "exit-loss/layer-N"."""
    prefix = "validation/" if record.get("split") == "valid" else ""
    out: dict[str, float] = {}

    def put(tag: str, value) -> None:
        if value is not None:
            out[prefix + tag] = float(value)

    put("lm loss", record.get("lm_loss"))
    for group, tag in (
        ("exit_losses", "exit-loss"),
        ("exit_weights", "exit-weight"),
        ("exit_kl", "exit-kl"),
    ):
        for layer, value in (record.get(group) or {}).items():
            put(f"{tag}/layer-{layer}", value)
    put("grad-norm", record.get("grad_norm"))
    put("learning-rate", record.get("lr"))
    put("tokens-per-sec", record.get("tokens_per_s"))
    put("iteration-time", record.get("iteration_time_s"))
    for name, value in (record.get("memory") or {}).items():
        put(f"memory/{name}", value)
    for name, value in (record.get("timers_s") or {}).items():
        put(f"timers/{name}-time", value)
    return out


class ScalarLogger:
    """Writes `scalars(record)` to TensorBoard and/or W&B on the logging rank.

    `wandb_module` lets tests pass a stand-in for the wandb package."""

    def __init__(self, logging_config, run_summary: dict | None = None, wandb_module=None):
        cfg = logging_config
        self.enabled = (cfg.tensorboard_dir or cfg.wandb_project) and (
            not dist.is_initialized() or dist.get_rank() == 0
        )
        self.tb = None
        self.wandb = None
        if not self.enabled:
            return
        if cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=cfg.tensorboard_dir)
        if cfg.wandb_project:
            if wandb_module is None:
                import wandb as wandb_module
            save_dir = cfg.wandb_save_dir or os.path.join(cfg.tensorboard_dir or ".", "wandb")
            os.makedirs(save_dir, exist_ok=True)
            wandb_module.init(
                project=cfg.wandb_project,
                name=cfg.wandb_exp_name,
                dir=save_dir,
                config=run_summary or {},
            )
            self.wandb = wandb_module

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        values = scalars(record)
        step = int(record["iteration"])
        if self.tb is not None:
            for tag, value in values.items():
                self.tb.add_scalar(tag, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


class RunMonitor:
    """What the trainer needs from this module: timers, extras at logging steps, scalars."""

    def __init__(self, run, config, device: torch.device) -> None:
        """Sets `config.timers` (the TransformerConfig megatron-core's code reads)."""
        import dataclasses

        self.cfg = run.logging
        self.device = device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        level = self.cfg.timing_log_level
        self.timers = Timers(level, sync) if level > 0 else None
        self.config = config
        config.timers = self.timers
        self.scalars = ScalarLogger(self.cfg, dataclasses.asdict(run))
        self.writes_scalars = bool(self.cfg.tensorboard_dir or self.cfg.wandb_project)
        self._last_gather = 0

    def time(self, name: str):
        return self.timers.time(name) if self.timers is not None else contextlib.nullcontext()

    def pause_timers(self) -> None:
        """No timing until resume_timers (validation must not count as training time)."""
        self.config.timers = None

    def resume_timers(self) -> None:
        self.config.timers = self.timers

    def scalar_step(self, iteration: int) -> bool:
        return self.writes_scalars and iteration % self.cfg.tensorboard_log_interval == 0

    def extras(self, iteration: int) -> dict:
        """{"timers_s": mean seconds per iteration, "memory": MiB}, max over ranks.

        A collective: every rank calls it at the same iterations."""
        values: dict[str, float] = {}
        if self.timers is not None:
            steps = max(iteration - self._last_gather, 1)
            values.update({f"t:{k}": v / steps for k, v in self.timers.elapsed().items()})
        self._last_gather = iteration
        if self.cfg.log_memory_to_tensorboard:
            values.update({f"m:{k}": v for k, v in memory_stats(self.device).items()})
        values = gather_max(values, self.device)
        out: dict = {}
        if self.timers is not None:
            out["timers_s"] = {k[2:]: v for k, v in values.items() if k.startswith("t:")}
        if self.cfg.log_memory_to_tensorboard:
            out["memory"] = {k[2:]: v for k, v in values.items() if k.startswith("m:")}
        return out

    def log(self, record: dict) -> None:
        if not self.cfg.log_timers_to_tensorboard and "timers_s" in record:
            record = {k: v for k, v in record.items() if k != "timers_s"}
        self.scalars.log(record)

    def close(self) -> None:
        self.scalars.close()
