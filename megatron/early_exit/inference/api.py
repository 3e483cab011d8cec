"""Public API of the early-exit inference engine (typed requests, results, validation).

Everything a front end (CLI, REST server) needs to talk to the engine lives here and
imports nothing heavy: build `GenerationRequest`s, call `validate_request(...)` early
to turn bad input into an `InferenceError` (a ValueError with a message naming the
field), then hand the requests to `InferenceEngine.generate` (engine.py), which is a
*collective*: every rank of the model-parallel group calls it with the same requests
(the server broadcasts them from rank 0) and every rank gets the same results.

Modes (`EarlyExitParams.mode`):
- "none": full model, KV cache, no exit heads evaluated.
- "early_exit": lossy early exit. A token exits at the first enabled exit whose
  confidence >= threshold (threshold 1.0: never exit, exactly the full model; 0: the
  first enabled exit always fires). `method` keeps the KV cache exact:
  "kv_recompute" (any PP) or "pipeline" (PP > 1); None picks "pipeline" when PP > 1,
  else "kv_recompute". Both are batched (per-sequence exit decisions).
- "self_speculative": lossless. The exit at `draft_exit_layer` drafts up to
  `draft_length` tokens, the full model verifies them in one pass; output equals the full
  model's (greedy) or follows its distribution exactly (sampling). Any TP/PP (PP > 1 runs
  stage by stage, not pipelined); a batch is decoded one sequence after another.
  `draft_vocab_size` N restricts the draft to the N most frequent tokens (cheaper exit
  projection; drafts outside them are impossible, the output stays exact).

Confidence metrics, all mapped to [0, 1] (higher = more confident), computed on the exit's
softmax at the sampling temperature 1 (raw exit logits):
- "max_prob": p_top1.
- "margin": p_top1 - p_top2.
- "entropy": 1 - H(p) / log(V).
- "learned": sigmoid of the exit's confidence head (checkpoints trained with
  --exit-confidence-head), an estimate that the exit's top-1 equals the full model's.
  It is computed from the exit's hidden state *before* the vocabulary projection, which
  then runs only for tokens where it fires (over the full vocabulary, so the token is
  exactly the exit's argmax); threshold 0: every token exits at the first enabled exit;
  1.0: never (the full model). In self_speculative mode a draft it scores below
  `draft_threshold` is not made (other metrics draft it, then stop).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal, NamedTuple, Protocol

from megatron.early_exit.errors import InferenceError

Mode = Literal["none", "early_exit", "self_speculative"]
Method = Literal["kv_recompute", "pipeline"]
Metric = Literal["max_prob", "margin", "entropy", "learned"]
FinishReason = Literal["length", "eos", "stop", "cancelled"]

MAX_TOP_LOGPROBS = 20  # alternatives per position (as vLLM's default bound)
MODES = ("none", "early_exit", "self_speculative")
METHODS = ("kv_recompute", "pipeline")
METRICS = ("max_prob", "margin", "entropy", "learned")


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int = 0  # sampling is a function of (seed, step): identical at any TP/PP/batch
    stop_sequences: list[str] = field(default_factory=list)  # needs a tokenizer (text)
    stop_token_ids: list[list[int]] = field(default_factory=list)  # token-level stops
    eos_token_id: int | None = None  # None: the engine uses the tokenizer's EOS if any
    ignore_eos: bool = False
    logprobs: bool = False  # log p(chosen token) under the distribution it was drawn from
    # Scoring (one full-model forward over prompt + completion after decoding; no early exit,
    # temperature 1): the k most likely tokens at each generated position, and, when not None,
    # every prompt token's log-probability with its k alternatives (the first token: None).
    top_logprobs: int = 0
    prompt_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class EarlyExitParams:
    mode: Mode = "none"
    method: Method | None = None  # None: "pipeline" if PP > 1, else "kv_recompute"
    metric: Metric = "max_prob"
    threshold: float = 0.8  # in [0, 1]; 1.0 never exits
    exit_layers: list[int] | None = None  # restrict exits (1-based layer numbers); None: all
    draft_exit_layer: int | None = None  # self_speculative: None = the first exit layer
    draft_length: int = 4  # self_speculative: max drafted tokens per verification
    draft_threshold: float = 0.0  # self_speculative: stop drafting below this confidence
    # self_speculative: the draft scores only the N most frequent tokens (needs the engine's
    # token counts, tools/count_tokens.py); None: the whole vocabulary. Still lossless.
    draft_vocab_size: int | None = None
    # early_exit: instead of `threshold`, per-exit thresholds calibrated for this token
    # agreement with the full model (tools/calibrate_exits.py; the checkpoint's
    # exit_calibration.json must hold `metric` at this target); the calibration's exits.
    target_agreement: float | None = None
    # set by the engine from target_agreement (layer -> threshold); not a request field
    exit_thresholds: dict[int, float] | None = None


def exit_threshold(ee: EarlyExitParams, layer: int) -> float:
    """The threshold the exit at `layer` fires at."""
    if ee.exit_thresholds is not None:
        return ee.exit_thresholds.get(layer, 2.0)
    return ee.threshold


@dataclass
class GenerationRequest:
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    early_exit: EarlyExitParams = field(default_factory=EarlyExitParams)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GenerationRequest:
        return cls(
            prompt_token_ids=list(d["prompt_token_ids"]),
            sampling=SamplingParams(**d.get("sampling", {})),
            early_exit=EarlyExitParams(**d.get("early_exit", {})),
        )


@dataclass
class GenerationStats:
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    avg_layers_used: float = 0.0  # mean over generated tokens of the exit layer (L = full)
    elapsed_s: float = 0.0  # wall time of the generate call (shared by a batch)
    tokens_per_s: float = 0.0
    # self_speculative only
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    acceptance_rate: float = 0.0
    mean_accepted_length: float = 0.0  # accepted drafts per verification pass
    verify_passes: int = 0


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens only (stop sequence included, EOS included)
    exit_layers: list[int]  # per generated token: the layer whose head chose it (L = full)
    finish_reason: FinishReason
    logprobs: list[float] | None = None
    # Scoring (SamplingParams.top_logprobs / prompt_logprobs): {token id: full-model logprob}
    top_logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    text: str | None = None  # filled by front ends that hold a tokenizer
    stats: GenerationStats = field(default_factory=GenerationStats)

    def to_dict(self) -> dict:
        return asdict(self)


class TokenEvent(NamedTuple):
    """One generated token, reported by `generate(..., on_token=...)` as soon as it is final.

    The events of request `index`, in order, are exactly its result's `token_ids` /
    `exit_layers` / per-token log-probs (EOS and stop-sequence tokens included, like the
    result; front ends trim what they do not show).
    """

    index: int  # position of the request in the `generate` call
    token_id: int
    exit_layer: int
    logprob: float


OnToken = Callable[[TokenEvent], None]


@dataclass(frozen=True)
class ModelLimits:
    """What validation needs to know about the loaded model."""

    num_layers: int
    exit_layers: tuple[int, ...]  # exits the checkpoint has
    max_sequence_length: int
    vocab_size: int
    pipeline_parallel_size: int = 1
    has_token_counts: bool = False  # draft_vocab_size needs them
    has_confidence_heads: bool = False  # metric "learned" needs them
    # (metric, target agreement) pairs the checkpoint's exit_calibration.json holds
    calibrations: tuple[tuple[str, float], ...] = ()


def _fail(msg: str) -> None:
    raise InferenceError(msg)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_request(req: GenerationRequest, limits: ModelLimits) -> None:
    """Raise InferenceError naming the first bad field."""
    s, e = req.sampling, req.early_exit
    ids = req.prompt_token_ids
    if not isinstance(ids, list) or not ids:
        _fail("prompt is empty: give at least one token")
    for t in ids:
        if not _is_int(t) or not 0 <= t < limits.vocab_size:
            _fail(f"prompt token {t!r} is not an id in [0, {limits.vocab_size})")
    if not _is_int(s.max_new_tokens) or s.max_new_tokens < 0:
        _fail(f"max_new_tokens must be an integer >= 0, got {s.max_new_tokens!r}")
    if len(ids) + s.max_new_tokens > limits.max_sequence_length:
        _fail(
            f"prompt ({len(ids)} tokens) + max_new_tokens ({s.max_new_tokens}) exceeds the "
            f"model's context of {limits.max_sequence_length} tokens"
        )
    if not isinstance(s.temperature, (int, float)) or not (
        math.isfinite(s.temperature) and s.temperature >= 0
    ):
        _fail(f"temperature must be a finite number >= 0, got {s.temperature!r}")
    if not _is_int(s.top_k) or s.top_k < 0:
        _fail(f"top_k must be an integer >= 0, got {s.top_k!r}")
    if not isinstance(s.top_p, (int, float)) or not 0 < s.top_p <= 1:
        _fail(f"top_p must be in (0, 1], got {s.top_p!r}")
    if not _is_int(s.seed) or s.seed < 0:
        _fail(f"seed must be an integer >= 0, got {s.seed!r}")
    for seq in s.stop_sequences:
        if not isinstance(seq, str) or not seq:
            _fail(f"stop sequences must be non-empty strings, got {seq!r}")
    for seq in s.stop_token_ids:
        if not isinstance(seq, list) or not seq or not all(_is_int(t) for t in seq):
            _fail(f"stop_token_ids entries must be non-empty lists of ints, got {seq!r}")
    if not _is_int(s.top_logprobs) or not 0 <= s.top_logprobs <= MAX_TOP_LOGPROBS:
        _fail(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {s.top_logprobs!r}")
    k = s.prompt_logprobs
    if k is not None and (not _is_int(k) or not 0 <= k <= MAX_TOP_LOGPROBS):
        _fail(f"prompt_logprobs must be null or an integer in [0, {MAX_TOP_LOGPROBS}], got {k!r}")
    if s.eos_token_id is not None and not _is_int(s.eos_token_id):
        _fail(f"eos_token_id must be an integer, got {s.eos_token_id!r}")

    if e.mode not in MODES:
        _fail(f"early_exit.mode must be one of {MODES}, got {e.mode!r}")
    if e.method is not None and e.method not in METHODS:
        _fail(f"early_exit.method must be one of {METHODS} or null, got {e.method!r}")
    if e.metric not in METRICS:
        _fail(f"early_exit.metric must be one of {METRICS}, got {e.metric!r}")
    if e.metric == "learned" and not limits.has_confidence_heads:
        _fail(
            "early_exit.metric 'learned' needs exit confidence heads, but this checkpoint has "
            "none: add them with tools/checkpoint/add_exits.py --exit-confidence-head and train "
            "them (--tune-exit --exit-confidence-head)"
        )
    if not isinstance(e.threshold, (int, float)) or not 0.0 <= e.threshold <= 1.0:
        _fail(f"early_exit.threshold must be in [0, 1], got {e.threshold!r}")
    if not isinstance(e.draft_threshold, (int, float)) or not 0.0 <= e.draft_threshold <= 1.0:
        _fail(f"early_exit.draft_threshold must be in [0, 1], got {e.draft_threshold!r}")
    t = e.target_agreement
    if t is not None:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= 1.0:
            _fail(f"early_exit.target_agreement must be a number in (0, 1] or null, got {t!r}")
        if e.mode != "early_exit":
            _fail(f"early_exit.target_agreement needs mode 'early_exit', got mode {e.mode!r}")
        if e.exit_layers is not None:
            _fail("early_exit.target_agreement picks its own exits: do not give exit_layers")
        if not any(m == e.metric and abs(x - t) < 1e-9 for m, x in limits.calibrations):
            have = ", ".join(f"{m} {x:g}" for m, x in limits.calibrations) or "none"
            _fail(
                f"early_exit.target_agreement {t:g}: the checkpoint has no calibration for "
                f"metric {e.metric!r} at this target (calibrated: {have}; run "
                "tools/calibrate_exits.py)"
            )
    if e.exit_thresholds is not None:
        _fail("early_exit.exit_thresholds is set by the engine, not by requests")
    if e.exit_layers is not None:
        for n in e.exit_layers:
            if not _is_int(n) or n not in limits.exit_layers:
                _fail(
                    f"exit layer {n!r} does not exist; the model has exits at layers "
                    f"{list(limits.exit_layers)}"
                )
    if e.mode != "none" and not limits.exit_layers:
        _fail(f"mode {e.mode!r} needs exit heads but the model has none")
    if e.mode == "early_exit" and e.method == "pipeline" and limits.pipeline_parallel_size < 2:
        _fail("early_exit.method 'pipeline' needs pipeline parallelism (PP > 1)")
    if e.mode == "self_speculative":
        if not _is_int(e.draft_length) or e.draft_length < 1:
            _fail(f"early_exit.draft_length must be an integer >= 1, got {e.draft_length!r}")
        if e.draft_exit_layer is not None and e.draft_exit_layer not in limits.exit_layers:
            _fail(
                f"draft exit layer {e.draft_exit_layer!r} does not exist; the model has exits "
                f"at layers {list(limits.exit_layers)}"
            )
        n = e.draft_vocab_size
        if n is not None:
            if not _is_int(n) or not 1 <= n <= limits.vocab_size:
                _fail(
                    f"early_exit.draft_vocab_size must be an integer in [1, {limits.vocab_size}]"
                    f" or null, got {n!r}"
                )
            if not limits.has_token_counts:
                _fail(
                    "early_exit.draft_vocab_size needs token frequencies, but the model has "
                    "none: run tools/count_tokens.py --data-path PREFIX --save CKPT"
                )


class EngineProtocol(Protocol):
    """What `megatron.early_exit.inference.engine.InferenceEngine` offers front ends.

    Build one per process with `engine.load_engine(run_config)` (after `--load` parsing;
    initialises torch.distributed + model parallelism, loads the checkpoint) or
    `InferenceEngine(model, run_config, tokenizer)` on an already built stage model.
    """

    limits: ModelLimits

    def generate(
        self,
        requests: list[GenerationRequest],
        on_token: OnToken | None = None,
        cancelled: Callable[[int], bool] | None = None,
        cancel_sync: bool = False,
    ) -> list[GenerationResult]:
        """Collective over the model-parallel group; same requests on every rank.

        Validates first (raises InferenceError on every rank, before any communication).
        Requests are decoded together as one batch (mixed prompt lengths allowed).
        `on_token` (rank 0 only; other ranks pass None) gets a `TokenEvent` per generated
        token as soon as rank 0 knows it; an exception it raises disables it (logged) and
        never breaks the collective. `cancelled(i)` True stops request i after its current
        decode step (finish_reason "cancelled"); asked per rank, or with `cancel_sync`
        (same on every rank) on rank 0 only, its answer broadcast per step.
        """
        ...

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: list[int]) -> str: ...


def effective_params(
    e: EarlyExitParams, limits: ModelLimits, calibration: dict | None = None
) -> EarlyExitParams:
    """The early-exit settings a request really decodes with (defaults filled in; with
    `target_agreement`, the per-exit thresholds of the checkpoint's `calibration`); requests
    with equal effective settings can share a batch."""
    exits = list(limits.exit_layers) if e.exit_layers is None else sorted(e.exit_layers)
    mode = e.mode
    per_exit = None
    if mode == "early_exit" and e.target_agreement is not None:
        from megatron.early_exit.inference.calibration import lookup

        # validated: the calibration holds (metric, target); exits that never fire drop
        per_exit = lookup(calibration, e.metric, e.target_agreement) or {}
        exits = sorted(k for k, t in per_exit.items() if t <= 1.0 and k in exits)
        if not exits:
            mode = "none"
    elif mode == "early_exit" and (e.threshold >= 1.0 or not exits):
        mode = "none"  # 1.0 never exits: exactly the full model
    method = e.method
    if mode == "early_exit" and method is None:
        method = "pipeline" if limits.pipeline_parallel_size > 1 else "kv_recompute"
    if mode != "early_exit":
        method = None
    return EarlyExitParams(
        mode=mode,
        method=method,
        metric=e.metric,
        threshold=e.threshold,
        exit_layers=exits if mode != "none" else [],
        draft_exit_layer=e.draft_exit_layer,
        draft_length=e.draft_length,
        draft_threshold=e.draft_threshold,
        draft_vocab_size=e.draft_vocab_size if mode == "self_speculative" else None,
        target_agreement=e.target_agreement if mode == "early_exit" else None,
        exit_thresholds=per_exit if mode == "early_exit" else None,
    )


def validate_batch(reqs: list[GenerationRequest], limits: ModelLimits) -> None:
    """Validate every request; requests batched together must share the early-exit mode."""
    if not reqs:
        _fail("no requests given")
    for i, r in enumerate(reqs):
        try:
            validate_request(r, limits)
        except InferenceError as err:
            raise InferenceError(f"request {i}: {err}" if len(reqs) > 1 else str(err)) from None


__all__ = [
    "EarlyExitParams",
    "EngineProtocol",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "GenerationStats",
    "InferenceError",
    "METHODS",
    "METRICS",
    "MODES",
    "Method",
    "effective_params",
    "Metric",
    "Mode",
    "ModelLimits",
    "OnToken",
    "SamplingParams",
    "TokenEvent",
    "validate_batch",
    "exit_threshold",
    "validate_request",
]
