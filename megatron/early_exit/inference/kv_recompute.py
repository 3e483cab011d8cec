"""KV recomputation (any PP): early exit that keeps every layer's KV cache complete.

One step = one new token per unfinished sequence. Each stage runs its layers on a *chunk*
per sequence: the positions whose KV this layer lacks (tokens that exited earlier, parked
in the stage's hidden buffer) plus the new token. Per-sequence exit decisions: a sequence
that exits stops going deeper this step; the others continue (batch policy: per-sequence
decisions, deep layers run only for the sequences still undecided, exited tokens catch up
in the next step's chunk). With PP>1 stages run one after another and the last stage
broadcasts the decisions. Mode "none" (the full model) runs the same step without exits.
"""

from __future__ import annotations

import torch

from megatron.early_exit.inference.api import EarlyExitParams, exit_threshold
from megatron.early_exit.inference.decode_state import (
    DECIDED,
    RUNNING,
    Decision,
    Decoder,
    SeqState,
    chunk_tokens,
)
from megatron.early_exit.inference.stage import StageState


class KVRecompute(Decoder):
    """The Decoder with the KV-recomputation step."""

    def run(self, st: StageState, seqs: list[SeqState], ee: EarlyExitParams) -> None:
        while any(s.finish is None for s in seqs):
            self._kv_step(st, seqs, ee)

    def _kv_step(
        self,
        st: StageState,
        seqs: list[SeqState],
        ee: EarlyExitParams,
        active: list[int] | None = None,
    ) -> None:
        """One token for each unfinished sequence, or for the `active` ones only (continuous
        batching prefills joining sequences in a step of their own: continuous.py)."""
        pipe = self.pipe
        B = len(seqs)
        if active is None:
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
            running = [i for i in active if hdr[i, 0] == RUNNING]
            decided = self._decisions_from(hdr, lps)
            a = layers[0]
            starts = [seqs[i].cache_len[a] for i in running]
            ends = [seqs[i].pos for i in running]
            if running:
                n = sum(e - s + 1 for s, e in zip(starts, ends))
                flat = pipe.recv((n, st.hbuf.shape[-1]), st.dtype, pipe.stage - 1)
                st.put_flat(running, starts, ends, flat)
        exits = set(st.exits) if ee.mode == "early_exit" else set()
        # layers after which an exit decides (the exit's own layer, or the one before it
        # with pre_exit): a run of layers sharing one gather/scatter ends there
        decide_after = {e - 1 if self.pre_exit else e for e in exits}
        k = 0
        while k < len(layers) and running:
            layer = layers[k]
            if self.pre_exit and layer in exits:
                running = self._kv_exit(st, seqs, running, layer, layer - 1, ee, decided)
                if not running:
                    break
            starts = [seqs[i].cache_len[layer] for i in running]
            ends = [seqs[i].pos for i in running]
            # The following layers join this run while they take the same chunk and no exit
            # decides in between: one gather/scatter of the hidden state for the whole run.
            last = k
            while (
                last + 1 < len(layers)
                and layers[last] not in decide_after
                and [seqs[i].cache_len[layers[last + 1]] for i in running] == starts
            ):
                last += 1
            st.run_layers(layer, layers[last], st.chunk(running, starts, ends))
            if not self.pre_exit and layers[last] in exits:
                running = self._kv_exit(st, seqs, running, layers[last], layers[last], ee, decided)
            k = last + 1
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
        self.poll_cancel([seqs[i] for i in active])

    def _kv_exit(self, st, seqs, running, layer, ran_upto, ee, decided) -> list[int]:
        chunk = st.chunk(
            running, [seqs[i].cache_len[layer] for i in running], [seqs[i].pos for i in running]
        )
        last_rows = chunk.valid.sum(dim=1) - 1
        fired, logits = st.exit_decisions(
            layer, chunk, last_rows, list(range(len(running))), ee.metric, exit_threshold(ee, layer)
        )
        rows = [running[r] for r in fired]
        out = self.decide(st, seqs, rows, logits, layer, ran_upto, ee, True) if fired else {}
        decided.update(out)
        return [i for i in running if i not in out]

    # ------------------------------------------------------------------ headers
    def _encode(self, B, active, running, decided, extra_cols: int = 0):
        hdr = torch.zeros(B, 4 + extra_cols, dtype=torch.long)
        lps = torch.zeros(B, dtype=torch.float64)
        for i in running:
            hdr[i, 0] = RUNNING
        for i, d in decided.items():
            hdr[i, :4] = torch.tensor([DECIDED, d.token, d.exit_layer, d.ran_upto])
            lps[i] = d.logprob
        return hdr.to(self.device), lps.to(self.device)

    @staticmethod
    def _decisions_from(hdr, lps) -> dict[int, Decision]:
        h, lp = hdr.cpu().tolist(), lps.cpu().tolist()
        return {
            i: Decision(row[1], row[2], row[3], lp[i])
            for i, row in enumerate(h)
            if row[0] == DECIDED
        }

    def _send_header(self, B, active, running, decided, stage) -> None:
        hdr, lps = self._encode(B, active, running, decided)
        self.pipe.send(hdr, stage)
        self.pipe.send(lps, stage)

    def _recv_header(self, B, stage, cols: int = 4):
        hdr = self.pipe.recv((B, cols), torch.long, stage).cpu()
        lps = self.pipe.recv((B,), torch.float64, stage).cpu()
        return hdr, lps
