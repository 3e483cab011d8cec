"""Data: tokenizers (tokenizers.py) and their flags, corpus preprocessing into indexed
datasets (preprocess.py), megatron-core GPTDataset blends and splits (gpt_data.py), and
seeded mock data (mock.py)."""

from megatron.early_exit.data.mock import Batch, MockGPTDataset, microbatch_iterator

__all__ = ["Batch", "MockGPTDataset", "microbatch_iterator"]
