"""Reference GPT-2 byte-level BPE in plain Python: the algorithm as originally published.

Used only by tests, as the oracle the `tokenizers`-backed GPT2BPETokenizer must match id for
id. It is quadratic in word length (each merge rescans the word), so keep test words short.

* The GPT-2 split pattern uses ``\\p{L}`` / ``\\p{N}``, which the standard ``re`` module lacks;
  the classes are built from ``unicodedata`` categories (and ``\\s`` from the Unicode
  White_Space property: Python's ``\\s`` also matches U+001C..U+001F, the original does not).
* A word's symbols are merged pairwise, always the adjacent pair with the lowest rank, every
  non-overlapping occurrence left to right, until no pair is ranked.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from collections.abc import Iterable

from megatron.early_exit.data.tokenizer_bpe import byte_to_unicode

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


def _ranges_to_class(ranges: Iterable[tuple[int, int]]) -> str:
    out = []
    for lo, hi in ranges:
        out.append(re.escape(chr(lo)) if lo == hi else f"{re.escape(chr(lo))}-{re.escape(chr(hi))}")
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
def pretokenize_pattern() -> re.Pattern[str]:
    letters = _ranges_to_class(_category_ranges("L"))
    numbers = _ranges_to_class(_category_ranges("N"))
    space = _ranges_to_class(_WHITE_SPACE)
    return re.compile(
        r"'s|'t|'re|'ve|'m|'ll|'d"
        rf"| ?[{letters}]+"
        rf"| ?[{numbers}]+"
        rf"| ?[^{space}{letters}{numbers}]+"
        rf"|[{space}]+(?![^{space}])"
        rf"|[{space}]+"
    )


class ReferenceBPE:
    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]]) -> None:
        self.encoder = encoder
        self.decoder = {i: t for t, i in encoder.items()}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_of = {c: b for b, c in enumerate(byte_to_unicode())}
        self.translate = dict(enumerate(byte_to_unicode()))
        self.pattern = pretokenize_pattern()

    def _merge(self, symbols: list[str]) -> list[str]:
        while len(symbols) > 1:
            pairs = [p for p in zip(symbols, symbols[1:]) if p in self.ranks]
            if not pairs:
                break
            first, second = min(pairs, key=self.ranks.__getitem__)
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == (first, second):
                    out.append(first + second)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            symbols = out
        return symbols

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in self.pattern.findall(text):
            raw = word.encode("utf-8", "surrogatepass").decode("latin-1")
            ids.extend(self.encoder[s] for s in self._merge(list(raw.translate(self.translate))))
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        out = bytearray()
        for i in ids:
            token = self.decoder[i]
            if all(c in self.byte_of for c in token):
                out.extend(self.byte_of[c] for c in token)
            else:  # "<|endoftext|>" is plain text
                out.extend(token.encode("utf-8"))
        return bytes(out)
