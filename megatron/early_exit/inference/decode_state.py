"""Decode state shared by every decode strategy (kv_recompute.py, pipeline_decode.py,
speculative.py): per-sequence state, exit decisions, stop conditions, token events.

`Decoder` is what a strategy drives during one `generate` call: it records decided tokens
(`apply`), reports them to the streaming listener (`emit`), checks stop conditions
(`check_stop`), stops cancelled sequences (`poll_cancel`) and decides which sequences an
exit lets go (`decide`). The engine builds one per request group; strategies never see
the engine.

Cancellation: a strategy calls `poll_cancel` once per decode step (self_speculative: per
accepted token), after the step's tokens were applied, on every rank that applies them.
With `cancel_sync` the `cancelled` hook is asked on the group's first rank only (global
rank 0, the server's) and its answer, one byte per unfinished sequence, is broadcast, so
every rank stops the same sequences at the same step; pipeline decoding polls on stage 0
only (its tensor-parallel group): the deeper stages learn it from stage 0's next header.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron.early_exit.inference.api import (
    GenerationRequest,
    ModelLimits,
    OnToken,
    TokenEvent,
    exit_threshold,
)
from megatron.early_exit.inference.comm import Pipe
from megatron.early_exit.inference.sampling import confidence, sample
from megatron.early_exit.inference.stage import StageState

# A sequence's state in a decode step's header (kv_recompute.py, pipeline_decode.py).
INACTIVE, RUNNING, DECIDED = 0, 1, 2
log = logging.getLogger(__name__)
_STOP_MARGIN_CHARS = 16  # tail context that absorbs decoding artefacts at the tail's start


def stop_text_hit(detokenize, gen: list[int], stops: list[str]) -> bool:
    """Whether the decoded text of `gen` contains a stop sequence, decoding only a tail.

    Called after every token, so a new match overlaps the newest token's text: it lies
    within the last len(newest text) + len(longest stop) characters. The tail is grown
    until it holds that much plus a margin (decoding may differ from the full text only at
    the tail's start: a leading-space marker, a split UTF-8 character); a tail hit is
    confirmed on the full text, so the answer equals `any(q in detokenize(gen))` while a
    step costs O(stop length) instead of O(generated length).
    """
    need = max(map(len, stops)) + len(detokenize(gen[-1:])) + _STOP_MARGIN_CHARS
    w = min(len(gen), need)
    text = detokenize(gen[-w:])
    while w < len(gen) and len(text) < need:
        w = min(len(gen), 2 * w)
        text = detokenize(gen[-w:])
    if w < len(gen) and not any(q in text for q in stops):
        return False
    if w < len(gen):
        text = detokenize(gen)
    return any(q in text for q in stops)


@dataclass
class Decision:
    token: int
    exit_layer: int
    ran_upto: int  # deepest layer this step ran for the sequence
    logprob: float


@dataclass
class SeqState:
    req: GenerationRequest
    tokens: list[int]
    num_layers: int
    eos: int | None
    gen: list[int] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)
    layers_used: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str | None = None
    emb_len: int = 0
    xcache_len: int = 0  # self_speculative: positions in the draft exit block's cache
    cache_len: list[int] = field(default_factory=list)  # index = global layer (1-based)
    index: int = 0  # position of the request in the generate call (for on_token)
    # self_speculative: drafted/accepted tokens, verification passes (GenerationStats fields)
    spec_stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.cache_len = [0] * (self.num_layers + 1)
        if self.req.sampling.max_new_tokens == 0:
            self.finish = "length"

    @property
    def pos(self) -> int:
        return len(self.tokens) - 1


def chunk_tokens(seqs: list[SeqState], rows: list[int], chunk) -> torch.Tensor:
    """Token ids [b, n] at a chunk's positions (padding repeats the last position)."""
    ids = [[seqs[i].tokens[p] for p in pos] for i, pos in zip(rows, chunk.pos.tolist())]
    return torch.tensor(ids, dtype=torch.long, device=chunk.pos.device)


class Decoder:
    """One request group's decoding context on this rank (see the module docstring)."""

    def __init__(
        self,
        pipe: Pipe,
        num_layers: int,
        pre_exit: bool,
        limits: ModelLimits,
        tokenizer=None,
        on_token: OnToken | None = None,
        draft_ids: Callable[[int], torch.Tensor] | None = None,
    ) -> None:
        self.pipe = pipe
        self.device = pipe.device
        self.num_layers = num_layers
        self.pre_exit = pre_exit
        self.limits = limits
        self.tokenizer = tokenizer
        self.on_token = on_token
        self.draft_ids = draft_ids
        self.cancelled: Callable[[int], bool] | None = None  # see InferenceEngine.generate
        self.cancel_sync = False  # the ranks agree on `cancelled` (poll_cancel)

    def apply(self, s: SeqState, d: Decision) -> None:
        """Record a decided token; update per-layer cache lengths; check stop conditions."""
        p = s.pos
        for layer in range(1, d.ran_upto + 1):
            s.cache_len[layer] = max(s.cache_len[layer], p + 1)
        s.emb_len = p + 1
        s.tokens.append(d.token)
        s.gen.append(d.token)
        s.exits.append(d.exit_layer)
        s.layers_used.append(d.ran_upto)
        s.logprobs.append(d.logprob)
        self.emit(s)
        self.check_stop(s)

    def emit(self, s: SeqState) -> None:
        """Report the token just appended to `s` (final: tokens are never taken back)."""
        if self.on_token is None:
            return
        try:
            self.on_token(TokenEvent(s.index, s.gen[-1], s.exits[-1], s.logprobs[-1]))
        except Exception:  # a broken listener must not strand the other ranks mid-collective
            log.exception("on_token callback failed; streaming disabled for this call")
            self.on_token = None

    def check_stop(self, s: SeqState) -> None:
        sp = s.req.sampling
        tok = s.gen[-1]
        if s.eos is not None and tok == s.eos:
            s.finish = "eos"
        elif (
            any(s.gen[-len(q) :] == q for q in sp.stop_token_ids if len(s.gen) >= len(q))
            or sp.stop_sequences
            and stop_text_hit(self.tokenizer.detokenize, s.gen, sp.stop_sequences)
        ):
            s.finish = "stop"
        elif len(s.gen) >= sp.max_new_tokens:
            s.finish = "length"

    def poll_cancel(self, states: list[SeqState], stage0: bool = False) -> None:
        """Finish ("cancelled") the unfinished `states` whose request was cancelled.

        Every rank of the group calls it with the same states at the same point. `stage0`:
        only pipeline stage 0 calls it (its tensor-parallel group agrees), else the whole
        model-parallel group does."""
        live = [s for s in states if s.finish is None]
        if not live or (self.cancelled is None and not self.cancel_sync):
            return
        if self.cancel_sync and dist.is_initialized():
            if stage0:
                group = parallel_state.get_tensor_model_parallel_group()
            else:
                group = parallel_state.get_model_parallel_group()
            ranks = dist.get_process_group_ranks(group)
            ask = self.cancelled is not None and dist.get_rank() == ranks[0]
            flags = torch.tensor(
                [ask and bool(self.cancelled(s.index)) for s in live],  # type: ignore[misc]
                dtype=torch.uint8,
                device=self.device,
            )
            if len(ranks) > 1:
                dist.broadcast(flags, ranks[0], group=group)
            stop = [bool(f) for f in flags.tolist()]
        elif self.cancelled is not None:
            stop = [bool(self.cancelled(s.index)) for s in live]
        else:
            return
        for s, f in zip(live, stop):
            if f:
                s.finish = "cancelled"

    def decide(
        self, st: StageState, seqs, rows: list[int], logits, layer: int, ran_upto: int, ee, force
    ) -> dict[int, Decision]:
        """Sequences (indices `rows` into seqs) whose exit at `layer` fires (all if force)."""
        out = {}
        conf = None if force else confidence(logits, ee.metric)
        for r, i in enumerate(rows):
            if force or float(conf[r]) >= exit_threshold(ee, layer):
                s = seqs[i]
                tok, lp = sample(logits[r], s.req.sampling, s.req.sampling.seed, len(s.gen))
                out[i] = Decision(tok, layer, ran_upto, lp)
        return out
