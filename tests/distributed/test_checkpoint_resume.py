"""Resume continues exactly; checkpoints load into other layouts; interrupted saves are safe."""

import os

import pytest

from tests.distributed.launch import (
    ENTRY,
    ROOT,
    TINY,
    assert_close_records,
    layout_args,
    read_metrics,
    torchrun,
    train,
)

pytestmark = pytest.mark.distributed
FAULT_WORKER = ROOT / "tests" / "distributed" / "worker_fault.py"  # kills the save of iteration N
MODEL = [*TINY, "--exit-layer-nums", "1", "3", "--use-exit-norm", "--lr-warmup-iters", "2"]


def test_resume_is_exact_and_reshards(tmp_path):
    pp2 = layout_args(1, 2)
    straight = train(2, [*MODEL, *pp2, "--train-iters", "6"], tmp_path / "straight.jsonl")
    ckpt = tmp_path / "ckpt"
    first = train(
        2,
        [*MODEL, *pp2, "--train-iters", "6", "--exit-interval", "3", "--save", str(ckpt)],
        tmp_path / "first.jsonl",
    )
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    resumed = train(
        2, [*MODEL, *pp2, "--train-iters", "6", "--load", str(ckpt)], tmp_path / "resumed.jsonl"
    )
    assert [r["iteration"] for r in resumed] == [4, 5, 6]
    # Same layout: bit-identical losses, grad norms and learning rates.
    for a, b in zip(straight, first + resumed):
        for key in ("lm_loss", "exit_losses", "grad_norm", "lr"):
            assert a[key] == b[key], f"iteration {a['iteration']}: {key} {a[key]} != {b[key]}"
    # Another layout (TP2, PP1): same trajectory up to float reassociation.
    other = train(
        2,
        [*MODEL, *layout_args(2, 1), "--train-iters", "6", "--load", str(ckpt)],
        tmp_path / "tp2.jsonl",
    )
    assert_close_records(straight[3:], other, rel=1e-5, label="resume into TP2")


def test_resume_distributed_optimizer_into_other_layout(tmp_path):
    dp2 = [*layout_args(1, 1, distopt=True)]
    straight = train(2, [*MODEL, *dp2, "--train-iters", "4"], tmp_path / "straight.jsonl")
    ckpt = tmp_path / "ckpt"
    train(
        2,
        [*MODEL, *dp2, "--train-iters", "4", "--exit-interval", "2", "--save", str(ckpt)],
        tmp_path / "a.jsonl",
    )
    # DP2 -> PP2 (DP1): Adam moments are resharded through the fully reshardable format.
    resumed = train(
        2,
        [*MODEL, *layout_args(1, 2, distopt=True), "--train-iters", "4", "--load", str(ckpt)],
        tmp_path / "b.jsonl",
    )
    assert_close_records(straight[2:], resumed, rel=1e-5, label="distopt DP2 -> PP2")


def test_killed_save_leaves_previous_checkpoint_loadable(tmp_path):
    ckpt = tmp_path / "ckpt"
    args = [*MODEL, *layout_args(1, 2), "--train-iters", "4", "--save", str(ckpt)]
    proc = torchrun(
        2,
        FAULT_WORKER,
        ["4", *args, "--save-interval", "2", "--metrics-file", str(tmp_path / "m.jsonl")],
        check=False,
    )
    assert proc.returncode != 0, "the fault injection should have killed the save"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (ckpt / "iter_0000002").is_dir()
    assert not (ckpt / "iter_0000004").exists()
    assert (ckpt / "iter_0000004.tmp").is_dir()  # the half-written save, never pointed to
    reference = read_metrics(tmp_path / "m.jsonl")

    resumed = train(
        2, [*MODEL, *layout_args(1, 2), "--train-iters", "4", "--load", str(ckpt), "--save",
            str(ckpt)], tmp_path / "resumed.jsonl",
    )  # fmt: skip
    assert [r["iteration"] for r in resumed] == [3, 4]
    assert resumed[0]["lm_loss"] == reference[2]["lm_loss"]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert not (ckpt / "iter_0000004.tmp").exists()
    assert sorted(os.listdir(ckpt)) == [
        "iter_0000002",
        "iter_0000004",
        "latest_checkpointed_iteration.txt",
    ]


def test_load_missing_checkpoint_fails_clearly(tmp_path):
    proc = torchrun(
        1, ENTRY, [*MODEL, "--train-iters", "1", "--load", str(tmp_path / "nope")], check=False
    )
    assert proc.returncode != 0
    assert "latest_checkpointed_iteration.txt is missing" in proc.stderr + proc.stdout


@pytest.mark.slow  # make test time budget
def test_load_checkpoint_of_other_architecture_fails_clearly(tmp_path):
    ckpt = tmp_path / "ckpt"
    torchrun(1, ENTRY, [*MODEL, "--train-iters", "0", "--save", str(ckpt)])
    other = [*TINY, "--exit-layer-nums", "2", "--use-exit-mlp"]
    proc = torchrun(1, ENTRY, [*other, "--train-iters", "1", "--load", str(ckpt)], check=False)
    assert proc.returncode != 0
    out = proc.stderr + proc.stdout
    assert "does not match the model" in out and "exit_heads.2.mlp" in out
    assert "exit heads at layers [3]" in out or "exit heads at layers [1, 3]" in out
