"""GGUF -> HF on a tiny GGUF written here the way llama.cpp writes Llama models (Q/K rows
permuted, byte-level BPE tokenizer in the metadata); checked against the source weights
and against transformers' own GGUF loader."""

import numpy as np
import pytest
import torch

from megatron.early_exit.convert import ConversionError

pytestmark = pytest.mark.unit

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "t h", "Ġt he"]


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to attn_q / attn_k rows."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _tokens():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    return SPECIALS + alphabet + [m.replace(" ", "") for m in MERGES]


def _write_gguf(path, model, arch="llama", pre="smollm"):
    import gguf

    c = model.config
    tokens = _tokens()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_rope_dimension_count(head_dim)
    if arch == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    layer = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
    }
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        a = t.numpy().astype(np.float32)
        if name in names:
            w.add_tensor(names[name], a)
            continue
        _, _, i, *mid, suffix = name.split(".")
        kind = layer[".".join(mid)]
        if arch == "llama" and kind == "attn_q":  # llama.cpp permutes only Llama's Q/K
            a = _llama_cpp_permute(a, c.num_attention_heads)
        elif arch == "llama" and kind == "attn_k":
            a = _llama_cpp_permute(a, c.num_key_value_heads)
        w.add_tensor(f"blk.{i}.{kind}.{suffix}", np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(_tokens()), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, rope_theta=5000.0, tie_word_embeddings=True, initializer_range=0.1,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("gguf")
    _write_gguf(d / "tiny.gguf", model)
    return model, d


def test_unpermute_inverts_llama_cpp_permutation():
    from megatron.early_exit.convert.gguf_file import unpermute_rows

    w = np.random.default_rng(0).standard_normal((3 * 16, 8)).astype(np.float32)
    back = unpermute_rows(torch.from_numpy(_llama_cpp_permute(w, 3)), 3)
    assert torch.equal(back, torch.from_numpy(w))


def test_gguf_to_hf_restores_weights_and_matches_transformers_loader(tiny, tmp_path):
    import transformers

    from megatron.early_exit.convert.gguf_file import gguf_to_hf

    model, d = tiny
    out = tmp_path / "hf"
    gguf_to_hf(str(d / "tiny.gguf"), str(out))
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    src = model.state_dict()
    for name, t in ours.state_dict().items():
        assert torch.equal(t, src[name]), name  # F32 tensors: exact, Q/K un-permuted
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        d, gguf_file="tiny.gguf", dtype=torch.float32
    ).eval()
    x = torch.randint(0, len(_tokens()), (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(x).logits, ref(x).logits)
    text = "the then<|im_start|>hi 2024<|im_end|>"
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ref_tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file="tiny.gguf")
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == ref_tok(text, add_special_tokens=False).input_ids
    assert 1 in ids and 2 in ids  # special tokens stay whole
    assert tok.decode(ids) == text
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"


@pytest.mark.parametrize("arch, pre", [("qwen2", "qwen2"), ("qwen3", "qwen2")])
def test_qwen_gguf_to_hf_restores_the_source_model(tmp_path, arch, pre):
    """Qwen2 (q/k/v biases) and Qwen3 (q/k norms, head_dim 32 != 64/4) GGUF files, written
    as llama.cpp writes them (no Q/K permutation), with Qwen2's pre-tokenizer regex."""
    import transformers

    from megatron.early_exit.convert.gguf_file import gguf_to_hf

    torch.manual_seed(0)
    common = dict(
        vocab_size=len(_tokens()), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
        initializer_range=0.1,
    )  # fmt: skip
    if arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=32))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    model.eval()
    _write_gguf(tmp_path / "m.gguf", model, arch=arch, pre=pre)
    out = tmp_path / "hf"
    config = gguf_to_hf(str(tmp_path / "m.gguf"), str(out))
    assert config["model_type"] == arch
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    src = model.state_dict()
    assert ours.state_dict().keys() == src.keys()
    for name, t in ours.state_dict().items():
        assert torch.equal(t, src[name]), name
    x = torch.randint(0, len(_tokens()), (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(x).logits, model(x).logits)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "the then 2024<|im_start|>hi\n\n  there<|im_end|>"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text and 1 in ids and 2 in ids
    # Qwen2's regex keeps digits one by one and "\n\n" whole (GPT-2's would not split
    # "2024"): the split is the one we asked for.
    pieces = [p for p, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("a 2024\n\nb")]
    assert pieces == ["a", "Ġ", "2", "0", "2", "4", "ĊĊ", "b"], pieces


def test_bad_gguf_input(tmp_path):
    from megatron.early_exit.convert.gguf_file import gguf_to_hf

    with pytest.raises(ConversionError, match="does not exist"):
        gguf_to_hf(str(tmp_path / "missing.gguf"), str(tmp_path / "out"))
    (tmp_path / "junk.gguf").write_bytes(b"GGUF but not really")
    with pytest.raises(ConversionError, match="not a readable GGUF"):
        gguf_to_hf(str(tmp_path / "junk.gguf"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_gpt2_gguf_to_hf_restores_the_source_model(tmp_path):
    """GPT-2 written as llama.cpp writes it: Conv1D weights transposed, fused attn_qkv, the
    tied embedding copied as `output`; tanh GELU (ggml's gelu)."""
    import gguf
    import transformers

    from megatron.early_exit.convert.gguf_file import gguf_to_hf

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=len(_tokens()), n_embd=64, n_layer=2, n_head=4, n_positions=64,
        activation_function="gelu_new", initializer_range=0.1,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg).eval()
    tokens = _tokens()
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_feed_forward_length(256)
    w.add_head_count(4)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    top = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd",
           "transformer.ln_f": "output_norm"}  # fmt: skip
    layer = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
             "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}  # fmt: skip
    for name, t in model.state_dict().items():
        a = t.numpy().astype(np.float32)
        base, suffix = name.rsplit(".", 1)
        if name == "lm_head.weight":
            w.add_tensor("output.weight", a)
        elif base in top:
            w.add_tensor(f"{top[base]}.{suffix}", a)
        elif ".attn.bias" not in name and ".attn.masked_bias" not in name:
            _, _, i, *mid = base.split(".")
            kind = layer[".".join(mid)]
            if suffix == "weight" and not kind.endswith("norm"):
                a = a.T
            w.add_tensor(f"blk.{i}.{kind}.{suffix}", np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    config = gguf_to_hf(str(tmp_path / "g.gguf"), str(tmp_path / "hf"))
    assert config["activation_function"] == "gelu_new" and config["tie_word_embeddings"]
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    src = model.state_dict()
    for name, t in ours.state_dict().items():
        assert torch.equal(t, src[name]), name
    x = torch.randint(0, len(tokens), (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(x).logits, model(x).logits)
