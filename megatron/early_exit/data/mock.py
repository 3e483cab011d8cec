"""Seeded synthetic GPT data, deterministic per global sample index.

Sample i depends only on (seed, i), so every TP/PP/DP layout trains on exactly the same
samples in the same global order. Each sample repeats a short random motif, which a
small model can learn (by copying), so losses visibly fall.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    tokens: torch.Tensor  # [b, s] inputs
    labels: torch.Tensor  # [b, s] next tokens
    loss_mask: torch.Tensor  # [b, s] float
    position_ids: torch.Tensor  # [b, s]

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in self.__dict__.values()))


class MockGPTDataset:
    def __init__(self, vocab_size: int, seq_length: int, seed: int = 1234) -> None:
        if vocab_size < 2:
            raise ValueError("mock data needs a vocabulary of at least 2 tokens")
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.seed = seed

    def __getitem__(self, index: int) -> torch.Tensor:
        """Tokens [seq_length + 1] of global sample `index`."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        period = int(torch.randint(2, 9, (1,), generator=g))
        motif = torch.randint(0, self.vocab_size, (period,), generator=g)
        reps = (self.seq_length + 1 + period - 1) // period
        return motif.repeat(reps)[: self.seq_length + 1].clone()

    def batch(self, indices: list[int]) -> Batch:
        seqs = torch.stack([self[i] for i in indices])
        tokens, labels = seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous()
        b, s = tokens.shape
        return Batch(
            tokens=tokens,
            labels=labels,
            loss_mask=torch.ones(b, s, dtype=torch.float32),
            position_ids=torch.arange(s).unsqueeze(0).expand(b, s).contiguous(),
        )


def microbatch_iterator(
    dataset,
    iteration: int,
    global_batch_size: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
) -> Iterator[Batch]:
    """This DP rank's microbatches of one iteration's global batch, in order.

    `dataset` is anything with `.batch(global_sample_indices) -> Batch`.
    """
    per_rank = global_batch_size // data_parallel_size
    start = iteration * global_batch_size + data_parallel_rank * per_rank
    for m in range(per_rank // micro_batch_size):
        first = start + m * micro_batch_size
        yield dataset.batch(list(range(first, first + micro_batch_size)))
