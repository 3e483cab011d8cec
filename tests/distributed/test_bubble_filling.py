"""Bubble filling on real processes: alignment (tagged toy stages), exact gradients, TP."""

import json
from pathlib import Path

import pytest
import torch

from tests.distributed.launch import (
    ENTRY,
    TINY,
    assert_close_records,
    layout_args,
    torchrun,
    train,
)

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).with_name("worker_bubble.py")
EXITS = ["--exit-layer-nums", "1", "3"]


@pytest.mark.parametrize("P,M,warm,cool", [(2, 4, 1, 0), (4, 3, 1, 1)])
def test_stages_see_the_same_microbatch_ids(tmp_path, P, M, warm, cool):
    # Each stage asserts, per microbatch id, data == activation == loss id and the exact
    # gradient of that id (see the worker); here we check every stage finished.
    out = tmp_path / "toy"
    torchrun(P, WORKER, ["toy", str(out), str(P), str(M), str(warm), str(cool)], timeout=120)
    stages = sorted(json.loads(p.read_text())["stage"] for p in tmp_path.glob("toy.rank*"))
    assert stages == list(range(P))


def _merge(files):
    merged = {"plain": {}, "filled": {}}
    exit_stage = {}
    for f in files:
        rec = torch.load(f)
        merged["plain"].update(rec["plain"])
        merged["filled"].update(rec["filled"])
        exit_stage.update(rec["exit_stage"])
        merged["spec"] = {"P": rec["P"], "dp": rec["dp"], "fills": rec["fills"]}
    merged["spec"]["exit_stage"] = exit_stage
    return merged


def _rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
    den = sum(float(b[k].norm() ** 2) for k in b) ** 0.5
    return num / den


@pytest.mark.parametrize(
    "nproc,fill",
    [
        (4, ["--num-fill-warmup-microbatches", "1", "--num-fill-cooldown-microbatches", "0"]),
        pytest.param(
            2,
            ["--num-fill-warmup-microbatches", "0", "--num-fill-cooldown-microbatches", "1"],
            marks=pytest.mark.slow,  # same objective as warm-up on PP=2; alignment: toy test
        ),
    ],
    ids=["warmup-dp2", "cooldown"],
)
def test_gradients_equal_the_documented_objective(tmp_path, nproc, fill):
    # Same weights in every layout: start both from one checkpoint.
    ckpt = tmp_path / "ckpt"
    torchrun(1, ENTRY, [*TINY, *EXITS, "--train-iters", "0", "--save", str(ckpt)])
    load = ["--load", str(ckpt), "--no-load-optim", "--finetune"]
    # The worker also asserts that the executor without fills is bit-identical to 1F1B.
    pipe = [*TINY, *EXITS, *load, *layout_args(1, 2), "--fill-explicit-bubbles", *fill]
    torchrun(nproc, WORKER, ["pipe", str(tmp_path / "pipe"), *pipe])
    got = _merge(sorted(tmp_path.glob("pipe.rank*.pt")))
    assert len(got["spec"]["fills"]) == 1
    assert got["spec"]["exit_stage"] == {1: 0, 3: 1}  # 4 layers on 2 stages, exits 1 and 3
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(got["spec"]))
    torchrun(1, WORKER, ["ref", str(tmp_path / "ref"), str(spec), *TINY, *EXITS, *load])
    ref = torch.load(tmp_path / "ref.pt")
    assert _rel(got["plain"], ref["main"]) < 1e-5
    assert _rel(got["filled"], ref["filled"]) < 1e-5
    assert _rel(ref["filled"], ref["main"]) > 1e-3  # the fill microbatch changed the gradient


@pytest.mark.slow  # 6 processes, about 2 minutes on 2 cores
def test_tensor_parallel_filling_matches_tp1(tmp_path):
    args = [*TINY, *EXITS, "--train-iters", "2", "--fill-explicit-bubbles"]
    args += ["--num-fill-warmup-microbatches", "1", "--num-fill-cooldown-microbatches", "0"]
    tp1 = train(2, [*args, *layout_args(1, 2)], tmp_path / "tp1.jsonl")
    tp2 = train(4, [*args, *layout_args(2, 2)], tmp_path / "tp2.jsonl")
    assert all(r["fill_microbatches"] == 1 for r in tp1 if r["split"] == "train")
    assert_close_records(tp1, tp2, rel=1e-4, label="TP=2 vs TP=1 with filling")


@pytest.mark.slow  # make test time budget; recompute parity without fills runs in make test
@pytest.mark.parametrize(
    "recompute",
    [
        ["--recompute-granularity", "full", "--recompute-method", "uniform",
         "--recompute-num-layers", "1"],
        ["--recompute-granularity", "selective"],
    ],
    ids=["full", "selective"],
)  # fmt: skip
def test_filling_with_recomputation_matches_filling_without(tmp_path, recompute):
    """Fill microbatches run forward and backward like the others: with recomputation
    (exit chunks cut, exit heads recomputed) the losses and grad norm stay the same."""
    args = [*TINY, *EXITS, "--train-iters", "2", "--fill-explicit-bubbles", *layout_args(1, 2)]
    args += ["--num-fill-warmup-microbatches", "1", "--num-fill-cooldown-microbatches", "0"]
    plain = train(2, args, tmp_path / "plain.jsonl")
    got = train(2, [*args, *recompute], tmp_path / "recompute.jsonl")
    assert all(r["fill_microbatches"] == 1 for r in got if r["split"] == "train")
    assert_close_records(plain, got, rel=1e-5, label="filling + recomputation")
