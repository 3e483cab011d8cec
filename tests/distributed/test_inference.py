"""Early-exit generation CLI at several TP/PP layouts: both methods give the same tokens.

One tiny random checkpoint (large init std, so tokens and exits vary; saved at TP1PP1,
loaded resharded), three prompts of mixed lengths decoded as one batch.
"""

import json

import pytest

from tests.distributed.launch import ENTRY, ROOT, layout_args, torchrun

pytestmark = pytest.mark.distributed
GENERATE = ROOT / "tools" / "generate.py"
MODEL = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "64", "--tokenizer-type", "NullTokenizer", "--vocab-size", "200",
    "--exit-layer-nums", "1", "2", "3",
]  # fmt: skip
PROMPTS = ["5,17,42,7,99,3", "1,2,3", "60,61,12,13,40,41,42,8,9,90,11"]
THRESHOLD = "0.8"  # exits at every layer, and the full model, for this checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("inference") / "ckpt"
    torchrun(1, ENTRY, [
        *MODEL, "--mock-data", "--micro-batch-size", "1", "--global-batch-size", "1",
        "--init-method-std", "0.25", "--lr", "1e-9", "--train-iters", "1", "--save", str(path),
    ])  # fmt: skip
    return path


def _generate(ckpt, tmp_path, tp, pp, *extra, n=14):
    out = tmp_path / f"out_{tp}_{pp}_{abs(hash(extra))}.json"
    prompts = [a for p in PROMPTS for a in ("--prompt-ids", p)]
    args = [
        "--load", str(ckpt), *layout_args(tp, pp), *prompts, "--max-new-tokens", str(n),
        "--output-json", str(out), *extra,
    ]  # fmt: skip
    torchrun(tp * pp, GENERATE, args)
    return json.loads(out.read_text())


def _truncate(tokens, eos, stop):
    """Reference tokens cut where the engine must stop: EOS (kept) or the stop string."""
    for k, t in enumerate(tokens):
        if t == eos:
            return tokens[: k + 1], "eos"
        if stop in " ".join(map(str, tokens[: k + 1])):
            return tokens[: k + 1], "stop"
    return tokens, "length"


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    ref = _generate(ckpt, tmp, 1, 1, "--ignore-eos", *EARLY_EXIT)
    assert {e for r in ref for e in r["exit_layers"]} == {1, 2, 3, 4}
    return ref


EARLY_EXIT = ("--mode", "early_exit", "--threshold", THRESHOLD)


def _check_layout(ckpt, tmp_path, reference, tp, pp, method):
    # EOS chosen from prompt 0's output, a stop string from prompt 1's: every method must
    # stop exactly where the unconstrained reference says.
    eos = reference[0]["token_ids"][5]
    stop = " ".join(map(str, reference[1]["token_ids"][3:5]))
    got = _generate(
        ckpt, tmp_path, tp, pp, *EARLY_EXIT, "--method", method,
        "--eos-token-id", str(eos), "--stop", stop,
    )  # fmt: skip
    reasons = set()
    for a, b in zip(reference, got):
        want, reason = _truncate(a["token_ids"], eos, stop)
        assert b["token_ids"] == want, (tp, pp, method)
        assert b["exit_layers"] == a["exit_layers"][: len(want)], (tp, pp, method)
        assert b["finish_reason"] == reason
        reasons.add(reason)
    assert {"eos", "stop"} <= reasons


@pytest.mark.parametrize("method", ["kv_recompute", "pipeline"])
def test_pp2_methods_match_pp1(ckpt, tmp_path, reference, method):
    _check_layout(ckpt, tmp_path, reference, 1, 2, method)


def test_tp2_matches_pp1(ckpt, tmp_path, reference):
    """TP=2: the decode step runs split at its two tensor-parallel sums (layers.py)."""
    _check_layout(ckpt, tmp_path, reference, 2, 1, "kv_recompute")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kv_recompute", "pipeline"])
@pytest.mark.parametrize("tp, pp", [(1, 4), (2, 2)])
def test_pp4_and_tp2_methods_match_pp1(ckpt, tmp_path, reference, tp, pp, method):
    _check_layout(ckpt, tmp_path, reference, tp, pp, method)


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp", [(1, 2), (1, 4)])
def test_self_speculative_pp_matches_full_model(ckpt, tmp_path, tp, pp):
    full = _generate(ckpt, tmp_path, 1, 1, "--ignore-eos")
    eos = full[0]["token_ids"][6]
    spec = ("--mode", "self_speculative", "--draft-exit-layer", "2", "--draft-length", "3")
    got = _generate(ckpt, tmp_path, tp, pp, *spec, "--eos-token-id", str(eos))
    for a, b in zip(full, got):
        want, reason = _truncate(a["token_ids"], eos, "\0")
        assert b["token_ids"] == want and b["finish_reason"] == reason, (tp, pp)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kv_recompute", "pipeline"])
def test_uneven_pp2_matches_pp1(ckpt, tmp_path, reference, method):
    """Stage 0 holds layer 1 only (exit 1), stage 1 layers 2-4: the stages load their layers
    from the TP1PP1 checkpoint and decode the reference's tokens and exits."""
    uneven = ("--decoder-first-pipeline-num-layers", "1")
    got = _generate(ckpt, tmp_path, 1, 2, "--ignore-eos", *EARLY_EXIT, "--method", method, *uneven)
    for a, b in zip(reference, got):
        assert b["token_ids"] == a["token_ids"] and b["exit_layers"] == a["exit_layers"], method


@pytest.mark.slow
def test_self_speculative_uneven_pp2_matches_full_model(ckpt, tmp_path):
    full = _generate(ckpt, tmp_path, 1, 1, "--ignore-eos")
    spec = ("--mode", "self_speculative", "--draft-exit-layer", "2", "--draft-length", "3")
    uneven = ("--decoder-last-pipeline-num-layers", "1")  # draft exit 2 on stage 0 of [3, 1]
    got = _generate(ckpt, tmp_path, 1, 2, "--ignore-eos", *spec, *uneven)
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in full]
