"""Early exit in plain transformers: an export with exits loads with trust_remote_code as the
family's CausalLM plus our exit heads (modeling_early_exit.py), and decodes what our engine
decodes: lossless self-speculative decoding through transformers' own assisted generation
(the exit drafts), and lossy early exit at a threshold (same tokens, same exit layers)."""

import pytest
import torch

from tests.conversion import tiny_hf_config
from tests.single_process import gloo_world

pytestmark = pytest.mark.unit

PROMPT = [5, 17, 42, 9, 130, 77, 3, 61]
NEW = 12


@pytest.fixture(scope="module")
def world():
    yield from gloo_world()


def _export(tmp_path, kind, **exit_flags):
    """A random checkpoint of the family with exits at layers 1 and 2 -> HF folder."""
    from megatron.early_exit.convert.hf_arch import flags_from_hf
    from megatron.early_exit.convert.hf_convert import megatron_to_hf, record_args
    from megatron.early_exit.convert.megatron_side import Stage, build_run

    flags = flags_from_hf(tiny_hf_config(kind).to_dict()).flags
    flags.update(exit_layer_nums=[1, 2], init_method_std=0.1, **exit_flags)
    run = build_run(flags)
    stage = Stage(run)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in stage.model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
            if "exit_heads" in name and "output_layer" in name:
                p.mul_(8.0)  # confident exits, so that some tokens leave early
    src = tmp_path / "src"
    record_args(run, {"tokenizer_type": "NullTokenizer"}, stage.save(str(src), args=None))
    megatron_to_hf(str(src), str(tmp_path / "hf"))
    return stage, tmp_path / "hf"


def _engine(stage):
    from megatron.early_exit.inference.engine import InferenceEngine

    return InferenceEngine(stage.model, vocab_size=200, max_sequence_length=64)


def _ours(engine, **ee):
    from megatron.early_exit.inference.api import EarlyExitParams, GenerationRequest, SamplingParams

    req = GenerationRequest(PROMPT, SamplingParams(NEW, ignore_eos=True), EarlyExitParams(**ee))
    return engine.generate([req])[0]


@pytest.mark.parametrize(
    "kind, exit_flags",
    [
        ("llama", dict(use_exit_norm=True, use_exit_mlp=True, untie_exit_output_weights=True)),
        ("qwen3", dict(use_exit_norm=True)),  # tied to the word embeddings
        ("gpt2_new", dict(use_exit_norm=True, use_exit_mlp=True, exit_layer_temperature=[0.5])),
    ],
)
def test_transformers_decodes_what_our_engine_decodes(world, tmp_path, kind, exit_flags):
    from transformers import AutoModelForCausalLM

    stage, hf_dir = _export(tmp_path, kind, **exit_flags)
    assert (hf_dir / "modeling_early_exit.py").is_file()
    plain = AutoModelForCausalLM.from_pretrained(hf_dir)  # no remote code: the family model
    assert not hasattr(plain, "exit_heads")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    assert type(model).__name__.startswith("EarlyExit") and set(model.exit_heads) == {"1", "2"}
    x = torch.tensor([PROMPT])
    with torch.no_grad():
        out = model(input_ids=x, output_exit_logits=True)
        assert torch.equal(out.logits, plain.eval()(input_ids=x).logits)
    assert sorted(out.exit_logits) == [1, 2] and out.exit_logits[1].shape == (1, len(PROMPT), 200)

    engine = _engine(stage)
    full = _ours(engine, mode="none")
    # Lossless: transformers' assisted generation with the exit at layer 1 drafting.
    ours_spec = _ours(engine, mode="self_speculative", draft_exit_layer=1, draft_length=3)
    assert ours_spec.token_ids == full.token_ids
    spec = model.generate(
        x, assistant_model=model.early_exit_assistant(1), do_sample=False,
        max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    assert spec[0, len(PROMPT) :].tolist() == full.token_ids

    # Lossy: a threshold at which some tokens exit and some do not; same tokens and layers.
    confident = []
    for threshold in (0.999, 0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05):
        ours = _ours(engine, mode="early_exit", threshold=threshold, method="kv_recompute")
        confident = [n for n in ours.exit_layers if n < 4]
        if 0 < len(confident) < NEW:
            break
    assert 0 < len(confident) < NEW, ours.exit_layers
    tokens, layers = model.generate_early_exit(x, NEW, threshold)
    assert tokens[0].tolist() == ours.token_ids
    assert layers == ours.exit_layers


@pytest.mark.slow  # four tool processes
def test_ee_tuning_exits_on_an_imported_qwen3_run_in_transformers(tmp_path):
    """HF Qwen3 -> ours -> add_exits (the exit copies the final norm and the LM head) -> HF:
    the recorded flags survive EE-Tuning's tool, and in transformers the exit's logits are
    exactly the LM head applied to layer 2's hidden state."""
    import json

    from transformers import AutoModelForCausalLM

    from tests.conversion import checked, make_tiny_hf, run_tool

    hf = make_tiny_hf("qwen3", tmp_path / "hf")
    ours, exits, back = tmp_path / "ours", tmp_path / "exits", tmp_path / "export"
    checked(run_tool("hf_to_megatron", "--hf-dir", hf, "--out", ours, "--allow-no-tokenizer"))
    checked(run_tool("add_exits", "--load", ours, "--save", exits, "--exit-layer-nums", "2",
                     "--use-exit-norm", "--untie-exit-output-weights"))  # fmt: skip
    args = json.loads((exits / "iter_0000000" / "ee_args.json").read_text())
    assert args["qk_layernorm"] and args["kv_channels"] == 32 and args["exit_layer_nums"] == [2]
    checked(run_tool("megatron_to_hf", "--load", exits, "--out", back))
    model = AutoModelForCausalLM.from_pretrained(back, trust_remote_code=True).eval()
    x = torch.tensor([PROMPT])
    with torch.no_grad():
        out = model(input_ids=x, output_exit_logits=True, output_hidden_states=True)
        expected = model.lm_head(model.model.norm(out.hidden_states[2]))
    assert torch.allclose(out.exit_logits[2], expected, atol=1e-6, rtol=0)
