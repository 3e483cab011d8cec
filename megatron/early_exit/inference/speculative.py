"""Lossless self-speculative decoding with an early exit as the draft model (PP=1).

Per round: the exit at layer k drafts up to `draft_length` tokens, each through layers
1..k only (their KV there is final). One verification pass then feeds the last draft
through 1..k and every not-yet-verified position through k+1..L (the KV-recomputation
chunk), giving the full model's logits at each drafted position. Greedy: accept the
longest prefix where draft == full-model argmax, then append the full model's token.
Sampling: standard speculative rejection sampling (accept d with prob min(1, p(d)/q(d)),
else draw from norm(max(0, p - q)); a bonus token from p when all are accepted), so the
output distribution is exactly the full model's. After a rejection the per-layer cache
lengths are cut back to the accepted positions; stale entries are overwritten later
(attention only reads positions <= the query's). Sequences of a batch are decoded one
after another (rounds are per sequence). PP > 1: the same rounds, stage by stage (hidden
states passed on like in kv_recompute; the draft is broadcast from the exit's stage, the
verification result from the last stage) - correct, not pipelined.

Draft vocabulary (`draft_vocab_size` N, FR-Spec): the draft exit scores only the N most
frequent tokens (decoder.draft_ids; the projection rows are gathered once per generate
call, stage.py), so a draft costs N/V of the exit projection. q is the softmax (after
temperature/top-k/top-p) over those N tokens and exactly 0 elsewhere, so drafts come only
from the subset and rejection sampling stays exact (accept min(1, p/q); the residual
max(0, p - q) equals p outside the subset). Greedy output is unchanged (the full model
decides every token). The adaptive stop (`draft_threshold`) uses the confidence of the
subset distribution (its max_prob/margin are renormalised over N tokens, entropy is
normalised by log N), which is higher than the full-vocabulary one. With metric "learned"
the exit's confidence estimator decides before the projection: a token it scores below
`draft_threshold` is not drafted at all (the round verifies what it has), so a declined
draft costs no projection.
"""

from __future__ import annotations

import torch

from megatron.early_exit.inference.decode_state import Decoder
from megatron.early_exit.inference.sampling import (
    confidence,
    generator_for,
    processed_logprobs,
)
from megatron.early_exit.inference.stage import layer_runs
from megatron.early_exit.stage_split import split_of_config


def run_self_speculative(decoder: Decoder, st, seqs, ee) -> None:
    k = ee.draft_exit_layer or ee.exit_layers[0]
    n = ee.draft_vocab_size
    st.set_draft_vocab(decoder.draft_ids(n) if n is not None else None)
    for i, s in enumerate(seqs):
        s.spec_stats.update(drafted_tokens=0, accepted_tokens=0, verify_passes=0)
        while s.finish is None:
            _round(decoder, st, i, s, k, ee)
        d, a, v = (s.spec_stats[x] for x in ("drafted_tokens", "accepted_tokens", "verify_passes"))
        s.spec_stats["acceptance_rate"] = a / d if d else 0.0
        s.spec_stats["mean_accepted_length"] = a / v if v else 0.0


def _owner(st, layer: int) -> int:
    """Pipeline stage holding a layer (the model's split, even or uneven)."""
    return split_of_config(st.model.config).stage_of(layer)


def _forward(decoder, st, i, s, from_layer: int, upto: int) -> None:
    """Newest position through layers from_layer..upto on every stage, with catch-up chunks
    (positions a layer lacks); hidden states move stage to stage like in kv_recompute.
    Bookkeeping (cache lengths) is updated identically on every rank."""
    pipe, p = decoder.pipe, s.pos
    first, last = st.offset + 1, st.offset + len(st.layers)
    if from_layer == 1 and st.first:
        chunk = st.chunk([i], [s.emb_len], [p])
        ids = [[s.tokens[q] for q in chunk.pos[0].tolist()]]
        st.embed(chunk, torch.tensor(ids, device=decoder.device))
    if pipe.stage > 0 and from_layer <= first <= upto:
        start = s.cache_len[first]
        flat = pipe.recv((p - start + 1, st.hbuf.shape[-1]), st.dtype, pipe.stage - 1)
        st.put_flat([i], [start], [p], flat)
    here = range(max(first, from_layer), min(last, upto) + 1)
    # consecutive layers that lack the same positions take one chunk: one run_layers call
    changes = {n for n in here[:-1] if s.cache_len[n + 1] != s.cache_len[n]}
    for a, b in layer_runs(here, changes):
        st.run_layers(a, b, st.chunk([i], [s.cache_len[a]], [p]))
    if not st.last and from_layer <= last + 1 <= upto:
        pipe.send(st.get_flat([i], [s.cache_len[last + 1]], [p]), pipe.stage + 1)
    if from_layer == 1:
        s.emb_len = p + 1
    for layer in range(from_layer, upto + 1):
        s.cache_len[layer] = p + 1


def _draft(decoder, st, i, s, k, ee, step: int) -> tuple[int, torch.Tensor, float]:
    """(draft token, its processed log-distribution q [V], exit confidence), on every rank.

    Metric "learned": the estimator runs before the projection; below `draft_threshold`
    nothing is drafted (token -1, no projection), since a rejection is expected."""
    sp = s.req.sampling
    V = decoder.limits.vocab_size
    box = torch.zeros(V + 2, dtype=torch.float64)
    owner = _owner(st, k)
    if decoder.pipe.stage == owner:
        # an exit block sees every position its own cache lacks (hbuf holds layer-k outputs)
        chunk = st.chunk([i], [s.xcache_len if k in st.exit_caches else s.pos], [s.pos])
        h = st.exit_features(k, chunk, chunk.valid.sum(dim=1) - 1)
        learned = float(st.exit_confidence(k, h)[0]) if ee.metric == "learned" else None
        if learned is not None and learned < ee.draft_threshold:
            st.projections_skipped += 1
            box[0], box[1] = -1, learned
        else:
            if learned is not None:
                st.projections_run += 1
            logits = st.exit_project(k, h, draft=True)  # [1, V] or [1, N] (draft vocab)
            q = processed_logprobs(logits[0], sp)
            if sp.greedy:
                tok = int(torch.argmax(q))
            else:
                tok = int(torch.multinomial(q.exp(), 1, generator=generator_for(sp.seed, step)))
            box[0] = tok
            box[1] = learned if learned is not None else float(confidence(logits, ee.metric)[0])
            if st.draft_ids is not None:  # back to vocabulary ids; q is 0 outside the subset
                ids = st.draft_ids_cpu
                box[0] = int(ids[tok])
                box[2:] = float("-inf")
                box[2:][ids] = q.double()
            else:
                box[2:] = q.double()
    s.xcache_len = s.pos + 1
    box = decoder.pipe.broadcast(box.to(decoder.device), owner).cpu()
    return int(box[0]), box[2:].float(), float(box[1])


def _round(decoder, st, i, s, k, ee) -> None:
    sp = s.req.sampling
    L = decoder.num_layers
    base = s.pos  # newest token, not yet through any layer deeper than what it has
    budget = sp.max_new_tokens - len(s.gen) - 1  # room for drafts + the full model's token
    drafts: list[int] = []
    qs: list[torch.Tensor] = []
    fed = False  # the newest token already went through 1..k (a declined "learned" draft)
    for j in range(min(ee.draft_length, budget)):
        _forward(decoder, st, i, s, 1, k)
        tok, q, conf = _draft(decoder, st, i, s, k, ee, 3 * (len(s.gen) + j) + 1)
        if tok < 0:
            fed = True
            break
        drafts.append(tok)
        qs.append(q)
        s.tokens.append(tok)
        if ee.draft_threshold > 0 and conf < ee.draft_threshold:
            break
    # verification: the newest token through 1..k, everything pending through k+1..L
    if not fed:
        _forward(decoder, st, i, s, 1, k)
    if decoder.pipe.stage == _owner(st, k) and k in st.exit_caches and s.xcache_len <= s.pos:
        st.exit_block_fill(k, st.chunk([i], [s.xcache_len], [s.pos]))
    s.xcache_len = s.pos + 1
    _forward(decoder, st, i, s, k + 1, L)
    box = torch.zeros(ee.draft_length + 3, dtype=torch.float64)
    if st.last:
        positions = list(range(base, s.pos + 1))
        full = st.final_logits([i] * len(positions), positions)
        accepted, nxt, ps = _accept(drafts, qs, full, sp, len(s.gen))
        box[0], box[1] = accepted, nxt
        for j in range(accepted):
            box[2 + j] = float(ps[j][drafts[j]])
        box[2 + accepted] = float(ps[accepted][nxt])
    box = decoder.pipe.broadcast(box.to(decoder.device), decoder.pipe.size - 1).cpu().tolist()
    accepted, nxt, lps = int(box[0]), int(box[1]), box[2:]
    s.spec_stats["verify_passes"] += 1
    s.spec_stats["drafted_tokens"] += len(drafts)
    s.spec_stats["accepted_tokens"] += accepted
    # roll back to base + accepted (KV of rejected drafts is dropped)
    keep = base + accepted + 1
    s.tokens = s.tokens[: base + 1]  # drafts are re-appended below as accepted tokens
    for layer in range(1, L + 1):
        s.cache_len[layer] = min(s.cache_len[layer], keep)
    s.emb_len = min(s.emb_len, keep)
    s.xcache_len = min(s.xcache_len, keep)
    new = [(drafts[j], k, lps[j]) for j in range(accepted)] + [(nxt, L, lps[accepted])]
    for tok, layer, lp in new:
        s.tokens.append(tok)
        s.gen.append(tok)
        s.exits.append(layer)
        s.layers_used.append(layer)
        s.logprobs.append(lp)
        decoder.emit(s)
        decoder.check_stop(s)
        decoder.poll_cancel([s])  # every rank runs this loop alike
        if s.finish is not None:
            break
    # the tokens list keeps the pending token at the end, like kv_recompute expects
    s.tokens = s.tokens[: len(s.req.prompt_token_ids) + len(s.gen)]


def _accept(drafts, qs, full, sp, step0):
    """(accepted drafts, next token, target log-probs per position) from logits [m+1, V]."""
    ps = [processed_logprobs(full[j], sp) for j in range(full.shape[0])]
    for j, d in enumerate(drafts):
        p = ps[j]
        if sp.greedy:
            if int(torch.argmax(p)) != d:
                return j, int(torch.argmax(p)), ps
            continue
        ratio = float(torch.exp(p[d] - qs[j][d]))
        u = float(torch.rand(1, generator=generator_for(sp.seed, 3 * (step0 + j) + 2)))
        if u >= min(1.0, ratio):
            resid = (p.exp() - qs[j].exp()).clamp_min(0)
            g = generator_for(sp.seed, 3 * (step0 + j))
            return j, int(torch.multinomial(resid / resid.sum(), 1, generator=g)), ps
    p = ps[len(drafts)]
    if sp.greedy:
        tok = int(torch.argmax(p))
    else:
        g = generator_for(sp.seed, 3 * (step0 + len(drafts)))
        tok = int(torch.multinomial(p.exp(), 1, generator=g))
    return len(drafts), tok, ps
