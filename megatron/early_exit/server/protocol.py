"""Translate validated HTTP requests into engine requests, and engine results into responses.

Runs on rank 0 only (it holds the tokenizer work); followers only ever see
`GenerationRequest`s. Nothing here touches torch.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from megatron.early_exit.inference.api import (
    EarlyExitParams,
    GenerationRequest,
    GenerationResult,
    InferenceError,
    ModelLimits,
    SamplingParams,
    validate_request,
)
from megatron.early_exit.server.schemas import (
    CompletionRequest,
    EarlyExitOptions,
    MegatronRequest,
)

# Characters one token can cover at most, as a cheap bound applied before tokenizing: a
# prompt longer than context * this cannot fit (GPT-2/SmolLM2-style BPE tokens are at most a
# few dozen characters; the real length check on token ids follows tokenizing).
CHARS_PER_TOKEN_BOUND = 64


@dataclass
class TextCodec:
    """Tokenizer access for the front end (rank 0)."""

    tokenize: Callable[[str], list[int]]
    detokenize: Callable[[list[int]], str]
    limits: ModelLimits
    bos: int | None = None
    model_name: str = "early-exit-gpt"
    eos: int | None = None  # the engine's EOS: a streamed EOS token is held back, never shown

    @property
    def max_prompt_chars(self) -> int:
        return self.limits.max_sequence_length * CHARS_PER_TOKEN_BOUND

    def encode_prompt(self, text: str, add_bos: bool) -> list[int]:
        if len(text) > self.max_prompt_chars:  # O(1): refused before any tokenizer work
            raise InferenceError(
                f"prompt has {len(text)} characters; the model's context of "
                f"{self.limits.max_sequence_length} tokens holds at most "
                f"{self.max_prompt_chars} ({CHARS_PER_TOKEN_BOUND} per token)"
            )
        try:
            ids = list(self.tokenize(text))
        except ValueError as exc:  # TokenizerError and friends: the text is the problem
            raise InferenceError(f"cannot tokenize prompt: {exc}") from None
        if add_bos:
            if self.bos is None:
                raise InferenceError("add_BOS is set but the tokenizer has no BOS token")
            ids = [self.bos, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.detokenize(list(ids)) if ids else ""


def _random_seed() -> int:
    return secrets.randbits(31)


def _early_exit_params(opts: EarlyExitOptions | None) -> EarlyExitParams:
    if opts is None:
        return EarlyExitParams(mode="none")
    params = EarlyExitParams(mode=opts.mode, method=None if opts.method == "auto" else opts.method)
    for name in (
        "metric",
        "threshold",
        "draft_exit_layer",
        "draft_length",
        "draft_threshold",
        "draft_vocab_size",
        "target_agreement",
    ):
        value = getattr(opts, name)
        if value is not None:
            setattr(params, name, value)
    if opts.exit_layers is not None:
        params.exit_layers = list(opts.exit_layers)
    return params


def _checked(reqs: list[GenerationRequest], limits: ModelLimits) -> list[GenerationRequest]:
    for i, r in enumerate(reqs):
        try:
            validate_request(r, limits)
        except InferenceError as err:
            raise InferenceError(f"prompt {i}: {err}" if len(reqs) > 1 else str(err)) from None
    return reqs


# ---- PUT /api (Megatron-LM / EE-LLM) ---------------------------------------------------


def megatron_requests(req: MegatronRequest, codec: TextCodec) -> list[GenerationRequest]:
    greedy = req.temperature == 0.0 or req.top_k == 1
    seed = req.random_seed if req.random_seed is not None else _random_seed()
    sampling = dict(
        max_new_tokens=req.tokens_to_generate,
        temperature=0.0 if greedy else req.temperature,
        top_k=0 if greedy else req.top_k,
        top_p=req.top_p if req.top_p > 0.0 else 1.0,
        seed=seed,
        stop_sequences=list(req.stop_sequences or []),
        logprobs=req.logprobs,
    )
    if req.use_early_exit:
        ee = EarlyExitParams(mode="early_exit")
        if req.early_exit_thres is not None:
            ee.threshold = req.early_exit_thres
        if req.exit_layers is not None:
            ee.exit_layers = list(req.exit_layers)
        if req.early_exit_metric is not None:
            ee.metric = req.early_exit_metric
        ee.target_agreement = req.target_agreement
    else:
        ee = EarlyExitParams(mode="none")
        if req.exit_layers is not None:  # still checked: an unknown layer is a client error
            ee.exit_layers = list(req.exit_layers)
        if req.target_agreement is not None:  # needs use_early_exit: a 400 says so
            ee.target_agreement = req.target_agreement
    out = [
        GenerationRequest(
            prompt_token_ids=codec.encode_prompt(p, req.add_BOS),
            sampling=SamplingParams(**sampling),
            early_exit=EarlyExitParams(**vars(ee)),
        )
        for p in req.prompts
    ]
    return _checked(out, codec.limits)


def megatron_response(
    req: MegatronRequest,
    gen: list[GenerationRequest],
    results: list[GenerationResult],
    codec: TextCodec,
) -> dict:
    texts, segments, logprobs, exits = [], [], [], []
    for g, r in zip(gen, results):
        all_ids = [*g.prompt_token_ids, *r.token_ids]
        texts.append(codec.decode(all_ids))
        segments.append([codec.decode([t]) for t in all_ids])
        logprobs.append(list(r.logprobs or []))
        exits.append(list(r.exit_layers))
    out = {
        "text": texts,
        "segments": segments,
        "logprobs": logprobs if req.logprobs else None,
        "tokens": [list(r.token_ids) for r in results],
        "finish_reasons": [r.finish_reason for r in results],
    }
    if req.print_max_prob:
        out["exit_layers"] = exits
        confidences = [getattr(r, "confidences", None) for r in results]
        out["max_probs"] = confidences if any(c is not None for c in confidences) else None
        out["early_exit_stats"] = [early_exit_stats(r) for r in results]
    return out


def early_exit_stats(r: GenerationResult) -> dict:
    """The response extension with a request's decoding statistics (schemas.EarlyExitStats)."""
    st = r.stats
    return {
        "avg_layers_used": st.avg_layers_used,
        "drafted_tokens": int(st.drafted_tokens),
        "accepted_tokens": int(st.accepted_tokens),
        "acceptance_rate": st.acceptance_rate,
        "verify_passes": int(st.verify_passes),
    }


# ---- POST /v1/completions (OpenAI) -----------------------------------------------------


def completion_requests(req: CompletionRequest, codec: TextCodec) -> list[GenerationRequest]:
    seed = req.seed if req.seed is not None else _random_seed()
    out = [
        GenerationRequest(
            prompt_token_ids=codec.encode_prompt(p, add_bos=False) if isinstance(p, str) else p,
            sampling=SamplingParams(
                max_new_tokens=req.max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                seed=seed,
                stop_sequences=req.stops(),
                logprobs=req.logprobs is not None,
                # real alternatives and prompt scores come from a full-model scoring pass
                # after decoding (inference/scoring.py); a stream does not send them
                top_logprobs=0 if req.stream else (req.logprobs or 0),
                prompt_logprobs=req.logprobs if req.echo and not req.stream else None,
            ),
            early_exit=_early_exit_params(req.early_exit),
        )
        for p in req.prompts()
    ]
    return _checked(out, codec.limits)


def prompt_texts(req: CompletionRequest, codec: TextCodec) -> list[str]:
    """The prompts as text (token-id prompts decoded), for echo."""
    return [p if isinstance(p, str) else codec.decode(p) for p in req.prompts()]


@dataclass
class _Choice:
    text: str  # what the client sees (echo + completion, stop sequence / EOS removed)
    prefix: str  # the echoed prompt ("" without echo)
    token_ids: list[int]  # completion tokens that make up the visible text
    result: GenerationResult


def _visible(req: CompletionRequest, prompt: str, r: GenerationResult, codec) -> _Choice:
    ids = list(r.token_ids)
    if r.finish_reason == "eos" and ids:
        ids = ids[:-1]  # OpenAI never shows the end-of-text token
    text = codec.decode(ids)
    if r.finish_reason == "stop":
        cuts = [text.find(s) for s in req.stops() if s in text]
        if cuts:
            text = text[: min(cuts)]
    prefix = prompt if req.echo else ""
    return _Choice(text=prefix + text, prefix=prefix, token_ids=ids, result=r)


def _logprobs_block(choice: _Choice, codec: TextCodec, prompt_ids: list[int]) -> dict:
    """OpenAI's legacy block. With echo: the prompt tokens first (the first one's logprob is
    null). top_logprobs: the k most likely tokens of the full model at each position, or,
    where none were computed (logprobs 0, streams), the chosen token alone."""
    r = choice.result
    tokens = [codec.decode([t]) for t in choice.token_ids]
    lps: list[float | None] = list(r.logprobs or [])[: len(tokens)]
    lps += [None] * (len(tokens) - len(lps))
    tops: list[dict | None] = [{t: lp} if lp is not None else None for t, lp in zip(tokens, lps)]
    if r.top_logprobs:
        tops = [_named(d, codec) for d in r.top_logprobs[: len(tokens)]]
    pos = 0
    if r.prompt_logprobs is not None:
        ptoks = [codec.decode([t]) for t in prompt_ids]
        tokens, lps = ptoks + tokens, list(r.prompt_logprobs) + lps
        ptops = r.prompt_top_logprobs or [None] * len(ptoks)
        tops = [_named(d, codec) if d else None for d in ptops] + tops
    else:
        pos = len(choice.prefix)
    offsets = []
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _named(d: dict[int, float] | None, codec: TextCodec) -> dict[str, float] | None:
    return None if d is None else {codec.decode([t]): lp for t, lp in d.items()}


def _finish(r: GenerationResult) -> str:
    return "length" if r.finish_reason == "length" else "stop"


def completion_response(
    req: CompletionRequest,
    gen: list[GenerationRequest],
    results: list[GenerationResult],
    codec: TextCodec,
    request_id: str | None = None,
) -> dict:
    choices = []
    for i, (p, r) in enumerate(zip(prompt_texts(req, codec), results)):
        c = _visible(req, p, r, codec)
        choices.append(
            {
                "text": c.text,
                "index": i,
                "logprobs": _logprobs_block(c, codec, gen[i].prompt_token_ids)
                if req.logprobs is not None
                else None,
                "finish_reason": _finish(r),
                "exit_layers": list(r.exit_layers),
                "token_ids": list(r.token_ids),
            }
        )
        if req.early_exit is not None:
            choices[-1]["early_exit_stats"] = early_exit_stats(r)
    prompt_tokens = sum(len(g.prompt_token_ids) for g in gen)
    completion_tokens = sum(len(r.token_ids) for r in results)
    return {
        "id": request_id or f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": req.model or codec.model_name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class CompletionStreamer:
    """Server-sent events of one /v1/completions request, written while tokens arrive.

    `token(...)` is fed each generated token (engine `TokenEvent`s) and returns the events
    that can be sent already; `finish(results)` the rest, ending with `data: [DONE]`. Text is
    only sent once it cannot change: a decoding that ends inside a multi-byte character
    (U+FFFD), a trailing EOS token and a tail that could still grow into a stop sequence are
    held back; at the end the rest of the final (non-streamed) text is sent, so the
    concatenated stream equals it for tokenizers whose decoding of a prefix is a prefix of
    the decoding (byte-level BPE, SentencePiece).
    """

    def __init__(self, req: CompletionRequest, gen: list[GenerationRequest], codec: TextCodec):
        self.req, self.gen, self.codec = req, gen, codec
        self.rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.prompts = prompt_texts(req, codec)
        self.stops = req.stops()
        n = len(self.prompts)
        self.prefix = [p if req.echo else "" for p in self.prompts]
        self.sent = [""] * n
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.layers: list[list[int]] = [[] for _ in range(n)]  # reported, not yet sent
        self.lps: list[list[float | None]] = [[] for _ in range(n)]

    def _event(self, choices: list[dict], usage: dict | None = None) -> bytes:
        body = {
            "id": self.rid,
            "object": "text_completion",
            "created": self.created,
            "model": self.req.model or self.codec.model_name,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n".encode()

    def _delta(self, i: int, text: str) -> bytes:
        layers, lps = self.layers[i], self.lps[i]
        logprobs = None
        if self.req.logprobs is not None:
            logprobs = {
                "tokens": [text],
                "token_logprobs": [sum(x for x in lps if x is not None)] if lps else [None],
                "top_logprobs": None,
                "text_offset": [0],
            }
        self.sent[i] += text
        self.layers[i], self.lps[i] = [], []
        choice = {"text": text, "index": i, "logprobs": logprobs, "finish_reason": None}
        return self._event([{**choice, "exit_layers": layers}])

    def _held(self, text: str) -> int:
        """Characters at the end of `text` that may still become a stop sequence."""
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:k]):
                    hold = k
                    break
        return hold

    def start(self) -> list[bytes]:
        """The echoed prompts (sent before any token)."""
        out = []
        for i, p in enumerate(self.prefix):
            if p:
                out.append(self._delta(i, p))
        return out

    def token(self, i: int, token_id: int, exit_layer: int, logprob: float | None) -> list[bytes]:
        self.ids[i].append(token_id)
        self.layers[i].append(exit_layer)
        self.lps[i].append(logprob)
        ids = self.ids[i]
        if self.codec.eos is not None and ids[-1] == self.codec.eos:
            ids = ids[:-1]  # the final EOS is never shown; a later token releases it
        text = self.codec.decode(ids)
        if text.endswith("\ufffd") or any(stop in text for stop in self.stops):
            return []  # incomplete character / a stop: finish() cuts and sends the rest
        safe = self.prefix[i] + text[: len(text) - self._held(text)]
        if len(safe) <= len(self.sent[i]) or not safe.startswith(self.sent[i]):
            return []
        return [self._delta(i, safe[len(self.sent[i]) :])]

    def finish(self, results: list[GenerationResult]) -> list[bytes]:
        out = []
        for i, (p, r) in enumerate(zip(self.prompts, results)):
            # tokens the listener never saw (no streaming engine): feed them now, in order
            lps = list(r.logprobs or [])
            for k in range(len(self.ids[i]), len(r.token_ids)):
                lp = lps[k] if k < len(lps) else None
                if k == len(r.token_ids) - 1 and r.finish_reason == "eos":
                    self.ids[i].append(r.token_ids[k])  # EOS: never shown
                    self.layers[i].append(r.exit_layers[k])
                    self.lps[i].append(lp)
                    continue
                out += self.token(i, r.token_ids[k], r.exit_layers[k], lp)
            final = _visible(self.req, p, r, self.codec).text
            rest = final[len(self.sent[i]) :] if final.startswith(self.sent[i]) else ""
            if rest or self.layers[i]:
                out.append(self._delta(i, rest))
            out.append(
                self._event(
                    [{"text": "", "index": i, "logprobs": None, "finish_reason": _finish(r)}]
                )
            )
        if self.req.stream_options is not None and self.req.stream_options.include_usage:
            prompt_tokens = sum(len(g.prompt_token_ids) for g in self.gen)
            completion_tokens = sum(len(r.token_ids) for r in results)
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
            out.append(self._event([], usage))
        out.append(b"data: [DONE]\n\n")
        return out

    def error(self, err: dict) -> bytes:
        """An error after the stream started (the status line is already sent)."""
        return f"data: {json.dumps(err)}\n\n".encode()


def completion_stream(
    req: CompletionRequest,
    gen: list[GenerationRequest],
    results: list[GenerationResult],
    codec: TextCodec,
) -> Iterator[bytes]:
    """Server-sent events for a finished generation (one event per token), then [DONE]."""
    streamer = CompletionStreamer(req, gen, codec)
    yield from streamer.start()
    yield from streamer.finish(results)
