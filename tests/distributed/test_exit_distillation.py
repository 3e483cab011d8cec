"""--exit-distillation in parallel layouts: the vocab-parallel KL gives TP=2 the same losses,
KLs and gradient norms as one process; with PP > 1 the last stage's teacher travels to the
exits' stages (pipeline/teacher.py) and PP=2 matches one process exactly when the teacher
keeps the whole vocabulary (the default), in training and in validation. Slow tier: small
--exit-distillation-top-k at TP=2 x PP=2 matches one process with the same k (and its KL
is below the full one: the documented bound), PP=4 relays through an exit-less stage, and
EE-Tuning (exits only) at TP=2 and PP=2.

With virtual pipeline stages (the interleaved schedule) the teacher follows each gradient
down the ring of virtual stages: PP=2 x 2 chunks equals one process (make test); slow: k=8,
PP=4 x 2 chunks with an exit on the last rank's first chunk, EE-Tuning with chunks."""

import pytest
import torch

from tests.distributed.launch import ENTRY, TINY, assert_close_records, torchrun, train

pytestmark = pytest.mark.distributed
# Larger init than the default: peaked, differing distributions, so the KL is far from 0.
# Tied exit heads (the default): with chunks, their embedding copies sync across ranks too.
ARCH = [*TINY, "--init-method-std", "0.2", "--exit-layer-nums", "1", "3", "--use-exit-norm",
        "--use-exit-mlp", "--exit-distillation"]  # fmt: skip
TRAIN = ["--train-iters", "3", "--lr", "1e-2", "--eval-interval", "3", "--eval-iters", "1"]
# Pipeline layouts initialise differently: every run starts from one saved model.
FROM_REF = ["--no-load-optim", "--finetune"]
TP2 = ["--tensor-model-parallel-size", "2"]
PP2 = ["--pipeline-model-parallel-size", "2"]
# PP=2 x 2 chunks of one layer: exit 1 on rank 0's first chunk, exit 3 on its second, the
# teacher made on rank 1's second chunk and relayed by rank 1's first chunk (no exit).
VPP2 = [*PP2, "--num-layers-per-virtual-pipeline-stage", "1", "--no-batch-p2p-comm"]


def assert_close_kl(a: list[dict], b: list[dict], rel: float, label: str) -> None:
    assert len(a) == len(b), label
    for ra, rb in zip(a, b):
        assert ra["exit_kl"].keys() == rb["exit_kl"].keys() == {"1", "3"}, label
        for k, x in ra["exit_kl"].items():
            y = rb["exit_kl"][k]
            assert abs(x - y) <= rel * max(x, y), f"{label} {ra['split']} {k}: {x} vs {y}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A saved initial model and one process's run from it."""
    root = tmp_path_factory.mktemp("distill")
    torchrun(1, ENTRY, [*ARCH, "--train-iters", "0", "--save", str(root / "ckpt")])
    args = [*ARCH, *TRAIN, *FROM_REF, "--load", str(root / "ckpt")]
    return args, train(1, args, root / "one.jsonl")


def test_tensor_parallel_matches_one_process(reference, tmp_path):
    args, one = reference
    tp2 = train(2, [*args, *TP2], tmp_path / "tp2.jsonl")
    assert_close_records(one, tp2, 1e-5, "TP=2")
    assert_close_kl(one, tp2, 1e-5, "TP=2")
    train_kl = [r["exit_kl"]["1"] for r in one if r["split"] == "train"]
    assert min(train_kl) > 0.1  # a real distribution gap, not a trivial ~0
    assert one[-1]["exit_kl"]["1"] < one[0]["exit_kl"]["1"]  # validation KL went down


def test_pipeline_parallel_matches_one_process(reference, tmp_path):
    """Exit 1 on stage 0 gets the whole-vocabulary teacher from stage 1 (exit 3 is local)."""
    args, one = reference
    pp2 = train(2, [*args, *PP2], tmp_path / "pp2.jsonl")
    assert_close_records(one, pp2, 1e-5, "PP=2")
    assert_close_kl(one, pp2, 1e-5, "PP=2")  # train and validation records


@pytest.mark.slow
def test_small_top_k_tp2_pp2_matches_one_process_with_the_same_k(reference, tmp_path):
    args, dense = reference
    top_k = ["--exit-distillation-top-k", "8"]
    one = train(1, [*args, *top_k], tmp_path / "one.jsonl")
    got = train(4, [*args, *top_k, *TP2, *PP2], tmp_path / "tp2pp2.jsonl")
    assert_close_records(one, got, 1e-5, "TP=2 PP=2 k=8")
    assert_close_kl(one, got, 1e-5, "TP=2 PP=2 k=8")
    # The bound: before any update (the first validation) the top-k KL <= the full KL.
    for layer, full in dense[0]["exit_kl"].items():
        assert 0 <= one[0]["exit_kl"][layer] <= full + 1e-6, layer
    assert one[-1]["exit_kl"]["1"] < one[0]["exit_kl"]["1"]  # it still trains the exit


@pytest.mark.slow
def test_pipeline_4_relays_through_a_stage_without_exits(reference, tmp_path):
    """Exits 1 and 3 live on stages 0 and 2; stage 1 only relays the teacher."""
    args, one = reference
    pp4 = train(4, [*args, "--pipeline-model-parallel-size", "4"], tmp_path / "pp4.jsonl")
    assert_close_records(one, pp4, 1e-5, "PP=4")
    assert_close_kl(one, pp4, 1e-5, "PP=4")


@pytest.mark.slow
def test_ee_tuning_tensor_and_pipeline_parallel_match_one_process(tmp_path):
    base = [*ARCH, "--train-iters", "1", "--save", str(tmp_path / "base")]
    train(1, base, tmp_path / "base.jsonl")  # a checkpoint with exits
    tune = ["--load", str(tmp_path / "base"), "--tune-exit", "--finetune", *TRAIN]
    t1 = train(1, [*ARCH, *tune], tmp_path / "t1.jsonl")
    for label, layout in (("TP=2", TP2), ("PP=2", PP2)):
        got = train(2, [*ARCH, *tune, *layout], tmp_path / f"{label}.jsonl")
        assert_close_records(t1, got, 1e-5, f"EE-Tuning {label}")
        assert_close_kl(t1, got, 1e-5, f"EE-Tuning {label}")
    assert t1[-1]["exit_kl"]["3"] < t1[0]["exit_kl"]["3"]


def test_interleaved_pipeline_matches_one_process(reference, tmp_path):
    """PP=2 x 2 chunks, whole-vocabulary teacher: the teacher travels 3 -> 2 -> 1 -> 0 through
    the virtual stages with the gradients (training) and in the drain (validation)."""
    args, one = reference
    got = train(2, [*args, *VPP2], tmp_path / "vpp.jsonl")
    assert_close_records(one, got, 1e-5, "PP=2 x VPP=2")
    assert_close_kl(one, got, 1e-5, "PP=2 x VPP=2")  # train and validation records


@pytest.mark.slow
def test_interleaved_small_top_k_matches_one_process_with_the_same_k(reference, tmp_path):
    args, _ = reference
    top_k = ["--exit-distillation-top-k", "8"]
    one = train(1, [*args, *top_k], tmp_path / "one.jsonl")
    got = train(2, [*args, *top_k, *VPP2], tmp_path / "vpp.jsonl")
    assert_close_records(one, got, 1e-5, "PP=2 x VPP=2 k=8")
    assert_close_kl(one, got, 1e-5, "PP=2 x VPP=2 k=8")


@pytest.mark.slow
def test_interleaved_pipeline_4_matches_one_process(tmp_path):
    """8 layers on PP=4 x 2 chunks of one layer, 8 microbatches: exits 2, 4 and 7 on virtual
    stages 1 (rank 1), 3 (the last rank's first chunk, reached after a trip round the ring)
    and 6 (rank 2's second chunk); ranks 0 and 1 relay on their second chunks."""
    # The later flags override ARCH's.
    arch = [*ARCH, "--num-layers", "8", "--global-batch-size", "16", "--exit-layer-nums", "2",
            "4", "7"]  # fmt: skip
    torchrun(1, ENTRY, [*arch, "--train-iters", "0", "--save", str(tmp_path / "ckpt")])
    args = [*arch, *TRAIN, *FROM_REF, "--load", str(tmp_path / "ckpt")]
    one = train(1, args, tmp_path / "one.jsonl")
    vpp = ["--pipeline-model-parallel-size", "4", "--virtual-pipeline-model-parallel-size", "2"]
    got = train(4, [*args, *vpp], tmp_path / "vpp.jsonl")
    assert_close_records(one, got, 1e-5, "PP=4 x VPP=2")
    for ra, rb in zip(one, got):
        for k, x in ra["exit_kl"].items():
            assert abs(x - rb["exit_kl"][k]) <= 1e-5 * x, f"{ra['split']} exit {k}"


@pytest.mark.slow
def test_ee_tuning_interleaved_matches_one_process(tmp_path):
    """EE-Tuning with PP=2 x 2 chunks (forward-only interleaved backbone, each chunk trains
    its exits; the teachers come down the ring after the forwards), with and without
    distillation: same exit losses, KLs and exit-head grad norms as one process, and the
    same saved exit heads."""
    from megatron.early_exit.tuning.compare import read_model_tensors

    plain = [a for a in ARCH if a != "--exit-distillation"]
    for label, arch in (("distillation", ARCH), ("cross entropy", plain)):
        base = tmp_path / label / "base"
        train(1, [*arch, "--train-iters", "1", "--save", str(base)], base.parent / "b.jsonl")
        tune = [*arch, "--load", str(base), "--tune-exit", "--finetune", *TRAIN]
        one = train(1, [*tune, "--save", str(base.parent / "one")], base.parent / "1.jsonl")
        got = train(2, [*tune, *VPP2, "--save", str(base.parent / "vpp")], base.parent / "v.jsonl")
        assert_close_records(one, got, 1e-5, f"EE-Tuning PP=2 x VPP=2, {label}")
        if arch is ARCH:
            assert_close_kl(one, got, 1e-5, f"EE-Tuning PP=2 x VPP=2, {label}")
        a = read_model_tensors(str(base.parent / "one"))
        b = read_model_tensors(str(base.parent / "vpp"))
        assert a.keys() == b.keys()
        heads = [key for key in a if "exit_heads" in key]
        assert heads, list(a)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=key)
