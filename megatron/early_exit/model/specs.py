"""Layer specs: megatron-core's local spec (CPU, or GPU without TE) or its TE spec.

We extend megatron-core through specs only: the local spec's norms are swapped for a
sequence-parallel-capable torch norm; nothing of the layer itself is copied.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron.early_exit.model.norms import SequenceParallelTorchNorm
from megatron.early_exit.platform import accelerator_status


@dataclass
class LayerSpecs:
    """Everything the model needs to build its decoder and exit heads."""

    layer: ModuleSpec  # one transformer layer
    norm: type  # norm module class/factory (final norm, exit norm)
    exit_mlp: MLPSubmodules  # MLP without a fused input norm
    uses_te: bool

    def block(self, num_local_layers: int) -> TransformerBlockSubmodules:
        return TransformerBlockSubmodules(
            layer_specs=[self.layer] * num_local_layers, layer_norm=self.norm
        )


def transformer_engine_usable(device_is_cuda: bool) -> bool:
    return device_is_cuda and accelerator_status().usable("transformer_engine")


def get_layer_specs(config: TransformerConfig, use_te: bool) -> LayerSpecs:
    if use_te:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )

        layer = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
        return LayerSpecs(
            layer=layer,
            norm=TENorm,
            exit_mlp=MLPSubmodules(
                linear_fc1=TEColumnParallelLinear, linear_fc2=TERowParallelLinear
            ),
            uses_te=True,
        )
    layer = copy.deepcopy(
        get_gpt_layer_local_spec(
            normalization=config.normalization, qk_layernorm=config.qk_layernorm
        )
    )
    layer.submodules.input_layernorm = SequenceParallelTorchNorm
    layer.submodules.pre_mlp_layernorm = SequenceParallelTorchNorm
    if config.qk_layernorm:  # the local spec's torch norm refuses sequence parallelism
        attention = layer.submodules.self_attention.submodules
        attention.q_layernorm = attention.k_layernorm = SequenceParallelTorchNorm
    return LayerSpecs(
        layer=layer,
        norm=SequenceParallelTorchNorm,
        exit_mlp=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        uses_te=False,
    )
