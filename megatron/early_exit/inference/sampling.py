"""Exit confidence metrics and token sampling on full-vocabulary logits.

Sampling is a pure function of (logits, params, seed, step): the random generator is
re-seeded from (seed, step) for every token, so the token does not depend on which rank
or pipeline stage draws it, on the batch it was decoded in, or on TP/PP.
"""

from __future__ import annotations

import math

import torch

from megatron.early_exit.inference.api import SamplingParams

_STEP_STRIDE = 1_000_003


def confidence(logits: torch.Tensor, metric: str) -> torch.Tensor:
    """[n, V] logits -> [n] confidence in [0, 1] (see api.py for the definitions).
    "learned" is not a function of the logits (StageState.exit_confidence)."""
    probs = torch.softmax(logits.float(), dim=-1)
    if metric == "max_prob":
        return probs.max(dim=-1).values
    if metric == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    if metric == "entropy":
        logp = torch.log(probs.clamp_min(1e-30))
        ent = -(probs * logp).sum(dim=-1)
        return (1.0 - ent / math.log(logits.shape[-1])).clamp(0.0, 1.0)
    raise ValueError(f"unknown confidence metric {metric!r}")


def generator_for(seed: int, step: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * _STEP_STRIDE + step) % (2**63 - 1))
    return g


def processed_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """log-probabilities of the distribution tokens are drawn from ([V] -> [V], CPU float)."""
    x = logits.detach().float().cpu()
    if params.greedy:
        return torch.log_softmax(x, dim=-1)
    x = x / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        cum = torch.softmax(sorted_x, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_x, dim=-1) >= params.top_p  # keep the top-1 always
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return torch.log_softmax(x, dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams, seed: int, step: int) -> tuple[int, float]:
    """One token from [V] logits; returns (token, its log-probability)."""
    logp = processed_logprobs(logits, params)
    if params.greedy:
        token = int(torch.argmax(logp))
    else:
        token = int(torch.multinomial(logp.exp(), 1, generator=generator_for(seed, step)))
    return token, float(logp[token])
