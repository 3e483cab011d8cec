"""Build this rank's stage of the early-exit GPT, for training, inference and conversion alike."""

from __future__ import annotations

import torch
from megatron.core.transformer.module import Float16Module

from megatron.early_exit.config import EarlyExitTransformerConfig, RunConfig
from megatron.early_exit.model.gpt_model import EarlyExitGPTModel, build_model
from megatron.early_exit.platform import Platform


def unwrap(model: torch.nn.Module) -> EarlyExitGPTModel:
    while not isinstance(model, EarlyExitGPTModel):
        model = model.module
    return model


def build_stage_model(
    run: RunConfig, config: EarlyExitTransformerConfig, platform: Platform, use_te: bool
) -> torch.nn.Module:
    model = build_model(
        config,
        vocab_size=run.padded_vocab_size(),
        max_sequence_length=run.model.resolved_max_position_embeddings(),
        share_embeddings_and_output_weights=not run.model.untie_embeddings_and_output_weights,
        position_embedding_type=run.model.position_embedding_type,
        rotary_base=run.model.rotary_base,
        rotary_percent=run.model.rotary_percent,
        use_te=use_te,
    )
    model.to(platform.device())
    if config.fp16 or config.bf16:
        model = Float16Module(config, model)
    return model
