"""Early-exit GPT on megatron-core's GPTModel."""

from megatron.early_exit.model.build import build_stage_model, init_model_parallel, unwrap
from megatron.early_exit.model.exit_head import ExitHead
from megatron.early_exit.model.gpt_model import (
    EarlyExitGPTModel,
    ExitForwardOutput,
    ExitState,
    build_model,
    tied_embedding_ranks,
)
from megatron.early_exit.model.specs import LayerSpecs, get_layer_specs

__all__ = [
    "EarlyExitGPTModel",
    "ExitForwardOutput",
    "ExitHead",
    "ExitState",
    "LayerSpecs",
    "build_model",
    "build_stage_model",
    "get_layer_specs",
    "init_model_parallel",
    "tied_embedding_ranks",
    "unwrap",
]
