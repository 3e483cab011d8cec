"""The interleaved (virtual-stage) schedule with exit losses equals the plain one (slow;
the PP=2 x 2 layout of make test is test_parity.py::test_parity_interleaved_pp2_vpp2).

Same LM loss, every exit loss and grad norm (the grad norm covers every parameter's
gradient) as a single process, from one reference checkpoint that the model chunks load
chunk by chunk; validation (the forward-only interleaved schedule) too.
"""

import pytest

from tests.distributed.launch import TINY, assert_close_records, layout_args, train
from tests.distributed.test_parity import ITERS, _reference

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

EVAL = ["--eval-interval", "2", "--eval-iters", "1"]


def _assert_close_validation(a: list[dict], b: list[dict], label: str) -> None:
    va = [r for r in a if r["split"] == "valid"]
    vb = [r for r in b if r["split"] == "valid"]
    assert len(va) == len(vb) > 0, label
    for ra, rb in zip(va, vb):
        pairs = [("lm", ra["lm_loss"], rb["lm_loss"])]
        pairs += [(f"exit {k}", v, rb["exit_losses"][k]) for k, v in ra["exit_losses"].items()]
        for name, x, y in pairs:
            assert abs(x - y) <= 1e-5 * abs(x), f"{label} validation {name}: {x} vs {y}"


# 8 layers: with PP=4 x 2 chunks, exits on a middle rank's first chunk (2), on the first
# rank's second chunk (5) and on the third rank's second chunk (7); tied LM head.
EIGHT = [
    *TINY, "--num-layers", "8",
    "--exit-layer-nums", "2", "5", "7", "--use-exit-norm", "--use-exit-mlp",
    "--untie-exit-output-weights", "--global-batch-size", "16",
]  # fmt: skip


def test_interleaved_pp4_vpp2_matches_pp1_and_saves(tmp_path_factory, tmp_path):
    """PP=4 x 2 chunks with 8 microbatches (steady state on every rank), then the
    interleaved run's checkpoint evaluates like the single process's."""
    ckpt = _reference(tmp_path_factory, "vpp4", EIGHT)
    args = [*EIGHT, *ITERS, *EVAL, "--load", str(ckpt)]
    base = train(1, [*args, "--save", str(tmp_path / "a")], tmp_path / "pp1.jsonl")
    got = train(
        4,
        [*args, *layout_args(1, 4), "--virtual-pipeline-model-parallel-size", "2",
         "--save", str(tmp_path / "b")],
        tmp_path / "vpp.jsonl",
    )  # fmt: skip
    assert_close_records(base, got, rel=1e-5, label="PP4 VPP2")
    _assert_close_validation(base, got, "PP4 VPP2")
    # Saved from model chunks, loaded without: same weights, same validation losses.
    again = [*EIGHT, "--train-iters", "0", "--eval-interval", "1", "--eval-iters", "1"]
    ea = train(1, [*again, "--load", str(tmp_path / "a")], tmp_path / "ea.jsonl")
    eb = train(1, [*again, "--load", str(tmp_path / "b")], tmp_path / "eb.jsonl")
    _assert_close_validation(ea, eb, "checkpoint saved with VPP")


# Llama style: untied LM head, tied exit heads. 6 layers with PP=2 x 2 chunks and a last
# stage of 4 layers: rank 0 holds 1 | 4, rank 1 holds 2-3 | 5-6. Exit 4's copy sits beside
# the embedding (rank 0); exits 2 and 5 put two copies on rank 1 (no tied LM head there).
LLAMA_TIED_6 = [
    *TINY, "--num-layers", "6", "--exit-layer-nums", "2", "4", "5", "--use-exit-norm",
    "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--swiglu",
    "--untie-embeddings-and-output-weights", "--disable-bias-linear",
]  # fmt: skip
# GPT-2 style (everything tied), 8 layers, PP=4 x 2 chunks of one layer: exits on a middle
# rank's first chunk (2), the first rank's second chunk (5, beside the embedding) and the
# last rank's first chunk (4, beside the tied LM head).
GPT2_TIED_8 = [
    *TINY, "--num-layers", "8", "--exit-layer-nums", "2", "4", "5", "--global-batch-size", "16",
]  # fmt: skip
VPP2 = ["--virtual-pipeline-model-parallel-size", "2"]


def test_interleaved_tied_exits_untied_lm_head_uneven(tmp_path_factory, tmp_path):
    ckpt = _reference(tmp_path_factory, "llama6", LLAMA_TIED_6)
    args = [*LLAMA_TIED_6, *ITERS, *EVAL, "--load", str(ckpt)]
    base = train(1, args, tmp_path / "pp1.jsonl")
    uneven = ["--decoder-last-pipeline-num-layers", "4", "--no-batch-p2p-comm"]
    got = train(2, [*args, *layout_args(1, 2), *VPP2, *uneven], tmp_path / "vpp.jsonl")
    assert_close_records(base, got, rel=1e-5, label="llama PP2 VPP2 last=4")
    _assert_close_validation(base, got, "llama PP2 VPP2 last=4")


def test_interleaved_pp4_tied_exits_saves_layout_independent(tmp_path_factory, tmp_path):
    """PP=4 x 2 with tied exits everywhere; the chunked run's checkpoint (copies not saved,
    loaded from the embedding) evaluates like the single process's."""
    ckpt = _reference(tmp_path_factory, "gpt2_8", GPT2_TIED_8)
    args = [*GPT2_TIED_8, *ITERS, *EVAL, "--load", str(ckpt)]
    base = train(1, [*args, "--save", str(tmp_path / "a")], tmp_path / "pp1.jsonl")
    got = train(
        4, [*args, *layout_args(1, 4), *VPP2, "--save", str(tmp_path / "b")], tmp_path / "v.jsonl"
    )
    assert_close_records(base, got, rel=1e-5, label="gpt2 PP4 VPP2")
    _assert_close_validation(base, got, "gpt2 PP4 VPP2")
    again = [*GPT2_TIED_8, "--train-iters", "0", "--eval-interval", "1", "--eval-iters", "1"]
    ea = train(1, [*again, "--load", str(tmp_path / "a")], tmp_path / "ea.jsonl")
    eb = train(1, [*again, "--load", str(tmp_path / "b")], tmp_path / "eb.jsonl")
    _assert_close_validation(ea, eb, "tied checkpoint saved with VPP")


def test_interleaved_overlap_dp2_matches_no_overlap(tmp_path_factory, tmp_path):
    """PP=2 x 2 chunks x DP=2, distributed optimizer, small buckets: --overlap-grad-reduce /
    --overlap-param-gather (each chunk reduces during its own last backward; parameters
    gather in the next forward) give the run without overlap, and that run the PP=1 one.
    Tied exits on three chunks (copies beside the embedding and on rank 1), untied LM head."""
    ckpt = _reference(tmp_path_factory, "llama6o", LLAMA_TIED_6)
    common = [*LLAMA_TIED_6, "--load", str(ckpt), "--no-load-optim", "--finetune",
              "--train-iters", "3", "--eval-interval", "3", "--eval-iters", "1"]  # fmt: skip
    base = train(1, [*common, "--global-batch-size", "16"], tmp_path / "pp1.jsonl")
    layout = [*layout_args(1, 2, distopt=True), *VPP2, "--no-batch-p2p-comm",
              "--decoder-last-pipeline-num-layers", "4", "--global-batch-size", "16",
              "--ddp-bucket-size", "20000"]  # fmt: skip
    plain = train(4, [*common, *layout], tmp_path / "plain.jsonl")
    over = train(
        4,
        [*common, *layout, "--overlap-grad-reduce", "--overlap-param-gather"],
        tmp_path / "over.jsonl",
    )
    assert_close_records(base, plain, rel=1e-5, label="PP2 VPP2 DP2 distopt")
    assert_close_records(plain, over, rel=1e-6, label="PP2 VPP2 DP2 overlap")
    _assert_close_validation(plain, over, "PP2 VPP2 DP2 overlap")
