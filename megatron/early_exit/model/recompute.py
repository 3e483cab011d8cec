"""Activation recomputation with exits.

Full recomputation (megatron-core's `recompute_granularity="full"`) runs each checkpointed
chunk of layers under `torch.no_grad()` in forward and again in backward. An exit hook
inside such a chunk would see a hidden state without a graph (the exit's loss would not
reach the layers below it) and fire a second time in backward. So the decoder's chunking
(`TransformerBlock._checkpointed_forward`, replaced on the block instance only; the layers
stay megatron-core's) cuts chunks at the exits: an exit's hidden state is then a chunk's
output (post-exit) or input (pre-exit), which has a graph, and it is captured once, by
the block, in forward. Hooks stay muted while a chunk runs, also in its backward rerun.
Chunk sizes otherwise follow megatron-core's `uniform` / `block` methods, except that the
last uniform chunk ends at the stage's last layer (a stage of an uneven split may hold
fewer layers than --recompute-num-layers, where megatron-core's chunks would overrun);
a cut only adds the checkpoint of a hidden state the exit head keeps anyway.

Exit heads: each exit's projection and loss run under a non-reentrant checkpoint
(`checkpoint_exit_head`), so only the exit's input hidden state [s, b, h] is kept between
forward and backward, and the s x b x V/tp logits (and the loss's saved softmax) exist
for one exit at a time, recomputed in backward. Chunking the vocabulary would save the
same memory only with a fused projection + loss kernel; recomputing costs one extra
exit-head forward (the head is a small share of a stage's FLOPs) and works unchanged with
tied weights, TP and distillation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core import tensor_parallel


def chunk_plan(
    num_layers: int, method: str, recompute_num_layers: int, cut_after: set[int]
) -> list[tuple[int, int, bool]]:
    """[start, end) local layer ranges with whether each is checkpointed: megatron-core's
    `uniform` (chunks of N layers) or `block` (the first N layers one by one, the rest
    not), additionally cut after each local index in `cut_after`."""
    n = recompute_num_layers
    if method == "uniform":
        base = [(s, min(s + n, num_layers), True) for s in range(0, num_layers, n)]
    elif method == "block":
        base = [(i, i + 1, i < n) for i in range(num_layers)]
    else:
        raise ValueError(f"unknown recompute method {method!r}")
    out = []
    for start, end, ckpt in base:
        for i in range(start, end - 1):
            if i in cut_after:
                out.append((start, i + 1, ckpt))
                start = i + 1
        out.append((start, end, ckpt))
    return out


def install_exit_aware_recompute(model) -> None:
    """Replace `model.decoder`'s checkpointed forward by one that cuts chunks at exits."""
    block = model.decoder
    offset, pre_exit = model.layer_offset, model.config.early_exit.pre_exit
    local = [n - 1 - offset for n in model.local_exit_layers]
    # A pre-exit reads layer j's input: cut before j; a post-exit reads its output.
    cut_after = {j - 1 for j in local if j > 0} if pre_exit else set(local)
    plan = chunk_plan(
        len(block.layers),
        model.config.recompute_method,
        model.config.recompute_num_layers,
        cut_after,
    )
    exit_at = {n - 1 - offset: n for n in model.local_exit_layers}

    def checkpointed_forward(
        hidden_states,
        attention_mask,
        context,
        context_mask,
        rotary_pos_emb,
        attention_bias,
        packed_seq_params,
        use_inner_quantization_context,
        padding_mask=None,
    ):
        if use_inner_quantization_context:
            raise NotImplementedError("fp8/fp4 recomputation is not supported with exits")

        def run(start: int, end: int) -> Callable:
            def forward(hidden, mask, ctx, ctx_mask, rope, pad_mask=None):
                for index in range(start, end):
                    hidden, ctx = block.layers[index](
                        hidden_states=hidden,
                        attention_mask=mask,
                        context=ctx,
                        context_mask=ctx_mask,
                        rotary_pos_emb=rope,
                        attention_bias=attention_bias,
                        inference_context=None,
                        packed_seq_params=packed_seq_params,
                        padding_mask=pad_mask,
                    )
                return hidden, ctx

            return forward

        args = (attention_mask, context, context_mask, rotary_pos_emb, padding_mask)
        for start, end, ckpt in plan:
            if not ckpt:  # plain forward: the hooks capture, as without recomputation
                hidden_states, context = run(start, end)(hidden_states, *args[:4], padding_mask)
                args = (attention_mask, context, context_mask, rotary_pos_emb, padding_mask)
                continue
            if pre_exit and start in exit_at:
                model.record_exit_state(
                    exit_at[start], hidden_states, attention_mask, rotary_pos_emb
                )
            with model.exit_hooks_muted():
                hidden_states, context = tensor_parallel.checkpoint(
                    run(start, end),
                    block.config.distribute_saved_activations,
                    hidden_states,
                    *args,
                )
            args = (attention_mask, context, context_mask, rotary_pos_emb, padding_mask)
            if not pre_exit and end - 1 in exit_at:
                model.record_exit_state(
                    exit_at[end - 1], hidden_states, attention_mask, rotary_pos_emb
                )
        return hidden_states

    block._checkpointed_forward = checkpointed_forward


def checkpoint_exit_head(fn: Callable, hidden: torch.Tensor):
    """`fn(hidden)` (exit head + loss) recomputed in backward instead of keeping its
    activations. Non-reentrant: the head's parameters get gradients also when `hidden`
    needs none (EE-Tuning's frozen backbone). megatron-core's model-parallel RNG tracker
    (dropout inside TP regions) is replayed from its forward state in the recomputation;
    torch's own RNG state is restored by torch.utils.checkpoint."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    states = tracker.get_states()
    calls = [0]

    def replayed(h):
        calls[0] += 1
        if calls[0] == 1 or not states:
            return fn(h)
        current = tracker.get_states()
        tracker.set_states(states)
        try:
            return fn(h)
        finally:
            tracker.set_states(current)

    return torch.utils.checkpoint.checkpoint(replayed, hidden, use_reentrant=False)
