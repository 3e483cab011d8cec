"""Exit-loss weight schedule and curricula.

w(t) = init + s(t / T) * (target - init) for t < T, and target afterwards, where
s(r) = r (linear) or (1 - cos(pi r)) / 2 (cosine). init > target gives a cool-down.

A curriculum (LayerSkip, arXiv 2404.16710) then sets some exits' weights to 0 at
iteration t (exits indexed 0..n-1 from the shallowest; the LM loss is always on):
- rotational, period P: exit i has a loss when i % P == t % P;
- gradual over G iterations (default --train-iters): the deepest exit from the start,
  exit i from iteration ceil((n - 1 - i) * G / n), so every exit has one from (n-1)G/n.
An exit whose weight is 0 is still computed (its loss stays a metric); the curriculum
shapes the objective, not the cost.
"""

from __future__ import annotations

import math

from megatron.early_exit.config import ExitConfig


class ExitLossWeights:
    def __init__(self, exits: ExitConfig, train_iters: int = 0) -> None:
        self.layers = list(exits.exit_layer_nums)
        self.targets = [exits.target_weight(i) for i in range(exits.num_exits)]
        self.inits = list(exits.exit_layer_weight_init) or list(self.targets)
        self.warmup_iters = exits.exit_layer_weight_warmup_iters
        self.style = exits.exit_layer_weight_warmup_style
        self.curriculum = exits.exit_loss_curriculum
        self.period = exits.exit_loss_curriculum_period
        gradual = exits.exit_loss_curriculum_iters
        self.gradual_iters = train_iters if gradual is None else gradual

    def _progress(self, iteration: int) -> float:
        if self.warmup_iters <= 0 or iteration >= self.warmup_iters:
            return 1.0
        r = max(iteration, 0) / self.warmup_iters
        if self.style == "cosine":
            return (1.0 - math.cos(math.pi * r)) / 2.0
        return r

    def active(self, index: int, iteration: int) -> bool:
        """Whether exit `index` (0 = shallowest) has a loss at the 0-based iteration."""
        if self.curriculum == "rotational":
            return index % self.period == iteration % self.period
        if self.curriculum == "gradual":
            n = len(self.layers)
            return iteration >= math.ceil((n - 1 - index) * self.gradual_iters / n)
        return True

    def at(self, iteration: int, curriculum: bool = True) -> dict[int, float]:
        """Weight of every exit (by layer number) for the 0-based training iteration
        (`curriculum=False`: every exit on, as validation reports them)."""
        s = self._progress(iteration)
        return {
            layer: (init + s * (target - init))
            if not curriculum or self.active(i, iteration)
            else 0.0
            for i, (layer, init, target) in enumerate(zip(self.layers, self.inits, self.targets))
        }
