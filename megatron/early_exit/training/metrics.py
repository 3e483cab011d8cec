"""Gather per-stage losses to every rank; print one log line and a JSON line on rank 0."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron.early_exit.pipeline.losses import (
    exit_agreement_key,
    exit_confidence_key,
    exit_kl_key,
    exit_loss_key,
    lm_loss_key,
)


def reduce_losses(
    per_microbatch: list[dict[str, torch.Tensor]], exit_layers: list[int], device: torch.device
) -> tuple[float | None, dict[int, float]]:
    """Mean LM loss and mean loss of EVERY exit over microbatches and DP replicas."""
    keys = [lm_loss_key()] + [exit_loss_key(n) for n in exit_layers]
    means = _reduce_means(per_microbatch, keys, device)
    return means[0], {n: means[1 + i] for i, n in enumerate(exit_layers)}


def reduce_exit_kl(
    per_microbatch: list[dict[str, torch.Tensor]], exit_layers: list[int], device: torch.device
) -> dict[int, float | None]:
    """Mean KL(final || exit) of every exit (exit distillation), like `reduce_losses`."""
    means = _reduce_means(per_microbatch, [exit_kl_key(n) for n in exit_layers], device)
    return dict(zip(exit_layers, means))


def reduce_exit_confidence(
    per_microbatch: list[dict[str, torch.Tensor]], exit_layers: list[int], device: torch.device
) -> tuple[dict[int, float | None], dict[int, float | None]]:
    """Mean confidence-head BCE and mean top-1 agreement with the final layer, per exit."""
    keys = [exit_confidence_key(n) for n in exit_layers]
    keys += [exit_agreement_key(n) for n in exit_layers]
    means = _reduce_means(per_microbatch, keys, device)
    n = len(exit_layers)
    return dict(zip(exit_layers, means[:n])), dict(zip(exit_layers, means[n:]))


def _reduce_means(
    per_microbatch: list[dict[str, torch.Tensor]], keys: list[str], device: torch.device
) -> list[float | None]:
    """Mean of each metric over microbatches and ranks (None where no rank has it).

    Each loss lives on the stage that owns it; one all-reduce over the world collects
    them (TP replicas hold identical values, so only TP rank 0 contributes).
    """
    sums = torch.zeros(2 * len(keys), dtype=torch.float64, device=device)
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        # Accumulate on the device: no host sync per microbatch and metric.
        for i, key in enumerate(keys):
            values = [mb[key] for mb in per_microbatch if key in mb]
            if values:
                sums[i] = torch.stack(values).to(device=device, dtype=torch.float64).sum()
                sums[len(keys) + i] = len(values)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    return [
        (sums[i] / sums[len(keys) + i]).item() if sums[len(keys) + i] > 0 else None
        for i in range(len(keys))
    ]


class MetricsWriter:
    """Rank-0 log lines and JSON lines (`--metrics-file`)."""

    def __init__(self, path: str | None) -> None:
        self.enabled = not dist.is_initialized() or dist.get_rank() == 0
        self.path = path
        # Where log lines go instead of stdout (a progress bar's `write`, so as not to break it).
        self.echo: Callable[[str], None] | None = None
        if self.enabled and path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        line = format_log_line(record)
        if self.echo is not None:
            self.echo(line)
        else:
            print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def format_log_line(record: dict) -> str:
    parts = [f"{record.get('split', 'train')} iteration {record['iteration']}"]
    if record.get("lm_loss") is not None:
        parts.append(f"lm loss {record['lm_loss']:.4f}")
    exits = record.get("exit_losses") or {}
    if exits:
        parts.append(
            "exit losses " + " ".join(f"L{k}: {v:.4f}" for k, v in exits.items() if v is not None)
        )
    kls = record.get("exit_kl") or {}
    if kls:
        parts.append(
            "exit KL " + " ".join(f"L{k}: {v:.4f}" for k, v in kls.items() if v is not None)
        )
    agree = record.get("exit_agreement") or {}
    if agree:  # confidence heads: how often the exit's top-1 is the final layer's
        parts.append(
            "exit agreement "
            + " ".join(f"L{k}: {v:.3f}" for k, v in agree.items() if v is not None)
        )
    if record.get("grad_norm") is not None:
        parts.append(f"grad norm {record['grad_norm']:.4f}")
    if record.get("lr") is not None:
        parts.append(f"lr {record['lr']:.3e}")
    if record.get("iteration_time_s") is not None:
        parts.append(f"{1000 * record['iteration_time_s']:.1f} ms/iter")
    if record.get("tokens_per_s") is not None:
        parts.append(f"{record['tokens_per_s']:.0f} tokens/s")
    if record.get("memory"):
        parts.append("memory MiB (max over ranks) " + _pairs(record["memory"], 1.0, ".0f"))
    if record.get("timers_s"):
        parts.append("ms/iter (max over ranks) " + _pairs(record["timers_s"], 1000.0, ".2f"))
    return " | ".join(parts)


def _pairs(values: dict[str, float], scale: float, fmt: str) -> str:
    return " ".join(f"{k}: {scale * v:{fmt}}" for k, v in values.items())
