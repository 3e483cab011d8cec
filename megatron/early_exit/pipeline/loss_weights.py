"""Exit-loss weight schedule.

w(t) = init + s(t / T) * (target - init) for t < T, and target afterwards, where
s(r) = r (linear) or (1 - cos(pi r)) / 2 (cosine). init > target gives a cool-down.
"""

from __future__ import annotations

import math

from megatron.early_exit.config import ExitConfig


class ExitLossWeights:
    def __init__(self, exits: ExitConfig) -> None:
        self.layers = list(exits.exit_layer_nums)
        self.targets = [exits.target_weight(i) for i in range(exits.num_exits)]
        self.inits = list(exits.exit_layer_weight_init) or list(self.targets)
        self.warmup_iters = exits.exit_layer_weight_warmup_iters
        self.style = exits.exit_layer_weight_warmup_style

    def _progress(self, iteration: int) -> float:
        if self.warmup_iters <= 0 or iteration >= self.warmup_iters:
            return 1.0
        r = max(iteration, 0) / self.warmup_iters
        if self.style == "cosine":
            return (1.0 - math.cos(math.pi * r)) / 2.0
        return r

    def at(self, iteration: int) -> dict[int, float]:
        """Weight of every exit (by layer number) for the 0-based training iteration."""
        s = self._progress(iteration)
        return {
            layer: init + s * (target - init)
            for layer, init, target in zip(self.layers, self.inits, self.targets)
        }
