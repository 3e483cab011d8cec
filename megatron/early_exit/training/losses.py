"""Per-microbatch loss of one pipeline stage: LM loss (last stage) + its weighted exit losses."""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron.early_exit.data import Batch
from megatron.early_exit.model import EarlyExitGPTModel, ExitForwardOutput


def lm_loss_key() -> str:
    return "lm_loss"


def exit_loss_key(layer_number: int) -> str:
    return f"exit_{layer_number}"


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)


def make_loss_func(
    batch: Batch,
    model: EarlyExitGPTModel,
    exit_weights: dict[int, float],
    dynamic_exit_weight: bool,
) -> Callable[[ExitForwardOutput], tuple[torch.Tensor | None, dict[str, torch.Tensor]]]:
    """Loss for one microbatch. Exit metrics are the unweighted exit cross entropies.

    With dynamic weighting, each token's exit loss is scaled by the exit's own detached
    max probability: the exit is trained hardest where it is (becoming) confident, which
    is where it will fire at inference.
    """

    def loss_func(out: ExitForwardOutput):
        total = None
        metrics: dict[str, torch.Tensor] = {}
        mask = batch.loss_mask
        if model.post_process:
            lm = masked_mean(out.output, mask)
            metrics[lm_loss_key()] = lm.detach()
            total = lm
        total = add_weighted_exit_losses(
            total, model, out.exit_states, batch, exit_weights, dynamic_exit_weight, metrics
        )
        return total, metrics

    return loss_func


def add_weighted_exit_losses(
    total: torch.Tensor | None,
    model: EarlyExitGPTModel,
    exit_states: dict,
    batch: Batch,
    exit_weights: dict[int, float],
    dynamic_exit_weight: bool,
    metrics: dict[str, torch.Tensor],
) -> torch.Tensor | None:
    """`total` plus this stage's weighted exit losses, added one by one in layer order (None
    when both are absent); records each exit's unweighted cross entropy in `metrics`."""
    mask = batch.loss_mask
    for layer, state in sorted(exit_states.items()):
        per_token, max_prob = model.exit_loss(
            layer, state, batch.labels, with_max_prob=dynamic_exit_weight
        )
        loss = masked_mean(per_token, mask)
        metrics[exit_loss_key(layer)] = loss.detach()
        weighted = masked_mean(per_token * max_prob, mask) if dynamic_exit_weight else loss
        term = exit_weights[layer] * weighted
        total = term if total is None else total + term
    return total
