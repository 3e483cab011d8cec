"""Request/response schemas of the HTTP API (pydantic v2), the single source of truth.

The server validates every body with these models (strict types, no unknown fields, finite
floats) and the published OpenAPI document is generated from the same models, so the schema
always matches what the server accepts. Semantic checks that need the model (prompt length
against the context, exit layers that exist) happen later and also answer 400.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_PROMPTS = 128
MAX_STOP_SEQUENCES = 16
MAX_PROMPT_CHARS = 200_000  # a cheap bound before tokenizing; the token bound is the context

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
# OpenAI also takes prompts as token ids (lm-evaluation-harness sends them); ids are checked
# against the vocabulary and the context by the engine's validation
TokenIds = Annotated[
    list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_PROMPT_CHARS)
]
StopSeq = Annotated[str, Field(min_length=1, max_length=1000)]
ExitLayer = Annotated[int, Field(ge=1, le=100_000)]


class EarlyExitOptions(BaseModel):
    """Early-exit extension of the completions request."""

    model_config = _STRICT

    mode: Literal["none", "early_exit", "self_speculative"] = Field(
        "early_exit",
        description="none: full model; early_exit: lossy per-token exit; "
        "self_speculative: exits draft, the full model verifies (lossless)",
    )
    metric: Literal["max_prob", "margin", "entropy", "learned"] | None = Field(
        None,
        description="confidence metric; the engine default when omitted. learned: the exit's "
        "confidence head (checkpoints with exit confidence heads), computed before the "
        "vocabulary projection, which then runs only where it fires",
    )
    threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="exit when confidence >= threshold (1.0 = never)"
    )
    target_agreement: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="mode early_exit: instead of threshold, the checkpoint's per-exit "
        "thresholds calibrated for this token agreement with the full model "
        "(tools/calibrate_exits.py; 400 when it has none for this metric and target)",
    )
    exit_layers: list[ExitLayer] | None = Field(
        None, max_length=1024, description="exits allowed to fire (default: all)"
    )
    method: Literal["auto", "kv_recompute", "pipeline"] = Field(
        "auto", description="early-exit method (auto chooses by pipeline size)"
    )
    draft_exit_layer: ExitLayer | None = Field(
        None, description="self_speculative: the drafting exit (default: the first exit)"
    )
    draft_length: int | None = Field(
        None, ge=1, le=64, description="self_speculative: max tokens drafted per step"
    )
    draft_threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="self_speculative: stop drafting below this draft confidence (adaptive "
        "draft length, capped by draft_length; with learned, a draft scored below it is "
        "not made)",
    )
    draft_vocab_size: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="self_speculative: draft over the N most frequent tokens only (cheaper "
        "draft, still lossless; needs the checkpoint's token counts)",
    )


class MegatronRequest(BaseModel):
    """PUT /api: the Megatron-LM / EE-LLM text generation request."""

    model_config = _STRICT

    prompts: list[Prompt] = Field(..., min_length=1, max_length=MAX_PROMPTS)
    tokens_to_generate: int = Field(64, ge=0, le=1_000_000)
    logprobs: bool = False
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 means greedy")
    top_k: int = Field(0, ge=0, le=1_000_000, description="0 disables top-k; 1 is greedy")
    top_p: float = Field(0.0, ge=0.0, le=1.0, description="0 disables nucleus sampling")
    add_BOS: bool = False
    stop_sequences: list[StopSeq] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    random_seed: int | None = Field(None, ge=0, le=2**63 - 1)
    use_early_exit: bool = False
    early_exit_thres: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="confidence threshold (engine default when omitted); 1.0 never exits",
    )
    exit_layers: list[ExitLayer] | None = Field(None, max_length=1024)
    early_exit_metric: Literal["max_prob", "margin", "entropy", "learned"] | None = Field(
        None,
        description="confidence metric of use_early_exit (engine default when omitted); "
        "learned needs exit confidence heads",
    )
    target_agreement: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="with use_early_exit: the checkpoint's per-exit thresholds calibrated "
        "for this token agreement and early_exit_metric (default max_prob) instead of "
        "early_exit_thres",
    )
    print_max_prob: bool = Field(
        False, description="return per-token exit layer and confidence (EE-LLM printed them)"
    )
    no_log: bool = Field(False, description="accepted for Megatron compatibility; ignored")

    @model_validator(mode="after")
    def _one_truncation(self):
        if self.top_k > 0 and self.top_p > 0.0:
            raise ValueError("cannot set both top_k and top_p")
        return self


class CompletionRequest(BaseModel):
    """POST /v1/completions: the OpenAI completions request plus `early_exit`."""

    model_config = _STRICT

    prompt: Prompt | list[Prompt] | TokenIds | list[TokenIds] = Field(
        ..., description="a prompt or a list of 1-128 prompts (text, or token ids)"
    )
    model: str | None = Field(None, max_length=256, description="informational")
    max_tokens: int = Field(16, ge=0, le=1_000_000)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="log-probability of each token and its k most likely alternatives "
        "(full model); with echo, also of the prompt tokens (the first: null)",
    )
    echo: bool = False
    stop: StopSeq | list[StopSeq] | None = Field(None)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="only 0 is supported")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="only 0 is supported")
    best_of: Literal[1] | None = None
    user: str | None = Field(None, max_length=256)
    early_exit: EarlyExitOptions | None = None

    @model_validator(mode="after")
    def _limits(self):
        if isinstance(self.prompt, list) and not 1 <= len(self.prompts()) <= MAX_PROMPTS:
            raise ValueError(f"prompt list must hold 1 to {MAX_PROMPTS} prompts")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


CompletionRequest.model_rebuild()


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str = Field(..., max_length=MAX_PROMPT_CHARS)


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | list[TextPart]
    name: str | None = Field(None, max_length=256)

    def plain(self) -> dict:
        """The message as the chat template sees it (text parts joined)."""
        content = self.content
        if not isinstance(content, str):
            content = "".join(p.text for p in content)
        out = {"role": self.role, "content": content}
        if self.name is not None:
            out["name"] = self.name
        return out


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions: the OpenAI chat request plus `early_exit`."""

    model_config = _STRICT

    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1024)
    model: str | None = Field(None, max_length=256, description="informational")
    max_tokens: int | None = Field(None, ge=0, le=1_000_000)
    max_completion_tokens: int | None = Field(None, ge=0, le=1_000_000)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=0, description="only 0 is supported")
    stop: StopSeq | list[StopSeq] | None = Field(None)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="only 0 is supported")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="only 0 is supported")
    user: str | None = Field(None, max_length=256)
    early_exit: EarlyExitOptions | None = None


# ---- responses (documentation: the server builds plain dicts of these shapes) ----


class TokenExitInfo(BaseModel):
    exit_layer: int = Field(..., description="1-based layer whose head produced the token")
    confidence: float | None = Field(None, description="value of the exit metric")


class EarlyExitStats(BaseModel):
    """Per-request decoding statistics (response extension)."""

    avg_layers_used: float = Field(..., description="mean layer of the head that chose a token")
    drafted_tokens: int = Field(..., description="self_speculative: tokens drafted")
    accepted_tokens: int = Field(..., description="self_speculative: drafts accepted")
    acceptance_rate: float = Field(..., description="self_speculative: accepted / drafted")
    verify_passes: int = Field(..., description="self_speculative: verification passes")


class MegatronResponse(BaseModel):
    text: list[str] = Field(..., description="prompt + generated text, per prompt")
    segments: list[list[str]] = Field(..., description="token strings (prompt + generated)")
    logprobs: list[list[float]] | None = Field(
        None, description="log-probability of each generated token"
    )
    exit_layers: list[list[int]] | None = Field(
        None, description="exit layer of each generated token (print_max_prob)"
    )
    max_probs: list[list[float | None]] | None = Field(
        None, description="confidence of each generated token (print_max_prob)"
    )
    tokens: list[list[int]] = Field(..., description="generated token ids")
    early_exit_stats: list[EarlyExitStats] | None = Field(
        None, description="per prompt (print_max_prob)"
    )


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None
    exit_layers: list[int] | None = Field(None, description="exit layer of each generated token")
    token_ids: list[int] | None = Field(None, description="generated token ids")
    early_exit_stats: EarlyExitStats | None = Field(
        None, description="decoding statistics (requests with early_exit)"
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded", "stopping"]
    world_size: int
    queue_depth: int
