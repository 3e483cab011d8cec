"""One pipeline stage's inference state: layers, KV caches, hidden buffer, exit heads.

`hbuf[i, p]` holds the newest hidden state computed for position p of sequence i on this
stage (the output of the deepest local layer that has processed it, or the input that
arrived from the previous stage). KV recomputation relies on it: a token that exited at
layer k keeps its layer-k hidden state here until the next step feeds it, together with
the new token, through layers k+1.. (kv_recompute.py).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from megatron.early_exit.inference.layers import Chunk, KVCache, layer_forward, new_cache
from megatron.early_exit.inference.projection import decode_threads, project
from megatron.early_exit.inference.sampling import confidence


def layer_runs(layers: range, ends_after: set[int]) -> list[tuple[int, int]]:
    """`layers` cut into consecutive (first, last) runs, each ending at a layer of
    `ends_after` (an exit decides there, or the next layer takes another chunk) or at the
    last layer: each run is one StageState.run_layers call."""
    runs, first = [], None
    for layer in layers:
        first = layer if first is None else first
        if layer in ends_after or layer == layers[-1]:
            runs.append((first, layer))
            first = None
    return runs


def make_chunk(seqs: list[int], starts: list[int], ends: list[int], device) -> Chunk:
    """Rows [start, end] (inclusive) of each sequence, right-padded with the last position.

    Not memoised; decoding uses StageState.chunk, which is."""
    n = max(e - s + 1 for s, e in zip(starts, ends))
    pos = torch.empty(len(seqs), n, dtype=torch.long)
    valid = torch.zeros(len(seqs), n, dtype=torch.bool)
    for r, (s, e) in enumerate(zip(starts, ends)):
        m = e - s + 1
        pos[r, :m] = torch.arange(s, e + 1)
        pos[r, m:] = e
        valid[r, :m] = True
    return Chunk(
        torch.tensor(seqs, dtype=torch.long, device=device),
        pos.to(device),
        valid.to(device),
        max_pos=max(ends),
    )


def _project(output_layer, h: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """A vocab-parallel output layer (ColumnParallelLinear, gather_output=False) on h: the
    local matmul, without megatron-core's autograd wrapper (decode is overhead-bound), with
    a kernel chosen by row count (projection.py)."""
    w = output_layer.weight if weight is None else weight
    return project(h, w, output_layer.bias)


class StageState:
    def __init__(self, model, batch: int, max_len: int, vocab_size: int, exit_layers: list[int]):
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = vocab_size
        self.offset = model.layer_offset
        self.layers = list(model.decoder.layers)
        self.first = model.pre_process
        self.last = model.post_process
        self.pre_exit = model.config.early_exit.pre_exit
        self.exits = [n for n in model.local_exit_layers if n in exit_layers]
        self.caches = [
            new_cache(layer, batch, max_len, self.dtype, self.device) for layer in self.layers
        ]
        self.exit_caches: dict[int, KVCache] = {}
        for n in self.exits:
            block = model.exit_heads.get(n).block
            if block is not None:
                self.exit_caches[n] = new_cache(block, batch, max_len, self.dtype, self.device)
        h = model.config.hidden_size
        self.hbuf = torch.zeros(batch, max_len, h, dtype=self.dtype, device=self.device)
        self.freqs = None
        if getattr(model, "position_embedding_type", None) == "rope":
            self.freqs = model.rotary_pos_emb(max_len).squeeze(1)  # [S, 1, d]
        self._chunks: dict[tuple, Chunk] = {}  # per generate call: nothing shared by engines
        self.draft_ids: torch.Tensor | None = None  # self_speculative draft vocabulary
        self.draft_ids_cpu: torch.Tensor | None = None
        self._draft_proj: dict[int, tuple] = {}  # exit layer -> (slots, W[ids], bias[ids])
        # Metric "learned": exit evaluations (one per sequence and exit) whose vocabulary
        # projection ran / was skipped because the estimator did not fire (this rank).
        self.projections_run = 0
        self.projections_skipped = 0

    def set_draft_vocab(self, ids: torch.Tensor | None) -> None:
        """Restrict `exit_logits(..., draft=True)` to these token ids (ascending)."""
        self.draft_ids = None if ids is None else ids.to(self.device)
        self.draft_ids_cpu = None if ids is None else ids.cpu()
        self._draft_proj = {}

    def chunk(self, seqs: list[int], starts: list[int], ends: list[int]) -> Chunk:
        """make_chunk on this stage's device, memoised (bounded): within a decode step every
        layer usually sees the same ranges."""
        key = (tuple(seqs), tuple(starts), tuple(ends))
        chunk = self._chunks.get(key)
        if chunk is None:
            chunk = make_chunk(seqs, starts, ends, self.device)
            if len(self._chunks) > 64:
                self._chunks.clear()
            self._chunks[key] = chunk
        return chunk

    @property
    def global_layers(self) -> range:
        return range(self.offset + 1, self.offset + len(self.layers) + 1)

    # ------------------------------------------------------------------ hidden buffer
    def gather(self, chunk: Chunk) -> torch.Tensor:
        return self.hbuf[chunk.seq_idx.unsqueeze(1), chunk.pos].transpose(0, 1).contiguous()

    def scatter(self, chunk: Chunk, hidden: torch.Tensor) -> None:
        rows, cols, seq, pos = chunk.valid_index()
        self.hbuf[seq, pos] = hidden[cols, rows].to(self.dtype)

    def put_flat(self, seqs, starts, ends, flat: torch.Tensor) -> None:
        """Store received hidden states [sum(n_i), h] for positions [start_i, end_i]."""
        o = 0
        for i, s, e in zip(seqs, starts, ends):
            self.hbuf[i, s : e + 1] = flat[o : o + e - s + 1].to(self.dtype)
            o += e - s + 1

    def get_flat(self, seqs, starts, ends) -> torch.Tensor:
        parts = [self.hbuf[i, s : e + 1] for i, s, e in zip(seqs, starts, ends)]
        if not parts:
            return torch.zeros(0, self.hbuf.shape[-1], dtype=self.dtype, device=self.device)
        return torch.cat(parts).contiguous()

    # ------------------------------------------------------------------ compute
    def embed(self, chunk: Chunk, tokens: torch.Tensor) -> None:
        """tokens [b, n] at chunk positions -> hbuf."""
        emb = self.model.embedding(input_ids=tokens, position_ids=chunk.pos)
        self.scatter(chunk, emb)

    def run_layer(self, layer_number: int, chunk: Chunk) -> None:
        self.run_layers(layer_number, layer_number, chunk)

    def run_layers(self, first: int, last: int, chunk: Chunk) -> None:
        """Layers first..last (global numbers) on the same chunk: the hidden state goes from
        layer to layer and is stored in hbuf once (a valid row's output depends only on its
        input and the KV cache, so this equals run_layer per layer)."""
        h = self.gather(chunk)
        with decode_threads(h.shape[0] * h.shape[1], self.device):
            for idx in range(first - 1 - self.offset, last - self.offset):
                h = layer_forward(self.layers[idx], h, chunk, self.caches[idx], self.freqs)
        self.scatter(chunk, h)

    def _full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[n, V/tp] vocab-parallel -> [n, V_real] float on every TP rank."""
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            logits = gather_from_tensor_model_parallel_region(logits)
        return logits[..., : self.vocab_size].float()

    def _draft_projection(self, layer_number: int, head) -> tuple:
        """This TP rank's rows of the exit projection for the draft ids, gathered once per
        generate call (not per token): (their slots in the draft vocabulary, W, bias).
        Rank r holds ids [r * V/tp, (r+1) * V/tp) of the vocab-parallel projection."""
        proj = self._draft_proj.get(layer_number)
        if proj is None:
            w = self.model.tied_exit_output_weight() if head.tied else head.output_layer.weight
            start = parallel_state.get_tensor_model_parallel_rank() * w.shape[0]
            ids = self.draft_ids
            mine = (ids >= start) & (ids < start + w.shape[0])
            local = ids[mine] - start
            bias = head.output_layer.bias
            proj = (
                mine.nonzero().squeeze(1),
                w.detach().index_select(0, local).contiguous(),
                None if bias is None else bias.detach().index_select(0, local),
            )
            self._draft_proj[layer_number] = proj
        return proj

    def exit_logits(
        self, layer_number: int, chunk: Chunk, last_rows: torch.Tensor, draft: bool = False
    ) -> torch.Tensor:
        """Exit head logits at the newest position of each chunk sequence: [b, V], or with
        `draft` only the draft vocabulary's (set_draft_vocab): [b, N], on every TP rank.

        An exit block (a transformer layer in the head) sees the whole chunk so that its
        own KV cache stays in step with the backbone layer it hangs on.
        """
        h = self.exit_features(layer_number, chunk, last_rows)
        return self.exit_project(layer_number, h, draft)

    def exit_decisions(
        self,
        layer_number: int,
        chunk: Chunk,
        last_rows: torch.Tensor,
        rows: list[int],
        metric: str,
        threshold: float,
    ) -> tuple[list[int], torch.Tensor | None]:
        """Which of `rows` (chunk rows) exit here, and their full-vocabulary logits [n, V]
        (None when none fires). Metrics on the exit's distribution project every row first;
        "learned" asks the estimator first and projects only the rows that fire, so the
        emitted token is still exactly the exit's argmax."""
        if metric != "learned":
            logits = self.exit_logits(layer_number, chunk, last_rows)
            conf = confidence(logits, metric).tolist()
            fired = [r for r in rows if conf[r] >= threshold]
            return fired, (logits[fired] if fired else None)
        h = self.exit_features(layer_number, chunk, last_rows)
        conf = self.exit_confidence(layer_number, h).tolist()
        fired = [r for r in rows if conf[r] >= threshold]
        self.projections_run += len(fired)
        self.projections_skipped += len(rows) - len(fired)
        if not fired:
            return fired, None
        return fired, self.exit_project(layer_number, h[:, fired])

    def exit_confidence(self, layer_number: int, h: torch.Tensor) -> torch.Tensor:
        """The learned estimator on `exit_features` [1, b, h]: [b] float in [0, 1] (the same
        on every TP rank: the features are)."""
        head = self.model.exit_heads.get(layer_number)
        return torch.sigmoid(head.confidence_logit(h[0]).float())

    def exit_features(
        self, layer_number: int, chunk: Chunk, last_rows: torch.Tensor
    ) -> torch.Tensor:
        """The exit head's hidden state before its projection, newest position of each chunk
        sequence: [1, b, h] (the exit block, if any, runs on the whole chunk)."""
        head = self.model.exit_heads.get(layer_number)
        b = chunk.seq_idx.shape[0]
        if head.block is not None:
            h = layer_forward(
                head.block, self.gather(chunk), chunk, self.exit_caches[layer_number], self.freqs
            )
            h = h[last_rows, torch.arange(b, device=self.device)].unsqueeze(0)
        else:
            h = self.hbuf[chunk.seq_idx, chunk.pos[torch.arange(b), last_rows]].unsqueeze(0)
        if head.mlp is not None:
            out, bias = head.mlp(h)
            h = h + (out if bias is None else out + bias)
        if head.norm is not None:
            h = head.norm(h)
        return h

    def exit_project(self, layer_number: int, h: torch.Tensor, draft: bool = False) -> torch.Tensor:
        """Vocabulary projection of `exit_features` rows [1, b, h]: [b, V] (or [b, N] with
        `draft` and a draft vocabulary), on every TP rank."""
        head = self.model.exit_heads.get(layer_number)
        b = h.shape[1]
        if draft and self.draft_ids is not None:
            slots, w, bias = self._draft_projection(layer_number, head)
            logits = project(h[0], w, bias)  # [b, N/tp-ish]: only this rank's draft ids
            if parallel_state.get_tensor_model_parallel_world_size() > 1:
                full = logits.new_zeros(b, len(self.draft_ids))
                full[:, slots] = logits
                torch.distributed.all_reduce(
                    full, group=parallel_state.get_tensor_model_parallel_group()
                )  # each slot is non-zero on exactly one rank: the sum assembles [b, N]
                logits = full
            if head.temperature != 1.0:
                logits = logits / head.temperature
            return logits.float()
        weight = self.model.tied_exit_output_weight() if head.tied else None
        logits = _project(head.output_layer, h, weight)
        if head.temperature != 1.0:
            logits = logits / head.temperature
        return self._full_logits(logits[0])

    def final_logits(self, seqs: list[int], positions: list[int]) -> torch.Tensor:
        h = self.hbuf[torch.tensor(seqs), torch.tensor(positions)].unsqueeze(0)
        norm = getattr(self.model.decoder, "final_layernorm", None)
        if norm is not None:
            h = norm(h)
        weight = None
        if self.model.share_embeddings_and_output_weights:
            weight = self.model.shared_embedding_or_output_weight()
        return self._full_logits(_project(self.model.output_layer, h, weight)[0])

    def exit_block_fill(self, layer_number: int, chunk: Chunk) -> None:
        """Run an exit block only for its KV cache (token already decided)."""
        if layer_number in self.exit_caches:
            block = self.model.exit_heads.get(layer_number).block
            layer_forward(
                block, self.gather(chunk), chunk, self.exit_caches[layer_number], self.freqs
            )
