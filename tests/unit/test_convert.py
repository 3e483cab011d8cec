"""HF <-> ours conversion on tiny random models, in one process (gloo world of one):
logits parity with transformers, greedy tokens, bit-exact round trip (exit heads and
vocabulary padding included). The CLIs and the 4-process TP2PP2 parity run in
tests/distributed/test_convert.py."""

import json
import os

import pytest
import torch

from tests.conversion import load_stage, make_tiny_hf
from tests.single_process import gloo_world

pytestmark = pytest.mark.unit

TOL = 1e-5


@pytest.fixture(scope="module")
def world():
    yield from gloo_world()


def _parity(root, hf_dir, generate=6):
    from megatron.early_exit.convert.workers import hf_parity

    stage, flags = load_stage(root)
    ids = torch.randint(0, 200, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    return hf_parity(stage, str(hf_dir), ids, int(flags["vocab_size"]), generate)


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "gpt2"])
def test_hf_to_megatron_logits_and_greedy_match_transformers(world, tmp_path, kind):
    from megatron.early_exit.convert.hf_convert import hf_to_megatron

    hf = make_tiny_hf(kind, tmp_path / "hf")
    ckpt = tmp_path / "ours"
    args = hf_to_megatron(hf, str(ckpt), allow_no_tokenizer=True)
    assert args["vocab_size"] == 200 and args["tokenizer_type"] == "NullTokenizer"
    assert json.loads((ckpt / "iter_0000000" / "ee_args.json").read_text()) == args
    r = _parity(ckpt, hf)
    assert r["padded_vocab_size"] == 256  # padding rows exist but do not touch real logits
    assert r["max_abs_logit"] > 1.0, "logits too small for the tolerance to mean anything"
    assert r["max_abs_logit_diff"] <= TOL, r
    assert r["greedy_equal"], (r["ours_greedy"], r["hf_greedy"])


def test_round_trip_is_exact_with_exit_heads_and_padding(world, tmp_path):
    """A randomly initialised checkpoint (random vocab padding rows; untied exit heads with
    MLP + norm) -> HF folder -> ours: every tensor bitwise equal; the HF export loads with
    AutoModelForCausalLM and generates our greedy tokens."""
    from safetensors import safe_open

    from megatron.early_exit.convert.hf_convert import hf_to_megatron, megatron_to_hf, record_args
    from megatron.early_exit.convert.megatron_side import Stage, build_run

    flags = dict(
        num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32,
        normalization="RMSNorm", position_embedding_type="rope", swiglu=True,
        group_query_attention=True, num_query_groups=2, untie_embeddings_and_output_weights=True,
        disable_bias_linear=True, exit_layer_nums=[1, 3], use_exit_norm=True, use_exit_mlp=True,
        untie_exit_output_weights=True, vocab_size=200, init_method_std=0.1,
    )  # fmt: skip
    run = build_run(flags)
    stage = Stage(run)
    with torch.no_grad():  # norms at 1 would hide a swapped norm
        for name, p in stage.model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    src = tmp_path / "src"
    record_args(run, {"tokenizer_type": "NullTokenizer"}, stage.save(str(src), args=None))

    hf = tmp_path / "hf"
    config = megatron_to_hf(str(src), str(hf))
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["early_exit"]["exit_layer_nums"] == [1, 3]
    with safe_open(str(hf / "early_exit_heads.safetensors"), "pt") as f:
        heads = set(f.keys())
    assert {"exit_heads.1.mlp.linear_fc1.weight", "exit_heads.3.norm.weight"} <= heads
    assert (hf / "megatron_vocab_padding.safetensors").is_file()

    back = tmp_path / "back"
    hf_to_megatron(str(hf), str(back), allow_no_tokenizer=True)
    a, b = load_stage(src)[0].full_weights(), load_stage(back)[0].full_weights()
    assert a.keys() == b.keys() and any(k.startswith("exit_heads.") for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []

    r = _parity(src, hf, generate=8)
    assert r["max_abs_logit_diff"] <= TOL, r
    assert r["greedy_equal"], (r["ours_greedy"], r["hf_greedy"])


def test_existing_output_is_refused_and_failures_leave_nothing(world, tmp_path):
    from megatron.early_exit.convert import ConversionError
    from megatron.early_exit.convert.hf_convert import hf_to_megatron

    hf = make_tiny_hf("llama", tmp_path / "hf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="exists and is not empty"):
        hf_to_megatron(hf, str(out), allow_no_tokenizer=True)
    assert os.listdir(out) == ["keep.txt"]
    with pytest.raises(ConversionError, match="no tokenizer"):  # fails after the model save
        hf_to_megatron(hf, str(tmp_path / "new"))
    assert sorted(os.listdir(tmp_path)) == ["hf", "out"]  # no partial checkpoint left
