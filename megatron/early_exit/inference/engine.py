"""InferenceEngine: batched generation with early exit on an EarlyExitGPTModel stage.

Every rank of a model replica calls `generate` with the same requests (collective).
Requests are grouped by their early-exit parameters; each group is decoded as one batch
(mixed prompt lengths). Decode methods:

- kv_recompute (any PP, kv_recompute.py): one step = one new token per unfinished
  sequence; tokens that exited earlier catch up through the deeper layers in the next
  step's chunk, so every layer's KV cache stays complete.
- pipeline (PP>1, pipeline_decode.py): stage s forwards every token to stage s+1 (so every
  layer's KV is filled exactly once, nothing is recomputed); when an exit on stage s fires
  for all undecided sequences, stage s sends the tokens straight to stage 0, which starts
  the next step while stages > s finish the exited token. Stage 0 owns stop decisions and
  sends a stop message down the pipeline (so generation ends at EOS, unlike EE-LLM's).
- mode "none" or threshold 1.0: the full model (kv_recompute machinery, no exit heads).
- self_speculative (speculative.py): an exit drafts, the full model verifies (lossless).

The engine groups requests by their early-exit parameters and dispatches each group to its
strategy with a `decode_state.Decoder`; the strategies never call back into the engine.

Streaming: `generate(..., on_token=cb)` calls `cb(TokenEvent)` on the rank that passes it
(the server's rank 0) each time a token is appended to a sequence (`Decoder.emit`):
kv_recompute and pipeline from `apply` (stage 0 owns the decisions in pipeline mode),
self_speculative for each accepted token in order. Tokens are only ever appended once they
are final, so the events of a request are exactly its result's tokens.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from megatron.early_exit.inference.api import (
    EarlyExitParams,
    GenerationRequest,
    GenerationResult,
    GenerationStats,
    InferenceError,
    ModelLimits,
    OnToken,
    effective_params,
    validate_batch,
)
from megatron.early_exit.inference.comm import Pipe
from megatron.early_exit.inference.continuous import ContinuousBatch, StepPlan
from megatron.early_exit.inference.decode_state import Decoder, SeqState
from megatron.early_exit.inference.kv_recompute import KVRecompute
from megatron.early_exit.inference.pipeline_decode import run_pipeline
from megatron.early_exit.inference.scoring import score
from megatron.early_exit.inference.speculative import run_self_speculative
from megatron.early_exit.inference.stage import StageState

D = TypeVar("D", bound=Decoder)


class InferenceEngine:
    def __init__(
        self,
        model,
        vocab_size: int,
        max_sequence_length: int,
        tokenizer=None,
        token_counts: torch.Tensor | None = None,
        calibration: dict | None = None,
    ):
        """`model`: this rank's bare EarlyExitGPTModel stage (eval mode is set here).
        `token_counts`: int [vocab] token frequencies (tools/count_tokens.py) for
        self-speculative `draft_vocab_size`."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        cfg = model.config
        self.num_layers = cfg.num_layers
        self.pre_exit = cfg.early_exit.pre_exit
        self.device = next(model.parameters()).device
        self.pipe = Pipe(self.device)
        self.limits = ModelLimits(
            num_layers=cfg.num_layers,
            exit_layers=tuple(cfg.early_exit.exit_layer_nums),
            max_sequence_length=max_sequence_length,
            vocab_size=vocab_size,
            pipeline_parallel_size=self.pipe.size,
            has_confidence_heads=cfg.early_exit.exit_confidence_head,
        )
        self.eos = None
        if tokenizer is not None:
            try:
                self.eos = int(tokenizer.eod)
            except Exception:  # noqa: BLE001  (tokenizers without an EOD)
                self.eos = None
        self.last_state: StageState | None = None  # the last group's caches, for inspection
        # Metric "learned", summed over generate calls on this rank's stage: exit
        # evaluations whose vocabulary projection ran / was skipped (the estimator said no).
        self.exit_projections_run = 0
        self.exit_projections_skipped = 0
        self.token_counts = token_counts
        self.calibration = calibration

    @property
    def calibration(self) -> dict | None:
        """The checkpoint's exit_calibration.json (inference/calibration.py), if any."""
        return self._calibration

    @calibration.setter
    def calibration(self, data: dict | None) -> None:
        from megatron.early_exit.inference.calibration import available

        self._calibration = data
        self.limits = dataclasses.replace(self.limits, calibrations=available(data))

    @property
    def token_counts(self) -> torch.Tensor | None:
        return self._token_counts

    @token_counts.setter
    def token_counts(self, counts: torch.Tensor | None) -> None:
        from megatron.early_exit.inference.draft_vocab import check_counts

        vocab = self.limits.vocab_size
        self._token_counts = None if counts is None else check_counts(counts, vocab)
        self._draft_ids: dict[int, torch.Tensor] = {}  # per engine: N -> draft ids
        self.limits = dataclasses.replace(self.limits, has_token_counts=counts is not None)

    def draft_ids(self, n: int) -> torch.Tensor:
        """The n most frequent token ids (ascending), computed once per n."""
        ids = self._draft_ids.get(n)
        if ids is None:
            from megatron.early_exit.inference.draft_vocab import top_token_ids

            ids = self._draft_ids[n] = top_token_ids(self._token_counts, n)
        return ids

    # ------------------------------------------------------------------ public
    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.tokenize(text))

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.detokenize(ids)

    def generate(
        self,
        requests: list[GenerationRequest],
        on_token: OnToken | None = None,
        cancelled: Callable[[int], bool] | None = None,
        cancel_sync: bool = False,
    ) -> list[GenerationResult]:
        """`cancelled(i)` True stops request i right after its current decode step
        (finish_reason "cancelled"). Without `cancel_sync` it is asked on each rank
        separately (one process). `cancel_sync=True`, passed alike on every rank, makes the
        ranks agree: it is asked on global rank 0 only (the others may pass None) and the
        answer is broadcast once per decode step (decode_state.Decoder.poll_cancel)."""
        validate_batch(requests, self.limits)
        for r in requests:
            if r.sampling.stop_sequences and self.tokenizer is None:
                raise InferenceError("stop_sequences need a tokenizer (use stop_token_ids)")
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(self._effective(r.early_exit, len(requests))), []).append(i)
        results: list[GenerationResult | None] = [None] * len(requests)
        for idx in groups.values():
            group_results, on_token = self._generate_group(
                requests, idx, on_token, cancelled, cancel_sync
            )
            for i, res in zip(idx, group_results):
                results[i] = res
        self._score(requests, results)  # type: ignore[arg-type]
        return results  # type: ignore[return-value]

    def step(self, plan, on_token: OnToken | None = None) -> list:
        """One continuous-batching iteration (continuous.py): `plan` is a StepPlan (or its
        dict), the same on every rank; returns the slots freed by it (`Finished`)."""
        if isinstance(plan, dict):
            plan = StepPlan.from_dict(plan)
        cb = getattr(self, "_continuous", None)
        if cb is None:
            cb = self._continuous = ContinuousBatch(self, plan.slots)
        return cb.step(plan, on_token)

    def _score(self, requests: list[GenerationRequest], results: list[GenerationResult]) -> None:
        """Fill the scoring fields (SamplingParams.top_logprobs / prompt_logprobs) with one
        full-model pass over prompt + completion (scoring.py; no early exit)."""
        want = [
            i
            for i, r in enumerate(requests)
            if r.sampling.top_logprobs or r.sampling.prompt_logprobs is not None
        ]
        if not want:
            return
        k = max(max(requests[i].sampling.top_logprobs, requests[i].sampling.prompt_logprobs or 0)
                for i in want)  # fmt: skip
        seqs = [list(requests[i].prompt_token_ids) + list(results[i].token_ids) for i in want]
        with torch.no_grad():
            scored = score(self.model, self.pipe, self.limits.vocab_size, seqs, k)
        for i, (chosen, tops) in zip(want, scored):
            sp, res, n = requests[i].sampling, results[i], len(requests[i].prompt_token_ids)

            def cut(d, kk):
                return None if d is None else dict(list(d.items())[:kk])

            if sp.top_logprobs:
                res.top_logprobs = [cut(d, sp.top_logprobs) for d in tops[n:]]
            if sp.prompt_logprobs is not None:
                res.prompt_logprobs = chosen[:n]
                res.prompt_top_logprobs = [cut(d, sp.prompt_logprobs) for d in tops[:n]]

    # ------------------------------------------------------------------ grouping
    def _effective(self, e: EarlyExitParams, batch: int) -> EarlyExitParams:
        return effective_params(e, self.limits, self._calibration)

    def _generate_group(
        self,
        requests: list[GenerationRequest],
        idx: list[int],
        on_token: OnToken | None,
        cancelled: Callable[[int], bool] | None = None,
        cancel_sync: bool = False,
    ) -> tuple[list[GenerationResult], OnToken | None]:
        """The group's results, and the listener for the next group (None once it failed)."""
        reqs = [requests[i] for i in idx]
        ee = self._effective(reqs[0].early_exit, len(reqs))
        seqs = [
            SeqState(r, list(r.prompt_token_ids), self.num_layers, self._eos_for(r), index=i)
            for i, r in zip(idx, reqs)
        ]
        max_len = max(len(r.prompt_token_ids) + r.sampling.max_new_tokens for r in reqs)
        exits = ee.exit_layers or []
        if ee.mode == "self_speculative":
            exits = [ee.draft_exit_layer or exits[0]]
        st = StageState(self.model, len(reqs), max_len, self.limits.vocab_size, exits)
        t0 = time.perf_counter()
        kind = KVRecompute if ee.mode != "self_speculative" and ee.method != "pipeline" else Decoder
        decoder = self.decoder(kind, on_token)
        decoder.cancelled, decoder.cancel_sync = cancelled, cancel_sync
        with torch.no_grad():
            if ee.mode == "self_speculative":
                run_self_speculative(decoder, st, seqs, ee)
            elif ee.method == "pipeline":
                run_pipeline(decoder, st, seqs, ee)
            else:
                decoder.run(st, seqs, ee)
        elapsed = time.perf_counter() - t0
        self.last_state = st
        self.exit_projections_run += st.projections_run
        self.exit_projections_skipped += st.projections_skipped
        return [self._result(s, elapsed) for s in seqs], decoder.on_token

    def decoder(self, kind: type[D] = Decoder, on_token: OnToken | None = None) -> D:
        """A decoding context (`decode_state.Decoder` or a subclass) for this model stage."""
        return kind(
            self.pipe,
            self.num_layers,
            self.pre_exit,
            self.limits,
            self.tokenizer,
            on_token,
            self.draft_ids,
        )

    def _eos_for(self, r: GenerationRequest) -> int | None:
        if r.sampling.ignore_eos:
            return None
        return r.sampling.eos_token_id if r.sampling.eos_token_id is not None else self.eos

    def _result(self, s: SeqState, elapsed: float) -> GenerationResult:
        n = len(s.gen)
        stats = GenerationStats(
            num_prompt_tokens=len(s.req.prompt_token_ids),
            num_generated_tokens=n,
            avg_layers_used=sum(s.layers_used) / n if n else 0.0,
            elapsed_s=elapsed,
            tokens_per_s=n / elapsed if elapsed > 0 else 0.0,
        )
        for k, v in s.spec_stats.items():
            setattr(stats, k, v)
        text = self.tokenizer.detokenize(s.gen) if self.tokenizer is not None and n else None
        return GenerationResult(
            token_ids=list(s.gen),
            exit_layers=list(s.exits),
            finish_reason=s.finish or "length",
            logprobs=list(s.logprobs) if s.req.sampling.logprobs else None,
            text=text if text is not None else ("" if self.tokenizer is not None else None),
            stats=stats,
        )
