"""Torch LayerNorm/RMSNorm usable with sequence parallelism.

megatron-core's local-spec norm (`WrappedTorchNorm`) refuses sequence parallelism. With
SP each TP rank normalises a different slice of the sequence, so the norm's parameter
gradients are partial sums that must be all-reduced across TP; megatron-core's
finalize step does that for parameters marked `sequence_parallel=True`, which we set.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class SequenceParallelTorchNorm:
    """Factory with the megatron-core norm signature returning a torch norm module."""

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        kind = getattr(config, "normalization", normalization)
        if kind == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif kind == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"unsupported normalization {kind!r}")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
