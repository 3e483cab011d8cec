"""One early-exit head: [transformer layer] -> [residual MLP] -> [norm] -> output projection.

The norm sits right before the projection, like the final norm before the LM head, so
an exit that copies the final norm and the output embedding computes exactly what the
full model's head would compute on that layer's hidden state.

With --exit-confidence-head the head also holds a confidence estimator (CALM's learned
"classifier" measure): one linear map hidden -> 1 on the same normed hidden state the
output projection sees, whose sigmoid predicts whether the exit's top-1 token equals the
final layer's. It costs h + 1 parameters (well under 1% of a layer) and lets inference
decide before paying for the vocabulary projection (metric "learned").
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module

from megatron.early_exit.config import EarlyExitTransformerConfig
from megatron.early_exit.model.specs import LayerSpecs


class ExitHead(MegatronModule):
    def __init__(
        self,
        config: EarlyExitTransformerConfig,
        specs: LayerSpecs,
        layer_number: int,
        exit_index: int,
        vocab_size: int,
        tied: bool,
    ) -> None:
        super().__init__(config=config)
        ee = config.early_exit
        self.layer_number = layer_number
        self.temperature = ee.temperature(exit_index)
        self.tied = tied
        self.block = (
            build_module(specs.layer, config=config, layer_number=layer_number)
            if ee.use_exit_block
            else None
        )
        self.mlp = (
            MLP(config=config, submodules=specs.exit_mlp, ffn_hidden_size=config.ffn_hidden_size)
            if ee.use_exit_mlp
            else None
        )
        self.norm = (
            build_module(
                specs.norm,
                config=config,
                hidden_size=config.hidden_size,
                eps=config.layernorm_epsilon,
            )
            if ee.use_exit_norm
            else None
        )
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            config.hidden_size,
            vocab_size,
            config=config,
            init_method=config.init_method,
            bias=False,
            skip_bias_add=False,
            gather_output=False,
            skip_weight_param_allocation=tied,
        )
        self.confidence = None
        if ee.exit_confidence_head:
            # Zero init: sigmoid 0.5 everywhere until trained, and the same at any layout.
            self.confidence = torch.nn.Linear(
                config.hidden_size, 1, bias=True, dtype=config.params_dtype
            )
            torch.nn.init.zeros_(self.confidence.weight)
            torch.nn.init.zeros_(self.confidence.bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rotary_pos_emb: torch.Tensor | None = None,
        output_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden [s, b, h] (sequence-parallel: [s/tp, b, h]) -> logits [s, b, V/tp]."""
        h = self.features(hidden_states, attention_mask, rotary_pos_emb)
        return self.project(h, output_weight)

    def features(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rotary_pos_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The hidden state the output projection (and the confidence estimator) sees."""
        h = hidden_states
        if self.block is not None:
            h, _ = self.block(
                hidden_states=h, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb
            )
        if self.mlp is not None:
            out, bias = self.mlp(h)
            h = h + (out if bias is None else out + bias)
        if self.norm is not None:
            h = self.norm(h)
        return h

    def project(self, h: torch.Tensor, output_weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.tied and output_weight is None:
            raise ValueError(f"exit at layer {self.layer_number} is tied but got no weight")
        logits, _ = self.output_layer(h, weight=output_weight if self.tied else None)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits

    def confidence_logit(self, h: torch.Tensor) -> torch.Tensor:
        """[..., h] features -> [...] logit of P(exit top-1 == final top-1)."""
        if self.confidence is None:
            raise ValueError(f"exit at layer {self.layer_number} has no confidence head")
        return self.confidence(h).squeeze(-1)
