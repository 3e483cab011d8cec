"""Run the real entry point under torchrun (gloo) and read its metrics file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "pretrain_early_exit_gpt.py"

# The tiny model of the acceptance criteria: 4 layers, hidden 64, 4 heads.
TINY = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--mock-data", "--tokenizer-type", "NullTokenizer",
    "--vocab-size", "200", "--micro-batch-size", "2", "--global-batch-size", "8",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(
    nproc: int,
    script: Path | str,
    args: list[str],
    env: dict | None = None,
    timeout: int = 300,
    check: bool = True,
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script), *args,
    ]  # fmt: skip
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"torchrun failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def train(nproc: int, args: list[str], metrics_file: Path, env: dict | None = None) -> list[dict]:
    torchrun(nproc, ENTRY, [*args, "--metrics-file", str(metrics_file)], env=env)
    return read_metrics(metrics_file)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def layout_args(tp: int, pp: int, sp: bool = False, distopt: bool = False) -> list[str]:
    args = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    if sp:
        args.append("--sequence-parallel")
    if distopt:
        args.append("--use-distributed-optimizer")
    return args


def assert_close_records(a: list[dict], b: list[dict], rel: float, label: str) -> None:
    """Same lm loss, every exit loss and grad norm, iteration by iteration."""
    a = [r for r in a if r["split"] == "train"]
    b = [r for r in b if r["split"] == "train"]
    assert len(a) == len(b), f"{label}: {len(a)} vs {len(b)} records"
    for ra, rb in zip(a, b):
        assert ra["iteration"] == rb["iteration"]
        pairs = [(k, ra[k], rb[k]) for k in ("lm_loss", "grad_norm")]
        assert ra["exit_losses"].keys() == rb["exit_losses"].keys(), label
        for k in ra["exit_losses"]:
            pairs.append((f"exit {k}", ra["exit_losses"][k], rb["exit_losses"][k]))
        for name, x, y in pairs:
            assert x is not None and y is not None, f"{label}: {name} missing"
            assert abs(x - y) <= rel * max(abs(x), abs(y)), (
                f"{label} iteration {ra['iteration']}: {name} {x!r} vs {y!r}"
            )
