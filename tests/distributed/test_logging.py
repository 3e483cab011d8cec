"""TensorBoard scalars of a PP=2 run, read back with TensorBoard's own reader, equal the
metrics file: exit losses of both stages, weights, grad norm, lr, throughput, validation,
timers and memory (the logging rank writes what every stage reduced to it)."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.distributed.launch import TINY, layout_args, train

pytestmark = pytest.mark.distributed


TIMERS = (
    "forward-backward", "optimizer", "batch-generator", "forward-compute", "backward-compute",
    "exit-heads", "forward-recv", "backward-send",
)  # fmt: skip


def _read_scalars(logdir) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_equal_metrics_file(tmp_path):
    tb = tmp_path / "tb"
    args = [
        *TINY, *layout_args(1, 2), "--exit-layer-nums", "1", "3",
        "--exit-layer-weight", "0.5", "0.25", "--train-iters", "2", "--eval-interval", "2",
        "--eval-iters", "1", "--tensorboard-dir", str(tb), "--timing-log-level", "2",
        "--log-timers-to-tensorboard", "--log-memory-to-tensorboard",
    ]  # fmt: skip
    records = train(2, args, tmp_path / "m.jsonl")
    got = _read_scalars(tb)

    train_records = [r for r in records if r["split"] == "train"]
    valid_records = [r for r in records if r["split"] == "valid"]
    assert len(train_records) == 2 and len(valid_records) == 2  # iterations 0 and 2
    for r in train_records:
        step = r["iteration"]
        expected = {
            "lm loss": r["lm_loss"],
            "exit-loss/layer-1": r["exit_losses"]["1"],  # stage 0's exit
            "exit-loss/layer-3": r["exit_losses"]["3"],  # stage 1's exit
            "exit-weight/layer-1": 0.5,
            "exit-weight/layer-3": 0.25,
            "grad-norm": r["grad_norm"],
            "learning-rate": r["lr"],
            "tokens-per-sec": r["tokens_per_s"],
            "memory/rss-mib": r["memory"]["rss-mib"],
        }
        for name in TIMERS:
            expected[f"timers/{name}-time"] = r["timers_s"][name]
            assert r["timers_s"][name] > 0, name  # every timer ran on some rank
        for tag, value in expected.items():
            assert value is not None, tag
            assert got[tag][step] == pytest.approx(value, rel=1e-6), (tag, step)
        assert r["memory"]["rss-mib"] > 10
    for r in valid_records:
        for tag, value in (
            ("validation/lm loss", r["lm_loss"]),
            ("validation/exit-loss/layer-1", r["exit_losses"]["1"]),
            ("validation/exit-loss/layer-3", r["exit_losses"]["3"]),
        ):
            assert got[tag][r["iteration"]] == pytest.approx(value, rel=1e-6), tag
    assert not any(tag.startswith("validation/timers") for tag in got)
