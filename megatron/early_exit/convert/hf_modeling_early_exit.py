"""Early-exit heads for a causal LM exported by EE-Megatron, with only transformers installed.

megatron_to_hf.py copies this file into the export as `modeling_early_exit.py` and points
config.json's `auto_map` at the class for the family, so

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

gives the family's own CausalLM (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM,
GPT2LMHeadModel) plus the exit heads of `early_exit_heads.safetensors`. Without
trust_remote_code the same folder loads as the plain family model (exits ignored).

* `model(input_ids, output_exit_logits=True).exit_logits`: {layer: logits} per exit;
* `model.generate_early_exit(input_ids, max_new_tokens, threshold)`: lossy greedy early
  exit (a token comes from the first exit whose confidence reaches the threshold), the
  same tokens as EE-Megatron's engine (its KV cache is exact, as a full recomputation);
* `model.generate(input_ids, assistant_model=model.early_exit_assistant(layer))`: lossless
  self-speculative decoding by transformers' own assisted generation, the exit drafting
  (layers 1..layer share the model's weights) and the full model verifying.

An exit head: [residual MLP] -> [norm] -> output projection (own, or the word embeddings)
-> / temperature; tensor names are EE-Megatron's (`exit_heads.<layer>.*`). This file
imports nothing of EE-Megatron.
"""

from __future__ import annotations

import copy

import torch
import transformers
from torch import nn

EXIT_HEADS_FILE = "early_exit_heads.safetensors"


def _activation(name: str):
    if name == "silu":
        return nn.functional.silu
    if name == "gelu_tanh":  # GPT-2's gelu_new (EE-Megatron's --openai-gelu)
        return lambda x: nn.functional.gelu(x, approximate="tanh")
    return nn.functional.gelu


class _MLP(nn.Module):
    def __init__(self, head: dict):
        super().__init__()
        hidden, ffn, bias = head["hidden_size"], head["ffn_hidden_size"], head["bias"]
        self.gated = head["gated"]
        self.act = _activation(head["activation"])
        self.linear_fc1 = nn.Linear(hidden, ffn * (2 if self.gated else 1), bias=bias)
        self.linear_fc2 = nn.Linear(ffn, hidden, bias=bias)

    def forward(self, x):
        h = self.linear_fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.linear_fc2(h)


class ExitHead(nn.Module):
    def __init__(self, head: dict, ee: dict, vocab_size: int, temperature: float):
        super().__init__()
        hidden = head["hidden_size"]
        self.mlp = _MLP(head) if ee.get("use_exit_mlp") else None
        self.norm = None
        if ee.get("use_exit_norm"):
            if head["normalization"] == "RMSNorm":
                self.norm = nn.RMSNorm(hidden, eps=head["eps"])
            else:
                self.norm = nn.LayerNorm(hidden, eps=head["eps"])
        self.tied = not ee.get("untie_exit_output_weights")
        self.output_layer = None if self.tied else nn.Linear(hidden, vocab_size, bias=False)
        self.temperature = temperature

    def forward(self, h: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        if self.mlp is not None:
            h = h + self.mlp(h)
        if self.norm is not None:
            h = self.norm(h)
        w = embedding_weight if self.tied else self.output_layer.weight
        logits = nn.functional.linear(h, w)
        return logits if self.temperature == 1.0 else logits / self.temperature


class _ExitAsLMHead(nn.Module):
    """An exit head in the place of a draft model's LM head."""

    def __init__(self, head: ExitHead, embedding: nn.Module):
        super().__init__()
        self.head, self.embedding = head, embedding

    def forward(self, h):
        return self.head(h, self.embedding.weight)


def _confidence(logits: torch.Tensor, metric: str) -> torch.Tensor:
    probs = torch.softmax(logits.float(), dim=-1)
    if metric == "max_prob":
        return probs.max(dim=-1).values
    if metric == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    if metric == "entropy":
        ent = -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=-1)
        return (1.0 - ent / torch.log(torch.tensor(float(logits.shape[-1])))).clamp(0.0, 1.0)
    raise ValueError(f"unknown confidence metric {metric!r}")


class EarlyExitMixin:
    """Adds the exit heads to a transformers CausalLM (see the module docstring)."""

    _keys_to_ignore_on_load_missing = [r"exit_heads\."]

    def _init_exits(self, config) -> None:
        ee = config.early_exit
        layers = list(ee["exit_layer_nums"])
        temps = list(ee.get("exit_layer_temperature") or [])
        if len(temps) == 1:
            temps = temps * len(layers)
        temps = temps or [1.0] * len(layers)
        self.exit_layer_nums = layers
        self.pre_exit = bool(ee.get("pre_exit"))
        self.exit_heads = nn.ModuleDict(
            {
                str(n): ExitHead(ee["head"], ee, config.vocab_size, float(t))
                for n, t in zip(layers, temps)
            }
        )

    # ------------------------------------------------------------------ structure
    def _decoder_layers(self) -> nn.ModuleList:
        return self.transformer.h if hasattr(self, "transformer") else self.model.layers

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        from safetensors.torch import load_file
        from transformers.utils import cached_file

        model = super().from_pretrained(path, *args, **kwargs)
        name = model.config.early_exit.get("file", EXIT_HEADS_FILE)
        tensors = load_file(cached_file(path, name))
        prefix = "exit_heads."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        model.exit_heads.to(device=device, dtype=dtype)
        model.exit_heads.load_state_dict(
            {k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True
        )
        return model

    # ------------------------------------------------------------------ forward
    def forward(self, *args, output_exit_logits: bool = False, **kwargs):
        if not output_exit_logits:
            return super().forward(*args, **kwargs)
        captured: dict[int, torch.Tensor] = {}
        hooks = []
        for n in self.exit_layer_nums:
            layer = self._decoder_layers()[n - 1]
            if self.pre_exit:  # the layer's input

                def pre(module, a, kw, n=n):
                    captured[n] = kw["hidden_states"] if "hidden_states" in kw else a[0]

                hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            else:

                def post(module, a, out, n=n):
                    captured[n] = out[0] if isinstance(out, tuple) else out

                hooks.append(layer.register_forward_hook(post))
        try:
            out = super().forward(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        emb = self.get_input_embeddings().weight
        out.exit_logits = {n: self.exit_heads[str(n)](captured[n], emb) for n in captured}
        return out

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_early_exit(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        threshold: float,
        metric: str = "max_prob",
        exit_layers: list[int] | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        """Lossy greedy early exit for one sequence [1, s]: (new tokens [1, n], the layer
        each token came from, num_layers for the full model). Every step recomputes the
        whole sequence (the full model's hidden states, as EE-Megatron's exact KV cache)."""
        if input_ids.shape[0] != 1:
            raise ValueError("generate_early_exit decodes one sequence")
        enabled = sorted(exit_layers or self.exit_layer_nums)
        full = len(self._decoder_layers())
        ids, layers = input_ids, []
        for _ in range(max_new_tokens):
            out = self(input_ids=ids, output_exit_logits=True)
            token, chosen = None, full
            for n in enabled:
                logits = out.exit_logits[n][0, -1]
                if float(_confidence(logits, metric)) >= threshold:
                    token, chosen = logits.argmax(), n
                    break
            if token is None:
                token = out.logits[0, -1].argmax()
            ids = torch.cat([ids, token.view(1, 1).to(ids.device)], dim=1)
            layers.append(chosen)
        return ids[:, input_ids.shape[1] :], layers

    def early_exit_assistant(self, layer: int | None = None):
        """A draft model for `generate(assistant_model=...)`: the layers up to the exit at
        `layer` (shared with this model, no copy) and that exit head as its LM head."""
        layer = layer or self.exit_layer_nums[0]
        if layer not in self.exit_layer_nums:
            raise ValueError(f"no exit at layer {layer}; exits: {self.exit_layer_nums}")
        depth = layer - 1 if self.pre_exit else layer
        base = _BASE_OF[type(self)]
        cfg = copy.deepcopy(self.config)
        setattr(cfg, "n_layer" if hasattr(self, "transformer") else "num_hidden_layers", depth)
        cfg.auto_map = None
        with torch.device("meta"):  # every module is replaced by this model's below
            draft = base(cfg)
        if hasattr(self, "transformer"):
            t, d = self.transformer, draft.transformer
            d.wte, d.wpe, d.drop = t.wte, t.wpe, t.drop
            d.h = nn.ModuleList(t.h[:depth])
            d.ln_f = nn.Identity()
        else:
            m, d = self.model, draft.model
            d.embed_tokens, d.rotary_emb = m.embed_tokens, m.rotary_emb
            d.layers = nn.ModuleList(m.layers[:depth])
            d.norm = nn.Identity()
        draft.lm_head = _ExitAsLMHead(self.exit_heads[str(layer)], self.get_input_embeddings())
        draft.generation_config = copy.deepcopy(self.generation_config)
        return draft.eval()


_BASE_OF: dict[type, type] = {}


def _early_exit_class(base_name: str):
    base = getattr(transformers, base_name, None)
    if base is None:  # an older transformers without this family
        return None

    def __init__(self, config):
        base.__init__(self, config)
        self._init_exits(config)

    cls = type(f"EarlyExit{base_name}", (EarlyExitMixin, base), {"__init__": __init__})
    _BASE_OF[cls] = base
    return cls


EarlyExitLlamaForCausalLM = _early_exit_class("LlamaForCausalLM")
EarlyExitQwen2ForCausalLM = _early_exit_class("Qwen2ForCausalLM")
EarlyExitQwen3ForCausalLM = _early_exit_class("Qwen3ForCausalLM")
EarlyExitGPT2LMHeadModel = _early_exit_class("GPT2LMHeadModel")
