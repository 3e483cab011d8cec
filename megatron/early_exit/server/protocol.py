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


@dataclass
class TextCodec:
    """Tokenizer access for the front end (rank 0)."""

    tokenize: Callable[[str], list[int]]
    detokenize: Callable[[list[int]], str]
    limits: ModelLimits
    bos: int | None = None
    model_name: str = "early-exit-gpt"

    def encode_prompt(self, text: str, add_bos: bool) -> list[int]:
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
    for name in ("metric", "threshold", "draft_exit_layer", "draft_length", "draft_threshold"):
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
    else:
        ee = EarlyExitParams(mode="none")
        if req.exit_layers is not None:  # still checked: an unknown layer is a client error
            ee.exit_layers = list(req.exit_layers)
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
    return out


# ---- POST /v1/completions (OpenAI) -----------------------------------------------------


def completion_requests(req: CompletionRequest, codec: TextCodec) -> list[GenerationRequest]:
    seed = req.seed if req.seed is not None else _random_seed()
    out = [
        GenerationRequest(
            prompt_token_ids=codec.encode_prompt(p, add_bos=False),
            sampling=SamplingParams(
                max_new_tokens=req.max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                seed=seed,
                stop_sequences=req.stops(),
                logprobs=req.logprobs is not None,
            ),
            early_exit=_early_exit_params(req.early_exit),
        )
        for p in req.prompts()
    ]
    return _checked(out, codec.limits)


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


def _logprobs_block(choice: _Choice, codec: TextCodec) -> dict:
    r = choice.result
    tokens = [codec.decode([t]) for t in choice.token_ids]
    lps = list(r.logprobs or [])[: len(tokens)]
    lps += [None] * (len(tokens) - len(lps))
    offsets, pos = [], len(choice.prefix)
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": lps,
        "top_logprobs": [{t: lp} if lp is not None else None for t, lp in zip(tokens, lps)],
        "text_offset": offsets,
    }


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
    for i, (p, r) in enumerate(zip(req.prompts(), results)):
        c = _visible(req, p, r, codec)
        choices.append(
            {
                "text": c.text,
                "index": i,
                "logprobs": _logprobs_block(c, codec) if req.logprobs is not None else None,
                "finish_reason": _finish(r),
                "exit_layers": list(r.exit_layers),
                "token_ids": list(r.token_ids),
            }
        )
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


def _text_deltas(choice: _Choice, codec: TextCodec) -> Iterator[tuple[str, list[int]]]:
    """Per-token text increments whose concatenation is exactly `choice.text`.

    A prefix's decoding is only sent once it is a prefix of the final text and does not
    end inside a multi-byte character, so the stream never has to take text back.
    """
    sent = choice.prefix
    if sent:
        yield sent, []
    layers = list(choice.result.exit_layers)
    pending: list[int] = []
    for k in range(1, len(choice.token_ids) + 1):
        pending.append(layers[k - 1] if k - 1 < len(layers) else 0)
        cand = choice.prefix + codec.decode(choice.token_ids[:k])
        if cand.endswith("\ufffd") or not choice.text.startswith(cand) or len(cand) <= len(sent):
            continue
        yield cand[len(sent) :], pending
        sent, pending = cand, []
    rest = choice.text[len(sent) :]
    tail_layers = pending + layers[len(choice.token_ids) :]
    if rest or tail_layers:
        yield rest, tail_layers


def completion_stream(
    req: CompletionRequest,
    gen: list[GenerationRequest],
    results: list[GenerationResult],
    codec: TextCodec,
) -> Iterator[bytes]:
    """Server-sent events for a finished generation (one event per token), then [DONE]."""
    rid = f"cmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    model = req.model or codec.model_name

    def event(choices: list[dict], usage: dict | None = None) -> bytes:
        body = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n".encode()

    for i, (p, r) in enumerate(zip(req.prompts(), results)):
        c = _visible(req, p, r, codec)
        lp_iter = iter(list(r.logprobs or []))
        for delta, layers in _text_deltas(c, codec):
            lps = [next(lp_iter, None) for _ in layers]
            logprobs = None
            if req.logprobs is not None:
                logprobs = {
                    "tokens": [delta],
                    "token_logprobs": [sum(x for x in lps if x is not None)] if lps else [None],
                    "top_logprobs": None,
                    "text_offset": [0],
                }
            yield event(
                [
                    {
                        "text": delta,
                        "index": i,
                        "logprobs": logprobs,
                        "finish_reason": None,
                        "exit_layers": layers,
                    }
                ]
            )
        yield event([{"text": "", "index": i, "logprobs": None, "finish_reason": _finish(r)}])
    if req.stream_options is not None and req.stream_options.include_usage:
        prompt_tokens = sum(len(g.prompt_token_ids) for g in gen)
        completion_tokens = sum(len(r.token_ids) for r in results)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        yield event([], usage)
    yield b"data: [DONE]\n\n"
