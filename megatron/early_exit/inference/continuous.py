"""Continuous batching, engine side: iteration-level scheduling (as in Orca / vLLM).

The engine keeps `slots` decode slots (one KV-cache row each, sized to the model's context)
across calls. Each `InferenceEngine.step(plan)` is one decode iteration, a collective run
by every rank of the replica with the same `StepPlan` (the server's rank 0 decides it and
broadcasts it in its command, server/launch.py):

1. `leaves`: those slots' sequences stop now ("cancelled") and their slots are free;
2. `joins`: new requests take free slots; each is validated here, on every rank alike, and a
   bad one is answered in the step's output instead of failing the step for the others;
3. the joining sequences are prefilled (each its whole prompt as one chunk row) and get their
   first token, and every other running sequence gets one token (KVRecompute._kv_step with
   per-sequence exit decisions). Prompts longer than MERGE_PREFILL_TOKENS get a pass of their
   own first, so the one-token rows are not padded to their length;
4. sequences that finished (EOS, stop, length) leave at once: the step returns their
   results and their slots are free for the next step's joins.

A sequence's tokens depend only on its own request (seeded sampling is a function of
(seed, step); rows never mix in attention), so a request gets what it gets alone.

Covered: mode "none" and "early_exit" with method "kv_recompute" (any TP and PP); all
sequences in the slots share their effective early-exit settings (`batch_key`). Pipeline
decoding and self_speculative keep their own batch loops: the server runs those requests
with queue batching (server/service.py).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from megatron.early_exit.inference.api import (
    GenerationRequest,
    GenerationResult,
    InferenceError,
    ModelLimits,
    OnToken,
    effective_params,
    validate_request,
)
from megatron.early_exit.inference.decode_state import SeqState
from megatron.early_exit.inference.kv_recompute import KVRecompute
from megatron.early_exit.inference.stage import StageState

# Joining prompts up to this many tokens share the step's pass with the running sequences
# (each still one chunk row of its own; padding the one-token rows to it costs little, a
# second pass costs a whole model traversal and, with PP, its messages); longer ones are
# prefilled in a pass of their own.
MERGE_PREFILL_TOKENS = 16


@dataclass
class StepPlan:
    """What rank 0 decided for one decode iteration (broadcast as a plain dict)."""

    slots: int
    joins: list[tuple[int, dict]] = field(default_factory=list)  # (slot, request dict)
    leaves: list[int] = field(default_factory=list)  # slots whose sequence is cancelled
    reset: bool = False  # forget every slot first (after a failed step)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StepPlan:
        return cls(d["slots"], [(int(a), b) for a, b in d["joins"]], list(d["leaves"]), d["reset"])


@dataclass
class Finished:
    """A slot freed by a step: its result, or `error` (a rejected join, answered 400)."""

    slot: int
    result: GenerationResult | None = None
    error: str | None = None


def batch_key(
    req: GenerationRequest, limits: ModelLimits, calibration: dict | None = None
) -> str | None:
    """Requests with the same key can share the running batch; None: not covered by
    continuous batching (pipeline decoding, self_speculative). `calibration`: the engine's
    exit_calibration.json, for requests giving a target agreement."""
    try:
        ee = effective_params(req.early_exit, limits, calibration)
    except Exception:  # noqa: BLE001  (malformed settings: validation answers them)
        return None
    if ee.mode == "none" or (ee.mode == "early_exit" and ee.method == "kv_recompute"):
        return repr(ee)
    return None


class ContinuousBatch:
    """The engine's slots between steps (one per engine; see the module docstring)."""

    def __init__(self, engine, slots: int) -> None:
        self.engine = engine
        self.slots = slots
        self.st: StageState | None = None
        self.seqs: list[SeqState | None] = [None] * slots
        self.joined: list[float] = [0.0] * slots
        self.key: str | None = None
        self.ee = None

    @property
    def busy(self) -> list[int]:
        return [i for i, s in enumerate(self.seqs) if s is not None]

    def _state(self, need: int) -> StageState:
        """The slots' caches, holding at least `need` positions per sequence. They grow
        (doubling, copied) as longer requests join, up to the model's context, rather than
        being sized to the context up front (8192 positions x slots x layers for SmolLM2)."""
        st, e = self.st, self.engine
        if st is not None and st.hbuf.shape[1] >= need:
            return st
        old = 0 if st is None else st.hbuf.shape[1]
        cap = min(e.limits.max_sequence_length, max(need, 2 * old, 16))
        new = StageState(  # every exit's caches, so any batch's settings fit
            e.model, self.slots, cap, e.limits.vocab_size, list(e.limits.exit_layers)
        )
        if st is not None:
            new.exits = st.exits
            new.hbuf[:, :old] = st.hbuf
            pairs = list(zip(new.caches, st.caches))
            pairs += [(new.exit_caches[n], c) for n, c in st.exit_caches.items()]
            for a, b in pairs:
                a.k[:, :old] = b.k
                a.v[:, :old] = b.v
        self.st = new
        return new

    def _join(self, slot: int, d: dict) -> str | None:
        """Put a request in `slot`; the error message if it is rejected."""
        e = self.engine
        if not 0 <= slot < self.slots or self.seqs[slot] is not None:
            return f"internal: slot {slot} is not free"
        try:
            req = GenerationRequest.from_dict(d)
            validate_request(req, e.limits)
        except (InferenceError, TypeError, ValueError) as exc:
            return str(exc)
        if req.sampling.stop_sequences and e.tokenizer is None:
            return "stop_sequences need a tokenizer (use stop_token_ids)"
        key = batch_key(req, e.limits, e.calibration)
        if key is None:
            return "internal: request is not covered by continuous batching"
        if self.busy and key != self.key:
            return "internal: request's early-exit settings differ from the running batch"
        st = self._state(len(req.prompt_token_ids) + req.sampling.max_new_tokens)
        if not self.busy and key != self.key:
            self.key, self.ee = key, effective_params(req.early_exit, e.limits, e.calibration)
            wanted = self.ee.exit_layers or []
            st.exits = [n for n in e.model.local_exit_layers if n in wanted]
        self.seqs[slot] = SeqState(
            req, list(req.prompt_token_ids), e.num_layers, e._eos_for(req), index=slot
        )
        self.joined[slot] = time.perf_counter()
        return None

    def step(self, plan: StepPlan, on_token: OnToken | None = None) -> list[Finished]:
        if plan.reset or plan.slots != self.slots:
            self.__init__(self.engine, plan.slots)  # type: ignore[misc]
        done: list[Finished] = []
        for slot in plan.leaves:
            s = self.seqs[slot] if 0 <= slot < self.slots else None
            if s is not None:
                s.finish = s.finish or "cancelled"
        new: list[int] = []
        for slot, d in plan.joins:
            err = self._join(slot, d)
            if err is not None:
                done.append(Finished(slot, error=err))
            else:
                new.append(slot)
        st = self.st
        seqs = self.seqs
        old = [i for i in self.busy if i not in new and seqs[i].finish is None]  # type: ignore[union-attr]
        new = [i for i in new if seqs[i].finish is None]  # type: ignore[union-attr]
        if new or old:
            dec = self.engine.decoder(KVRecompute, on_token)
            # free slots are passed as finished placeholders: the step skips them
            view = [s if s is not None else _FREE for s in seqs]
            passes = [new, old]
            if new and max(len(seqs[i].tokens) for i in new) <= MERGE_PREFILL_TOKENS:
                passes = [new + old]  # short prompts: one pass, half the per-step overhead
            with torch.no_grad():
                for active in passes:
                    if active:
                        dec._kv_step(st, view, self.ee, active)
        finished = [i for i in self.busy if seqs[i].finish is not None]  # type: ignore[union-attr]
        results = [self._result(i) for i in finished]
        self.engine._score([seqs[i].req for i in finished], results)  # type: ignore[union-attr]
        for i, res in zip(finished, results):
            done.append(Finished(i, result=res))
            self.seqs[i] = None
        return done

    def _result(self, slot: int) -> GenerationResult:
        s = self.seqs[slot]
        return self.engine._result(s, time.perf_counter() - self.joined[slot])


class _Free:
    finish = "free"


_FREE = _Free()
