"""A decode-cost model calibrated on measured per-call times of the machine it runs on.

Batch-1 CPU decoding is not priced by the parameters it reads: a SmolLM2-135M layer step
spends most of its time in fixed per-call overhead, and a projection's cost depends on its
row count in ways a parameter count does not see (projection.py). So every component is
timed as called during decoding, at 1..8 rows:

- `layer_ms[k]`: one decoder layer on k new positions of one sequence (KV cache, attention,
  norms, MLP: everything `StageState.run_layer` does);
- `weights_ms[k]`: that layer's weight products alone (each 2-D weight through
  `projection.project`, the kernels the decode step uses), so
  `layer - weights` is the per-call overhead the issue wants gone;
- `head_ms[k]`: final norm + LM head on k rows (`final_logits`, as verification calls it);
- `exit_head_ms[e]` / `exit_block_ms[e]`: exit e's head on one row and its exit block alone;
- `exit_estimator_ms[e]`: with confidence heads, exit e's features and learned estimator on
  one row, without the projection: what metric `learned` pays where the exit declines;
- `step_overhead_ms`: what a decode step costs beyond its layers and head (embedding,
  sampling, bookkeeping), from the measured time per generated token.

Predictions interpolate the row curves; `fit` summarises a curve as fixed + per-row ms.
Single stage (PP=1) at the current thread count; TP>1 times the local shards.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

ROWS = tuple(range(1, 9))


@dataclasses.dataclass
class CostModel:
    num_layers: int
    vocab_size: int
    rows: list[int]
    layer_ms: list[float]
    weights_ms: list[float]
    head_ms: list[float]
    exit_head_ms: dict[int, float]
    exit_block_ms: dict[int, float]
    step_overhead_ms: float = 0.0
    threads: int = 1
    exit_estimator_ms: dict[int, float] = dataclasses.field(default_factory=dict)

    # ---------------------------------------------------------------- curves
    @staticmethod
    def _at(rows: list[int], ms: list[float], k: float) -> float:
        """Piecewise-linear in k through the measured points, linear beyond them."""
        if len(rows) == 1:
            return ms[0] * k / rows[0]
        for i in range(len(rows) - 1):
            if k <= rows[i + 1] or i == len(rows) - 2:
                a, b = rows[i], rows[i + 1]
                return ms[i] + (ms[i + 1] - ms[i]) * (k - a) / (b - a)
        raise AssertionError("unreachable")

    def layer(self, k: float = 1) -> float:
        return self._at(self.rows, self.layer_ms, k)

    def weights(self, k: float = 1) -> float:
        return self._at(self.rows, self.weights_ms, k)

    def head(self, k: float = 1) -> float:
        return self._at(self.rows, self.head_ms, k)

    def exit_head(self, e: int, draft_vocab: int | None = None) -> float:
        """Exit e's head on one row; with a draft vocabulary its projection shrinks in
        proportion (the draft rows are a slice of the same weight)."""
        t = self.exit_head_ms[e]
        if draft_vocab:
            t -= self.head(1) * (1 - min(draft_vocab, self.vocab_size) / self.vocab_size)
        return t

    def exit_decline(self, e: int, learned: bool = False) -> float:
        """Exit e evaluated on one row without firing: its whole head, or with `learned`
        (and a measured estimator) only the features and the estimator."""
        if learned and e in self.exit_estimator_ms:
            return self.exit_estimator_ms[e]
        return self.exit_head(e)

    @staticmethod
    def fit(rows: list[int], ms: list[float]) -> tuple[float, float]:
        """Least squares ms = fixed + per_row * k."""
        n = len(rows)
        mx, my = sum(rows) / n, sum(ms) / n
        var = sum((x - mx) ** 2 for x in rows)
        slope = sum((x - mx) * (y - my) for x, y in zip(rows, ms)) / var if var else 0.0
        return my - slope * mx, slope

    # ---------------------------------------------------------------- predictions (ms)
    def full_step(self, rows: int = 1) -> float:
        """One full-model decode step over `rows` rows (batch rows or a chunk)."""
        return self.step_overhead_ms + self.num_layers * self.layer(rows) + self.head(rows)

    def early_exit_token(self, exit_layer: int, heads: list[int], learned: bool = False) -> float:
        """A batch-1 token that leaves at `exit_layer` (== num_layers: the full model) after
        evaluating the exit heads `heads`; those that decline cost `exit_decline` (with
        `learned`, no projection). KV catch-up is not counted."""
        t = self.step_overhead_ms + exit_layer * self.layer(1)
        t += sum(
            self.exit_head(e) if e == exit_layer else self.exit_decline(e, learned) for e in heads
        )
        return t + (self.head(1) if exit_layer >= self.num_layers else 0.0)

    def verification(self, e: int, k: int) -> float:
        """Verifying k drafts from exit e: the last draft through 1..e (+ the exit block's
        cache), the k+1 pending positions through e+1..L, the LM head on k+1 rows."""
        L = self.num_layers
        t = self.step_overhead_ms + e * self.layer(1) + self.exit_block_ms.get(e, 0.0)
        return t + (L - e) * self.layer(k + 1) + self.head(k + 1)

    def speculative_round(self, e: int, k: int, draft_vocab: int | None = None) -> float:
        """k drafts (layers 1..e and exit e's head, one row each) and their verification."""
        draft = self.step_overhead_ms + e * self.layer(1) + self.exit_head(e, draft_vocab)
        return k * draft + self.verification(e, k)

    # ---------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("exit_head_ms", "exit_block_ms", "exit_estimator_ms"):
            d[key] = {str(e): v for e, v in d[key].items()}
        d["fits"] = {
            name: dict(zip(("fixed_ms", "per_row_ms"), self.fit(self.rows, getattr(self, name))))
            for name in ("layer_ms", "weights_ms", "head_ms")
        }
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CostModel:
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in fields}
        for key in ("exit_head_ms", "exit_block_ms", "exit_estimator_ms"):
            d[key] = {int(e): float(v) for e, v in d.get(key, {}).items()}
        return cls(**d)


# -------------------------------------------------------------------- calibration
def _median_ms(fns: dict, rounds: int, best_of: int = 2) -> dict:
    """Per-call ms of each callable: the median over rounds of the best of `best_of` calls,
    every callable timed in each round (a shared CPU's load drifts; alternating keeps all
    of them under the same drift, best-of drops single preemptions)."""
    times: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            best = float("inf")
            for _ in range(best_of):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            times[key].append(best * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def calibrate(engine, rows=ROWS, rounds: int = 5, tokens: int = 16) -> CostModel:
    """Time the components of `engine` (one stage holding every layer) on this machine."""
    import torch

    from megatron.early_exit.inference.api import GenerationRequest, SamplingParams
    from megatron.early_exit.inference.projection import project
    from megatron.early_exit.inference.stage import StageState

    model = engine.model
    if not (model.pre_process and model.post_process):
        raise ValueError("calibrate needs the whole model in one stage (PP=1)")
    L = engine.limits.num_layers
    exits = list(engine.limits.exit_layers)
    rows = list(rows)
    n = max(rows)
    span = 8 + n  # positions: a short context, then the timed chunk
    if span > engine.limits.max_sequence_length:
        raise ValueError(f"calibrate needs a context of {span} positions")
    st = StageState(model, 1, span, engine.limits.vocab_size, exits)
    g = torch.Generator().manual_seed(0)
    st.hbuf.copy_(torch.randn(st.hbuf.shape, generator=g).to(st.dtype))
    ctx = 8
    with torch.no_grad():
        st.run_layer(1, st.chunk([0], [0], [ctx - 1]))  # a filled cache to attend to
        weights = [p for p in st.layers[0].parameters() if p.dim() == 2]
        x = {k: torch.randn(1, k, model.config.hidden_size, generator=g).to(st.dtype) for k in rows}
        fns = {}
        for k in rows:
            chunk = st.chunk([0], [ctx], [ctx + k - 1])
            fns[("layer", k)] = lambda c=chunk: st.run_layer(1, c)
            fns[("weights", k)] = lambda xk=x[k]: [
                project(xk if w.shape[1] == xk.shape[-1] else _fit(xk, w.shape[1]), w)
                for w in weights
            ]
            fns[("head", k)] = lambda k=k: st.final_logits([0] * k, list(range(ctx, ctx + k)))
        one = st.chunk([0], [ctx], [ctx])
        last = torch.zeros(1, dtype=torch.long)
        for e in exits:
            fns[("exit", e)] = lambda e=e: st.exit_logits(e, one, last)
            if e in st.exit_caches:
                fns[("block", e)] = lambda e=e: st.exit_block_fill(e, one)
            if model.config.early_exit.exit_confidence_head:
                fns[("estimator", e)] = lambda e=e: st.exit_confidence(
                    e, st.exit_features(e, one, last)
                )
        for fn in fns.values():
            fn()  # warm-up: first-call allocations
        ms = _median_ms(fns, rounds)
        overhead = _per_token_ms(engine, GenerationRequest, SamplingParams, tokens)
    cm = CostModel(
        num_layers=L,
        vocab_size=engine.limits.vocab_size,
        rows=rows,
        layer_ms=[ms[("layer", k)] for k in rows],
        weights_ms=[ms[("weights", k)] for k in rows],
        head_ms=[ms[("head", k)] for k in rows],
        exit_head_ms={e: ms[("exit", e)] for e in exits},
        exit_block_ms={e: ms.get(("block", e), 0.0) for e in exits},
        threads=torch.get_num_threads(),
        exit_estimator_ms={e: ms[("estimator", e)] for e in exits if ("estimator", e) in ms},
    )
    cm.step_overhead_ms = max(0.0, overhead - L * cm.layer(1) - cm.head(1))
    return cm


def _fit(x, width: int):
    """A stand-in input of another width (the MLP's second weight reads the FFN width)."""
    import torch

    return torch.zeros(*x.shape[:-1], width, dtype=x.dtype)


def _per_token_ms(engine, GenerationRequest, SamplingParams, tokens: int) -> float:
    """Measured full-model decode time per generated token (batch 1): the difference of a
    short and a long generation, so prefill and per-call setup cancel."""
    prompt = [1, 2, 3, 4]
    tokens = max(2, min(tokens, engine.limits.max_sequence_length - len(prompt) - 1))

    def gen(n):
        sp = SamplingParams(max_new_tokens=n, ignore_eos=True)
        return lambda: engine.generate([GenerationRequest(list(prompt), sp)])

    ms = _median_ms({1: gen(1), tokens: gen(tokens)}, 3, best_of=1)
    return max(0.0, (ms[tokens] - ms[1]) / (tokens - 1))
