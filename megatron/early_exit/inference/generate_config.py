"""`GenerateConfig`: the generation flags of tools/generate.py, declared once (flags.flag).

The model and parallelism flags are the training ones (arguments.py); these say what to
generate and how. Everything here is checked before any process group or model exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from megatron.early_exit.errors import ConfigError
from megatron.early_exit.flags import flag
from megatron.early_exit.inference.api import (
    METHODS,
    METRICS,
    MODES,
    EarlyExitParams,
    GenerationRequest,
    SamplingParams,
)


@dataclass
class GenerateConfig:
    FLAG_GROUP: ClassVar[str] = "generation"

    prompt: list[str] = flag([], append=True, help="prompt text (repeatable)")
    prompt_ids: list[str] = flag([], append=True, help="comma-separated token ids (repeatable)")
    prompts_file: str | None = flag(None, help="one prompt per line, or JSONL with 'prompt' keys")
    add_bos: bool = flag(False, help="prepend the tokenizer's BOS token to every prompt")
    max_new_tokens: int = flag(32, help="tokens to generate per prompt at most")
    temperature: float = flag(0.0, help="sampling temperature (0: greedy)")
    top_k: int = flag(0, help="sample from the k most likely tokens (0: off)")
    top_p: float = flag(1.0, help="nucleus sampling mass (1.0: off)")
    sampling_seed: int = flag(0, help="seed of the sampling (same tokens at any TP/PP/batch)")
    stop: list[str] = flag([], append=True, help="stop sequence (repeatable)")
    ignore_eos: bool = flag(False, help="do not stop at the end-of-document token")
    eos_token_id: int | None = flag(None, help="default: the tokenizer's")
    logprobs: bool = flag(False, help="report the log-probability of each token")
    mode: str = flag("none", choices=MODES, help="none, lossy early exit, or lossless drafts")
    method: str | None = flag(
        None, choices=METHODS, help="early-exit KV handling (default: pipeline if PP > 1)"
    )
    metric: str = flag("max_prob", choices=METRICS, help="exit confidence metric")
    threshold: float = flag(
        0.8, aliases=["--early-exit-thres"], help="exit when the confidence reaches this"
    )
    target_agreement: float | None = flag(
        None,
        help="early_exit: instead of --threshold, the checkpoint's per-exit thresholds "
        "calibrated for this token agreement (tools/calibrate_exits.py)",
    )
    exit_layers: list[int] | None = flag(None, help="use only these exits (default: all)")
    draft_exit_layer: int | None = flag(
        None, help="self_speculative: the drafting exit (default: the first)"
    )
    draft_length: int = flag(4, help="self_speculative: drafts per verification at most")
    draft_threshold: float = flag(0.0, help="self_speculative: stop drafting below this confidence")
    draft_vocab_size: int | None = flag(
        None,
        help="self_speculative: draft over the N most frequent tokens only (needs the "
        "checkpoint's token_counts.npy from tools/count_tokens.py)",
    )
    batch_size: int | None = flag(None, help="prompts per batch (default: all)")
    output_json: str | None = flag(None, help="write the results here (rank 0)")

    def validate(self) -> GenerateConfig:
        """Reject bad counts before any model is built (ConfigError naming the flag)."""
        for name, value, low in (
            ("--batch-size", self.batch_size, 1),
            ("--max-new-tokens", self.max_new_tokens, 0),
            ("--top-k", self.top_k, 0),
            ("--draft-length", self.draft_length, 1),
            ("--draft-vocab-size", self.draft_vocab_size, 1),
            ("--eos-token-id", self.eos_token_id, 0),
        ):
            if value is not None and value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")
        t = self.target_agreement
        if t is not None and not 0.0 < t <= 1.0:
            raise ConfigError(f"--target-agreement must be in (0, 1], got {t}")
        if t is not None and self.mode != "early_exit":
            raise ConfigError("--target-agreement needs --mode early_exit")
        return self

    def prompt_texts(self) -> list[str]:
        """--prompt texts, then --prompts-file lines (plain text, or JSON objects with
        "prompt")."""
        texts = list(self.prompt)
        if not self.prompts_file:
            return texts
        path = self.prompts_file
        try:
            lines = Path(path).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--prompts-file {path}: cannot read: {exc}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if not line.lstrip().startswith("{"):
                texts.append(line)
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--prompts-file {path} line {n}: invalid JSON: {exc}") from None
            prompt = obj.get("prompt") if isinstance(obj, dict) else None
            if not isinstance(prompt, str):
                raise ConfigError(
                    f'--prompts-file {path} line {n}: expected a JSON object with a string "prompt"'
                )
            texts.append(prompt)
        return texts

    def prompt_token_ids(self) -> list[list[int]]:
        """--prompt-ids values: comma-separated non-negative token ids."""
        out = []
        for value in self.prompt_ids:
            try:
                ids = [int(x) for x in value.split(",") if x.strip()]
            except ValueError:
                raise ConfigError(
                    f"--prompt-ids {value!r}: expected comma-separated integer token ids"
                ) from None
            if not ids or min(ids) < 0:
                raise ConfigError(f"--prompt-ids {value!r}: expected one or more token ids >= 0")
            out.append(ids)
        return out

    def requests(self, prompts: list[list[int]]) -> list[GenerationRequest]:
        """One request per tokenized prompt, with these sampling and early-exit settings."""
        sampling = dict(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.sampling_seed,
            stop_sequences=list(self.stop),
            ignore_eos=self.ignore_eos,
            eos_token_id=self.eos_token_id,
            logprobs=self.logprobs,
        )
        ee = EarlyExitParams(
            mode=self.mode,
            method=self.method,
            metric=self.metric,
            threshold=self.threshold,
            exit_layers=self.exit_layers,
            draft_exit_layer=self.draft_exit_layer,
            draft_length=self.draft_length,
            draft_threshold=self.draft_threshold,
            draft_vocab_size=self.draft_vocab_size,
            target_agreement=self.target_agreement,
        )
        return [GenerationRequest(p, SamplingParams(**sampling), ee) for p in prompts]
