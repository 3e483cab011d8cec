"""Learned exit confidence at TP=2 (slow: five small launches).

* training with --exit-confidence-head gives the same losses, confidence BCE and exit
  agreement at TP=2 with sequence parallelism as at TP=1 (vocab-parallel top-1 target);
* generation with metric "learned" gives the same tokens and exit layers at TP=2 and with
  pipeline-based decoding at PP=2 as at TP=1.
"""

import json

import pytest

from tests.distributed.launch import ENTRY, ROOT, assert_close_records, layout_args, torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
GENERATE = ROOT / "tools" / "generate.py"
MODEL = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--tokenizer-type", "NullTokenizer", "--vocab-size", "200",
    "--exit-layer-nums", "1", "2", "3", "--use-exit-norm", "--exit-confidence-head",
]  # fmt: skip
TRAIN = [
    "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "2", "--seed", "5",
    "--init-method-std", "0.25", "--lr", "0.05", "--train-iters", "4",
    "--exit-confidence-loss-weight", "5",
]  # fmt: skip
PROMPTS = ["5,17,42,7,99,3", "1,2,3", "60,61,12,13,40,41,42,8,9,90,11"]


def _train(tmp, tp, sp, save=None):
    metrics = tmp / f"metrics_{tp}.jsonl"
    extra = ["--save", str(save)] if save else []
    torchrun(tp, ENTRY, [*MODEL, *TRAIN, *layout_args(tp, 1, sp=sp), *extra,
                         "--metrics-file", str(metrics)])  # fmt: skip
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def _generate(ckpt, tmp, tp, threshold, pp=1, *extra):
    out = tmp / f"gen_{tp}_{pp}.json"
    prompts = [a for p in PROMPTS for a in ("--prompt-ids", p)]
    torchrun(tp * pp, GENERATE, [
        "--load", str(ckpt), *layout_args(tp, pp), *prompts, "--max-new-tokens", "12",
        "--ignore-eos", "--mode", "early_exit", "--metric", "learned",
        "--threshold", threshold, "--output-json", str(out), *extra,
    ])  # fmt: skip
    return json.loads(out.read_text())


def test_tp2_equals_tp1(tmp_path):
    ckpt = tmp_path / "ckpt"
    one = _train(tmp_path, 1, False, save=ckpt)
    two = _train(tmp_path, 2, True)
    assert_close_records(one, two, rel=1e-4, label="tp2 sp vs tp1")
    last = [r for r in one if r["split"] == "train"][-1]
    for k, v in last["exit_confidence_bce"].items():
        assert v == pytest.approx(two[-1]["exit_confidence_bce"][k], rel=1e-4)
        assert last["exit_agreement"][k] == pytest.approx(two[-1]["exit_agreement"][k])
    ref = _generate(ckpt, tmp_path, 1, "0.5")
    got = _generate(ckpt, tmp_path, 2, "0.5")
    # pipeline-based decoding: the exits are decided on their own stages
    piped = _generate(ckpt, tmp_path, 1, "0.5", 2, "--method", "pipeline")
    for a, b, c in zip(ref, got, piped):
        assert a["token_ids"] == b["token_ids"] == c["token_ids"]
        assert a["exit_layers"] == b["exit_layers"] == c["exit_layers"]
    # At this threshold exit 3 fires (projection) after exits 1 and 2 were evaluated and
    # declined (no projection): both paths run at TP=2.
    assert {e for r in ref for e in r["exit_layers"]} == {3}
