"""This rank's stage of the early-exit GPT, for training, inference and conversion alike:
start the process groups the model's layout needs, then build the stage."""

from __future__ import annotations

import torch
from megatron.core.transformer.module import Float16Module

from megatron.early_exit.config import EarlyExitTransformerConfig, RunConfig
from megatron.early_exit.model.gpt_model import (
    EarlyExitGPTModel,
    build_model,
    tied_embedding_ranks,
)
from megatron.early_exit.platform import Platform, initialize_distributed


def init_model_parallel(
    run: RunConfig, config: EarlyExitTransformerConfig, platform: Platform
) -> None:
    """Process groups for `run`'s layout (a world of one without torchrun), seeded.

    The embedding group holds every stage with a copy of the word embeddings: the first,
    the last when the LM head is tied, and each stage with a tied exit head.
    """
    initialize_distributed(
        platform,
        world_size=run.parallel.world_size,
        tensor_model_parallel_size=run.parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=run.parallel.pipeline_model_parallel_size,
        seed=run.training.seed,
        virtual_pipeline_model_parallel_size=run.parallel.virtual_pipeline_model_parallel_size,
        get_embedding_ranks=tied_embedding_ranks(
            config, not run.model.untie_embeddings_and_output_weights
        ),
    )


class ModelChunks(torch.nn.ModuleList):
    """This rank's model chunks of the interleaved schedule (one per virtual stage, each in
    its own DDP), answering the calls the trainer makes on a single stage's DDP model."""

    def zero_grad_buffer(self) -> None:
        for chunk in self:
            chunk.zero_grad_buffer()

    def disable_forward_pre_hook(self) -> None:
        for chunk in self:
            chunk.disable_forward_pre_hook()

    def enable_forward_pre_hook(self) -> None:
        for chunk in self:
            chunk.enable_forward_pre_hook()


def unwrap(model: torch.nn.Module) -> EarlyExitGPTModel:
    """The bare EarlyExitGPTModel inside DDP / Float16Module wrappers."""
    if isinstance(model, ModelChunks):
        raise TypeError("unwrap() of several model chunks: use unwrap_chunks()")
    while not isinstance(model, EarlyExitGPTModel):
        model = model.module
    return model


def unwrap_chunks(model: torch.nn.Module) -> list[EarlyExitGPTModel]:
    """The bare model of each chunk (one for a model without virtual stages)."""
    if isinstance(model, ModelChunks):
        return [unwrap(chunk) for chunk in model]
    return [unwrap(model)]


def build_stage_model(
    run: RunConfig,
    config: EarlyExitTransformerConfig,
    platform: Platform,
    use_te: bool,
    vp_stage: int | None = None,
) -> torch.nn.Module:
    """This rank's stage (or its model chunk `vp_stage`) on the platform's device (in a
    Float16Module for bf16/fp16)."""
    model = build_model(
        config,
        vocab_size=run.padded_vocab_size(),
        max_sequence_length=run.model.resolved_max_position_embeddings(),
        share_embeddings_and_output_weights=not run.model.untie_embeddings_and_output_weights,
        position_embedding_type=run.model.position_embedding_type,
        rotary_base=run.model.rotary_base,
        rotary_percent=run.model.rotary_percent,
        rope_scaling=run.model.use_rope_scaling,
        rope_scaling_factor=run.model.rope_scaling_factor,
        use_te=use_te,
        vp_stage=vp_stage,
    )
    model.to(platform.device())
    if config.fp16 or config.bf16:
        model = Float16Module(config, model)
    return model
