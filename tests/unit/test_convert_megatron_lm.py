"""Megatron-LM / EE-LLM torch-format checkpoints import into our dist checkpoints.

Fixtures of several TP/PP splits are written from one tiny reference model (ours, random
weights) by tests/megatron_lm_writer.py; each must import to exactly the reference's
tensors and logits. Bad or partial checkpoints give one error and write nothing.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.conversion import run_tool
from tests.megatron_lm_writer import write_megatron_lm
from tests.single_process import tp1pp1_world

pytestmark = pytest.mark.unit

LLAMA = {  # GQA, SwiGLU, RMSNorm, RoPE, tied embeddings; EE-LLM exits: norm + untied output
    "num_layers": 4,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "group_query_attention": True,
    "num_query_groups": 2,
    "ffn_hidden_size": 48,
    "swiglu": True,
    "normalization": "RMSNorm",
    "position_embedding_type": "rope",
    "disable_bias_linear": True,
    "vocab_size": 96,
    "make_vocab_size_divisible_by": 8,
    "seq_length": 16,
    "max_position_embeddings": 16,
    "exit_layer_nums": [1, 3],
    "use_exit_norm": True,
    "untie_exit_output_weights": True,
}
GPT = {  # LayerNorm, learned positions, biases, untied embeddings; exit with a whole layer
    "num_layers": 4,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "ffn_hidden_size": 64,
    "normalization": "LayerNorm",
    "position_embedding_type": "learned_absolute",
    "untie_embeddings_and_output_weights": True,
    "vocab_size": 96,
    "make_vocab_size_divisible_by": 8,
    "seq_length": 16,
    "max_position_embeddings": 16,
    "exit_layer_nums": [2],
    "use_exit_norm": True,
    "use_exit_block": True,
    "untie_exit_output_weights": True,
}
TOKENS = torch.tensor([[5, 17, 3, 90, 44, 8, 61, 2]])


@pytest.fixture(scope="module")
def world():
    yield from tp1pp1_world(seed=11)


def _reference(flags):
    from megatron.early_exit.convert.megatron_side import Stage, build_run

    stage = Stage(build_run(flags))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in stage.model.named_parameters():
            noise = 0.2 * torch.randn(p.shape, generator=gen)
            p.copy_(1 + noise if "norm" in name else noise)
    return stage


def _load(out):
    from megatron.early_exit.convert.megatron_side import (
        Stage,
        build_run,
        read_raw_args,
        resolved_args,
    )

    iter_dir, raw = read_raw_args(str(out))
    stage = Stage(build_run(resolved_args(iter_dir, raw)))
    stage.load(str(out))
    return stage, raw


@pytest.mark.parametrize(
    "flags, layouts",
    [(LLAMA, [(1, 1), (2, 1), (1, 2), (2, 2)]), (GPT, [(2, 2)])],
    ids=["llama", "gpt"],
)
def test_every_split_imports_to_the_reference_model(world, tmp_path, flags, layouts):
    from megatron.early_exit.convert.megatron_lm import megatron_lm_to_megatron

    ref = _reference(flags)
    full = ref.full_weights()
    ref_logits = ref.logits(TOKENS)
    for tp, pp in layouts:
        src, out = tmp_path / f"src-tp{tp}pp{pp}", tmp_path / f"ours-tp{tp}pp{pp}"
        write_megatron_lm(src, flags, full, tp, pp)
        args = megatron_lm_to_megatron(str(src), str(out))
        assert args["exit_layer_nums"] == flags["exit_layer_nums"]
        assert args.get("num_query_groups") == flags.get("num_query_groups")
        stage, raw = _load(out)
        got = stage.full_weights()
        assert sorted(got) == sorted(full), (tp, pp)
        for name, value in full.items():
            assert torch.equal(got[name], value), (tp, pp, name)
        assert torch.equal(stage.logits(TOKENS), ref_logits), (tp, pp)


def _fixture(tmp_path, tp=2, pp=2):
    from megatron.early_exit.convert.megatron_side import Stage, build_run

    src = tmp_path / "src"
    write_megatron_lm(src, LLAMA, Stage(build_run(LLAMA)).full_weights(), tp, pp)
    return src


def _rank(src, t, p):
    return src / "iter_0000007" / f"mp_rank_{t:02d}_{p:03d}" / "model_optim_rng.pt"


def _edit(path, change):
    state = torch.load(path, weights_only=False)
    change(state)
    torch.save(state, path)


class _Hostile:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_bad_or_partial_checkpoints_are_refused_and_nothing_is_written(world, tmp_path):
    from megatron.early_exit.convert.errors import ConversionError
    from megatron.early_exit.convert.megatron_lm import megatron_lm_to_megatron

    def shrink_rank1(state):
        enc = state["model"]["language_model"]["encoder"]
        enc["layers.0.self_attention.dense.weight"] = enc["layers.0.self_attention.dense.weight"][
            :, :4
        ]

    def wrong_ffn(state):
        state["args"].ffn_hidden_size = 40

    cases = [
        ("missing rank", lambda s: _rank(s, 1, 1).unlink(), "is missing"),
        ("missing tracker", lambda s: (s / "latest_checkpointed_iteration.txt").unlink(),
         "latest_checkpointed_iteration.txt is missing"),
        ("truncated", lambda s: _rank(s, 0, 1).write_bytes(_rank(s, 0, 1).read_bytes()[:300]),
         "is not a readable checkpoint file"),
        ("ranks disagree", lambda s: _edit(_rank(s, 1, 0), shrink_rank1), "ranks disagree"),
        ("args disagree",
         lambda s: [_edit(_rank(s, t, p), wrong_ffn) for t in (0, 1) for p in (0, 1)],
         "does not match the model"),
        ("hostile pickle",
         lambda s: _edit(_rank(s, 1, 1), lambda st: st.update(rng_state=_Hostile())),
         "posix.system, which is not allowed"),
    ]  # fmt: skip
    for i, (label, damage, message) in enumerate(cases):
        src = _fixture(tmp_path / f"case{i}")
        damage(src)
        out = tmp_path / f"out{i}"
        with pytest.raises(ConversionError, match=message.replace(".", r"\.")):
            megatron_lm_to_megatron(str(src), str(out))
        assert not out.exists() and not list(tmp_path.glob(f"out{i}*")), label
    # A tokenizer folder without a tokenizer: refused after the weights were staged.
    (tmp_path / "no-tokenizer").mkdir()
    with pytest.raises(ConversionError, match="has no tokenizer.json"):
        megatron_lm_to_megatron(
            str(_fixture(tmp_path / "tok")), str(tmp_path / "out-tok"),
            hf_tokenizer=str(tmp_path / "no-tokenizer"),
        )  # fmt: skip
    assert not list(tmp_path.glob("out-tok*"))


def test_cli_gives_one_error_line_and_exit_code_2(tmp_path):
    src = tmp_path / "src"
    (src / "iter_0000003" / "mp_rank_00").mkdir(parents=True)
    (src / "latest_checkpointed_iteration.txt").write_text("3")
    torch.save({"model": _Hostile()}, src / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt")
    proc = run_tool("megatron_lm_to_ours", "--load", src, "--out", tmp_path / "out")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "system, which is not allowed" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_restricted_loader_refuses_code_and_stubs_megatron_classes(tmp_path):
    from megatron.core.enums import ModelType

    from megatron.early_exit.convert.errors import ConversionError
    from megatron.early_exit.convert.megatron_lm import Opaque, safe_load

    path = tmp_path / "x.pt"
    torch.save({"model": {}, "args": ModelType.encoder_or_decoder}, path)
    assert isinstance(safe_load(str(path))["args"], Opaque)
    torch.save({"model": {}, "x": _Hostile()}, path)
    with pytest.raises(ConversionError, match="system, which is not allowed"):
        safe_load(str(path))
