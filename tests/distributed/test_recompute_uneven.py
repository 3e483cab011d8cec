"""Activation recomputation and uneven pipeline stages give the losses and gradient norms of
the plain PP=1 run (gloo, tiny model). The slow tier: make test runs one combined layout
(test_parity.py::test_parity_uneven_stages_with_full_recompute) and the in-process TP1PP1
gradient checks (tests/unit/test_recompute.py)."""

import pytest

from tests.distributed.launch import ENTRY, TINY, assert_close_records, layout_args, torchrun, train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# Exits at 1 and 3: with --recompute-num-layers 2 both sit inside a recomputed chunk.
UNTIED = [*TINY, "--exit-layer-nums", "1", "3", "--use-exit-norm", "--untie-exit-output-weights"]
# Tied exits at 2 and 3: with PP3 and the accounted split [1, 2, 1] they live on the middle
# stage, which then holds a copy of the word embeddings.
GPT2_TIED = [*TINY, "--exit-layer-nums", "2", "3", "--use-dynamic-exit-layer-weight"]
ITERS = ["--train-iters", "2", "--no-load-optim", "--finetune"]
FULL_UNIFORM = ["--recompute-granularity", "full", "--recompute-method", "uniform",
                "--recompute-num-layers", "2"]  # fmt: skip


def _reference(tmp_path_factory, name, model_args):
    ckpt = tmp_path_factory.mktemp(name) / "ckpt"
    torchrun(1, ENTRY, [*model_args, "--train-iters", "0", "--save", str(ckpt)])
    base = train(1, [*model_args, *ITERS, "--load", str(ckpt)], ckpt.parent / "base.jsonl")
    assert len(base) == 2 and all(r["lm_loss"] > 0 for r in base)
    return ckpt, base


@pytest.fixture(scope="module")
def untied_ref(tmp_path_factory):
    return _reference(tmp_path_factory, "untied", UNTIED)


def _check(ref, model_args, nproc, tp, pp, extra, tmp_path, label):
    ckpt, base = ref
    got = train(
        nproc,
        [*model_args, *ITERS, "--load", str(ckpt), *layout_args(tp, pp), *extra],
        tmp_path / "m.jsonl",
    )
    assert_close_records(base, got, rel=1e-5, label=label)


def test_full_recompute_pp2_matches_pp1(untied_ref, tmp_path):
    _check(untied_ref, UNTIED, 2, 1, 2, FULL_UNIFORM, tmp_path, "PP2 full recompute")


def test_uneven_pp2_matches_pp1(untied_ref, tmp_path):
    # Stage 0 holds layer 1 (exit 1), stage 1 layers 2-4 (exit 3, LM head).
    _check(
        untied_ref,
        UNTIED,
        2,
        1,
        2,
        ["--decoder-first-pipeline-num-layers", "1", "--recompute-granularity", "selective"],
        tmp_path,
        "uneven PP2",
    )


@pytest.mark.parametrize(
    "nproc,tp,pp,extra",
    [
        (4, 2, 2, ["--decoder-last-pipeline-num-layers", "1", *FULL_UNIFORM]),
        (
            4,
            1,
            4,
            [
                "--recompute-granularity",
                "full",
                "--recompute-method",
                "block",
                "--recompute-num-layers",
                "1",
            ],
        ),  # fmt: skip
        (4, 2, 2, ["--recompute-granularity", "selective", "--sequence-parallel"]),
    ],
    ids=["tp2pp2-uneven-full", "pp4-block", "tp2pp2-sp-selective"],
)
def test_bigger_layouts_match_pp1(untied_ref, tmp_path, nproc, tp, pp, extra):
    _check(untied_ref, UNTIED, nproc, tp, pp, extra, tmp_path, f"TP{tp}PP{pp} {extra}")


def test_tied_exits_on_an_accounted_middle_stage_match_pp1(tmp_path_factory, tmp_path):
    ref = _reference(tmp_path_factory, "tied", GPT2_TIED)
    extra = ["--account-for-embedding-in-pipeline-split", "--account-for-loss-in-pipeline-split",
             *FULL_UNIFORM[:5], "1"]  # fmt: skip
    _check(ref, GPT2_TIED, 3, 1, 3, extra, tmp_path, "PP3 accounted split, tied exits")
