"""Byte-level BPE (the GPT-2 scheme) on the `tokenizers` library.

Encoding runs in `tokenizers` (Rust): its BPE merges a word with a priority queue, so the
cost grows about linearly with the word's length (a 100,000-letter word takes a fraction of
a second; a pure-Python merge loop took tens of seconds). The library's word cache holds at
most `CACHE_WORDS` entries and skips long words, so its memory is bounded in bytes too.

The pieces we configure, all standard GPT-2:
* a reversible map from the 256 byte values to printable unicode characters, so every
  byte string is a string over a 256-symbol alphabet that the vocabulary covers;
* the GPT-2 pre-tokenization pattern (``pre_tokenizers.ByteLevel(use_regex=True)``: splits
  text into contractions, letter runs, number runs, punctuation runs and whitespace);
* merge ranks from vocab.bpe, applied lowest rank first.

No special tokens are registered, so ``<|endoftext|>`` written in the text is encoded as
ordinary characters. Decoding is a byte-table lookup here, so a sequence that ends inside a
multi-byte character decodes with U+FFFD exactly as before (streaming relies on that).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

# Words in the library's BPE cache. It never caches a word longer than 256 bytes, and an
# entry takes at most ~7.5 KiB (measured: 4096 distinct 250-letter words held 30 MiB), so
# the cache stays below ~15 MiB whatever the input; common words still hit it.
CACHE_WORDS = 2048

# Lone surrogates (possible in a Python str, e.g. from JSON "\ud800") cannot cross into the
# library. For pre-tokenization they are replaced by a character of the same class (not a
# letter, number or space) and the same length, U+E000; their own bytes are then encoded.
_SURROGATE_STANDIN = "\ue000"


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


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class ByteLevelBPE:
    """Encode/decode with a byte-level BPE vocabulary.

    `encoder` maps token strings (over the byte_to_unicode alphabet) to ids; `merges` is the
    ordered list of symbol pairs (rank = position). The caller validates the files; this
    class assumes every byte symbol and every merge result is in `encoder`. Raises
    ValueError when the library rejects the vocabulary (e.g. a merge of unknown symbols).
    """

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]]) -> None:
        from tokenizers import Tokenizer, models, pre_tokenizers

        self.encoder = encoder
        try:
            self._model = models.BPE(vocab=encoder, merges=merges, cache_capacity=CACHE_WORDS)
        except Exception as e:  # the bindings raise a bare Exception
            raise ValueError(str(e)) from None
        self._tok = Tokenizer(self._model)
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        self._translate = {b: c for b, c in enumerate(byte_to_unicode())}
        decode_byte = {c: b for b, c in enumerate(byte_to_unicode())}
        size = max(encoder.values()) + 1 if encoder else 0
        self.id_bytes: list[bytes | None] = [None] * size
        for token, idx in encoder.items():
            if all(ch in decode_byte for ch in token):
                self.id_bytes[idx] = bytes(decode_byte[ch] for ch in token)
            else:  # e.g. "<|endoftext|>" is already plain text
                self.id_bytes[idx] = token.encode("utf-8")

    # ---- text --------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        try:
            # the batch call skips offset bookkeeping: about twice as fast as `encode`
            return self._tok.encode_batch_fast([text], add_special_tokens=False)[0].ids
        except TypeError:
            if not isinstance(text, str) or not _has_surrogate(text):
                raise
        return self._encode_with_surrogates(text)

    def _encode_with_surrogates(self, text: str) -> list[int]:
        # Lone surrogates keep their bytes (surrogatepass), so nothing is silently dropped;
        # they decode as U+FFFD, i.e. such strings do not round-trip.
        standin = "".join(_SURROGATE_STANDIN if "\ud800" <= ch <= "\udfff" else ch for ch in text)
        ids: list[int] = []
        for _, (start, end) in self._tok.pre_tokenizer.pre_tokenize_str(standin):
            word = text[start:end].encode("utf-8", "surrogatepass")
            mapped = word.decode("latin-1").translate(self._translate)
            ids.extend(t.id for t in self._model.tokenize(mapped))
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
