"""Checkpoint conversion: Hugging Face <-> ours, GGUF -> Hugging Face, change of layout.

* `hf_arch`: HF config.json <-> our model flags (Llama 1-3.x, Mistral, Qwen2, Qwen3, GPT-2).
* `weights`: full (unsharded) tensors, HF names <-> our names (QKV grouping, SwiGLU, Conv1D).
* `hf_files`: reading HF weights, tokenizer files in both directions, atomic output dirs.
* `megatron_side`: build/load/save our model in-process (world of one or under torchrun),
  forward across TP/PP stages, greedy decoding without a KV cache (a test reference).
* `hf_modeling_early_exit`: copied into HF exports with exits (trust_remote_code); runs
  the exit heads with only transformers (never imported by our code).
* `gguf_file`: GGUF -> HF folder (dequantized weights, tokenizer.json from its metadata).
* `workers`: torchrun entry points (parity check, re-save at another layout).

CLIs live in tools/checkpoint/. Every user error is a `ConversionError` (exit code 2).
"""

from megatron.early_exit.convert.errors import ConversionError

__all__ = ["ConversionError"]
