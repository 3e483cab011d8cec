"""--overlap-grad-reduce / --overlap-param-gather change when DP communication runs, never
the numbers: losses, every exit loss, grad norms and the saved weights equal the run
without overlap (gloo on CPU runs megatron-core's asynchronous bucket collectives too)."""

import pytest

from megatron.early_exit.tuning.compare import read_model_tensors
from tests.distributed.launch import (
    ENTRY,
    TINY,
    assert_close_records,
    layout_args,
    torchrun,
    train,
)

pytestmark = pytest.mark.distributed

OVERLAP = ["--overlap-grad-reduce", "--overlap-param-gather"]
# Small buckets: several per stage, so reduces start during the backward, not at its end.
BUCKETS = ["--ddp-bucket-size", "20000"]


def _run(tmp_path, name, nproc, args):
    out = tmp_path / name
    records = train(nproc, [*args, "--save", str(out)], tmp_path / f"{name}.jsonl")
    return records, read_model_tensors(str(out))


def _assert_same(base, over, label):
    (ra, wa), (rb, wb) = base, over
    assert_close_records(ra, rb, rel=1e-6, label=label)
    valid_a = [r["lm_loss"] for r in ra if r["split"] == "valid"]
    valid_b = [r["lm_loss"] for r in rb if r["split"] == "valid"]
    assert valid_a == pytest.approx(valid_b, rel=1e-6)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() <= 1e-6, k


def test_overlap_dp2_matches_no_overlap(tmp_path):
    # DP2, distributed optimizer, exits with tied output weights, three steps so stale
    # parameters (a missed all-gather) or unreduced grads would show in later losses.
    args = [
        *TINY, *layout_args(1, 1, distopt=True), "--exit-layer-nums", "1", "3",
        "--train-iters", "3", "--eval-interval", "2", "--eval-iters", "1", *BUCKETS,
    ]  # fmt: skip
    base = _run(tmp_path, "base", 2, args)
    over = _run(tmp_path, "over", 2, [*args, *OVERLAP])
    _assert_same(base, over, "DP2 overlap")


@pytest.mark.slow
@pytest.mark.parametrize("fill", [False, True], ids=["1f1b", "bubble-filling"])
def test_overlap_pp2dp2_exits_on_every_stage(tmp_path, fill):
    # PP2 x DP2: an exit on each stage; untied LM head, so the last stage's tied exit uses
    # its own copy of the word embeddings (all-reduced over the embedding group). With
    # bubble filling the last backward may be a fill that reaches only some parameters.
    args = [
        *TINY, *layout_args(1, 2, distopt=True), "--exit-layer-nums", "1", "3",
        "--untie-embeddings-and-output-weights", "--train-iters", "3", "--eval-interval", "3",
        "--eval-iters", "1", *BUCKETS, *(["--fill-explicit-bubbles"] if fill else []),
    ]  # fmt: skip
    base = _run(tmp_path, "base", 4, args)
    over = _run(tmp_path, "over", 4, [*args, *OVERLAP])
    _assert_same(base, over, f"PP2DP2 overlap fill={fill}")


@pytest.mark.slow
def test_overlap_with_exit_tuning(tmp_path):
    # --tune-exit: frozen backbone, only the exit heads' buckets reduce (its schedule has no
    # no_sync: a bucket is ready once every microbatch has added its grads).
    ckpt = tmp_path / "pretrained"
    exits = ["--exit-layer-nums", "1", "3", "--use-exit-norm", "--use-exit-mlp"]
    torchrun(1, ENTRY, [*TINY, *exits, "--train-iters", "0", "--save", str(ckpt)])
    args = [
        *TINY, *layout_args(1, 1, distopt=True), "--tune-exit", "--load", str(ckpt),
        "--train-iters", "3", "--lr", "1e-2", "--eval-interval", "3", "--eval-iters", "1",
        *BUCKETS,
    ]  # fmt: skip
    base = _run(tmp_path, "base", 2, args)
    over = _run(tmp_path, "over", 2, [*args, *OVERLAP])
    _assert_same(base, over, "tune-exit overlap")
