"""EE-Tuning (--tune-exit): frozen backbone, exit-only training, partial stage loading.

* the backbone of every tuned checkpoint is bit-identical to the one tuned from;
* running only the first k of P stages gives the same exit losses and the same tuned
  exit heads as running all P stages, and still saves a complete model;
* TP=2 and DP=2 match one process; missing exits point to tools/checkpoint/add_exits.py.
"""

import os
import subprocess
import sys

import pytest

from megatron.early_exit.tuning.compare import compare_backbone, read_model_tensors
from tests.distributed.launch import ENTRY, ROOT, TINY, assert_close_records, torchrun, train

pytestmark = pytest.mark.distributed
TOOL = ROOT / "tools" / "checkpoint" / "add_exits.py"
ARCH = [*TINY, "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
        "--disable-bias-linear"]  # fmt: skip
TUNE = ["--tune-exit", "--mock-data", "--train-iters", "3", "--micro-batch-size", "2",
        "--global-batch-size", "8", "--lr", "1e-2", "--eval-interval", "3",
        "--eval-iters", "1"]  # fmt: skip
PP2 = ["--pipeline-model-parallel-size", "2"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ee_tuning")
    torchrun(1, ENTRY, [*ARCH, "--train-iters", "0", "--save", str(root / "base")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for name, layers in (("shallow", ["1", "2"]), ("both", ["1", "3"])):
        subprocess.run(
            [sys.executable, str(TOOL), "--load", str(root / "base"), "--save", str(root / name),
             "--exit-layer-nums", *layers, "--use-exit-norm", "--use-exit-mlp"],
            check=True, capture_output=True, cwd=ROOT, env=env, timeout=300,
        )  # fmt: skip
    return root


def tune(nproc, ckpt, out, *extra, metrics):
    return train(nproc, [*TUNE, "--load", str(ckpt), "--save", str(out), *extra], metrics)


def test_partial_stages_match_full_pipeline(ckpts, tmp_path):
    src = ckpts / "shallow"  # exits 1, 2: both on the first of two stages
    full = tune(2, src, tmp_path / "full", *PP2, metrics=tmp_path / "full.jsonl")
    part = tune(1, src, tmp_path / "part", *PP2, "--tune-exit-pipeline-parallel-size", "1",
                metrics=tmp_path / "part.jsonl")  # fmt: skip
    for a, b in zip(full, part):
        assert a["exit_losses"] == b["exit_losses"], (a, b)  # same ops, same order: exact
        assert a.get("grad_norm") == b.get("grad_norm")
    assert (
        part[0]["split"] == "valid" and part[-1]["exit_losses"]["1"] < part[0]["exit_losses"]["1"]
    )
    assert full[0]["lm_loss"] is not None and part[0]["lm_loss"] is None  # no LM head run
    for out in ("full", "part"):
        bad, changed, _ = compare_backbone(str(src), str(tmp_path / out))
        assert not bad, f"{out}: backbone changed: {bad}"
        assert changed, f"{out}: exit heads did not train"
    a, b = read_model_tensors(str(tmp_path / "full")), read_model_tensors(str(tmp_path / "part"))
    assert a.keys() == b.keys()  # the partial run saved a complete model
    for key in a:
        assert a[key].equal(b[key]), key
    # It loads as a normal full-depth model: the frozen LM loss is unchanged.
    again = tune(2, tmp_path / "part", tmp_path / "again", "--pipeline-model-parallel-size", "2",
                 "--train-iters", "4", metrics=tmp_path / "again.jsonl")  # fmt: skip
    assert [r["iteration"] for r in again if r["split"] == "train"] == [4]  # resumed
    assert again[-1]["lm_loss"] == full[0]["lm_loss"]  # same (first) validation samples


def test_tensor_and_data_parallel_match_one_process(ckpts, tmp_path):
    src = ckpts / "both"
    one = tune(1, src, tmp_path / "one", metrics=tmp_path / "one.jsonl")
    tp2 = tune(2, src, tmp_path / "tp2", "--tensor-model-parallel-size", "2",
               metrics=tmp_path / "tp2.jsonl")  # fmt: skip
    dp2 = tune(2, src, tmp_path / "dp2", metrics=tmp_path / "dp2.jsonl")
    assert_close_records(one, tp2, 1e-5, "TP=2")
    assert_close_records(one, dp2, 1e-5, "DP=2")
    for out in ("tp2", "dp2"):
        bad, changed, _ = compare_backbone(str(src), str(tmp_path / out))
        assert not bad and changed, out


def test_missing_exits_point_to_add_exits(ckpts, tmp_path):
    proc = torchrun(1, ENTRY, [*TUNE, "--load", str(ckpts / "base")], check=False)  # torchrun: rc 1
    assert proc.returncode != 0 and "tools/checkpoint/add_exits.py" in proc.stderr
    with_exits = ["--exit-layer-nums", "2", "--use-exit-norm"]
    proc = torchrun(1, ENTRY, [*TUNE, "--load", str(ckpts / "base"), *with_exits], check=False)
    assert proc.returncode != 0 and "tools/checkpoint/add_exits.py" in proc.stderr
    assert "has no exit heads" in proc.stderr
    partial = [*PP2, "--tune-exit-pipeline-parallel-size", "1"]
    proc = torchrun(1, ENTRY, [*TUNE, "--load", str(ckpts / "both"), *partial], check=False)
    assert proc.returncode != 0 and "there is an exit at layer 3" in proc.stderr
