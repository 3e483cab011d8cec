"""tools/count_tokens.py and the draft-vocabulary helpers (self-speculative draft_vocab_size).

The engine side (lossless greedy, exact sampling, subset projection) is tested in
tests/unit/test_inference.py; the TP=2 end-to-end run (count -> --save -> generate) here.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "count_tokens.py"


def _tool():
    spec = importlib.util.spec_from_file_location("count_tokens_tool", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _dataset(prefix: Path, docs: list[list[int]], dtype=numpy.uint16) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def _checkpoint(root: Path, vocab: int = 200, iteration: int = 3) -> Path:
    """A checkpoint directory as far as count_tokens cares: tracker, iter dir, ee_args."""
    it = root / f"iter_{iteration:07d}"
    it.mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    args = {"tokenizer_type": "NullTokenizer", "vocab_size": vocab}
    (it / "ee_args.json").write_text(json.dumps(args))
    return it


def _random_docs(seed: int, n: int, high: int) -> list[list[int]]:
    rng = numpy.random.default_rng(seed)
    return [rng.integers(0, high, rng.integers(0, 40)).tolist() for _ in range(n)]


@pytest.mark.unit
def test_counts_equal_numpy_bincount(tmp_path):
    from megatron.early_exit.inference.draft_vocab import count_token_ids

    a, b = _random_docs(0, 30, 150), _random_docs(1, 20, 120) + [[149, 149]]
    pa = _dataset(tmp_path / "a", a)
    pb = _dataset(tmp_path / "b", b, dtype=numpy.int32)
    flat = numpy.array([t for d in a + b for t in d])
    got = count_token_ids([pa, pb])
    assert got.dtype == numpy.int64
    numpy.testing.assert_array_equal(got, numpy.bincount(flat))
    numpy.testing.assert_array_equal(
        count_token_ids([pa, pb], vocab_size=200), numpy.bincount(flat, minlength=200)
    )


@pytest.mark.unit
def test_counts_chunked_and_per_document(tmp_path, monkeypatch):
    """Chunk boundaries and non-contiguous documents count the same tokens."""
    from megatron.early_exit.inference import draft_vocab as dv

    docs = _random_docs(2, 25, 90)
    prefix = _dataset(tmp_path / "d", docs)
    want = numpy.bincount(numpy.array([t for d in docs for t in d]), minlength=90)
    monkeypatch.setattr(dv, "_CHUNK", 7)
    numpy.testing.assert_array_equal(dv.count_token_ids([prefix], 90), want)
    ptr, lens = numpy.array([0, 40, 10]), numpy.array([3, 2, 4])  # bytes, itemsize 2
    assert dv._doc_ranges(ptr, lens, 2) == [(0, 3), (20, 22), (5, 9)]
    assert dv._doc_ranges(numpy.array([0, 6]), numpy.array([3, 1]), 2) == [(0, 4)]


@pytest.mark.unit
def test_top_ids_by_frequency_ties_by_lower_id():
    from megatron.early_exit.inference.draft_vocab import top_token_ids

    counts = torch.tensor([5, 9, 5, 0, 9, 1, 5])
    assert top_token_ids(counts, 3).tolist() == [0, 1, 4]  # 9, 9, then the first 5
    assert top_token_ids(counts, 5).tolist() == [0, 1, 2, 4, 6]
    assert top_token_ids(counts, 7).tolist() == list(range(7))


@pytest.mark.unit
def test_save_into_checkpoint(tmp_path, capsys):
    from megatron.early_exit.inference.draft_vocab import load_token_counts
    from megatron.early_exit.inference.loading import _token_counts

    docs = _random_docs(3, 40, 180)
    prefix = _dataset(tmp_path / "d", docs)
    it = _checkpoint(tmp_path / "ckpt", vocab=200)
    assert _tool().main(["--data-path", prefix, "--save", str(tmp_path / "ckpt")]) == 0
    saved = numpy.load(it / "token_counts.npy")
    want = numpy.bincount(numpy.array([t for d in docs for t in d]), minlength=200)
    assert saved.dtype == numpy.int64 and saved.shape == (200,)  # the checkpoint's vocab
    numpy.testing.assert_array_equal(saved, want)
    assert sorted(os.listdir(it)) == ["ee_args.json", "token_counts.npy"]  # no temp files
    assert "ids seen" in capsys.readouterr().out
    numpy.testing.assert_array_equal(load_token_counts(str(it)).numpy(), want)
    numpy.testing.assert_array_equal(_token_counts(str(tmp_path / "ckpt"), 200).numpy(), want)
    assert load_token_counts(str(tmp_path)) is None  # absent: no counts, no error


@pytest.mark.unit
@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "dataset not found"),
        ("suffix", "pass the prefix without .bin"),
        ("too_large", "token id 250 is outside the vocabulary of 200"),
        ("no_ckpt", "no checkpoint in"),
        ("no_args", "has no ee_args.json"),
        ("nowhere", "nowhere to write"),
        ("bad_vocab", "--vocab-size must be >= 1"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, capsys, case, match):
    prefix = _dataset(tmp_path / "d", [[1, 2, 250]])
    ckpt = tmp_path / "ckpt"
    _checkpoint(ckpt, vocab=200)
    argv = {
        "missing": ["--data-path", str(tmp_path / "nope"), "--save", str(ckpt)],
        "suffix": ["--data-path", prefix + ".bin", "--save", str(ckpt)],
        "too_large": ["--data-path", prefix, "--save", str(ckpt)],
        "no_ckpt": ["--data-path", prefix, "--save", str(tmp_path)],
        "no_args": ["--data-path", prefix, "--save", str(ckpt)],
        "nowhere": ["--data-path", prefix],
        "bad_vocab": ["--data-path", prefix, "--output", str(tmp_path / "c.npy"),
                      "--vocab-size", "0"],
    }[case]  # fmt: skip
    if case == "no_args":
        (ckpt / "iter_0000003" / "ee_args.json").unlink()
    assert _tool().main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert not (ckpt / "iter_0000003" / "token_counts.npy").exists()


@pytest.mark.unit
def test_cli_exit_code_and_output_file(tmp_path):
    prefix = _dataset(tmp_path / "d", [[3, 3, 7], [0]])
    out = tmp_path / "counts.npy"
    assert _tool().main(["--data-path", prefix, "--output", str(out)]) == 0
    numpy.testing.assert_array_equal(numpy.load(out), [1, 0, 0, 2, 0, 0, 0, 1])
    bad = subprocess.run([sys.executable, str(TOOL), "--data-path", str(tmp_path / "x"),
                          "--output", str(out)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert bad.returncode == 2
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: "), lines


@pytest.mark.unit
def test_counts_of_another_tokenizer_are_refused(tmp_path):
    from megatron.early_exit.checkpoint.files import CheckpointError
    from megatron.early_exit.inference.draft_vocab import check_counts
    from megatron.early_exit.inference.loading import _token_counts

    it = _checkpoint(tmp_path / "ckpt", vocab=50)
    numpy.save(it / "token_counts.npy", numpy.ones(60, dtype=numpy.int64))
    with pytest.raises(CheckpointError, match="another tokenizer"):
        _token_counts(str(tmp_path / "ckpt"), 50)
    numpy.save(it / "token_counts.npy", numpy.ones((2, 3), dtype=numpy.int64))
    with pytest.raises(CheckpointError, match="1-D array"):
        _token_counts(str(tmp_path / "ckpt"), 50)
    padded = check_counts(torch.tensor([4, 0, 2, 0, 0]), 8)  # trailing zeros beyond: fine
    assert padded.tolist() == [4, 0, 2, 0, 0, 0, 0, 0]
    assert check_counts(torch.tensor([1, 2, 0, 0]), 2).tolist() == [1, 2]


# ---------------------------------------------------------------- TP=2, end to end
@pytest.mark.distributed
@pytest.mark.slow  # make test time budget
def test_tp2_restricted_draft_matches_tp1(tmp_path):
    """Train a tiny checkpoint, count a dataset into it, generate with a restricted draft
    (build_engine loads the counts) at TP=1 and TP=2 (vocab-parallel subset projection)."""
    from tests.distributed.launch import ENTRY, layout_args, torchrun

    ckpt = tmp_path / "ckpt"
    model = [
        "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "64", "--tokenizer-type", "NullTokenizer", "--vocab-size", "200",
        "--exit-layer-nums", "1", "2", "3",
    ]  # fmt: skip
    torchrun(1, ENTRY, [
        *model, "--mock-data", "--micro-batch-size", "1", "--global-batch-size", "1",
        "--init-method-std", "0.25", "--lr", "1e-9", "--train-iters", "1", "--save", str(ckpt),
    ])  # fmt: skip
    # counts that favour ids in both TP shards ([0, 100) and [100, 200)) plus random ones
    docs = _random_docs(5, 60, 200) + [list(range(0, 200, 3)) * 5]
    assert _tool().main(["--data-path", _dataset(tmp_path / "d", docs), "--save", str(ckpt)]) == 0

    def generate(tp, *extra):
        out = tmp_path / f"out_{tp}_{len(extra)}.json"
        prompts = [a for p in ("5,17,42,7,99,3", "1,2,3", "160,61,12,113") for a in
                   ("--prompt-ids", p)]  # fmt: skip
        torchrun(tp, ROOT / "tools" / "generate.py", [
            "--load", str(ckpt), *layout_args(tp, 1), *prompts, "--max-new-tokens", "12",
            "--ignore-eos", "--output-json", str(out), *extra,
        ])  # fmt: skip
        return json.loads(out.read_text())

    spec = ("--mode", "self_speculative", "--draft-exit-layer", "2", "--draft-length", "3",
            "--draft-vocab-size", "64")  # fmt: skip
    one, two = generate(1, *spec), generate(2, *spec)
    # same tokens (lossless: == the full model, test_inference.py) and the same drafts
    # accepted, i.e. the TP=2 assembled subset logits pick the TP=1 drafts
    for a, b in zip(one, two):
        assert b["token_ids"] == a["token_ids"]
        for key in ("drafted_tokens", "accepted_tokens", "verify_passes"):
            assert b["stats"][key] == a["stats"][key], key
    assert (
        0
        < sum(r["stats"]["accepted_tokens"] for r in two)
        < sum(r["stats"]["drafted_tokens"] for r in two)
    )


@pytest.mark.unit
def test_server_schema_passes_draft_vocab_size():
    from pydantic import ValidationError

    from megatron.early_exit.inference.api import (
        GenerationRequest,
        InferenceError,
        ModelLimits,
        validate_request,
    )
    from megatron.early_exit.server.protocol import _early_exit_params
    from megatron.early_exit.server.schemas import CompletionRequest

    body = {"prompt": "x", "early_exit": {"mode": "self_speculative", "draft_vocab_size": 8}}
    params = _early_exit_params(CompletionRequest.model_validate(body).early_exit)
    assert params.draft_vocab_size == 8 and params.mode == "self_speculative"
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({**body, "early_exit": {"draft_vocab_size": 0}})
    req = GenerationRequest([1, 2], early_exit=params)
    limits = ModelLimits(num_layers=4, exit_layers=(1, 2), max_sequence_length=64, vocab_size=50)
    with pytest.raises(InferenceError, match="count_tokens"):
        validate_request(req, limits)
    validate_request(req, ModelLimits(4, (1, 2), 64, 50, has_token_counts=True))
