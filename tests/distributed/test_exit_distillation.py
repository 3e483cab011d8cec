"""--exit-distillation under tensor parallelism: the vocab-parallel KL gives TP=2 the same
losses, KLs and gradient norms as one process, in normal training (backbone and exits
trained) and in EE-Tuning (exits only, on the checkpoint the first run saved)."""

import pytest

from tests.distributed.launch import TINY, assert_close_records, train

pytestmark = pytest.mark.distributed
# Larger init than the default: peaked, differing distributions, so the KL is far from 0.
ARCH = [*TINY, "--init-method-std", "0.2", "--exit-layer-nums", "1", "3", "--use-exit-norm",
        "--use-exit-mlp", "--exit-distillation"]  # fmt: skip
TRAIN = ["--train-iters", "3", "--lr", "1e-2", "--eval-interval", "3", "--eval-iters", "1"]
TP2 = ["--tensor-model-parallel-size", "2"]


def assert_close_kl(a: list[dict], b: list[dict], rel: float, label: str) -> None:
    assert len(a) == len(b), label
    for ra, rb in zip(a, b):
        assert ra["exit_kl"].keys() == rb["exit_kl"].keys() == {"1", "3"}, label
        for k, x in ra["exit_kl"].items():
            y = rb["exit_kl"][k]
            assert abs(x - y) <= rel * max(x, y), f"{label} {ra['split']} {k}: {x} vs {y}"


def test_tensor_parallel_matches_one_process(tmp_path):
    one = train(1, [*ARCH, *TRAIN], tmp_path / "one.jsonl")
    tp2 = train(2, [*ARCH, *TRAIN, *TP2], tmp_path / "tp2.jsonl")
    assert_close_records(one, tp2, 1e-5, "TP=2")
    assert_close_kl(one, tp2, 1e-5, "TP=2")
    train_kl = [r["exit_kl"]["1"] for r in one if r["split"] == "train"]
    assert min(train_kl) > 0.1  # a real distribution gap, not a trivial ~0
    assert one[-1]["exit_kl"]["1"] < one[0]["exit_kl"]["1"]  # validation KL went down


@pytest.mark.slow
def test_ee_tuning_tensor_parallel_matches_one_process(tmp_path):
    base = [*ARCH, "--train-iters", "1", "--save", str(tmp_path / "base")]
    train(1, base, tmp_path / "base.jsonl")  # a checkpoint with exits
    tune = ["--load", str(tmp_path / "base"), "--tune-exit", "--finetune", *TRAIN]
    t1 = train(1, [*ARCH, *tune], tmp_path / "t1.jsonl")
    t2 = train(2, [*ARCH, *tune, *TP2], tmp_path / "t2.jsonl")
    assert_close_records(t1, t2, 1e-5, "EE-Tuning TP=2")
    assert_close_kl(t1, t2, 1e-5, "EE-Tuning TP=2")
    assert t1[-1]["exit_kl"]["3"] < t1[0]["exit_kl"]["3"]
