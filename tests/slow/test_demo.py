"""`make demo` end to end on real text (network for the first fetch; ~3-5 min on 2 cores)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_demo_lowers_every_validation_loss_on_shakespeare(tmp_path):
    import sys

    env = dict(os.environ, OUT=str(tmp_path / "demo"), ITERS="120", PY=sys.executable)
    proc = subprocess.run(
        ["bash", "examples/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [
        json.loads(x) for x in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()
    ]
    valid = [r for r in records if r["split"] == "valid"]
    first, last = valid[0], valid[-1]
    assert first["iteration"] == 0 and last["iteration"] == 120
    assert last["lm_loss"] < first["lm_loss"] - 3.0  # ln(50257) ~ 10.8 at the start
    for layer in ("1", "3"):
        assert last["exit_losses"][layer] < first["exit_losses"][layer] - 3.0
    assert (tmp_path / "demo" / "checkpoint" / "latest_checkpointed_iteration.txt").exists()
