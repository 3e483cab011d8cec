"""Two "nodes" on one machine: two torchrun launches with --nnodes 2 and node ranks 0/1
rendezvous on 127.0.0.1 and train the tiny model together (PP=2, one pipeline stage per
node). The losses must equal those of one launch with both processes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.distributed.launch import (
    ENTRY,
    ROOT,
    TINY,
    assert_close_records,
    free_port,
    layout_args,
    read_metrics,
    train,
)

pytestmark = pytest.mark.distributed

ARGS = [
    *TINY, *layout_args(1, 2), "--exit-layer-nums", "1", "3", "--use-exit-norm",
    "--exit-layer-weight", "0.5", "1.0", "--train-iters", "3",
]  # fmt: skip


def _node(node_rank: int, port: int, metrics) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
        "--node-rank", str(node_rank), "--nproc-per-node", "1",
        "--master-addr", "127.0.0.1", "--master-port", str(port),
        str(ENTRY), *ARGS, "--metrics-file", str(metrics),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_two_node_launch_matches_single_launch(tmp_path):
    port = free_port()
    metrics = tmp_path / "two_nodes.jsonl"
    nodes = [_node(rank, port, metrics) for rank in (0, 1)]
    logs = []
    try:
        for node in nodes:
            out, _ = node.communicate(timeout=240)
            logs.append(out)
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for rank, (node, log) in enumerate(zip(nodes, logs)):
        assert node.returncode == 0, f"node {rank} failed:\n{log[-6000:]}"

    # The metrics writer is the last pipeline stage: global rank 1, on node 1.
    two_nodes = read_metrics(metrics)
    one_launch = train(2, ARGS, tmp_path / "one_launch.jsonl")
    assert len([r for r in two_nodes if r["split"] == "train"]) == 3
    # Same ranks, same groups, same gloo reductions: the numbers are identical.
    assert_close_records(two_nodes, one_launch, rel=0.0, label="2 nodes vs 1 launch")
