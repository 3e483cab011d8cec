"""SmolLM2-135M with exits (add_exits: copies of the final norm and the LM head at layers 10
and 20) exported to HF runs its exits in plain transformers (trust_remote_code): greedy
self-speculative decoding through transformers' assisted generation and lossy early exit
at one threshold give our engine's tokens on a Hamlet prompt.

    .venv/bin/pytest -m slow -q tests/slow/test_smollm2_hf_exits.py
"""

import pytest
import torch

from tests.conversion import checked, run_tool
from tests.single_process import init_single_process_group

pytestmark = pytest.mark.slow

NEW = 16


def test_smollm2_exits_in_transformers_match_our_engine(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron.early_exit import assets
    from megatron.early_exit.convert.megatron_side import (
        Stage,
        build_run,
        read_raw_args,
        resolved_args,
    )
    from megatron.early_exit.inference.api import (
        EarlyExitParams,
        GenerationRequest,
        SamplingParams,
    )
    from megatron.early_exit.inference.engine import InferenceEngine
    from megatron.early_exit.platform.distributed import destroy_distributed

    assets.fetch("smollm2-135m-gguf")
    checked(run_tool("gguf_to_hf", "--asset", "smollm2-135m-gguf", "--out", tmp_path / "hf"))
    checked(run_tool("hf_to_megatron", "--hf-dir", tmp_path / "hf", "--out", tmp_path / "ours"))
    checked(run_tool("add_exits", "--load", tmp_path / "ours", "--save", tmp_path / "exits",
                     "--exit-layer-nums", "10", "20", "--use-exit-norm",
                     "--untie-exit-output-weights"))  # fmt: skip
    checked(run_tool("megatron_to_hf", "--load", tmp_path / "exits", "--out", tmp_path / "ee"))

    tok = AutoTokenizer.from_pretrained(tmp_path / "ee")
    prompt = tok("To be, or not to be, that is the question:", add_special_tokens=False).input_ids
    init_single_process_group()
    try:
        root = str(tmp_path / "exits")
        flags = resolved_args(*read_raw_args(root))
        stage = Stage(build_run(flags))
        stage.load(root)
        engine = InferenceEngine(stage.model, vocab_size=int(flags["vocab_size"]),
                                 max_sequence_length=256)  # fmt: skip

        def ours(**ee):
            req = GenerationRequest(
                prompt, SamplingParams(NEW, ignore_eos=True), EarlyExitParams(**ee)
            )
            return engine.generate([req])[0]

        full = ours(mode="none")
        lossy = ours(mode="early_exit", threshold=0.5, method="kv_recompute")
    finally:
        destroy_distributed()

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ee", trust_remote_code=True).eval()
    x = torch.tensor([prompt])
    spec = model.generate(
        x, assistant_model=model.early_exit_assistant(10), do_sample=False,
        max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    assert spec[0, len(prompt) :].tolist() == full.token_ids
    tokens, layers = model.generate_early_exit(x, NEW, 0.5)
    assert tokens[0].tolist() == lossy.token_ids
    assert layers == lossy.exit_layers
