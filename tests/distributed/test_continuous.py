"""Continuous batching with several ranks (gloo, 2 processes, PP=2; TP=2 in slow): rank 0's
scheduler broadcasts each step's joins and leaves (Coordinator STEP), every rank returns
the same finished sequences, and each request gets exactly what it gets alone, including a
request that joins mid-generation, a stop sequence and a cancellation mid-batch.
Worker: worker_continuous.py.
"""

import json

import pytest

from tests.distributed.launch import ROOT, TINY, layout_args, torchrun

pytestmark = pytest.mark.distributed
WORKER = ROOT / "tests" / "distributed" / "worker_continuous.py"
MODEL = [*TINY, "--seq-length", "64", "--exit-layer-nums", "1", "3", "--init-method-std", "0.25"]


@pytest.mark.parametrize(
    "tp,pp", [(1, 2), pytest.param(2, 1, marks=pytest.mark.slow)], ids=["pp2", "tp2"]
)
def test_continuous_batching_across_ranks(tmp_path, tp, pp):
    torchrun(2, WORKER, [str(tmp_path / "out"), *MODEL, *layout_args(tp, pp)])
    r0, r1 = (json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(2))
    assert r0["finished"] == r1["finished"]  # every rank freed the same slots with the same
    for name in ("none", "early_exit_kv"):
        rep = r0[name]
        assert rep["cancelled"], name
        for job, rows in rep["served"].items():
            assert rows == rep["alone"][job], (name, job)
        assert rep["served"]["pair"][1][2] == "stop", name
        # "a" alone first, then "b" and the pair's first prompt join it mid-generation
        assert rep["joins_per_step"][:3] == [1, 0, 2], name
    layers = {x for rows in r0["early_exit_kv"]["served"].values() for r in rows for x in r[1]}
    assert min(layers) < 4  # tokens really exit early in the batch
