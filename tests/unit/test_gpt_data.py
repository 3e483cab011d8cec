"""Real GPT datasets (megatron-core GPTDataset/BlendedDataset) over preprocessed files."""

import functools
import json
import os

import numpy
import pytest
import torch

from megatron.early_exit.data import mock
from megatron.early_exit.data.gpt_data import (
    DataError,
    MegatronTokenizerAdapter,
    batch_from_samples,
    build_gpt_datasets,
    microbatch_iterator,
    parse_data_path,
    samples_per_split,
)
from megatron.early_exit.data.preprocess import preprocess
from megatron.early_exit.data.tokenizers import NullTokenizer, TokenizerConfig, build_tokenizer

pytestmark = pytest.mark.unit

V = 40000
B_START = 20000  # corpus b's first token: corpora have disjoint token ranges
EOD = V - 1
TOK = NullTokenizer(V)
SEQ = 16


def make_corpus(path, n_docs, first_token=0, seed=0):
    """Documents of unique, increasing token ids -> (prefix, docs). Token t is in exactly
    one document, so a token identifies its document and position."""
    rng = numpy.random.default_rng(seed)
    docs, t = [], first_token
    for _ in range(n_docs):
        n = int(rng.integers(1, 2 * SEQ))
        docs.append(list(range(t, t + n)))
        t += n
    assert t < EOD
    jsonl = f"{path}.jsonl"
    with open(jsonl, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": " ".join(map(str, d))}) + "\n")
    factory = functools.partial(build_tokenizer, TokenizerConfig("NullTokenizer", vocab_size=V))
    preprocess([jsonl], str(path), factory, append_eod=True, log_interval=0)
    return f"{path}_text_document", docs


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    a = make_corpus(root / "a", 1000, first_token=0, seed=1)
    b = make_corpus(root / "b", 300, first_token=B_START, seed=2)
    return root, a, b


def raw(sample) -> list[int]:
    """The seq+1 tokens a sample was cut from."""
    return sample["tokens"].tolist() + [int(sample["labels"][-1])]


def doc_of(docs):
    return {t: i for i, d in enumerate(docs) for t in d}


def check_window(text, docs, where):
    """Text is EOD-separated pieces, each a contiguous slice of one document; pieces
    followed by an EOD end their document and pieces after an EOD start one."""
    owner = doc_of(docs)
    pieces, cur = [], []
    for t in text:
        if t == EOD:
            pieces.append((cur, True))
            cur = []
        else:
            cur.append(t)
    pieces.append((cur, False))
    for k, (piece, ends) in enumerate(pieces):
        if not piece:
            continue
        d = docs[owner[piece[0]]]
        start = d.index(piece[0])
        assert d[start : start + len(piece)] == piece, where
        if ends:
            assert start + len(piece) == len(d), where
        if k > 0:
            assert start == 0, where


def test_samples_reassemble_the_document_stream(corpora):
    root, (prefix, docs), _ = corpora
    train, valid, test = build_gpt_datasets(
        [prefix], "1,0,0", SEQ, 1234, TOK, [None, None, None], str(root / "cache1")
    )
    assert valid is None and test is None
    n = len(train)
    n_tokens = sum(len(d) + 1 for d in docs)
    assert n == (n_tokens - 1) // SEQ  # one epoch, last partial sample dropped
    # megatron shuffles documents and samples; undo the sample shuffle and the stream of
    # samples (overlapping by one token) must be the documents (+EOD) in document_index order
    assert sorted(train.document_index.tolist()) == list(range(len(docs)))
    order = numpy.argsort(train.shuffle_index)
    samples = [train[int(i)] for i in order]
    stream = raw(samples[0])
    for s in samples[1:]:
        r = raw(s)
        assert r[0] == stream[-1]
        stream += r[1:]
    expected = [t for i in train.document_index for t in docs[i] + [EOD]]
    assert stream == expected[: len(stream)]
    for i in range(n):
        s = train[i]
        check_window(raw(s), docs, i)
        assert torch.equal(s["labels"][:-1], s["tokens"][1:])
        assert torch.equal(s["loss_mask"], torch.ones(SEQ))
        assert torch.equal(s["position_ids"], torch.arange(SEQ))


def test_more_samples_than_an_epoch_and_cache_reuse(corpora):
    root, (prefix, docs), _ = corpora
    want = 3000  # ~3 epochs
    cache = str(root / "cache2")
    train, valid, _ = build_gpt_datasets([prefix], "90,10,0", SEQ, 7, TOK, [want, 40, 0], cache)
    assert len(train) >= want and len(valid) >= 40
    assert any(f.endswith(".npy") for f in os.listdir(cache))
    for i in range(0, want, 7):
        check_window(raw(train[i]), docs, i)
    again, _, _ = build_gpt_datasets([prefix], "90,10,0", SEQ, 7, TOK, [want, 40, 0], cache)
    for i in (0, 1, want - 1):
        assert torch.equal(again[i]["tokens"], train[i]["tokens"])
    other_seed, _, _ = build_gpt_datasets([prefix], "90,10,0", SEQ, 8, TOK, [want, 40, 0], cache)
    assert not all(torch.equal(other_seed[i]["tokens"], train[i]["tokens"]) for i in range(8))


@pytest.mark.parametrize("split", ["80,10,10", "949,50,1"])
def test_splits_do_not_share_documents(corpora, split):
    root, (prefix, docs), _ = corpora
    datasets = build_gpt_datasets(
        [prefix], split, SEQ, 3, TOK, [None, None, None], str(root / "cache3")
    )
    owner = doc_of(docs)
    seen = []
    for ds in datasets:
        ids = set()
        for i in range(len(ds)):
            ids |= {owner[t] for t in raw(ds[i]) if t != EOD}
        seen.append(ids)
    assert all(seen)
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    # Contiguous document ranges in order: train first, then valid, then test.
    assert max(seen[0]) < min(seen[1]) and max(seen[1]) < min(seen[2])


def test_blend_hits_its_weights(corpora):
    root, (pa, docs_a), (pb, docs_b) = corpora
    n = 2000
    train, _, _ = build_gpt_datasets(
        ["0.7", pa, "0.3", pb], "1,0,0", SEQ, 5, TOK, [n, 0, 0], str(root / "cache4")
    )
    assert len(train) >= n
    from_a = 0
    for i in range(n):
        text = [t for t in raw(train[i]) if t != EOD]
        in_a = [t < B_START for t in text]
        assert all(in_a) or not any(in_a)  # a sample comes from one corpus
        from_a += in_a[0]
        check_window(raw(train[i]), docs_a if in_a[0] else docs_b, i)
    assert abs(from_a / n - 0.7) < 0.03


def test_microbatches_follow_global_sample_indices(corpora):
    root, (prefix, _), _ = corpora
    train, _, _ = build_gpt_datasets(
        [prefix], "1,0,0", SEQ, 11, TOK, [64, 0, 0], str(root / "cache5")
    )
    gbs, it = 8, 3
    whole = batch_from_samples(train, list(range(it * gbs, (it + 1) * gbs)))
    assert whole.tokens.shape == (gbs, SEQ) and whole.tokens.dtype == torch.long
    assert torch.equal(whole.labels[:, :-1], whole.tokens[:, 1:])
    assert whole.loss_mask.dtype == torch.float32
    for dp in (1, 2, 4):
        got = [
            b
            for r in range(dp)
            for b in microbatch_iterator(
                train, it, gbs, 2, data_parallel_rank=r, data_parallel_size=dp
            )
        ]
        assert len(got) == gbs // 2
        for name in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(torch.cat([getattr(b, name) for b in got]), getattr(whole, name))
    # Same contract as the mock iterator.
    fake = mock.MockGPTDataset(V, SEQ)
    ref = torch.cat([b.tokens for b in mock.microbatch_iterator(fake, it, gbs, 2, 1, 2)])
    assert torch.equal(ref, fake.batch(list(range(28, 32))).tokens)
    with pytest.raises(IndexError, match="requested from a dataset"):
        batch_from_samples(train, [len(train)])


def test_errors(corpora, tmp_path):
    root, (prefix, _), _ = corpora
    build = functools.partial(build_gpt_datasets, seq_length=SEQ, seed=1, tokenizer=TOK)
    with pytest.raises(DataError, match="dataset not found"):
        build([str(tmp_path / "missing")], "1,0,0", num_samples=[1, 0, 0])
    with pytest.raises(DataError, match="without .bin"):
        build([prefix + ".bin"], "1,0,0", num_samples=[1, 0, 0])
    with pytest.raises(DataError, match="--split"):
        build([prefix], "a,b", num_samples=[1, 0, 0])
    with pytest.raises(DataError, match="valid split is empty"):
        build([prefix], "99999,1,0", num_samples=[10, 10, 0], data_cache_path=str(tmp_path))
    with pytest.raises(DataError, match="too small for this tokenizer"):
        build([prefix], "1,0,0", num_samples=[1, 0, 0], tokenizer=NullTokenizer(70000))
    with pytest.raises(DataError, match="weights must be positive"):
        parse_data_path(["0", prefix])


def test_settings_helpers():
    assert parse_data_path(["a"]) == (["a"], None)
    assert parse_data_path(["a", "b"]) == (["a", "b"], None)
    assert parse_data_path(["0.7", "a", "0.3", "b"]) == (["a", "b"], [0.7, 0.3])
    with pytest.raises(DataError):
        parse_data_path(["0.7", "a", "b"])
    assert samples_per_split(100, 8, 10, 2) == [800, 11 * 2 * 8, 16]
    assert samples_per_split(100, 8, 10, 0) == [800, 0, 0]

    class PadIsEod(NullTokenizer):
        @property
        def pad(self):
            return self.eod

    assert MegatronTokenizerAdapter(NullTokenizer(10)).pad == -1
    adapter = MegatronTokenizerAdapter(PadIsEod(10))
    assert adapter.pad == -1 and adapter.eod == 9 and adapter.vocab_size == 10
    assert json.loads(json.dumps(adapter.unique_identifiers))["class"] == "PadIsEod"


def test_re_preprocessed_data_does_not_reuse_stale_caches(tmp_path):
    cache = str(tmp_path / "cache")
    prefix, _ = make_corpus(tmp_path / "c", 50, first_token=0, seed=1)
    build_gpt_datasets([prefix], "1,0,0", SEQ, 1, TOK, [None, None, None], cache)
    # Same prefix, other documents (count and lengths): the old indices would be wrong.
    again, docs = make_corpus(tmp_path / "c", 80, first_token=B_START, seed=5)
    assert again == prefix
    ds, _, _ = build_gpt_datasets([prefix], "1,0,0", SEQ, 1, TOK, [None, None, None], cache)
    assert len(ds) == (sum(len(d) + 1 for d in docs) - 1) // SEQ
    for i in range(len(ds)):
        check_window(raw(ds[i]), docs, i)
