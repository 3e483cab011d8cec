"""One tokenizer interface for training, inference and the server.

Every tokenizer exposes its real vocabulary size (`vocab_size`) and special ids; the
model's padded vocabulary (TP-aware) is computed in one place, `config.pad_vocab_size`.

Types (``--tokenizer-type``) and the files they read:

* ``NullTokenizer`` (``--vocab-size``): text is space-separated ids; EOD is the last id.
* ``GPT2BPETokenizer`` (``--vocab-file`` encoder.json, ``--merge-file`` vocab.bpe): GPT-2
  byte-level BPE run on the `tokenizers` library (`tokenizer_bpe`; same ids as the original
  GPT-2 encoder, cost about linear in word length). EOD is ``<|endoftext|>``.
  Round-trips any valid ``str``. ``<|endoftext|>`` written in the *text* is encoded as
  ordinary characters, never as the EOD id (append `eod` explicitly).
* ``SentencePieceTokenizer`` (``--tokenizer-model`` x.model): the `sentencepiece` package.
  EOD is the model's eos id; bos/pad are None where the model leaves them undefined (-1).
  Round-trips only what SentencePiece's normalisation preserves (e.g. runs of spaces
  collapse).
* ``Llama2Tokenizer`` (``--tokenizer-model``): as SentencePieceTokenizer, but the model must
  define both bos and eos. Unlike Megatron-LM's Llama2Tokenizer, `tokenize` does NOT prepend
  BOS (nor append EOS): callers add `bos` / `eod` where they want them.
* ``HuggingFaceTokenizer`` (``--tokenizer-model`` a directory holding tokenizer.json, or the
  tokenizer.json itself): the `tokenizers` package. `tokenize` adds no special tokens (no
  post-processor BOS/EOS), though special tokens written in the text are still matched.
  EOD is ``eos_token`` from tokenizer_config.json / special_tokens_map.json beside
  tokenizer.json, else the first of ``<|endoftext|>``, ``</s>``, ``<|end_of_text|>``,
  ``<eos>`` in the vocabulary, else an error. bos/pad likewise (None when not found).

Every `tokenize` returns a plain ``list[int]``; every `detokenize` rejects ids outside
``[0, vocab_size)`` with a TokenizerError. The file-backed tokenizers pickle by rebuilding
from their files, so they can be handed to worker processes.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from megatron.early_exit.errors import TokenizerError
from megatron.early_exit.flags import add_flags, flag, from_args

TOKENIZER_TYPES = (
    "NullTokenizer",
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "Llama2Tokenizer",
    "HuggingFaceTokenizer",
)


@dataclass
class TokenizerConfig:
    """The Megatron tokenizer flags, shared by training, inference and preprocessing."""

    FLAG_GROUP: ClassVar[str] = "tokenizer"

    tokenizer_type: str = flag("NullTokenizer", help=f"one of {', '.join(TOKENIZER_TYPES)}")
    vocab_file: str | None = flag(None, help="GPT2BPETokenizer: encoder.json")
    merge_file: str | None = flag(None, help="GPT2BPETokenizer: vocab.bpe")
    tokenizer_model: str | None = flag(
        None, help="SentencePiece .model, or HF dir / tokenizer.json"
    )
    vocab_size: int | None = flag(None, help="NullTokenizer vocabulary")


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
        try:
            ids = [int(t) for t in text.split()]
        except ValueError as exc:
            raise TokenizerError(f"NullTokenizer reads space-separated token ids: {exc}") from None
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise TokenizerError(
                f"NullTokenizer ids out of range [0, {self._vocab_size}): {bad[:5]}"
            )
        return ids

    def detokenize(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise TokenizerError(
                f"NullTokenizer ids out of range [0, {self._vocab_size}): {bad[:5]}"
            )
        return " ".join(map(str, ids))


# ---- shared helpers ---------------------------------------------------------------------
def _require(value: str | None, flag: str, what: str, tokenizer_type: str) -> str:
    if not value:
        raise TokenizerError(f"--tokenizer-type {tokenizer_type} needs {flag} ({what})")
    return value


def _check_file(path: str, flag: str) -> str:
    if not os.path.exists(path):
        raise TokenizerError(f"{flag} {path!r}: no such file")
    if not os.path.isfile(path):
        raise TokenizerError(f"{flag} {path!r}: not a regular file")
    return path


def _check_ids(ids: Iterable[Any], vocab_size: int, name: str) -> list[int]:
    """Plain ints in [0, vocab_size) (accepts numpy / torch integer scalars)."""
    try:
        out = [i.__index__() for i in ids]
    except (AttributeError, TypeError) as e:
        raise TokenizerError(f"{name}.detokenize needs integer ids ({e})") from None
    bad = [i for i in out if not 0 <= i < vocab_size]
    if bad:
        raise TokenizerError(f"{name} ids out of range [0, {vocab_size}): {bad[:5]}")
    return out


class _StoredSpecialIds(Tokenizer):
    """Tokenizers that resolve their vocabulary size and special ids once, at load."""

    _vocab_size: int
    _eod: int
    _bos: int | None = None
    _pad: int | None = None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def bos(self) -> int | None:
        return self._bos

    @property
    def pad(self) -> int | None:
        return self._pad


# ---- GPT-2 byte-level BPE -----------------------------------------------------------------
def _load_gpt2_encoder(path: str) -> dict[str, int]:
    _check_file(path, "--vocab-file")
    try:
        with open(path, encoding="utf-8") as f:
            encoder = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"--vocab-file {path!r}: not a GPT-2 encoder.json ({e})") from None
    if not isinstance(encoder, dict) or not encoder:
        raise TokenizerError(
            f"--vocab-file {path!r}: not a GPT-2 encoder.json (expected a non-empty JSON object "
            "mapping token -> id)"
        )
    bad = [(k, v) for k, v in encoder.items() if not isinstance(v, int) or isinstance(v, bool)]
    if bad:
        raise TokenizerError(f"--vocab-file {path!r}: non-integer token ids, e.g. {bad[:3]}")
    if sorted(encoder.values()) != list(range(len(encoder))):
        raise TokenizerError(
            f"--vocab-file {path!r}: token ids must be exactly 0..{len(encoder) - 1} "
            "(duplicates or gaps found)"
        )
    return encoder


def _load_gpt2_merges(path: str) -> list[tuple[str, str]]:
    _check_file(path, "--merge-file")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"--merge-file {path!r}: not a GPT-2 vocab.bpe ({e})") from None
    merges: list[tuple[str, str]] = []
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise TokenizerError(
                f"--merge-file {path!r}: line {lineno} is not a merge 'A B': {line[:60]!r}"
            )
        merges.append((parts[0], parts[1]))
    return merges


class GPT2BPETokenizer(_StoredSpecialIds):
    """GPT-2 byte-level BPE from encoder.json + vocab.bpe (run on `tokenizers`)."""

    EOD_TOKEN = "<|endoftext|>"

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        from megatron.early_exit.data.tokenizer_bpe import ByteLevelBPE, byte_to_unicode

        self._files = (vocab_file, merge_file)
        encoder = _load_gpt2_encoder(vocab_file)
        merges = _load_gpt2_merges(merge_file)
        missing = [c for c in byte_to_unicode() if c not in encoder]
        if missing:
            raise TokenizerError(
                f"--vocab-file {vocab_file!r}: not a byte-level vocabulary "
                f"({len(missing)} of the 256 byte symbols are missing, e.g. {missing[:3]})"
            )
        for number, (a, b) in enumerate(merges, 1):
            missing = next((s for s in (a, b, a + b) if s not in encoder), None)
            if missing is not None:
                what = "the result of" if missing == a + b else f"symbol {missing!r} of"
                raise TokenizerError(
                    f"--merge-file {merge_file!r} does not match --vocab-file {vocab_file!r}: "
                    f"{what} merge #{number} {a!r} + {b!r} is not in the vocabulary"
                )
        if self.EOD_TOKEN not in encoder:
            raise TokenizerError(f"--vocab-file {vocab_file!r} has no {self.EOD_TOKEN!r} token")
        self._eod = encoder[self.EOD_TOKEN]
        self._vocab_size = len(encoder)
        try:
            self._bpe = ByteLevelBPE(encoder, merges)
        except ValueError as e:
            raise TokenizerError(
                f"--vocab-file {vocab_file!r} / --merge-file {merge_file!r}: rejected by the "
                f"`tokenizers` BPE ({e})"
            ) from None

    def __reduce__(self):
        return (type(self), self._files)

    @property
    def vocab(self) -> dict[str, int]:
        """Token string (byte-level alphabet) -> id."""
        return self._bpe.encoder

    def tokenize(self, text: str) -> list[int]:
        return self._bpe.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        ids = _check_ids(ids, self._vocab_size, "GPT2BPETokenizer")
        return self._bpe.decode_bytes(ids).decode("utf-8", errors="replace")


# ---- SentencePiece ------------------------------------------------------------------------
class SentencePieceTokenizer(_StoredSpecialIds):
    """A SentencePiece .model. `tokenize` adds no BOS/EOS; EOD is the model's eos id."""

    _NAME = "SentencePieceTokenizer"

    def __init__(self, model_file: str) -> None:
        self._model_file = model_file
        _check_file(model_file, "--tokenizer-model")
        try:
            import sentencepiece
        except ImportError as e:  # pragma: no cover - pinned in requirements.txt
            raise TokenizerError(f"{self._NAME} needs the `sentencepiece` package ({e})") from None
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(
                f"--tokenizer-model {model_file!r}: not a SentencePiece model ({e})"
            ) from None
        self._vocab_size = int(self._sp.get_piece_size())
        eos = int(self._sp.eos_id())
        if eos < 0:
            raise TokenizerError(
                f"--tokenizer-model {model_file!r} defines no eos piece; {self._NAME} uses it "
                "as EOD"
            )
        self._eod = eos
        bos, pad = int(self._sp.bos_id()), int(self._sp.pad_id())
        self._bos = bos if bos >= 0 else None
        self._pad = pad if pad >= 0 else None
        self._check_specials()

    def _check_specials(self) -> None:
        pass

    def __reduce__(self):
        return (type(self), (self._model_file,))

    def tokenize(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode(_check_ids(ids, self._vocab_size, self._NAME))


class Llama2Tokenizer(SentencePieceTokenizer):
    """Llama-2 style SentencePiece model: bos and eos must both be defined.

    `tokenize` does NOT add BOS or EOS (Megatron-LM's Llama2Tokenizer prepends BOS; here the
    caller decides, e.g. ``[tok.bos, *tok.tokenize(text)]``).
    """

    _NAME = "Llama2Tokenizer"

    def _check_specials(self) -> None:
        if self._bos is None:
            raise TokenizerError(
                f"--tokenizer-model {self._model_file!r} defines no bos piece; "
                "Llama2Tokenizer needs one (use SentencePieceTokenizer otherwise)"
            )


# ---- HuggingFace tokenizers ---------------------------------------------------------------
_HF_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
_HF_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>")
_HF_PAD_CANDIDATES = ("<pad>", "<|pad|>")


def _hf_special_tokens(directory: str) -> dict[str, str]:
    """eos/bos/pad token strings from tokenizer_config.json, then special_tokens_map.json."""
    found: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerError(f"--tokenizer-model: {path!r} is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise TokenizerError(f"--tokenizer-model: {path!r} is not a JSON object")
        for key in ("eos_token", "bos_token", "pad_token"):
            value = data.get(key)
            if isinstance(value, dict):  # serialized AddedToken
                value = value.get("content")
            if isinstance(value, str) and value and key not in found:
                found[key] = value
    return found


class HuggingFaceTokenizer(_StoredSpecialIds):
    """A `tokenizers` tokenizer.json (or a directory holding one). No special tokens added."""

    def __init__(self, path: str) -> None:
        self._path = path
        if os.path.isdir(path):
            json_path = os.path.join(path, "tokenizer.json")
            if not os.path.isfile(json_path):
                raise TokenizerError(f"--tokenizer-model {path!r}: directory has no tokenizer.json")
        elif os.path.isfile(path):
            json_path = path
        else:
            raise TokenizerError(
                f"--tokenizer-model {path!r}: no such file or directory "
                "(expected a tokenizer.json or a directory holding one)"
            )
        try:
            import tokenizers
        except ImportError as e:
            raise TokenizerError(
                f"HuggingFaceTokenizer needs the `tokenizers` package ({e})"
            ) from None
        try:
            self._tok = tokenizers.Tokenizer.from_file(json_path)
        except Exception as e:  # the bindings raise a bare Exception
            raise TokenizerError(
                f"--tokenizer-model {json_path!r}: not a HuggingFace tokenizer.json ({e})"
            ) from None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise TokenizerError(f"--tokenizer-model {json_path!r}: empty vocabulary")
        self._vocab_size = max(
            int(self._tok.get_vocab_size(with_added_tokens=True)), max(vocab.values()) + 1
        )
        specials = _hf_special_tokens(os.path.dirname(os.path.abspath(json_path)))

        eos = specials.get("eos_token")
        if eos is not None:
            if eos not in vocab:
                raise TokenizerError(
                    f"--tokenizer-model {path!r}: eos_token {eos!r} from the tokenizer config "
                    "is not in the vocabulary"
                )
            self._eod = vocab[eos]
        else:
            hit = next((t for t in _HF_EOS_CANDIDATES if t in vocab), None)
            if hit is None:
                raise TokenizerError(
                    f"--tokenizer-model {path!r}: cannot tell the EOD token: no eos_token in "
                    "tokenizer_config.json / special_tokens_map.json and none of "
                    f"{_HF_EOS_CANDIDATES} in the vocabulary"
                )
            self._eod = vocab[hit]
        self._bos = self._optional(specials.get("bos_token"), _HF_BOS_CANDIDATES, vocab)
        self._pad = self._optional(specials.get("pad_token"), _HF_PAD_CANDIDATES, vocab)

    @staticmethod
    def _optional(token: str | None, candidates: tuple[str, ...], vocab: dict[str, int]):
        if token is not None:
            return vocab.get(token)
        hit = next((t for t in candidates if t in vocab), None)
        return None if hit is None else vocab[hit]

    def __reduce__(self):
        return (type(self), (self._path,))

    def tokenize(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def detokenize(self, ids: Sequence[int]) -> str:
        ids = _check_ids(ids, self._vocab_size, "HuggingFaceTokenizer")
        return self._tok.decode(ids, skip_special_tokens=False)


# ---- command-line flags -------------------------------------------------------------------
def add_tokenizer_arguments(group, tokenizer_type_required: bool = False) -> None:
    """TokenizerConfig's flags (a tool that needs a tokenizer may require the type)."""
    required = {"required": True, "choices": list(TOKENIZER_TYPES)}
    add_flags(
        group, TokenizerConfig, {"tokenizer_type": required} if tokenizer_type_required else None
    )


def tokenizer_config_from_args(args) -> TokenizerConfig:
    return from_args(TokenizerConfig, args)


# ---- factory ------------------------------------------------------------------------------
def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    t = cfg.tokenizer_type
    if t == "NullTokenizer":
        return NullTokenizer(cfg.vocab_size)
    if t == "GPT2BPETokenizer":
        return GPT2BPETokenizer(
            _require(cfg.vocab_file, "--vocab-file", "GPT-2 encoder.json", t),
            _require(cfg.merge_file, "--merge-file", "GPT-2 vocab.bpe", t),
        )
    if t == "SentencePieceTokenizer":
        return SentencePieceTokenizer(
            _require(cfg.tokenizer_model, "--tokenizer-model", "a SentencePiece .model file", t)
        )
    if t == "Llama2Tokenizer":
        return Llama2Tokenizer(
            _require(cfg.tokenizer_model, "--tokenizer-model", "a SentencePiece .model file", t)
        )
    if t == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(
            _require(
                cfg.tokenizer_model,
                "--tokenizer-model",
                "a directory holding tokenizer.json, or the tokenizer.json file",
                t,
            )
        )
    raise TokenizerError(f"--tokenizer-type {t!r} is not one of {TOKENIZER_TYPES}")
