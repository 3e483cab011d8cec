"""One tokenizer interface for training, inference and the server.

Every tokenizer exposes its real vocabulary size (`vocab_size`) and special ids; the
model's padded vocabulary (TP-aware) is computed in one place, `config.pad_vocab_size`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


class TokenizerError(ValueError):
    """A tokenizer cannot be built from the given settings/files."""


@dataclass
class TokenizerConfig:
    tokenizer_type: str = "NullTokenizer"
    vocab_file: str | None = None  # GPT2BPETokenizer: encoder.json
    merge_file: str | None = None  # GPT2BPETokenizer: vocab.bpe
    tokenizer_model: str | None = None  # SentencePiece .model, or HF dir / tokenizer.json
    vocab_size: int | None = None  # NullTokenizer only


class Tokenizer(ABC):
    """Text <-> token ids. `eod` ends documents; `bos`/`pad` may be None."""

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def eod(self) -> int: ...

    @property
    def bos(self) -> int | None:
        return None

    @property
    def pad(self) -> int | None:
        return None

    @abstractmethod
    def tokenize(self, text: str) -> list[int]: ...

    @abstractmethod
    def detokenize(self, ids: list[int]) -> str: ...


class NullTokenizer(Tokenizer):
    """Token ids written as space-separated integers; the last id is EOD."""

    def __init__(self, vocab_size: int) -> None:
        if vocab_size is None or vocab_size < 2:
            raise TokenizerError("NullTokenizer needs --vocab-size N with N >= 2")
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._vocab_size - 1

    def tokenize(self, text: str) -> list[int]:
        ids = [int(t) for t in text.split()]
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise TokenizerError(
                f"NullTokenizer ids out of range [0, {self._vocab_size}): {bad[:5]}"
            )
        return ids

    def detokenize(self, ids: list[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


TOKENIZER_TYPES = (
    "NullTokenizer",
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "Llama2Tokenizer",
    "HuggingFaceTokenizer",
)


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    if cfg.tokenizer_type == "NullTokenizer":
        return NullTokenizer(cfg.vocab_size)
    raise TokenizerError(
        f"--tokenizer-type {cfg.tokenizer_type!r} is not available; choose one of {TOKENIZER_TYPES}"
    )
