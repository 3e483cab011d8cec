"""Exit losses on a middle pipeline stage backpropagate into the stages below it."""

import json
from pathlib import Path

import pytest

from tests.distributed.launch import ENTRY, TINY, layout_args, torchrun

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).with_name("worker_grads.py")


def _layer1_grad(ckpt, exit_weight: float, extra=()) -> float:
    args = [
        *TINY, "--exit-layer-nums", "2", "--exit-layer-weight", str(exit_weight),
        "--load", str(ckpt), "--no-load-optim", "--finetune", *layout_args(1, 4), *extra,
    ]  # fmt: skip
    out = torchrun(4, WORKER, args).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("GRADS "))
    return json.loads(line[len("GRADS ") :])["layer1"]


# make test time budget: the GPT-2 PP4 parity run (tied exits on middle stages, same grad
# norm as one process) covers the same path in make test.
@pytest.mark.slow
def test_middle_stage_exit_trains_layers_below(tmp_path):
    # PP=4 with 4 layers: the exit after layer 2 lives on stage 1, layer 1 on stage 0.
    ckpt = tmp_path / "ckpt"
    torchrun(1, ENTRY, [*TINY, "--exit-layer-nums", "2", "--train-iters", "0", "--save", str(ckpt)])
    g0 = _layer1_grad(ckpt, 0.0)
    g1 = _layer1_grad(ckpt, 1.0)
    g1_again = _layer1_grad(ckpt, 1.0)
    assert g0 > 0 and g1 > 0
    assert g1 == pytest.approx(g1_again, rel=1e-9)  # deterministic, so the difference is real
    assert abs(g1 - g0) > 1e-3 * g0, f"exit loss did not reach layer 1: {g0} vs {g1}"
