"""Bad conversion input: a clear ConversionError / exit code 2, and no output left."""

import json
import shutil

import pytest
import torch

from megatron.early_exit.convert import ConversionError
from tests.conversion import checked, make_tiny_hf, run_tool

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_hf("llama", tmp_path_factory.mktemp("hf") / "llama")


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    path = dst / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": "mistral_next"}, "unsupported model_type 'mistral_next'"),
        ({"num_local_experts": 8}, "mixture-of-experts"),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}},
            "RoPE scaling 'llama3' with low_freq_factor=2.0 is not supported: megatron-core",
        ),
        (
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 4096,
                }
            },
            "original_max_position_embeddings=4096",
        ),  # fmt: skip
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn'"),
        (
            {"model_type": "mistral", "sliding_window": 32, "max_position_embeddings": 64},
            "sliding_window 32 < max_position_embeddings 64",
        ),
        (
            {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16},
            "sliding_window 16 < max_position_embeddings",
        ),
        ({"model_type": "qwen3", "attention_bias": True}, "qwen3 with attention_bias=True"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"attention_bias": True}, "biases on every linear layer or on none"),
    ],
)
def test_unsupported_architectures_are_refused(changes, message):
    from megatron.early_exit.convert.hf_arch import flags_from_hf

    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 10}  # fmt: skip
    with pytest.raises(ConversionError, match=message):
        flags_from_hf({**base, **changes})


def test_gpt2_variants_that_compute_something_else_are_refused():
    from megatron.early_exit.convert.hf_arch import flags_from_hf

    base = {"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2, "n_positions": 8,
            "vocab_size": 10}  # fmt: skip
    assert flags_from_hf({**base, "activation_function": "gelu_new"}).flags["openai_gelu"]
    with pytest.raises(ConversionError, match="activation_function 'relu' is not supported"):
        flags_from_hf({**base, "activation_function": "relu"})
    with pytest.raises(ConversionError, match="attention-scaling variants"):
        flags_from_hf({**base, "scale_attn_by_inverse_layer_idx": True})


def test_sliding_window_capped_to_the_window_is_accepted():
    from megatron.early_exit.convert.hf_arch import flags_from_hf

    mistral = {"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4,
               "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 10,
               "sliding_window": 32, "max_position_embeddings": 64}  # fmt: skip
    flags = flags_from_hf(mistral, max_positions=32).flags
    assert flags["max_position_embeddings"] == 32 and flags["seq_length"] == 32
    with pytest.raises(ConversionError, match="exceeds the model's 64"):
        flags_from_hf(mistral, max_positions=128)


def test_missing_and_mismatched_files(tiny_llama, tmp_path):
    from megatron.early_exit.convert.hf_arch import flags_from_hf, read_hf_config
    from megatron.early_exit.convert.hf_files import read_hf_weights
    from megatron.early_exit.convert.weights import hf_to_ours

    with pytest.raises(ConversionError, match="no config.json"):
        read_hf_config(str(tmp_path))
    with pytest.raises(ConversionError, match="has no weights"):
        read_hf_weights(str(tmp_path))
    arch = flags_from_hf(read_hf_config(tiny_llama))
    weights = read_hf_weights(tiny_llama)
    fewer = {k: v for k, v in weights.items() if ".layers.3." not in k}
    with pytest.raises(ConversionError, match="lack 'model.layers.3"):
        hf_to_ours(arch.family, arch.flags, fewer)
    more = dict(weights, **{"model.layers.9.mlp.up_proj.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match="do not fit the architecture"):
        hf_to_ours(arch.family, arch.flags, more)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConversionError, match="not a readable safetensors"):
        read_hf_weights(str(tmp_path))


def test_tp_that_does_not_divide_heads_or_groups():
    from megatron.early_exit.config import ConfigError
    from megatron.early_exit.convert.megatron_side import build_run

    flags = {"num_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
             "group_query_attention": True, "num_query_groups": 3, "vocab_size": 100}  # fmt: skip
    with pytest.raises(ConfigError, match="not divisible by --tensor-model-parallel-size 2"):
        build_run(flags, tp=2, pp=1, world_size=2)
    with pytest.raises(ConfigError, match="--num-layers 30 is not divisible"):
        build_run(flags, tp=1, pp=4, world_size=4)
    build_run(flags, tp=3, pp=2, world_size=6)  # fine


def test_cli_exits_2_with_a_message_and_writes_nothing(tiny_llama, tmp_path):
    bad = _edit_config(tiny_llama, tmp_path / "bad", model_type="falcon")
    out = tmp_path / "out"
    proc = run_tool("hf_to_megatron", "--hf-dir", bad, "--out", out)
    assert proc.returncode == 2, proc.stderr
    assert "error: unsupported model_type 'falcon'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob("out*"))
    ckpt = tmp_path / "ckpt"  # only ee_args.json matters: the layout check comes first
    (ckpt / "iter_0000000").mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("0\n")
    args = {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 10}
    (ckpt / "iter_0000000" / "ee_args.json").write_text(json.dumps(args))
    sizes = ["--target-tensor-parallel-size", "3", "--target-pipeline-parallel-size", "1"]
    proc = run_tool("change_parallelism", "--load", ckpt, "--save", tmp_path / "tp3", *sizes)
    assert proc.returncode == 2 and "not divisible by --tensor-model-parallel-size 3" in proc.stderr
    assert not (tmp_path / "tp3").exists()
    for tool in ("hf_to_megatron", "megatron_to_hf", "gguf_to_hf", "change_parallelism"):
        assert "usage:" in checked(run_tool(tool, "--help")).stdout
