"""Projection of a few hidden rows onto a large weight: LM head, exit heads, draft vocabulary.

Decoding projects 1-8 rows (one per sequence, or the k+1 positions a self-speculative
verification checks) onto a vocabulary-sized weight (SmolLM2-135M: 49152 x 576, 113 MB in
fp32). That weight streams from memory once per call, so k rows should cost about one row.
On this project's CPUs (MKL sgemm) `F.linear(x, W)`, i.e. x @ W^T with a short x, does not:
2-3 rows cost 2-4x one row (benchmarks/projection_shapes.py). The same product computed as
W @ x^T (a tall weight times a thin matrix, then transposed back) keeps 2-8 rows at about
one weight read. Same dot products, fp32 results within 1e-5 of F.linear.

The rule is fixed rather than calibrated at load: a calibration on a shared CPU picks by
noise, and a fixed rule gives the same kernel, hence the same logits, on every run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_THIN_ROWS = 8  # up to this many rows use W @ x^T; prefill-sized chunks keep F.linear
MIN_THIN_NUMEL = 1 << 22  # weights below 4M elements (16 MB fp32) sit in cache: F.linear is fine


def thin_rows(rows: int, weight: torch.Tensor) -> bool:
    """Whether `project` computes `rows` rows as W @ x^T (see the module docstring)."""
    return (
        1 < rows <= MAX_THIN_ROWS
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.numel() >= MIN_THIN_NUMEL
    )


def project(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """F.linear(h, weight, bias) for h [..., in], with the kernel chosen by row count."""
    rows = h.numel() // max(1, h.shape[-1])
    if not thin_rows(rows, weight):
        return F.linear(h, weight, bias)
    x = h.reshape(rows, h.shape[-1])
    out = torch.mm(weight, x.t()).t()  # [rows, out]: a view of the [out, rows] product
    if bias is not None:
        out = out + bias
    return out.contiguous().view(*h.shape[:-1], weight.shape[0])
