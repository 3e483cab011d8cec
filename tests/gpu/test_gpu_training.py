"""GPU tier: CUDA + NCCL, bf16/fp16, and agreement with the CPU (gloo) path.

Skipped without CUDA. One GPU is enough: NCCL cannot put two ranks on one device, so
the multi-rank layout parity is covered by the gloo tests; here the same reference
checkpoint is trained on CPU and on GPU and the losses are compared.
"""

import os

import pytest
import torch

from tests.distributed.launch import ENTRY, TINY, torchrun, train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
MODEL = [
    *TINY, "--exit-layer-nums", "1", "3", "--use-exit-norm", "--normalization", "RMSNorm",
    "--position-embedding-type", "rope", "--swiglu", "--untie-embeddings-and-output-weights",
    "--disable-bias-linear",
]  # fmt: skip
CPU = {"CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    ckpt = root / "ref"
    torchrun(1, ENTRY, [*MODEL, "--train-iters", "0", "--save", str(ckpt)], env=CPU)
    args = [*MODEL, "--train-iters", "3", "--load", str(ckpt), "--finetune"]
    cpu = train(1, args, root / "cpu.jsonl", env=CPU)
    return ckpt, args, cpu


def _max_rel(a, b, key):
    return max(abs(x[key] - y[key]) / abs(x[key]) for x, y in zip(a, b))


def test_gpu_fp32_matches_cpu(reference, tmp_path):
    _, args, cpu = reference
    gpu = train(1, args, tmp_path / "gpu.jsonl", env={"NVIDIA_TF32_OVERRIDE": "0"})
    for key in ("lm_loss", "grad_norm"):
        assert _max_rel(cpu, gpu, key) < 1e-4, (key, cpu, gpu)
    for x, y in zip(cpu, gpu):
        for layer, value in x["exit_losses"].items():
            assert abs(value - y["exit_losses"][layer]) < 1e-4 * value


@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_gpu_half_precision_close_to_fp32(reference, tmp_path, precision):
    _, args, cpu = reference
    half = train(1, [*args, precision], tmp_path / "half.jsonl")
    assert all(r["update_successful"] for r in half[1:]), half  # fp16 may skip the first
    assert _max_rel(cpu, half, "lm_loss") < 2e-2
    for x, y in zip(cpu, half):
        for layer, value in x["exit_losses"].items():
            assert abs(value - y["exit_losses"][layer]) < 2e-2 * value


def test_gpu_bf16_training_lowers_every_loss(tmp_path):
    records = train(
        1, [*MODEL, "--bf16", "--train-iters", "40", "--lr", "3e-3"], tmp_path / "m.jsonl"
    )
    first, last = records[0], records[-1]
    assert last["lm_loss"] < 0.8 * first["lm_loss"]
    for layer in first["exit_losses"]:
        assert last["exit_losses"][layer] < 0.8 * first["exit_losses"][layer]


@pytest.mark.skipif(
    os.environ.get("EE_DISABLE_ACCELERATORS") == "1", reason="accelerators disabled"
)
def test_transformer_engine_spec_when_available(reference, tmp_path):
    from megatron.early_exit.platform import accelerator_status

    status = accelerator_status()
    if not status.usable("transformer_engine"):
        pytest.skip(f"transformer-engine unusable: {status.reasons['transformer_engine']}")
    _, args, cpu = reference
    te = train(1, args, tmp_path / "te.jsonl")
    assert _max_rel(cpu, te, "lm_loss") < 1e-3
