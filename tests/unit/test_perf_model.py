"""The package's FLOP model: stage costs follow the split, the suggested split is the best
one megatron-core accepts, and --dry-run prints both."""

import json

import pytest

pytestmark = pytest.mark.unit

# The LM head plus two exits make the last stage the heaviest with the even split.
HEAVY_TAIL = [
    "--mock-data", "--vocab-size", "32000", "--num-layers", "8", "--hidden-size", "256",
    "--num-attention-heads", "4", "--seq-length", "128", "--pipeline-model-parallel-size", "4",
    "--exit-layer-nums", "7", "8", "--untie-exit-output-weights",
]  # fmt: skip


def _run(argv, world_size=4):
    from megatron.early_exit.arguments import parse_run_config

    return parse_run_config(argv, world_size=world_size)


def test_stage_costs_follow_the_split_and_count_heads():
    from megatron.early_exit.perf_model import stage_costs, unit_costs

    split = ["--decoder-first-pipeline-num-layers", "3", "--decoder-last-pipeline-num-layers", "1"]
    run = _run([*HEAVY_TAIL, *split])  # layers 1-3, 4-5, 6-7, 8
    u = unit_costs(run)
    costs = stage_costs(run)
    assert [c.layers / u.layer for c in costs] == [3, 2, 2, 1]
    assert [c.exits for c in costs] == [0, 0, u.exit_head, u.exit_head]
    assert [c.lm_head for c in costs] == [0, 0, 0, u.lm_head]


def test_suggested_split_minimises_the_slowest_stage():
    from megatron.early_exit.perf_model import (
        candidate_splits,
        costs_for_split,
        suggest_split,
        unit_costs,
    )

    run = _run(HEAVY_TAIL)
    s = suggest_split(run)
    units, exits = unit_costs(run), run.exits.exit_layer_nums
    brute = min(
        max(c.total for c in costs_for_split(units, split, exits))
        for split in candidate_splits(8, 4)
    )
    assert s.slowest == pytest.approx(brute)
    assert s.gain > 0.1 and s.split.counts()[-1] < 2  # the tail stage gives up layers
    # Applying the suggestion leaves nothing to gain.
    again = suggest_split(_run([*HEAVY_TAIL, *s.flags()]))
    assert again.gain == pytest.approx(0.0)


def test_dry_run_prints_stage_costs_and_the_suggestion(capsys, monkeypatch):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("entry", root / "pretrain_early_exit_gpt.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert entry.main([*HEAVY_TAIL, "--tokenizer-type", "NullTokenizer", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "stage 3 (layers 7-8)" in out and "<- slowest" in out
    assert (
        "suggested split: --decoder-first-pipeline-num-layers 5 -> layers per stage [5, 1, 1, 1]"
        in out
    )
    report = json.loads(out.split("DRY_RUN_JSON ", 1)[1])
    assert len(report["stage_forward_flops"]) == 4
    assert report["suggested_split"]["gain"] > 0.1


def test_memory_estimate_orders_recomputation_and_counts_state():
    from megatron.early_exit.perf_model import format_memory_estimate, memory_estimate
    from megatron.early_exit.training.layout import describe_run

    full = ["--recompute-granularity", "full", "--recompute-method", "uniform",
            "--recompute-num-layers", "1"]  # fmt: skip
    run = _run([*HEAVY_TAIL, *full])
    est = memory_estimate(run)
    layout = describe_run(run)
    for e, st in zip(est, layout.stages):
        assert e.params == st.params * 4 and e.grads == st.params * 4  # fp32
        assert e.optimizer == st.params * 8  # Adam moments, no master copy in fp32
        acts = e.activations
        assert acts["full"] < acts["selective"] < acts["none"]
    distopt = memory_estimate(_run([*HEAVY_TAIL, "--use-distributed-optimizer"], world_size=8))
    assert distopt[0].optimizer == pytest.approx(est[0].optimizer / 2)  # DP 2
    text = format_memory_estimate(run)
    assert "this run: full" in text and "fits an 80 GB GPU" in text
