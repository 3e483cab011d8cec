"""The interleaved (virtual-stage) schedule with exit losses equals the plain one (slow;
the PP=2 x 2 layout of make test is test_parity.py::test_parity_interleaved_pp2_vpp2).

Same LM loss, every exit loss and grad norm (the grad norm covers every parameter's
gradient) as a single process, from one reference checkpoint that the model chunks load
chunk by chunk; validation (the forward-only interleaved schedule) too.
"""

import pytest

from tests.distributed.launch import TINY, assert_close_records, layout_args, train
from tests.distributed.test_parity import ITERS, _reference

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

EVAL = ["--eval-interval", "2", "--eval-iters", "1"]


def _assert_close_validation(a: list[dict], b: list[dict], label: str) -> None:
    va = [r for r in a if r["split"] == "valid"]
    vb = [r for r in b if r["split"] == "valid"]
    assert len(va) == len(vb) > 0, label
    for ra, rb in zip(va, vb):
        pairs = [("lm", ra["lm_loss"], rb["lm_loss"])]
        pairs += [(f"exit {k}", v, rb["exit_losses"][k]) for k, v in ra["exit_losses"].items()]
        for name, x, y in pairs:
            assert abs(x - y) <= 1e-5 * abs(x), f"{label} validation {name}: {x} vs {y}"


# 8 layers: with PP=4 x 2 chunks, exits on a middle rank's first chunk (2), on the first
# rank's second chunk (5) and on the third rank's second chunk (7); tied LM head.
EIGHT = [
    *TINY, "--num-layers", "8",
    "--exit-layer-nums", "2", "5", "7", "--use-exit-norm", "--use-exit-mlp",
    "--untie-exit-output-weights", "--global-batch-size", "16",
]  # fmt: skip


def test_interleaved_pp4_vpp2_matches_pp1_and_saves(tmp_path_factory, tmp_path):
    """PP=4 x 2 chunks with 8 microbatches (steady state on every rank), then the
    interleaved run's checkpoint evaluates like the single process's."""
    ckpt = _reference(tmp_path_factory, "vpp4", EIGHT)
    args = [*EIGHT, *ITERS, *EVAL, "--load", str(ckpt)]
    base = train(1, [*args, "--save", str(tmp_path / "a")], tmp_path / "pp1.jsonl")
    got = train(
        4,
        [*args, *layout_args(1, 4), "--virtual-pipeline-model-parallel-size", "2",
         "--save", str(tmp_path / "b")],
        tmp_path / "vpp.jsonl",
    )  # fmt: skip
    assert_close_records(base, got, rel=1e-5, label="PP4 VPP2")
    _assert_close_validation(base, got, "PP4 VPP2")
    # Saved from model chunks, loaded without: same weights, same validation losses.
    again = [*EIGHT, "--train-iters", "0", "--eval-interval", "1", "--eval-iters", "1"]
    ea = train(1, [*again, "--load", str(tmp_path / "a")], tmp_path / "ea.jsonl")
    eb = train(1, [*again, "--load", str(tmp_path / "b")], tmp_path / "eb.jsonl")
    _assert_close_validation(ea, eb, "checkpoint saved with VPP")
