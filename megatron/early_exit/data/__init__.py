"""Data: mock data for now (real tokenizers and datasets come with the data issue)."""

from megatron.early_exit.data.mock import Batch, MockGPTDataset, microbatch_iterator

__all__ = ["Batch", "MockGPTDataset", "microbatch_iterator"]
