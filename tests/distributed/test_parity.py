"""Same lm loss, every exit loss and grad norm in every TP/PP/DP/SP layout.

All layouts start from one reference checkpoint made by a single process, then train a
few iterations on the same mock samples (deterministic per global sample index).
"""

import pytest

from tests.distributed.launch import ENTRY, TINY, assert_close_records, layout_args, torchrun, train

pytestmark = pytest.mark.distributed

# 4 layers, exits at 1 and 3 with exit norms and untied heads (the acceptance model).
UNTIED = [*TINY, "--exit-layer-nums", "1", "3", "--use-exit-norm", "--untie-exit-output-weights"]
# Llama-style backbone with tied exit heads and an untied LM head: the middle/last stages
# hold copies of the word embeddings that must stay in sync.
LLAMA_TIED = [
    *TINY, "--exit-layer-nums", "2", "3", "--use-exit-norm", "--use-exit-mlp",
    "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--swiglu",
    "--group-query-attention", "--num-query-groups", "2",
    "--untie-embeddings-and-output-weights", "--disable-bias-linear",
]  # fmt: skip
# GPT-2 style, everything tied: exits on a middle stage share megatron's embedding group.
GPT2_TIED = [*TINY, "--exit-layer-nums", "2", "3"]
# Every head option at once: pre-exits (the stage-1 exit reads the received activation),
# exit blocks and MLPs, temperature, dynamic per-token weights, custom weights.
ALL_HEAD_OPTIONS = [
    *TINY, "--exit-layer-nums", "1", "3", "--pre-exit", "--use-exit-block", "--use-exit-mlp",
    "--use-exit-norm", "--exit-layer-temperature", "2.0", "--use-dynamic-exit-layer-weight",
    "--exit-layer-weight", "0.3", "0.7", "--untie-exit-output-weights",
]  # fmt: skip
ITERS = ["--train-iters", "2", "--no-load-optim", "--finetune"]


def _reference(tmp_path_factory, name, model_args):
    ckpt = tmp_path_factory.mktemp(name) / "ckpt"
    torchrun(1, ENTRY, [*model_args, "--train-iters", "0", "--save", str(ckpt)])
    return ckpt


@pytest.fixture(scope="module")
def untied_ref(tmp_path_factory):
    ckpt = _reference(tmp_path_factory, "untied", UNTIED)
    base = train(1, [*UNTIED, *ITERS, "--load", str(ckpt)], ckpt.parent / "tp1pp1.jsonl")
    return ckpt, base


@pytest.mark.parametrize(
    "nproc,tp,pp,sp,distopt",
    [
        (2, 2, 1, False, False),
        (2, 1, 2, False, False),
        (4, 2, 2, False, False),
        (4, 1, 2, False, False),  # TP1 PP2 DP2
        (2, 2, 1, True, False),  # TP2 + sequence parallel
        (4, 1, 2, False, True),  # PP2 DP2 + distributed optimizer
    ],
    ids=["tp2", "pp2", "tp2pp2", "pp2dp2", "tp2sp", "pp2dp2-distopt"],
)
def test_parity_untied_exits(untied_ref, tmp_path, nproc, tp, pp, sp, distopt):
    ckpt, base = untied_ref
    assert len(base) == 2 and all(r["lm_loss"] > 0 for r in base)
    got = train(
        nproc,
        [*UNTIED, *ITERS, "--load", str(ckpt), *layout_args(tp, pp, sp, distopt)],
        tmp_path / "m.jsonl",
    )
    assert_close_records(base, got, rel=1e-5, label=f"TP{tp}PP{pp}x{nproc}")


@pytest.mark.parametrize(
    "name,model_args,layouts",
    [
        ("llama", LLAMA_TIED, [(4, 1, 4), (4, 2, 2)]),
        ("gpt2", GPT2_TIED, [(4, 1, 4)]),
        pytest.param(
            "heads", ALL_HEAD_OPTIONS, [(2, 1, 2), (2, 2, 1)], marks=pytest.mark.slow
        ),  # make test time budget
    ],
)
def test_parity_across_stages(tmp_path_factory, tmp_path, name, model_args, layouts):
    """Tied exit heads on stages without the embedding (PP=4: exits on middle stages),
    and every exit-head option."""
    ckpt = _reference(tmp_path_factory, name, model_args)
    base = train(1, [*model_args, *ITERS, "--load", str(ckpt)], tmp_path / "base.jsonl")
    for nproc, tp, pp in layouts:
        got = train(
            nproc,
            [*model_args, *ITERS, "--load", str(ckpt), *layout_args(tp, pp)],
            tmp_path / f"tp{tp}pp{pp}.jsonl",
        )
        assert_close_records(base, got, rel=1e-5, label=f"{name} TP{tp}PP{pp}")


def test_validation_losses_match_across_layouts(untied_ref, tmp_path):
    """Forward-only 1F1B (evaluation) reports every exit's validation loss, in any layout."""
    ckpt, _ = untied_ref
    args = [*UNTIED, *ITERS, "--load", str(ckpt), "--eval-interval", "1", "--eval-iters", "2"]
    base = train(1, args, tmp_path / "a.jsonl")
    got = train(4, [*args, *layout_args(2, 2)], tmp_path / "b.jsonl")
    valid_a = [r for r in base if r["split"] == "valid"]
    valid_b = [r for r in got if r["split"] == "valid"]
    assert [r["iteration"] for r in valid_a] == [0, 1, 2]
    assert set(valid_a[0]["exit_losses"]) == {"1", "3"}
    for a, b in zip(valid_a, valid_b):
        assert abs(a["lm_loss"] - b["lm_loss"]) <= 1e-5 * a["lm_loss"]
        for k, v in a["exit_losses"].items():
            assert abs(v - b["exit_losses"][k]) <= 1e-5 * v


def test_parity_uneven_stages_with_full_recompute(untied_ref, tmp_path):
    """Uneven PP2 (stage 0: layer 1 and exit 1; stage 1: layers 2-4, exit 3 inside a
    recomputed chunk, LM head) with full recomputation equals the plain PP1 run.
    More layouts: tests/distributed/test_recompute_uneven.py (slow)."""
    ckpt, base = untied_ref
    extra = ["--decoder-first-pipeline-num-layers", "1", "--recompute-granularity", "full",
             "--recompute-method", "uniform", "--recompute-num-layers", "2"]  # fmt: skip
    got = train(
        2, [*UNTIED, *ITERS, "--load", str(ckpt), *layout_args(1, 2), *extra], tmp_path / "m.jsonl"
    )
    assert_close_records(base, got, rel=1e-5, label="uneven PP2 + full recompute")


def test_parity_layer_dropout_and_exit_curriculum(untied_ref, tmp_path):
    """LayerSkip training (seeded layer dropout, rotational exit curriculum): the same
    layers are skipped and the same exits trained in every layout (TP2PP2 vs one process)."""
    from megatron.early_exit.config import LayerDropoutConfig
    from megatron.early_exit.model.layer_dropout import LayerDropout

    ckpt, plain = untied_ref
    extra = ["--layer-dropout-rate", "0.6", "--layer-dropout-depth-scale", "linear",
             "--exit-loss-curriculum", "rotational"]  # fmt: skip
    drop = LayerDropout(LayerDropoutConfig(0.6, "linear"), num_layers=4, train_iters=2, seed=1234)
    assert any(drop.dropped_layers(t) for t in range(2))  # the run does skip layers
    args = [*UNTIED, *ITERS, "--load", str(ckpt), *extra]
    base = train(1, args, tmp_path / "a.jsonl")
    assert base[0]["lm_loss"] != plain[0]["lm_loss"] or base[1]["lm_loss"] != plain[1]["lm_loss"]
    got = train(4, [*args, *layout_args(2, 2)], tmp_path / "b.jsonl")
    assert_close_records(base, got, rel=1e-5, label="layer dropout TP2PP2")


@pytest.mark.slow  # make test: the tied + uneven and the distillation PP2 x VPP2 runs
def test_parity_interleaved_pp2_vpp2(untied_ref, tmp_path):
    """Interleaved schedule, PP=2 x 2 model chunks of one layer: exit 1 on rank 0's first
    chunk (with the embedding), exit 3 on rank 0's second chunk, the tied LM head on rank
    1's second chunk; 4 microbatches (warm-up, steady state, cool-down). The chunks load
    the PP=1 checkpoint. PP=4 x 2, validation and saving: tests/distributed/
    test_interleaved.py (slow)."""
    ckpt, base = untied_ref
    vpp = ["--num-layers-per-virtual-pipeline-stage", "1", "--no-batch-p2p-comm"]
    got = train(
        2, [*UNTIED, *ITERS, "--load", str(ckpt), *layout_args(1, 2), *vpp], tmp_path / "m.jsonl"
    )
    assert_close_records(base, got, rel=1e-5, label="PP2 VPP2")


# GPT-2 style (tied LM head and exits), 6 layers: with PP=2 x 2 chunks and the embedding and
# loss counted in the split, rank 0 holds layers 1 | 4-5 and rank 1 layers 2-3 | 6.
GPT2_TIED_6 = [*TINY, "--num-layers", "6", "--exit-layer-nums", "2", "4"]


def test_parity_interleaved_tied_exits_uneven(tmp_path_factory, tmp_path):
    """Interleaved PP=2 x 2 with tied exit heads and an uneven split (megatron-core's
    account-for-embedding/loss chunks): exit 4's copy of the word embeddings sits on rank 0
    beside the embedding itself, exit 2's on rank 1 beside the tied LM head, so each rank
    sums its two tied gradients before the embedding all-reduce. Loads the PP=1 checkpoint.
    Untied LM head, explicit first/last counts, PP=4 and overlap: test_interleaved.py (slow)."""
    ckpt = _reference(tmp_path_factory, "gpt2_6", GPT2_TIED_6)
    args = [*GPT2_TIED_6, *ITERS, "--load", str(ckpt)]
    base = train(1, args, tmp_path / "base.jsonl")
    vpp = ["--virtual-pipeline-model-parallel-size", "2", "--no-batch-p2p-comm",
           "--account-for-embedding-in-pipeline-split",
           "--account-for-loss-in-pipeline-split"]  # fmt: skip
    got = train(2, [*args, *layout_args(1, 2), *vpp], tmp_path / "m.jsonl")
    assert_close_records(base, got, rel=1e-5, label="PP2 VPP2 tied exits, uneven")
