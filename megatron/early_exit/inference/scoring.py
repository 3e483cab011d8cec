"""Scoring: log-probabilities of given token sequences under the full model (no early exit).

One forward of each whole sequence through every layer (a prefill into a fresh StageState,
the same layer path decoding uses), final-head logits at every position on the last stage,
log-softmax at temperature 1, then the results are broadcast from the last stage to every
stage. Collective over the pipeline: every rank calls it with the same sequences.
"""

from __future__ import annotations

import torch

from megatron.early_exit.inference.comm import Pipe
from megatron.early_exit.inference.stage import StageState

# (logprob of token t given tokens < t for t >= 1, with None for t = 0;
#  the k most likely tokens {id: logprob} at each position t >= 1, None for t = 0)
Scores = tuple[list[float | None], list[dict[int, float] | None]]


def score(model, pipe: Pipe, vocab_size: int, seqs: list[list[int]], k: int) -> list[Scores]:
    lens = [len(t) for t in seqs]
    rows = list(range(len(seqs)))
    starts, ends = [0] * len(seqs), [n - 1 for n in lens]
    st = StageState(model, len(seqs), max(lens), vocab_size, [])
    chunk = st.chunk(rows, starts, ends)
    if st.first:
        ids = [[seqs[i][p] for p in pos] for i, pos in zip(rows, chunk.pos.tolist())]
        st.embed(chunk, torch.tensor(ids, dtype=torch.long, device=st.device))
    else:
        flat = pipe.recv((sum(lens), st.hbuf.shape[-1]), st.dtype, pipe.stage - 1)
        st.put_flat(rows, starts, ends, flat)
    for layer in st.global_layers:
        st.run_layer(layer, chunk)
    if not st.last:
        pipe.send(st.get_flat(rows, starts, ends), pipe.stage + 1)
    out: list[Scores] | None = None
    if st.last:
        out = []
        for i, toks in enumerate(seqs):
            n = len(toks)
            logp = torch.log_softmax(st.final_logits([i] * n, list(range(n))), dim=-1).cpu()
            # position t is predicted by the logits at t - 1
            nxt = torch.tensor(toks[1:], dtype=torch.long)
            chosen = logp[:-1].gather(1, nxt.unsqueeze(1)).squeeze(1).tolist()
            tops: list[dict[int, float] | None] = [None]
            if k:
                vals, idx = logp[:-1].topk(k, dim=-1)
                tops += [dict(zip(r_i, r_v)) for r_i, r_v in zip(idx.tolist(), vals.tolist())]
            else:
                tops += [{} for _ in range(n - 1)]
            out.append(([None, *chosen], tops))
    return pipe.broadcast_object(out, pipe.size - 1)
