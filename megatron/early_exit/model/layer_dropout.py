"""Layer dropout with rates rising with depth (LayerSkip, arXiv 2404.16710).

Layer l of L (1-based) is skipped at training iteration t with probability

    p(l, t) = rate * D(l) * S(t)
    D(l): uniform 1;  linear (l-1)/(L-1);  exponential 2**((l-1)/(L-1)) - 1
    S(t): constant 1;  linear t/(T-1);     exponential 2**(t/(T-1)) - 1     (T = --train-iters)

so the first layer is never dropped with depth scaling and the last is dropped with
probability `rate` (at the end of training with a time schedule), as in LayerSkip.

One decision per layer and iteration, shared by every sample and microbatch of the global
batch. LayerSkip draws per sample; a per-iteration draw is what keeps the decision a pure
function of (seed, iteration, layer), so every rank of every TP/PP/DP layout takes the same
one without communication and losses stay identical across layouts (the parity suite
checks it). A skipped layer does no work: its output is its input, so its parameters get
no gradient that iteration. No rescaling of kept layers (LayerSkip does none either).
Validation and inference (module.eval()) never drop.
"""

from __future__ import annotations

import random

from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron.early_exit.config import LayerDropoutConfig


def depth_scale(kind: str, layer_number: int, num_layers: int) -> float:
    if kind == "uniform" or num_layers == 1:
        return 1.0
    r = (layer_number - 1) / (num_layers - 1)
    return r if kind == "linear" else 2.0**r - 1.0


def time_scale(kind: str, iteration: int, train_iters: int) -> float:
    if kind == "constant" or train_iters <= 1:
        return 1.0
    r = min(max(iteration, 0), train_iters - 1) / (train_iters - 1)
    return r if kind == "linear" else 2.0**r - 1.0


class LayerDropout:
    """Decides which layers to skip; `install` makes the model's layers obey it."""

    def __init__(self, cfg: LayerDropoutConfig, num_layers: int, train_iters: int, seed: int):
        self.cfg = cfg
        self.num_layers = num_layers
        self.train_iters = train_iters
        self.seed = seed
        self.iteration = 0

    def probability(self, layer_number: int, iteration: int) -> float:
        c = self.cfg
        return (
            c.layer_dropout_rate
            * depth_scale(c.layer_dropout_depth_scale, layer_number, self.num_layers)
            * time_scale(c.layer_dropout_time_scale, iteration, self.train_iters)
        )

    def drops(self, layer_number: int, iteration: int) -> bool:
        p = self.probability(layer_number, iteration)
        if p <= 0.0:
            return False
        # A private generator seeded by the triple: the same draw on every rank.
        draw = random.Random(f"{self.seed}:{iteration}:{layer_number}").random()
        return draw < p

    def dropped_layers(self, iteration: int) -> list[int]:
        return [n for n in range(1, self.num_layers + 1) if self.drops(n, iteration)]

    def install(self, modules) -> int:
        """Wrap the forward of every TransformerLayer under `modules` (an iterable of
        modules, e.g. the model chunks); returns how many layers were wrapped."""
        count = 0
        for module in modules:
            for layer in module.modules():
                if isinstance(layer, TransformerLayer) and not hasattr(layer, "_ee_dropout"):
                    layer._ee_dropout = self
                    layer.forward = _skippable(layer, layer.forward)
                    count += 1
        return count


def _skippable(layer: TransformerLayer, forward):
    def run(*args, **kwargs):
        dropout: LayerDropout = layer._ee_dropout
        if layer.training and dropout.drops(layer.layer_number, dropout.iteration):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            # A new tensor, not the input itself: the pipeline schedule frees a stage's
            # output storage after sending it, which must not free its input too.
            return hidden.clone(), kwargs.get("context")
        return forward(*args, **kwargs)

    return run
