"""Cancelling a running request with several ranks (gloo, 2 processes, PP=2 and TP=2).

Rank 0's cancel hook decides; every rank must stop the cancelled sequence at the same decode
step (engine.generate(..., cancel_sync=True)), and the batch's other sequences must get
exactly what they get without it. Worker: worker_cancel.py.
"""

import json

import pytest

from tests.distributed.launch import ROOT, TINY, layout_args, torchrun

pytestmark = pytest.mark.distributed
WORKER = ROOT / "tests" / "distributed" / "worker_cancel.py"
# a large init std spreads confidences: at threshold 0.8 tokens exit at 1, 3 and 4
MODEL = [*TINY, "--seq-length", "64", "--exit-layer-nums", "1", "3", "--init-method-std", "0.25"]
CANCEL_AFTER = 3  # worker_cancel.py


@pytest.mark.parametrize(
    "tp,pp", [(1, 2), pytest.param(2, 1, marks=pytest.mark.slow)], ids=["pp2", "tp2"]
)
def test_cancel_agrees_across_ranks(tmp_path, tp, pp):
    torchrun(2, WORKER, [str(tmp_path / "out"), *MODEL, *layout_args(tp, pp)])
    reports = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(2)]
    expected = {"none", "early_exit_kv", "self_speculative"}
    expected |= {"early_exit_pipeline"} if pp > 1 else set()
    for rank, report in enumerate(reports):
        assert set(report) == expected
        for name, rep in report.items():
            where = f"rank {rank}, {name}"
            batch, alone = rep["batch"], rep["alone"]
            # (a) the others are untouched by the cancellation
            assert [batch[0], batch[2]] == alone, where
            assert all(b[2] == "length" for b in alone), where
            # (b) the cancelled sequence stopped right after the step that saw the cancel
            tokens, _, finish = batch[1]
            assert finish == "cancelled" and len(tokens) == CANCEL_AFTER, where
            # ... and this rank fed no position of it after that step (the token of step k
            # comes from position prompt_len + k - 2; speculation may draft a few ahead)
            last = rep["prompt_len"] + CANCEL_AFTER - 2
            if name == "self_speculative":
                assert last <= rep["fed_max"] <= last + 3, where
            elif rank == 0 or tp > 1 or name == "early_exit_pipeline":
                assert rep["fed_max"] == last, where  # every position reaches these ranks
            else:
                assert rep["fed_max"] <= last, where  # a token may exit before stage 1
    for name in expected:  # every rank returns the same results
        assert reports[0][name]["batch"] == reports[1][name]["batch"], name
