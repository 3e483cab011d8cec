"""InferenceEngine: batched generation with early exit on an EarlyExitGPTModel stage.

Every rank of a model replica calls `generate` with the same requests (collective).
Requests are grouped by their early-exit parameters; each group is decoded as one batch
(mixed prompt lengths). Decode methods:

- kv_recompute (any PP): one step = one new token per unfinished sequence. Each stage
  runs its layers on a *chunk* per sequence: the positions whose KV this layer lacks
  (tokens that exited earlier, parked in the stage's hidden buffer) plus the new token.
  Per-sequence exit decisions: a sequence that exits stops going deeper this step; the
  others continue (batch policy: per-sequence decisions, deep layers run only for the
  sequences still undecided, exited tokens catch up in the next step's chunk). With PP>1
  stages run one after another and the last stage broadcasts the decisions.
- pipeline (PP>1): stage s forwards every token to stage s+1 (so every layer's KV is
  filled exactly once, nothing is recomputed); when an exit on stage s fires for all
  undecided sequences, stage s sends the tokens straight to stage 0, which starts the next
  step while stages > s finish the exited token. Stage 0 owns stop decisions and sends a
  stop message down the pipeline (so generation ends at EOS, unlike EE-LLM's).
- mode "none" or threshold 1.0: the full model (kv_recompute machinery, no exit heads).

Streaming: `generate(..., on_token=cb)` calls `cb(TokenEvent)` on the rank that passes it
(the server's rank 0) each time a token is appended to a sequence (`emit`): kv_recompute and
pipeline from `apply` (stage 0 owns the decisions in pipeline mode), self_speculative for each
accepted token in order. Tokens are only ever appended once they are final, so the events of
a request are exactly its result's tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch

from megatron.early_exit.inference.api import (
    EarlyExitParams,
    GenerationRequest,
    GenerationResult,
    GenerationStats,
    InferenceError,
    ModelLimits,
    OnToken,
    TokenEvent,
    validate_batch,
)
from megatron.early_exit.inference.comm import Pipe
from megatron.early_exit.inference.sampling import confidence, sample
from megatron.early_exit.inference.stage import StageState

# header states
_INACTIVE, _RUNNING, _DECIDED = 0, 1, 2
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


class InferenceEngine:
    def __init__(
        self,
        model,
        vocab_size: int,
        max_sequence_length: int,
        tokenizer=None,
        token_counts: torch.Tensor | None = None,
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
        )
        self.eos = None
        if tokenizer is not None:
            try:
                self.eos = int(tokenizer.eod)
            except Exception:  # noqa: BLE001  (tokenizers without an EOD)
                self.eos = None
        self.last_state: StageState | None = None  # for tests: caches after generate
        self._on_token: OnToken | None = None
        self.token_counts = token_counts

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
        self, requests: list[GenerationRequest], on_token: OnToken | None = None
    ) -> list[GenerationResult]:
        validate_batch(requests, self.limits)
        for r in requests:
            if r.sampling.stop_sequences and self.tokenizer is None:
                raise InferenceError("stop_sequences need a tokenizer (use stop_token_ids)")
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(self._effective(r.early_exit, len(requests))), []).append(i)
        results: list[GenerationResult | None] = [None] * len(requests)
        self._on_token = on_token
        try:
            for idx in groups.values():
                for i, res in zip(idx, self._generate_group(requests, idx)):
                    results[i] = res
        finally:
            self._on_token = None
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ grouping
    def _effective(self, e: EarlyExitParams, batch: int) -> EarlyExitParams:
        exits = list(self.limits.exit_layers) if e.exit_layers is None else sorted(e.exit_layers)
        mode = e.mode
        if mode == "early_exit" and (e.threshold >= 1.0 or not exits):
            mode = "none"  # 1.0 never exits: exactly the full model
        method = e.method
        if mode == "early_exit" and method is None:
            method = "pipeline" if self.pipe.size > 1 else "kv_recompute"
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
        )

    def _generate_group(
        self, requests: list[GenerationRequest], idx: list[int]
    ) -> list[GenerationResult]:
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
        with torch.no_grad():
            if ee.mode == "self_speculative":
                from megatron.early_exit.inference.speculative import run_self_speculative

                run_self_speculative(self, st, seqs, ee)
            elif ee.method == "pipeline":
                self._run_pipeline(st, seqs, ee)
            else:
                while any(s.finish is None for s in seqs):
                    self._kv_step(st, seqs, ee)
        elapsed = time.perf_counter() - t0
        self.last_state = st
        return [self._result(s, elapsed) for s in seqs]

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
        extra = getattr(s, "spec_stats", None)
        if extra:
            for k, v in extra.items():
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

    # ------------------------------------------------------------------ bookkeeping
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
        if self._on_token is None:
            return
        try:
            self._on_token(TokenEvent(s.index, s.gen[-1], s.exits[-1], s.logprobs[-1]))
        except Exception:  # a broken listener must not strand the other ranks mid-collective
            log.exception("on_token callback failed; streaming disabled for this call")
            self._on_token = None

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

    def decide(
        self, st: StageState, seqs, rows: list[int], logits, layer: int, ran_upto: int, ee, force
    ) -> dict[int, Decision]:
        """Sequences (indices `rows` into seqs) whose exit at `layer` fires (all if force)."""
        out = {}
        conf = None if force else confidence(logits, ee.metric)
        for r, i in enumerate(rows):
            if force or float(conf[r]) >= ee.threshold:
                s = seqs[i]
                tok, lp = sample(logits[r], s.req.sampling, s.req.sampling.seed, len(s.gen))
                out[i] = Decision(tok, layer, ran_upto, lp)
        return out

    # ------------------------------------------------------------------ kv recompute
    def _kv_step(self, st: StageState, seqs: list[SeqState], ee: EarlyExitParams) -> None:
        pipe = self.pipe
        B = len(seqs)
        active = [i for i, s in enumerate(seqs) if s.finish is None]
        decided: dict[int, Decision] = {}
        layers = list(st.global_layers)
        if st.first:
            running = list(active)
            chunk = st.chunk(
                running, [seqs[i].emb_len for i in running], [seqs[i].pos for i in running]
            )
            tokens = chunk_tokens(seqs, running, chunk)
            st.embed(chunk, tokens)
        else:
            hdr, lps = self._recv_header(B, pipe.stage - 1)
            running = [i for i in active if hdr[i, 0] == _RUNNING]
            decided = self._decisions_from(hdr, lps)
            a = layers[0]
            starts = [seqs[i].cache_len[a] for i in running]
            ends = [seqs[i].pos for i in running]
            if running:
                n = sum(e - s + 1 for s, e in zip(starts, ends))
                flat = pipe.recv((n, st.hbuf.shape[-1]), st.dtype, pipe.stage - 1)
                st.put_flat(running, starts, ends, flat)
        exits = set(st.exits) if ee.mode == "early_exit" else set()
        for layer in layers:
            if not running:
                break
            if self.pre_exit and layer in exits:
                running = self._kv_exit(st, seqs, running, layer, layer - 1, ee, decided)
                if not running:
                    break
            chunk = st.chunk(
                running, [seqs[i].cache_len[layer] for i in running],
                [seqs[i].pos for i in running],
            )  # fmt: skip
            st.run_layer(layer, chunk)
            if not self.pre_exit and layer in exits:
                running = self._kv_exit(st, seqs, running, layer, layer, ee, decided)
        if st.last:
            if running:
                logits = st.final_logits(running, [seqs[i].pos for i in running])
                decided.update(
                    self.decide(
                        st, seqs, running, logits, self.num_layers, self.num_layers, ee, True
                    )
                )
        else:
            self._send_header(B, active, running, decided, pipe.stage + 1)
            if running:
                nxt = layers[-1] + 1
                starts = [seqs[i].cache_len[nxt] for i in running]
                pipe.send(
                    st.get_flat(running, starts, [seqs[i].pos for i in running]), pipe.stage + 1
                )
        if pipe.size > 1:
            hdr, lps = self._encode(B, active, [], decided)
            pipe.broadcast(hdr, pipe.size - 1)
            pipe.broadcast(lps, pipe.size - 1)
            decided = self._decisions_from(hdr, lps)
        for i in active:
            self.apply(seqs[i], decided[i])

    def _kv_exit(self, st, seqs, running, layer, ran_upto, ee, decided) -> list[int]:
        chunk = st.chunk(
            running, [seqs[i].cache_len[layer] for i in running], [seqs[i].pos for i in running]
        )
        last_rows = chunk.valid.sum(dim=1) - 1
        logits = st.exit_logits(layer, chunk, last_rows)
        out = self.decide(st, seqs, running, logits, layer, ran_upto, ee, False)
        decided.update(out)
        return [i for i in running if i not in out]

    # ------------------------------------------------------------------ headers
    def _encode(self, B, active, running, decided, extra_cols: int = 0):
        hdr = torch.zeros(B, 4 + extra_cols, dtype=torch.long)
        lps = torch.zeros(B, dtype=torch.float64)
        for i in running:
            hdr[i, 0] = _RUNNING
        for i, d in decided.items():
            hdr[i, :4] = torch.tensor([_DECIDED, d.token, d.exit_layer, d.ran_upto])
            lps[i] = d.logprob
        return hdr.to(self.device), lps.to(self.device)

    @staticmethod
    def _decisions_from(hdr, lps) -> dict[int, Decision]:
        h, lp = hdr.cpu().tolist(), lps.cpu().tolist()
        return {
            i: Decision(row[1], row[2], row[3], lp[i])
            for i, row in enumerate(h)
            if row[0] == _DECIDED
        }

    def _send_header(self, B, active, running, decided, stage) -> None:
        hdr, lps = self._encode(B, active, running, decided)
        self.pipe.send(hdr, stage)
        self.pipe.send(lps, stage)

    def _recv_header(self, B, stage, cols: int = 4):
        hdr = self.pipe.recv((B, cols), torch.long, stage).cpu()
        lps = self.pipe.recv((B,), torch.float64, stage).cpu()
        return hdr, lps

    # ------------------------------------------------------------------ pipeline-based
    def _run_pipeline(self, st: StageState, seqs: list[SeqState], ee: EarlyExitParams) -> None:
        from megatron.early_exit.inference.pipeline_decode import run_pipeline

        run_pipeline(self, st, seqs, ee)
