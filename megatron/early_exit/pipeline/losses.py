"""Per-microbatch loss of one pipeline stage: LM loss (last stage) + its weighted exit losses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron.early_exit.data import Batch
from megatron.early_exit.model import EarlyExitGPTModel, ExitForwardOutput
from megatron.early_exit.model.gpt_model import (
    TopKTeacher,
    exit_stage,
    vocab_parallel_argmax,
    vocab_parallel_log_softmax,
    vocab_parallel_top_k_teacher,
)


def lm_loss_key() -> str:
    return "lm_loss"


def exit_loss_key(layer_number: int) -> str:
    return f"exit_{layer_number}"


def exit_kl_key(layer_number: int) -> str:
    return f"exit_kl_{layer_number}"


def exit_confidence_key(layer_number: int) -> str:
    return f"exit_conf_{layer_number}"


def exit_agreement_key(layer_number: int) -> str:
    return f"exit_agree_{layer_number}"


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
    return lm_loss_from_logits(model, logits, labels), teacher


def lm_loss_from_logits(
    model: EarlyExitGPTModel, logits: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Per-token LM loss [b, s] from final logits [b, s, V/tp] (in place on the logits)."""
    # compute_language_model_loss is per token in any layout: it transposes the labels in
    # and the loss out ([s, b] <-> [b, s]). Labels given as [s, b] thus match these [b, s]
    # logits, which spares an s*b*V copy back to its usual [s, b] logit layout.
    return model.compute_language_model_loss(labels.transpose(0, 1), logits).transpose(0, 1)


def final_outputs(
    model: EarlyExitGPTModel, logits: torch.Tensor, labels: torch.Tensor, exit_distillation: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """From the final logits of a forward without labels (ExitConfig.needs_final_logits):
    the per-token LM loss [b, s], the distillation teacher (or None) and, with confidence
    heads, the final layer's top-1 ids [b, s] (their detached target; else None)."""
    top1 = None
    if model.config.early_exit.exit_confidence_head:
        top1 = vocab_parallel_argmax(logits.detach())  # before the in-place CE
    if exit_distillation:
        lm, teacher = lm_loss_and_teacher(model, logits, labels)
        return lm, teacher, top1
    return lm_loss_from_logits(model, logits, labels), None, top1


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


def earliest_exit_virtual_stage(config) -> int:
    """The earliest virtual stage (chunk c of rank r is c * pp + r) holding an exit, from
    megatron-core's own layer offsets; the pipeline stage without virtual stages."""
    vpp = config.virtual_pipeline_model_parallel_size
    if vpp is None:
        return earliest_exit_stage(config)
    pp = config.pipeline_model_parallel_size
    first = min(config.early_exit.exit_layer_nums)
    for v in range(pp * vpp):
        chunk, rank = divmod(v, pp)
        offset = get_transformer_layer_offset(config, vp_stage=chunk, pp_rank=rank)
        if first <= offset + get_num_layers_to_build(config, vp_stage=chunk, pp_rank=rank):
            return v
    raise ValueError(f"exit layer {first} is outside the model's {config.num_layers} layers")


def teacher_goes_upstream(model: EarlyExitGPTModel) -> bool:
    """Whether this (last virtual) stage must send the teacher: an exit lives earlier."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp == 1:
        return False
    own = (getattr(model, "vp_stage", None) or 0) * pp
    own += parallel_state.get_pipeline_model_parallel_rank()
    return earliest_exit_virtual_stage(model.config) < own


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


def final_stage_terms(
    model: EarlyExitGPTModel,
    output: torch.Tensor,
    labels: torch.Tensor,
    exit_distillation: bool,
    box: TeacherBox,
) -> tuple[torch.Tensor, torch.Tensor | TopKTeacher | None, torch.Tensor | None]:
    """On the last stage, from the forward's output (the per-token LM loss, or the final
    logits when the exits need them): the per-token LM loss [b, s], the exits' distillation
    teacher (its upstream copy left in `box`) and the final top-1 for confidence heads."""
    if not (model.config.early_exit.needs_final_logits or exit_distillation):
        return output, None, None
    per_token, dense, top1 = final_outputs(model, output, labels, exit_distillation)
    teacher = None
    if exit_distillation:
        teacher, box.teacher = distillation_teachers(model, dense)
    return per_token, teacher, top1


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
        teacher = top1 = None
        metrics: dict[str, torch.Tensor] = {}
        mask = batch.loss_mask
        if model.post_process:
            per_token, teacher, top1 = final_stage_terms(
                model, out.output, batch.labels, exit_distillation, box
            )
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
            final_top1=top1,
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
    final_top1: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """`total` plus this stage's weighted exit losses, added one by one in layer order (None
    when both are absent); records each exit's unweighted cross entropy in `metrics`.

    With `teacher_log_probs` (exit distillation, see `lm_loss_and_teacher`) an exit's loss
    is its per-token KL from the teacher; its cross entropy stays the reported metric (so
    numbers compare with runs without distillation) and its mean KL is added as a metric.

    With `final_top1` (the final layer's top-1 ids [b, s]; confidence heads) each exit's
    confidence BCE, weighted by --exit-confidence-loss-weight, is added too; it reaches only
    the confidence heads (GPT model's exit_confidence_loss). Metrics: the BCE and the
    exit's agreement with the final layer's top-1.
    """
    mask = batch.loss_mask
    for layer, state in sorted(exit_states.items()):
        captured = {} if final_top1 is not None else None  # the exit's features and top-1
        if teacher_log_probs is None:
            per_token, max_prob = model.exit_loss(
                layer, state, batch.labels, with_max_prob=dynamic_exit_weight, capture=captured
            )
            loss = masked_mean(per_token, mask)
            metrics[exit_loss_key(layer)] = loss.detach()
        else:
            per_token, ce, max_prob = model.exit_distillation_loss(
                layer,
                state,
                batch.labels,
                teacher_log_probs,
                with_max_prob=dynamic_exit_weight,
                capture=captured,
            )
            loss = masked_mean(per_token, mask)
            metrics[exit_loss_key(layer)] = masked_mean(ce, mask)
            metrics[exit_kl_key(layer)] = loss.detach()
        weighted = masked_mean(per_token * max_prob, mask) if dynamic_exit_weight else loss
        term = exit_weights[layer] * weighted
        total = term if total is None else total + term
        if final_top1 is not None:
            bce, agree = model.exit_confidence_loss(layer, state, final_top1, captured)
            conf = masked_mean(bce, mask)
            metrics[exit_confidence_key(layer)] = conf.detach()
            metrics[exit_agreement_key(layer)] = masked_mean(agree, mask)
            total = total + model.config.early_exit.exit_confidence_loss_weight * conf
    return total
