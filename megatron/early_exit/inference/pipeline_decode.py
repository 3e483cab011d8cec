"""Pipeline-based early-exit decoding (PP > 1): no KV recomputation.

Every token goes through every layer exactly once, so each layer's KV cache is always
complete. Stage 0 embeds a step's new positions, runs its layers and sends them on;
deeper stages do the same with what arrives. A stage where all still-undecided
sequences exit sends the tokens *directly* to stage 0, which then starts the next step
while the deeper stages are still finishing the exited token (they skip their exit
heads for decided sequences). Messages:

- stage s -> s+1: header [B+1, 7] (row 0: kind STEP/STOP; row 1+i: state, token, exit,
  ran_upto, start, end, step of sequence i) + logprobs [B] + hidden of positions
  [start, end] of every active sequence (flattened).
- stage s -> stage 0, only if some sequence was undecided when the step reached s:
  decisions [B, 4] + logprobs [B].
Stage 0 reads decisions from stage 1, 2, ... until every sequence has a token, owns the
stop conditions (EOS, stop sequences, max tokens, cancellation) and sends STOP down the
pipeline at the end; the results are then broadcast from stage 0 so every rank returns the same.
"""

from __future__ import annotations

import torch

from megatron.early_exit.inference.api import exit_threshold
from megatron.early_exit.inference.decode_state import (
    DECIDED,
    INACTIVE,
    RUNNING,
    Decision,
    Decoder,
    chunk_tokens,
)
from megatron.early_exit.inference.sampling import sample
from megatron.early_exit.inference.stage import layer_runs

_STOP, _STEP = 0, 1
_COLS = 7


def run_pipeline(decoder: Decoder, st, seqs, ee) -> None:
    if st.first:
        _stage0(decoder, st, seqs, ee)
    else:
        _follower(decoder, st, seqs, ee)
    # Stage 0 holds the truth; copy it everywhere (all ranks return the same results).
    state = [(s.gen, s.exits, s.layers_used, s.logprobs, s.finish) for s in seqs]
    state = decoder.pipe.broadcast_object(state, 0)
    for s, (gen, exits, used, lps, finish) in zip(seqs, state):
        s.gen, s.exits, s.layers_used, s.logprobs, s.finish = gen, exits, used, lps, finish
        s.tokens = list(s.req.prompt_token_ids) + list(gen)


def _run_local(decoder, st, seqs, active, starts, ends, undecided, steps, ee) -> dict:
    """This stage's layers on every active sequence; exits only for undecided ones."""
    decided: dict[int, Decision] = {}
    chunk = st.chunk(active, starts, ends)
    last_rows = chunk.valid.sum(dim=1) - 1
    exits = set(st.exits)
    pre = decoder.pre_exit

    def check(layer: int, ran_upto: int) -> None:
        live = [r for r, i in enumerate(active) if i in undecided and i not in decided]
        if not live:
            st.exit_block_fill(layer, chunk)
            return
        threshold = exit_threshold(ee, layer)
        fired, logits = st.exit_decisions(layer, chunk, last_rows, live, ee.metric, threshold)
        for j, r in enumerate(fired):
            decided[active[r]] = _sample(
                decoder, seqs, active[r], logits[j], layer, ran_upto, steps
            )

    # runs of layers between the layers after which an exit decides share one gather/scatter
    for first, last in layer_runs(st.global_layers, {e - 1 if pre else e for e in exits}):
        if pre and first in exits:
            check(first, first - 1)
        st.run_layers(first, last, chunk)
        if not pre and last in exits:
            check(last, last)
    if st.last:
        rest = [i for i in active if i in undecided and i not in decided]
        if rest:
            logits = st.final_logits(rest, [ends[active.index(i)] for i in rest])
            for r, i in enumerate(rest):
                n = decoder.num_layers
                decided[i] = _sample(decoder, seqs, i, logits[r], n, n, steps)
    return decided


def _sample(decoder, seqs, i, logits, layer, ran_upto, steps):
    sp = seqs[i].req.sampling
    tok, lp = sample(logits, sp, sp.seed, steps[i])
    return Decision(tok, layer, ran_upto, lp)


def _header(B, kind, active, starts, ends, undecided, decided, steps):
    hdr = torch.zeros(B + 1, _COLS, dtype=torch.long)
    lps = torch.zeros(B, dtype=torch.float64)
    hdr[0, 0] = kind
    for i, s, e in zip(active, starts, ends):
        row = hdr[i + 1]
        row[0] = RUNNING if i in undecided else DECIDED
        row[4], row[5], row[6] = s, e, steps[i]
    for i, d in decided.items():
        hdr[i + 1, 1:4] = torch.tensor([d.token, d.exit_layer, d.ran_upto])
        lps[i] = d.logprob
    return hdr, lps


def _stage0(decoder, st, seqs, ee) -> None:
    pipe, B = decoder.pipe, len(seqs)
    while True:
        active = [i for i, s in enumerate(seqs) if s.finish is None]
        if not active:
            hdr, lps = _header(B, _STOP, [], [], [], set(), {}, {})
            pipe.send(hdr.to(decoder.device), 1)
            pipe.send(lps.to(decoder.device), 1)
            return
        starts = [seqs[i].emb_len for i in active]
        ends = [seqs[i].pos for i in active]
        steps = {i: len(seqs[i].gen) for i in active}
        chunk = st.chunk(active, starts, ends)
        tokens = chunk_tokens(seqs, active, chunk)
        st.embed(chunk, tokens)
        undecided = set(active)
        decided = _run_local(decoder, st, seqs, active, starts, ends, undecided, steps, ee)
        hdr, lps = _header(B, _STEP, active, starts, ends, undecided - set(decided), decided, steps)
        pipe.send(hdr.to(decoder.device), 1)
        pipe.send(lps.to(decoder.device), 1)
        pipe.send(st.get_flat(active, starts, ends), 1)
        stage = 1
        while len(decided) < len(active):
            d = pipe.recv((B, 4), torch.long, stage).cpu().tolist()
            lp = pipe.recv((B,), torch.float64, stage).cpu().tolist()
            for i in active:
                if d[i][0] == DECIDED:
                    decided[i] = Decision(d[i][1], d[i][2], d[i][3], lp[i])
            stage += 1
        for i in active:
            decoder.apply(seqs[i], decided[i])
        decoder.poll_cancel([seqs[i] for i in active], stage0=True)  # next header drops them


def _follower(decoder, st, seqs, ee) -> None:
    pipe, B = decoder.pipe, len(seqs)
    prev, nxt = pipe.stage - 1, pipe.stage + 1
    h = st.hbuf.shape[-1]
    while True:
        hdr = pipe.recv((B + 1, _COLS), torch.long, prev).cpu()
        lps = pipe.recv((B,), torch.float64, prev)
        if int(hdr[0, 0]) == _STOP:
            if not st.last:
                pipe.send(hdr.to(decoder.device), nxt)
                pipe.send(lps, nxt)
            return
        rows = hdr[1:].tolist()
        active = [i for i in range(B) if rows[i][0] != INACTIVE]
        undecided = {i for i in active if rows[i][0] == RUNNING}
        starts = [rows[i][4] for i in active]
        ends = [rows[i][5] for i in active]
        steps = {i: rows[i][6] for i in active}
        n = sum(e - s + 1 for s, e in zip(starts, ends))
        st.put_flat(active, starts, ends, pipe.recv((n, h), st.dtype, prev))
        decided = _run_local(decoder, st, seqs, active, starts, ends, undecided, steps, ee)
        if undecided:
            msg = torch.zeros(B, 4, dtype=torch.long)
            out = torch.zeros(B, dtype=torch.float64)
            for i, d in decided.items():
                msg[i] = torch.tensor([DECIDED, d.token, d.exit_layer, d.ran_upto])
                out[i] = d.logprob
            pipe.send(msg.to(decoder.device), 0)
            pipe.send(out.to(decoder.device), 0)
        if not st.last:
            still = undecided - set(decided)
            hdr2, lps2 = _header(B, _STEP, active, starts, ends, still, {}, steps)
            pipe.send(hdr2.to(decoder.device), nxt)
            pipe.send(lps2.to(decoder.device), nxt)
            pipe.send(st.get_flat(active, starts, ends), nxt)
