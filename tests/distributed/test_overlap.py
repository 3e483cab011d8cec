"""--overlap-grad-reduce / --overlap-param-gather change when DP communication runs, never
the numbers: losses, every exit loss, grad norms and the saved weights equal the run
without overlap (gloo on CPU runs megatron-core's asynchronous bucket collectives too)."""

import pytest

from megatron.early_exit.tuning.compare import read_model_tensors
from tests.distributed.launch import TINY, assert_close_records, layout_args, train

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
