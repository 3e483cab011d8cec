"""Wrap this rank's model stage in DDP and create the optimizer and LR schedule."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron.early_exit.config import EarlyExitTransformerConfig, RunConfig
from megatron.early_exit.model import EarlyExitGPTModel
from megatron.early_exit.model.build import ModelChunks, build_stage_model, unwrap
from megatron.early_exit.model.gpt_model import sync_tied_weights_init
from megatron.early_exit.platform import Platform
from megatron.early_exit.training.mode import TrainingMode, finalize_grads

# clip_grad=0 means "do not clip"; megatron-core then skips the grad norm, which we log.
_NO_CLIP = 1e30


@dataclass
class TrainState:
    # DDP(Float16Module?(EarlyExitGPTModel)), or ModelChunks of those (virtual stages)
    model: torch.nn.Module
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler

    @property
    def unwrapped(self) -> EarlyExitGPTModel:
        return unwrap(self.model)


def setup_training(
    run: RunConfig,
    config: EarlyExitTransformerConfig,
    platform: Platform,
    use_te: bool,
    mode: TrainingMode | None = None,
) -> TrainState:
    """This rank's stage in DDP, with optimizer and LR schedule (process groups must exist).

    `mode.prepare` (e.g. EE-Tuning's frozen backbone) runs before DDP and the optimizer see
    the parameters; `mode.finalize_grads` reduces each step's gradients."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=run.overlap.overlap_grad_reduce,
        overlap_param_gather=run.overlap.overlap_param_gather,
        bucket_size=run.overlap.ddp_bucket_size,
        use_distributed_optimizer=run.parallel.use_distributed_optimizer,
    )
    vpp = run.parallel.virtual_pipeline_model_parallel_size
    built = []
    for vp_stage in range(vpp) if vpp is not None else [None]:
        chunk = build_stage_model(run, config, platform, use_te, vp_stage=vp_stage)
        if mode is not None:
            mode.prepare(unwrap(chunk))
        built.append(chunk)
    if vpp is not None:  # a rank's tied word-embedding copies, once all its chunks exist
        sync_tied_weights_init([unwrap(chunk) for chunk in built])
    # As Megatron-LM: one bucket for chunks after the first (their grads are ready last).
    chunks = [
        DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=bool(c)
        )
        for c, chunk in enumerate(built)
    ]
    model = chunks[0] if vpp is None else ModelChunks(chunks)
    config.finalize_model_grads_func = finalize_grads if mode is None else mode.finalize_grads

    t = run.training
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=t.lr,
            min_lr=t.min_lr,
            weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2,
            adam_eps=t.adam_eps,
            clip_grad=t.clip_grad if t.clip_grad > 0 else _NO_CLIP,
            bf16=t.bf16,
            fp16=t.fp16,
            params_dtype=t.params_dtype,
            loss_scale=t.loss_scale,
            initial_loss_scale=t.initial_loss_scale,
            use_distributed_optimizer=run.parallel.use_distributed_optimizer,
            overlap_param_gather=run.overlap.overlap_param_gather,
        ),
        chunks,
    )
    if t.fp16:
        config.grad_scale_func = optimizer.scale_loss
    decay_iters = t.lr_decay_iters or max(t.train_iters, 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if t.lr_warmup_iters > 0 else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters,
        lr_decay_steps=max(decay_iters, t.lr_warmup_iters + 1),
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=max(t.train_iters, 1),
        wd_incr_style="constant",
    )
    return TrainState(model=model, optimizer=optimizer, scheduler=scheduler)
