"""`make demo` from a clean clone, end to end on real text (network for the first fetch;
~5-7 min on 2 cores). The clone reuses this checkout's venv (VENV=...) instead of
installing one: `-o` tells make not to rebuild the venv stamp, which a fresh clone's newer
requirements.txt would otherwise trigger (and that would re-point the editable install)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    if shutil.which("git") is None or shutil.which("make") is None:
        pytest.skip("needs git and make")
    clone = tmp_path_factory.mktemp("clone") / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    venv = Path(sys.prefix)  # the venv running the tests
    if not (venv / "bin" / "python").exists():
        pytest.skip("run the tests from a venv (make test-all)")
    env = dict(os.environ, PYTHONPATH=str(clone))  # the clone's code, not this checkout's
    proc = subprocess.run(
        ["make", "demo", f"VENV={venv}", "-o", f"{venv}/.installed"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=2400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    (clone / "outputs" / "demo" / "stdout.txt").write_text(proc.stdout)  # for the README excerpt
    return clone / "outputs" / "demo", proc.stdout


def test_demo_lowers_every_validation_loss_and_exits_stay_behind_the_lm(demo_run):
    out, _ = demo_run
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if r["split"] == "valid"]
    first, last = valid[0], valid[-1]
    assert first["iteration"] == 0 and last["iteration"] > 0
    assert last["lm_loss"] < first["lm_loss"] - 2.0  # ln(2048) ~ 7.6 at the start
    for loss in last["exit_losses"].values():
        assert loss < first["lm_loss"] - 2.0
    # the point of the demo: an exit two layers in is visibly worse than all eight layers
    assert last["exit_losses"]["2"] > last["lm_loss"] + 0.05
    assert (out / "checkpoint" / "latest_checkpointed_iteration.txt").exists()


def test_demo_generates_with_exits_and_lossless_self_speculation(demo_run):
    out, stdout = demo_run
    entries = json.loads((out / "generation.json").read_text())
    runs = {}
    for e in entries:
        runs.setdefault(e["run"], []).append(e)
        assert len(e["token_ids"]) == len(e["exit_layers"]) == len(e["token_texts"]) > 0
        assert e["prompt_token_ids"] and e["text"] == "".join(e["token_texts"])
    thresholds = sorted(
        e["early_exit"]["threshold"] for e in entries if e["run"].startswith("early")
    )
    low = f"early exit @ {thresholds[0]:g}"
    assert set(runs) == {"full model", low, f"early exit @ {thresholds[-1]:g}", "self-speculative"}
    layers = entries[0]["num_layers"]
    assert any(k < layers for e in runs[low] for k in e["exit_layers"])
    assert all(k == layers for e in runs["full model"] for k in e["exit_layers"])
    for spec, full in zip(runs["self-speculative"], runs["full model"]):
        assert spec["prompt_token_ids"] == full["prompt_token_ids"]
        assert spec["token_ids"] == full["token_ids"]
    for name in ("demo_losses.png", "demo_exit_layers.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "acceptance" in stdout and "examples/ee_inference/server.sh" in stdout
    assert "examples/ee_inference/client.sh" in stdout
