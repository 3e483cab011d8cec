"""Per-microbatch loss of one pipeline stage: LM loss (last stage) + its weighted exit losses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from megatron.early_exit.data import Batch
from megatron.early_exit.model import EarlyExitGPTModel, ExitForwardOutput
from megatron.early_exit.model.gpt_model import (
    TopKTeacher,
    exit_stage,
    vocab_parallel_log_softmax,
    vocab_parallel_top_k_teacher,
)


def lm_loss_key() -> str:
    return "lm_loss"


def exit_loss_key(layer_number: int) -> str:
    return f"exit_{layer_number}"


def exit_kl_key(layer_number: int) -> str:
    return f"exit_kl_{layer_number}"


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)


def lm_loss_and_teacher(
    model: EarlyExitGPTModel, logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """From the final logits [b, s, V/tp] of a forward without labels: the per-token LM loss
    [b, s] (what the forward with labels returns) and the teacher for exit distillation,
    the detached final log-probabilities [s, b, V/tp] (the exit logits' layout)."""
    # First: megatron's CE below works in place on the logits.
    teacher = vocab_parallel_log_softmax(logits.detach()).transpose(0, 1)
    # compute_language_model_loss is per token in any layout: it transposes the labels in
    # and the loss out ([s, b] <-> [b, s]). Labels given as [s, b] thus match these [b, s]
    # logits, which spares an s*b*V copy back to its usual [s, b] logit layout.
    lm = model.compute_language_model_loss(labels.transpose(0, 1), logits).transpose(0, 1)
    return lm, teacher


@dataclass
class TeacherBox:
    """One microbatch's distillation teacher between its loss function and the schedule
    (pipeline/teacher.py): the last stage's loss function leaves the top-k teacher here for
    the schedule to send upstream; on an earlier stage the schedule puts the received one
    here before calling the loss function (deferred to that microbatch's backward)."""

    teacher: TopKTeacher | None = None

    def take(self) -> TopKTeacher:
        if self.teacher is None:
            raise RuntimeError(
                "exit distillation: this stage's exits need the teacher from the last pipeline "
                "stage, but the schedule delivered none for this microbatch"
            )
        return self.teacher


def resolved_top_k(config, vocab_size: int) -> int:
    """The teacher's k: --exit-distillation-top-k, at most (and by default) the padded
    vocabulary `vocab_size`."""
    k = config.early_exit.exit_distillation_top_k
    return vocab_size if k is None else min(k, vocab_size)


def earliest_exit_stage(config) -> int:
    return min(exit_stage(n, config) for n in config.early_exit.exit_layer_nums)


def teacher_goes_upstream(model: EarlyExitGPTModel) -> bool:
    """Whether this (last) stage must send the teacher: an exit lives on an earlier stage."""
    return (
        parallel_state.get_pipeline_model_parallel_world_size() > 1
        and earliest_exit_stage(model.config) < parallel_state.get_pipeline_model_parallel_rank()
    )


def distillation_teachers(
    model: EarlyExitGPTModel, dense: torch.Tensor
) -> tuple[torch.Tensor | TopKTeacher, TopKTeacher | None]:
    """(teacher of this stage's exits, teacher to send upstream or None) from the final
    layer's log-probabilities. Without --exit-distillation-top-k the local exits keep the
    dense distribution (the PP=1 path); with it every exit sees the same top-k teacher,
    wherever it lives."""
    k = model.config.early_exit.exit_distillation_top_k
    upstream = teacher_goes_upstream(model)
    top_k = None
    if upstream or k is not None:
        top_k = vocab_parallel_top_k_teacher(dense, resolved_top_k(model.config, model.vocab_size))
    return (dense if k is None else top_k), (top_k if upstream else None)


def make_loss_func(
    batch: Batch,
    model: EarlyExitGPTModel,
    exit_weights: dict[int, float],
    dynamic_exit_weight: bool,
    exit_distillation: bool = False,
) -> Callable[[ExitForwardOutput], tuple[torch.Tensor | None, dict[str, torch.Tensor]]]:
    """Loss for one microbatch. Exit metrics are the unweighted exit cross entropies.

    With dynamic weighting, each token's exit loss is scaled by the exit's own detached
    max probability: the exit is trained hardest where it is (becoming) confident, which
    is where it will fire at inference.

    With exit distillation the forward ran without labels (`out.output` are the final
    logits); the final layer still trains on its LM loss only, the exits on the KL from its
    detached distribution.
    """

    box = TeacherBox()

    def loss_func(out: ExitForwardOutput):
        total = None
        teacher = None
        metrics: dict[str, torch.Tensor] = {}
        mask = batch.loss_mask
        if model.post_process:
            per_token = out.output
            if exit_distillation:
                per_token, dense = lm_loss_and_teacher(model, out.output, batch.labels)
                teacher, box.teacher = distillation_teachers(model, dense)
            lm = masked_mean(per_token, mask)
            metrics[lm_loss_key()] = lm.detach()
            total = lm
        elif exit_distillation and out.exit_states:
            teacher = box.take()
        total = add_weighted_exit_losses(
            total,
            model,
            out.exit_states,
            batch,
            exit_weights,
            dynamic_exit_weight,
            metrics,
            teacher_log_probs=teacher,
        )
        return total, metrics

    if exit_distillation:
        loss_func.teacher_box = box
    return loss_func


def add_weighted_exit_losses(
    total: torch.Tensor | None,
    model: EarlyExitGPTModel,
    exit_states: dict,
    batch: Batch,
    exit_weights: dict[int, float],
    dynamic_exit_weight: bool,
    metrics: dict[str, torch.Tensor],
    teacher_log_probs: torch.Tensor | TopKTeacher | None = None,
) -> torch.Tensor | None:
    """`total` plus this stage's weighted exit losses, added one by one in layer order (None
    when both are absent); records each exit's unweighted cross entropy in `metrics`.

    With `teacher_log_probs` (exit distillation, see `lm_loss_and_teacher`) an exit's loss
    is its per-token KL from the teacher; its cross entropy stays the reported metric (so
    numbers compare with runs without distillation) and its mean KL is added as a metric.
    """
    mask = batch.loss_mask
    for layer, state in sorted(exit_states.items()):
        if teacher_log_probs is None:
            per_token, max_prob = model.exit_loss(
                layer, state, batch.labels, with_max_prob=dynamic_exit_weight
            )
            loss = masked_mean(per_token, mask)
            metrics[exit_loss_key(layer)] = loss.detach()
        else:
            per_token, ce, max_prob = model.exit_distillation_loss(
                layer, state, batch.labels, teacher_log_probs, with_max_prob=dynamic_exit_weight
            )
            loss = masked_mean(per_token, mask)
            metrics[exit_loss_key(layer)] = masked_mean(ce, mask)
            metrics[exit_kl_key(layer)] = loss.detach()
        weighted = masked_mean(per_token * max_prob, mask) if dynamic_exit_weight else loss
        term = exit_weights[layer] * weighted
        total = term if total is None else total + term
    return total
