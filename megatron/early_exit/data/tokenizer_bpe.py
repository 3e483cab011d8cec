"""Byte-level BPE (the GPT-2 scheme), standard library only.

The pieces:
* a reversible map from the 256 byte values to printable unicode characters, so every
  byte string is a string over a 256-symbol alphabet that the vocabulary covers;
* the GPT-2 pre-tokenization pattern, which splits text into words (contractions,
  letter runs, number runs, punctuation runs, whitespace) before any merge is applied.
  The original pattern uses ``\\p{L}`` / ``\\p{N}``, which the standard ``re`` module lacks;
  the classes are built here from ``unicodedata`` categories instead (and ``\\s`` from the
  Unicode White_Space property), so no third-party regex engine is needed;
* merge ranks: a word's symbols are merged pairwise, always the adjacent pair with the
  lowest rank first, every non-overlapping occurrence left to right, until no pair is
  ranked.

Results are memoized per word, so repeated words cost one dict lookup.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from collections.abc import Iterable

# Unicode White_Space property (what `\s` means in the reference regex engine). Python's
# `\s` also matches U+001C..U+001F, which the reference pattern does not treat as space.
_WHITE_SPACE = (
    (0x0009, 0x000D),
    (0x0020, 0x0020),
    (0x0085, 0x0085),
    (0x00A0, 0x00A0),
    (0x1680, 0x1680),
    (0x2000, 0x200A),
    (0x2028, 0x2029),
    (0x202F, 0x202F),
    (0x205F, 0x205F),
    (0x3000, 0x3000),
)


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> tuple[str, ...]:
    """Byte value -> a printable character; printable latin-1 bytes map to themselves."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    keep_set = set(keep)
    table: list[str] = [""] * 256
    for b in keep:
        table[b] = chr(b)
    extra = 0
    for b in range(256):
        if b not in keep_set:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table)


def _ranges_to_class(ranges: Iterable[tuple[int, int]]) -> str:
    out = []
    for lo, hi in ranges:
        if lo == hi:
            out.append(re.escape(chr(lo)))
        else:
            out.append(f"{re.escape(chr(lo))}-{re.escape(chr(hi))}")
    return "".join(out)


def _category_ranges(major: str) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    start = prev = -2
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp))[0] == major:
            if cp != prev + 1:
                if start >= 0:
                    ranges.append((start, prev))
                start = cp
            prev = cp
    if start >= 0:
        ranges.append((start, prev))
    return ranges


@functools.lru_cache(maxsize=1)
def gpt2_pretokenize_pattern() -> re.Pattern[str]:
    """The GPT-2 split pattern with explicit character classes (built once, ~0.3 s)."""
    letters = _ranges_to_class(_category_ranges("L"))
    numbers = _ranges_to_class(_category_ranges("N"))
    space = _ranges_to_class(_WHITE_SPACE)
    pattern = (
        r"'s|'t|'re|'ve|'m|'ll|'d"
        rf"| ?[{letters}]+"
        rf"| ?[{numbers}]+"
        rf"| ?[^{space}{letters}{numbers}]+"
        rf"|[{space}]+(?![^{space}])"
        rf"|[{space}]+"
    )
    return re.compile(pattern)


class ByteLevelBPE:
    """Encode/decode with a byte-level BPE vocabulary.

    `encoder` maps token strings (over the byte_to_unicode alphabet) to ids; `merges` is the
    ordered list of symbol pairs (rank = position). The caller validates the files; this
    class assumes every byte symbol and every merge result is in `encoder`.
    """

    def __init__(
        self,
        encoder: dict[str, int],
        merges: list[tuple[str, str]],
        cache_size: int = 1 << 20,
    ) -> None:
        self.encoder = encoder
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self._translate = {b: c for b, c in enumerate(byte_to_unicode())}
        decode_byte = {c: b for b, c in enumerate(byte_to_unicode())}
        size = max(encoder.values()) + 1 if encoder else 0
        self.id_bytes: list[bytes | None] = [None] * size
        for token, idx in encoder.items():
            if all(ch in decode_byte for ch in token):
                self.id_bytes[idx] = bytes(decode_byte[ch] for ch in token)
            else:  # e.g. "<|endoftext|>" is already plain text
                self.id_bytes[idx] = token.encode("utf-8")
        self._pattern = gpt2_pretokenize_pattern()
        self._cache: dict[str, tuple[int, ...]] = {}
        self._cache_size = cache_size

    # ---- merges ------------------------------------------------------------------------
    def _merge(self, symbols: list[str]) -> list[str]:
        ranks = self.ranks
        while len(symbols) > 1:
            best_rank = None
            best_pair = None
            for pair in zip(symbols, symbols[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best_pair = r, pair
            if best_pair is None:
                break
            first, second = best_pair
            merged = first + second
            out: list[str] = []
            i, n = 0, len(symbols)
            while i < n:
                if i + 1 < n and symbols[i] == first and symbols[i + 1] == second:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            symbols = out
        return symbols

    def encode_word(self, word: str) -> tuple[int, ...]:
        hit = self._cache.get(word)
        if hit is not None:
            return hit
        # Lone surrogates cannot be UTF-8; keep their bytes so nothing is silently dropped
        # (they decode as U+FFFD, i.e. such strings do not round-trip).
        mapped = word.encode("utf-8", "surrogatepass").decode("latin-1").translate(self._translate)
        ids = tuple(self.encoder[s] for s in self._merge(list(mapped)))
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    # ---- text --------------------------------------------------------------------------
    def pretokenize(self, text: str) -> list[str]:
        return self._pattern.findall(text)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        encode_word = self.encode_word
        for word in self._pattern.findall(text):
            ids.extend(encode_word(word))
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raises IndexError/TypeError for ids outside the vocabulary."""
        table = self.id_bytes
        parts = []
        for i in ids:
            if i < 0:
                raise IndexError(i)
            b = table[i]
            if b is None:
                raise IndexError(i)
            parts.append(b)
        return b"".join(parts)
