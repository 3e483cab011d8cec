"""What `--tune-exit` changes in training, in one place: `ExitTuning`, a training mode
(the interface of training/mode.py, which the entry point hands to the trainer).

* the backbone is frozen (requires_grad=False), so megatron-core's DDP and optimizer only
  see exit-head parameters; tied exits project with the frozen word embeddings;
* the loss is the weighted sum of exit losses only (the frozen model's LM loss is
  reported, never trained);
* the schedule is `pipeline/exit_tuning.py`: a forward-only pipeline for the backbone and a
  local exit-head backward on each stage (no backward p2p at all);
* with `--tune-exit-pipeline-parallel-size k` the processes build only the first k of the
  P stages (see partial.py) and skip the LM head; with `--tune-exit-truncate-backbone`
  (one stage) only the layers up to the deepest exit;
* with `--teacher-cache DIR` the backbone is not run at all: the exit heads train on hidden
  states and top-k teacher distributions cached by tools/cache_teacher.py
  (teacher_cache.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from megatron.early_exit.checkpoint.files import read_checkpoint_args, read_tracker
from megatron.early_exit.checkpoint.integrity import checked_checkpoint_dir, read_common_state
from megatron.early_exit.config import EXIT_HEAD_FIELDS, ExitConfig, RunConfig
from megatron.early_exit.data import Batch
from megatron.early_exit.errors import CheckpointError, ConfigError
from megatron.early_exit.model import EarlyExitGPTModel, ExitForwardOutput, ExitState
from megatron.early_exit.pipeline.losses import (
    TeacherBox,
    add_weighted_exit_losses,
    final_stage_terms,
    lm_loss_key,
    masked_mean,
)
from megatron.early_exit.tuning.partial import PartialStagesCheckpoint
from megatron.early_exit.tuning.teacher_cache import (
    TeacherCache,
    cached_forward,
    make_cached_loss_func,
)

ADD_EXITS_HINT = "add them with tools/checkpoint/add_exits.py first"


def freeze_backbone(model: EarlyExitGPTModel) -> list[torch.nn.Parameter]:
    """requires_grad only on exit-head parameters; returns them."""
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = list(model.exit_heads.parameters())
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def strip_lm_head(model: EarlyExitGPTModel) -> None:
    """The deepest running stage of a partial run is not the model's last stage: no final
    norm, no LM head (a tied output copy stays when tied exits project with it)."""
    model.decoder.final_layernorm = None

    def hidden_only(hidden_states, *args, **kwargs):
        return hidden_states

    model._postprocess = hidden_only


def finalize_exit_grads(model_chunks: list[torch.nn.Module]) -> None:
    """DP all-reduce of the exit grads, plus TP all-reduce of sequence-parallel norm grads.

    megatron-core's finalize_model_grads would also all-reduce the (frozen, grad-less) word
    embeddings between stages; nothing of the backbone has a gradient here.
    """
    from megatron.core.distributed.finalize_model_grads import (
        _allreduce_non_tensor_model_parallel_grads,
    )
    from megatron.core.utils import get_model_config

    for chunk in model_chunks:
        chunk.finish_grad_sync()
    _allreduce_non_tensor_model_parallel_grads(model_chunks, get_model_config(model_chunks[0]))


def make_exit_tuning_loss_func(
    batch: Batch,
    model: EarlyExitGPTModel,
    exit_weights: dict[int, float],
    dynamic_exit_weight: bool,
    has_lm_loss: bool,
    exit_distillation: bool = False,
) -> Callable[[ExitForwardOutput], tuple[torch.Tensor | None, dict[str, torch.Tensor]]]:
    """Exit losses only; exit heads see detached hidden states (the backbone ran without
    autograd). The frozen model's LM loss, where computed, is a metric; with exit
    distillation its logits are also the exits' teacher."""

    def loss_func(out: ExitForwardOutput):
        mask = batch.loss_mask
        metrics: dict[str, torch.Tensor] = {}
        teacher = top1 = None
        if has_lm_loss:
            per_token, teacher, top1 = final_stage_terms(
                model, out.output.detach(), batch.labels, exit_distillation, box
            )
            metrics[lm_loss_key()] = masked_mean(per_token, mask)
        elif exit_distillation and out.exit_states:
            teacher = box.take()  # sent by the last stage (pipeline/teacher.py)
        detached = {
            layer: ExitState(state.hidden.detach(), state.attention_mask, state.rotary_pos_emb)
            for layer, state in out.exit_states.items()
        }
        total = add_weighted_exit_losses(
            None,
            model,
            detached,
            batch,
            exit_weights,
            dynamic_exit_weight,
            metrics,
            teacher_log_probs=teacher,
            final_top1=top1,
        )
        return total, metrics

    box = TeacherBox()
    if exit_distillation:
        loss_func.teacher_box = box
    return loss_func


def runtime_run(run: RunConfig) -> RunConfig:
    """The config the processes build: the first k stages as a model of L*k/P layers, or
    (one stage, truncated backbone or teacher cache) the layers up to the deepest exit."""
    k = run.parallel.tune_exit_pipeline_parallel_size
    pp = run.parallel.pipeline_model_parallel_size
    t = run.training
    if pp == 1 and (t.tune_exit_truncate_backbone or t.teacher_cache is not None):
        deepest = max(run.exits.exit_layer_nums)
        if deepest == run.model.num_layers:
            return run
        out = copy.deepcopy(run)
        out.model.num_layers = deepest
        return out
    if k is None or k == pp:
        return run
    out = copy.deepcopy(run)
    out.model.num_layers = run.model.num_layers * k // pp
    out.parallel.pipeline_model_parallel_size = k
    out.parallel.tune_exit_pipeline_parallel_size = None
    return out


def check_checkpoint_exits(run: RunConfig) -> None:
    """The checkpoint must already hold exactly these exit heads (made by add_exits)."""
    root = run.checkpoint.load
    saved = read_checkpoint_args(root)
    if saved is None:
        try:
            read_tracker(root)
        except CheckpointError as exc:
            raise CheckpointError(f"--tune-exit: {exc}") from exc
        return  # no recorded flags: the tensor check at load time still names mismatches
    # The flags that shape the heads' parameters (a temperature only rescales logits).
    # A field newer than the checkpoint (e.g. exit_confidence_head) has its default there.
    defaults = ExitConfig()
    theirs = {k: saved.get(k, getattr(defaults, k)) for k in EXIT_HEAD_FIELDS}
    ours = {k: getattr(run.exits, k) for k in EXIT_HEAD_FIELDS}
    if not theirs["exit_layer_nums"]:
        raise CheckpointError(
            f"--tune-exit: checkpoint {root} has no exit heads; {ADD_EXITS_HINT} "
            f"(e.g. --exit-layer-nums {' '.join(map(str, run.exits.exit_layer_nums))})"
        )
    diff = {k: (theirs[k], ours[k]) for k in ours if theirs[k] != ours[k]}
    if diff:
        text = ", ".join(f"{k}: checkpoint {a} vs requested {b}" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"--tune-exit: checkpoint {root} has other exit heads than requested ({text}); "
            f"tune the exits it has (drop the exit flags), or {ADD_EXITS_HINT}"
        )


class ExitTuning:
    """The trainer's view of `--tune-exit` (a training.mode.TrainingMode)."""

    tune_exit = True

    def __init__(self, run: RunConfig) -> None:
        if not run.training.tune_exit:
            raise ConfigError("ExitTuning needs --tune-exit")
        check_checkpoint_exits(run)
        self.run = run
        self.model_run = runtime_run(run)
        self.partial = self.model_run is not run
        self.checkpoint_hook = (
            PartialStagesCheckpoint(
                self.model_run.model.num_layers,
                run.model.num_layers,
                run.parallel.pipeline_model_parallel_size,
            )
            if self.partial
            else None
        )
        self.cache = (
            TeacherCache.open(run.training.teacher_cache, run)
            if run.training.teacher_cache is not None
            else None
        )

    def prepare(self, model: EarlyExitGPTModel) -> None:
        """Called on the bare stage model before DDP wraps it."""
        if self.partial and model.post_process:
            strip_lm_head(model)
        freeze_backbone(model)

    def finalize_grads(self, model_chunks: list[torch.nn.Module]) -> None:
        finalize_exit_grads(model_chunks)

    def has_lm_loss(self, model: EarlyExitGPTModel) -> bool:
        return model.post_process and not self.partial

    # ------------------------------------------------ teacher cache (optional mode hooks)
    def build_datasets(self, global_batch_size: int):
        """The trainer's (train, valid) data: the cache's samples instead of token data."""
        if self.cache is None:
            return None
        return self.cache.datasets(self.run, global_batch_size)

    def forward(self, model: EarlyExitGPTModel, batch):
        """The stage's forward output without running it (None: run the model)."""
        if self.cache is None:
            return None
        self.cache.check_backbone(model, self.run.checkpoint.load)
        return cached_forward(model, batch)

    def loss_func(self, batch, model, exit_weights, dynamic_exit_weight, exit_distillation=False):
        if self.cache is not None:
            return make_cached_loss_func(
                batch, model, exit_weights, dynamic_exit_weight, exit_distillation
            )
        return make_exit_tuning_loss_func(
            batch,
            model,
            exit_weights,
            dynamic_exit_weight,
            self.has_lm_loss(model),
            exit_distillation,
        )

    @staticmethod
    def schedule():
        from megatron.early_exit.pipeline.exit_tuning import forward_backward_exit_tuning

        return forward_backward_exit_tuning

    def load_optimizer(self, root: str) -> bool:
        """Adam state is restored only from an EE-Tuning checkpoint (same parameter set)."""
        common = read_common_state(checked_checkpoint_dir(root))
        return bool((common.get("extra") or {}).get("tune_exit"))
