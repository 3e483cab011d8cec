"""preprocess_data.py -> indexed dataset -> GPTDataset -> training and validation, any layout."""

import json
import subprocess
import sys

import pytest

from tests.distributed.launch import ENTRY, ROOT, assert_close_records, layout_args, torchrun, train

pytestmark = pytest.mark.distributed

MODEL = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
    "--exit-layer-nums", "1", "3", "--use-exit-norm",
]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """200 documents of repeating motifs, written as NullTokenizer text (ids)."""
    import random

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    with open(root / "docs.jsonl", "w") as f:
        for _ in range(200):
            motif = [rng.randrange(255) for _ in range(rng.randrange(2, 6))]
            ids = (motif * 40)[: rng.randrange(20, 120)]
            f.write(json.dumps({"text": " ".join(map(str, ids))}) + "\n")
    prefix = root / "corpus"
    subprocess.run(
        [
            sys.executable, str(ROOT / "tools" / "preprocess_data.py"),
            "--input", str(root / "docs.jsonl"), "--output-prefix", str(prefix),
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "256",
            "--append-eod", "--workers", "2",
        ],
        check=True, capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    return f"{prefix}_text_document"


def test_training_on_indexed_data_reports_validation_in_every_layout(corpus, tmp_path):
    args = [
        *MODEL, "--data-path", corpus, "--split", "90,10,0", "--tokenizer-type",
        "NullTokenizer", "--vocab-size", "256", "--train-iters", "6", "--lr", "3e-3",
        "--eval-interval", "3", "--eval-iters", "2",
        "--data-cache-path", str(tmp_path / "cache"),
    ]  # fmt: skip
    # Same initial weights in both layouts: a reference checkpoint, loaded with --finetune.
    ref = tmp_path / "ref"
    torchrun(1, ENTRY, [*MODEL, "--mock-data", "--vocab-size", "256", "--train-iters", "0",
                        "--save", str(ref)])  # fmt: skip
    args += ["--load", str(ref), "--finetune"]
    single = train(1, args, tmp_path / "pp1.jsonl")
    piped = train(2, [*args, *layout_args(1, 2)], tmp_path / "pp2.jsonl")
    assert_close_records(single, piped, rel=1e-5, label="real data PP2")
    valid = [r for r in piped if r["split"] == "valid"]
    assert [r["iteration"] for r in valid] == [0, 3, 6]
    assert all(set(r["exit_losses"]) == {"1", "3"} for r in valid)
    for a, b in zip([r for r in single if r["split"] == "valid"], valid):
        assert abs(a["lm_loss"] - b["lm_loss"]) <= 1e-5 * a["lm_loss"]


def test_missing_data_path_is_a_clear_error(tmp_path):
    proc = torchrun(
        1,
        ENTRY,
        [
            *MODEL,
            "--data-path",
            str(tmp_path / "nope"),
            "--vocab-size",
            "256",
            "--train-iters",
            "1",
        ],
        check=False,
    )
    assert proc.returncode != 0
    assert "nope" in proc.stderr and "error:" in proc.stderr


def _data_args(corpus, tmp_path, *extra):
    return [
        *MODEL, "--data-path", corpus, "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "256", "--data-cache-path", str(tmp_path / "cache"), *extra,
    ]  # fmt: skip


def test_small_corpus_without_validation_trains(corpus, tmp_path):
    # The default split leaves the test range of a 200-document corpus empty: unread splits
    # must not be built (megatron-core would loop forever on an empty one).
    records = train(1, _data_args(corpus, tmp_path, "--train-iters", "2"), tmp_path / "m.jsonl")
    assert [r["iteration"] for r in records] == [1, 2]


def test_last_validation_off_the_interval_has_samples(corpus, tmp_path):
    ckpt = tmp_path / "ckpt"
    args = _data_args(corpus, tmp_path, "--split", "90,10,0", "--train-iters", "5",
                      "--eval-interval", "2", "--eval-iters", "1", "--save", str(ckpt))  # fmt: skip
    records = train(1, args, tmp_path / "m.jsonl")
    assert [r["iteration"] for r in records if r["split"] == "valid"] == [0, 2, 4, 5]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "5"


def test_validation_without_validation_documents_is_refused(corpus, tmp_path):
    args = _data_args(corpus, tmp_path, "--split", "100,0,0", "--train-iters", "2",
                      "--eval-interval", "1")  # fmt: skip
    proc = torchrun(1, ENTRY, args, check=False)
    assert proc.returncode != 0
    assert "--eval-interval needs validation data" in proc.stderr
