"""tools/preprocess_data.py: corpus -> megatron-core IndexedDataset (.bin/.idx)."""

import functools
import glob
import importlib.util
import json
import os
from pathlib import Path

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron.early_exit.data.preprocess import (
    PreprocessError,
    dataset_prefix,
    main,
    preprocess,
    token_dtype,
)
from megatron.early_exit.data.tokenizers import (
    NullTokenizer,
    Tokenizer,
    TokenizerConfig,
    build_tokenizer,
)

pytestmark = pytest.mark.unit

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
V = 1000  # NullTokenizer vocabulary; EOD = 999


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255; EOD 256."""

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eod(self) -> int:
        return 256

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


def null_factory(vocab_size: int = V):
    return functools.partial(
        build_tokenizer, TokenizerConfig("NullTokenizer", vocab_size=vocab_size)
    )


def make_docs(n: int, seed: int = 0) -> list[list[int]]:
    rng = numpy.random.default_rng(seed)
    return [rng.integers(0, V - 1, size=int(rng.integers(1, 40))).tolist() for _ in range(n)]


def write_jsonl(path, docs, key="text", extra=True):
    with open(path, "w") as f:
        for i, doc in enumerate(docs):
            obj = {key: " ".join(map(str, doc))}
            if extra:
                obj["id"] = i
            f.write(json.dumps(obj) + "\n")


def read_docs(prefix) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    assert len(ds.document_indices) - 1 == len(ds)  # one sequence per document
    return [ds[i].tolist() for i in range(len(ds))]


def output_files(tmp_path, name="out"):
    return sorted(
        os.path.basename(p)
        for p in glob.glob(str(tmp_path / f"{name}*"))
        if p.endswith((".bin", ".idx")) or ".tmp" in p
    )


@pytest.mark.parametrize("append_eod", [False, True])
def test_jsonl_round_trip_and_workers_give_identical_bytes(tmp_path, append_eod):
    docs = make_docs(120)
    write_jsonl(tmp_path / "a.jsonl", docs[:70])
    write_jsonl(tmp_path / "b.jsonl", docs[70:])
    outs = {}
    for workers in (1, 2):
        prefix = str(tmp_path / f"w{workers}")
        res = preprocess(
            [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")],
            prefix,
            null_factory(),
            append_eod=append_eod,
            workers=workers,
            chunksize=3,
            log_interval=0,
        )
        out = dataset_prefix(prefix, "text")
        assert res.outputs == [out] and res.documents == 120
        expected = [d + [V - 1] if append_eod else d for d in docs]
        assert res.tokens == sum(map(len, expected))
        assert read_docs(out) == expected
        outs[workers] = [Path(out + ext).read_bytes() for ext in (".bin", ".idx")]
    assert outs[1] == outs[2]
    assert IndexedDataset(dataset_prefix(str(tmp_path / "w1"), "text")).index.dtype == numpy.uint16


def test_multiple_json_keys_write_one_dataset_each(tmp_path):
    with open(tmp_path / "in.jsonl", "w") as f:
        f.write(json.dumps({"title": "1 2", "body": "3 4 5"}) + "\n")
        f.write("\n")  # blank lines are not documents
        f.write(json.dumps({"title": "6", "body": "7 8"}) + "\n")
    res = preprocess(
        [str(tmp_path / "in.jsonl")],
        str(tmp_path / "out"),
        null_factory(),
        json_keys=["title", "body"],
        append_eod=True,
        log_interval=0,
    )
    assert res.documents == 2 and res.tokens == 3 + 4 + 2 + 3
    assert read_docs(str(tmp_path / "out_title_document")) == [[1, 2, 999], [6, 999]]
    assert read_docs(str(tmp_path / "out_body_document")) == [[3, 4, 5, 999], [7, 8, 999]]


@pytest.mark.parametrize("workers", [1, 2])
def test_txt_files_are_one_document_each_in_glob_order(tmp_path, workers):
    texts = ["héllo world\nsecond line", "", "x" * 300, "last one"]
    for i, t in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(t, encoding="utf-8")
    res = preprocess(
        [str(tmp_path / "doc*.txt")],
        str(tmp_path / "out"),
        ByteTokenizer,
        append_eod=True,
        workers=workers,
        chunksize=1,
        log_interval=0,
    )
    assert res.documents == 4
    got = read_docs(str(tmp_path / "out_text_document"))
    assert got == [list(t.encode("utf-8")) + [256] for t in texts]


def test_empty_documents_are_skipped_without_eod(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [[1, 2], [], [3]])
    res = preprocess(
        [str(tmp_path / "in.jsonl")], str(tmp_path / "out"), null_factory(), log_interval=0
    )
    assert res.skipped_empty == {"text": 1}
    assert read_docs(str(tmp_path / "out_text_document")) == [[1, 2], [3]]


def test_token_dtype_follows_vocab_size():
    assert token_dtype(257) is numpy.uint16
    assert token_dtype(65536) is numpy.uint16
    assert token_dtype(65537) is numpy.int32


def test_cli_progress_and_summary(tmp_path, capsys):
    docs = make_docs(10)
    write_jsonl(tmp_path / "in.jsonl", docs)
    spec = importlib.util.spec_from_file_location(
        "preprocess_data_tool", os.path.join(REPO, "tools", "preprocess_data.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rc = tool.main(
        [
            "--input", str(tmp_path / "in.jsonl"),
            "--output-prefix", str(tmp_path / "out"),
            "--tokenizer-type", "NullTokenizer", "--vocab-size", str(V),
            "--append-eod", "--workers", "2", "--log-interval", "4",
        ]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0
    assert err.count("processed ") == 2 and "MB/s" in err
    n_tokens = sum(len(d) + 1 for d in docs)
    assert f"10 documents, {n_tokens} tokens" in out and "tokens/s" in out
    assert f"{tmp_path / 'out_text_document'}.bin/.idx" in out
    assert read_docs(str(tmp_path / "out_text_document")) == [d + [V - 1] for d in docs]


def _run_failing(tmp_path, capsys, inputs, *extra):
    argv = ["--input", *inputs, "--output-prefix", str(tmp_path / "out")]
    argv += ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(V), *extra]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2
    errors = [ln for ln in err.strip().splitlines() if not ln.startswith("processed ")]
    assert len(errors) == 1 and errors[0].startswith("error: "), err
    assert output_files(tmp_path) == []  # no .bin/.idx, no temporary leftovers
    return errors[0]


def test_error_missing_input(tmp_path, capsys):
    msg = _run_failing(tmp_path, capsys, [str(tmp_path / "nope.jsonl")])
    assert "not found" in msg and "nope.jsonl" in msg
    msg = _run_failing(tmp_path, capsys, [str(tmp_path / "none*.jsonl")])
    assert "matches no files" in msg


@pytest.mark.parametrize("workers", ["1", "2"])
def test_error_empty_corpus(tmp_path, capsys, workers):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    msg = _run_failing(tmp_path, capsys, [str(tmp_path / "empty.jsonl")], "--workers", workers)
    assert "empty corpus" in msg and "no documents" in msg
    write_jsonl(tmp_path / "blank.jsonl", [[], []])
    msg = _run_failing(tmp_path, capsys, [str(tmp_path / "blank.jsonl")], "--workers", workers)
    assert "empty corpus" in msg and "0 tokens" in msg


@pytest.mark.parametrize("workers", ["1", "2"])
def test_error_wrong_json_key(tmp_path, capsys, workers):
    path = tmp_path / "in.jsonl"
    write_jsonl(path, make_docs(30), key="body")
    msg = _run_failing(
        tmp_path, capsys, [str(path)], "--json-keys", "text", "--workers", workers,
        "--log-interval", "1",
    )  # fmt: skip
    assert f"{path}:1:" in msg and "'text' not found" in msg and "['body', 'id']" in msg


@pytest.mark.parametrize("workers", ["1", "2"])
def test_error_malformed_json_line(tmp_path, capsys, workers):
    path = tmp_path / "in.jsonl"
    write_jsonl(path, make_docs(25))
    lines = path.read_text().splitlines()
    lines[20] = '{"text": "1 2'  # line 21
    path.write_text("\n".join(lines) + "\n")
    msg = _run_failing(tmp_path, capsys, [str(path)], "--workers", workers, "--log-interval", "1")
    assert f"{path}:21: malformed JSON" in msg


def test_error_token_out_of_vocabulary_and_mixed_modes(tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [[1, 2], [3, V + 5]])
    msg = _run_failing(tmp_path, capsys, [str(path)])
    assert f"{path}:2:" in msg and "out of range" in msg
    (tmp_path / "a.txt").write_text("1 2")
    msg = _run_failing(tmp_path, capsys, [str(path), str(tmp_path / "a.txt")])
    assert "mix" in msg


def test_failure_keeps_no_partial_output_and_library_raises(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", make_docs(50) + [[1]])
    with open(tmp_path / "in.jsonl", "a") as f:
        f.write("not json\n")
    with pytest.raises(PreprocessError, match=r"in\.jsonl:52: malformed JSON"):
        preprocess(
            [str(tmp_path / "in.jsonl")],
            str(tmp_path / "out"),
            null_factory(),
            workers=2,
            chunksize=2,
            log_interval=0,
        )
    assert output_files(tmp_path) == []


def test_null_tokenizer_in_factory_matches_direct_tokenization(tmp_path):
    tok = NullTokenizer(V)
    write_jsonl(tmp_path / "in.jsonl", [[5, 6, 7]])
    preprocess([str(tmp_path / "in.jsonl")], str(tmp_path / "o"), null_factory(), log_interval=0)
    assert read_docs(str(tmp_path / "o_text_document")) == [tok.tokenize("5 6 7")]
