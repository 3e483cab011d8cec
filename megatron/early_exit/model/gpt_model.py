"""EarlyExitGPTModel: megatron-core GPTModel plus exit heads attached by hooks.

Exit hidden states are captured with forward hooks on the decoder's layers (post-exit)
or forward pre-hooks (pre-exit), so the transformer layer itself is megatron-core's,
unmodified. `forward` returns the usual GPTModel output together with the captured
exit states; exit logits are computed later by `exit_loss` (the schedule calls it just
before that microbatch's backward, so s*b*V exit logits are never held across
microbatches in flight). With full activation recomputation the decoder's chunks are cut
at the exits and the block records exit states itself (model/recompute.py); with any
recomputation the exit heads' logits are recomputed in backward.

Tied exit heads reuse the word embeddings. A pipeline stage without the embedding keeps
a copy that megatron-core treats like the last stage's tied LM head: it is part of the
embedding process group (see `tied_embedding_ranks`), starts as the first stage's
weights, and has its gradient all-reduced with the embedding's every step. With virtual
stages each model chunk with tied exits (other than the embedding's and a tied LM head's)
holds a copy, so a rank may hold several: `sync_tied_weights_init` and
`allreduce_tied_weight_grads` treat a rank's copies together.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.transformer.utils import make_tp_sharded_tensor_for_checkpoint

from megatron.early_exit.config import EarlyExitTransformerConfig
from megatron.early_exit.model.exit_head import ExitHead
from megatron.early_exit.model.recompute import checkpoint_exit_head, install_exit_aware_recompute
from megatron.early_exit.model.specs import LayerSpecs, get_layer_specs
from megatron.early_exit.stage_split import split_of_config

WORD_EMBEDDING_KEY = "embedding.word_embeddings.weight"


@dataclass
class ExitState:
    """What an exit head needs from the backbone for one microbatch."""

    hidden: torch.Tensor
    attention_mask: torch.Tensor | None = None
    rotary_pos_emb: torch.Tensor | None = None


@dataclass
class ExitForwardOutput:
    """GPTModel output (hidden states, per-token loss or logits) plus local exit states."""

    output: torch.Tensor
    exit_states: dict[int, ExitState] = field(default_factory=dict)


def exit_stage(layer_number: int, config: EarlyExitTransformerConfig) -> int:
    """Pipeline stage owning a (1-based) layer, with the config's (possibly uneven) split."""
    return split_of_config(config).stage_of(layer_number)


def tied_exit_stages(config: EarlyExitTransformerConfig) -> list[int]:
    ee = config.early_exit
    if ee.untie_exit_output_weights:
        return []
    return sorted({exit_stage(n, config) for n in ee.exit_layer_nums})


def tied_embedding_ranks(config: EarlyExitTransformerConfig, share_embeddings: bool):
    """`get_embedding_ranks` for initialize_model_parallel: stages holding word embeddings.

    The first stage owns them; the last stage holds a copy when the LM head is tied; every
    stage with a tied exit head holds a copy too.
    """
    pp = config.pipeline_model_parallel_size
    stages = {0, *tied_exit_stages(config)}
    if share_embeddings and pp > 1:
        stages.add(pp - 1)

    def get_embedding_ranks(pp_ranks: list[int], *_unused) -> list[int]:
        if len(pp_ranks) == 1:
            return [pp_ranks[0]]
        return [pp_ranks[s] for s in sorted(stages)]

    return get_embedding_ranks


class ExitHeads(MegatronModule):
    """Container keyed by global layer number, so checkpoint keys are layout-independent."""

    def __init__(self, config: EarlyExitTransformerConfig, heads: dict[int, ExitHead]):
        super().__init__(config=config)
        for layer_number, head in heads.items():
            self.add_module(str(layer_number), head)

    def get(self, layer_number: int) -> ExitHead:
        return getattr(self, str(layer_number))


class TiedExitWeight(MegatronModule):
    """A pipeline stage's copy of the word embeddings for its tied exit heads."""

    def __init__(
        self,
        config: EarlyExitTransformerConfig,
        vocab_size: int,
        tp_size: int,
        vp_stage: int | None = None,
    ):
        super().__init__(config=config)
        self.vp_stage = vp_stage
        self.weight = torch.nn.Parameter(
            torch.zeros(vocab_size // tp_size, config.hidden_size, dtype=config.params_dtype)
        )
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)
        # Same treatment as the last stage's tied LM head: excluded from the grad norm
        # (counted once on the first stage) and kept in its own distributed-optimizer bucket
        # so shards line up across stages for the embedding all-reduce.
        self.weight.shared = True
        self.weight.shared_embedding = True
        self.weight.is_embedding_or_output_parameter = True

    def forward(self) -> torch.Tensor:
        return self.weight

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> ShardedStateDict:
        # Not saved (the first stage saves the embedding); loaded from the embedding's key.
        replica_id = (  # never the main replica; distinct per model chunk too
            1 + parallel_state.get_pipeline_model_parallel_rank(),
            self.vp_stage or 0,
            parallel_state.get_data_parallel_rank(with_context_parallel=True),
        )
        return {
            f"{prefix}weight": make_tp_sharded_tensor_for_checkpoint(
                tensor=self.weight,
                key=WORD_EMBEDDING_KEY,
                replica_id=replica_id,
                allow_shape_mismatch=True,
            )
        }


class EarlyExitGPTModel(GPTModel):
    def __init__(
        self,
        config: EarlyExitTransformerConfig,
        specs: LayerSpecs,
        vocab_size: int,
        max_sequence_length: int,
        pre_process: bool = True,
        post_process: bool = True,
        share_embeddings_and_output_weights: bool = True,
        position_embedding_type: str = "learned_absolute",
        rotary_base: int = 10000,
        rotary_percent: float = 1.0,
        rope_scaling: bool = False,
        rope_scaling_factor: float = 8.0,
        parallel_output: bool = True,
        vp_stage: int | None = None,
    ) -> None:
        # megatron-core's own count for this stage (uneven first/last stages included) or,
        # with virtual stages, for this model chunk (`vp_stage`; layer numbers stay global).
        num_local_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
        super().__init__(
            config=config,
            transformer_layer_spec=specs.block(num_local_layers),
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            position_embedding_type=position_embedding_type,
            rotary_base=rotary_base,
            rotary_percent=rotary_percent,
            rope_scaling=rope_scaling,
            rope_scaling_factor=rope_scaling_factor,
            parallel_output=parallel_output,
            vp_stage=vp_stage,
        )
        ee = config.early_exit
        self.layer_offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
        self.num_local_layers = len(self.decoder.layers)
        self.local_exit_layers = [
            n
            for n in ee.exit_layer_nums
            if self.layer_offset < n <= self.layer_offset + self.num_local_layers
        ]
        tied = not ee.untie_exit_output_weights
        self.tied_exit_weight = None
        if tied and self.local_exit_layers and self._needs_tied_copy():
            tp = parallel_state.get_tensor_model_parallel_world_size()
            self.tied_exit_weight = TiedExitWeight(config, vocab_size, tp, vp_stage)
        if tied and ee.exit_layer_nums and self.pre_process:
            # The embedding is shared with exits (here or on other stages' copies): its own
            # distributed-optimizer bucket, so its DP shards line up with the copies'.
            self.embedding.word_embeddings.weight.shared_embedding = True
        heads = {
            n: ExitHead(config, specs, n, ee.exit_layer_nums.index(n), vocab_size, tied)
            for n in self.local_exit_layers
        }
        self.exit_heads = ExitHeads(config, heads)
        self._sync_tied_exit_weight_init()
        self._capture: dict[int, ExitState] | None = None
        self._hooks_muted = False
        self._register_exit_hooks(ee.pre_exit)
        if config.recompute_granularity == "full":
            # Every stage: also those without exits, where an uneven split can leave fewer
            # layers than --recompute-num-layers (megatron-core's uniform chunks overrun).
            install_exit_aware_recompute(self)

    # ----------------------------------------------------------------- tied weights
    def _needs_tied_copy(self) -> bool:
        if self.pre_process:
            return False  # the embedding itself is here
        return not (self.post_process and self.share_embeddings_and_output_weights)

    def tied_exit_output_weight(self) -> torch.Tensor | None:
        """The weight tied exits project with on this stage (the word embeddings or a copy;
        the tied LM head's on a last stage): every tied copy of the embeddings it holds."""
        if self.pre_process:
            return self.embedding.word_embeddings.weight
        if self.tied_exit_weight is not None:
            return self.tied_exit_weight.weight
        if self.post_process and self.share_embeddings_and_output_weights:
            return self.output_layer.weight
        return None

    def _tied_exit_weight_in_forward(self) -> torch.Tensor | None:
        """`tied_exit_output_weight` for an exit head's forward. A stage's copy is read by
        calling its module, so that DDP's forward pre-hook waits for the copy's parameter
        all-gather (--overlap-param-gather); outside a forward (grad all-reduce) a call
        would start a gather of stale parameters."""
        if self.tied_exit_weight is not None:
            return self.tied_exit_weight()
        return self.tied_exit_output_weight()

    def shared_embedding_or_output_weight(self) -> torch.Tensor | None:
        # megatron-core all-reduces this weight's grad over the embedding group; middle
        # stages with tied exits are members, so they answer with their copy.
        weight = super().shared_embedding_or_output_weight()
        if weight is None and self.tied_exit_weight is not None:
            return self.tied_exit_weight.weight
        return weight

    def _embedding_group_with_peers(self):
        """megatron-core's embedding group if this rank shares word embeddings with others."""
        if self.config.pipeline_model_parallel_size == 1 or not dist.is_initialized():
            return None
        group = parallel_state.get_embedding_group(check_initialized=False)
        if group is None:
            return None
        ranks = dist.get_process_group_ranks(group)
        return group if dist.get_rank() in ranks and len(ranks) > 1 else None

    def _sync_tied_exit_weight_init(self) -> None:
        """Copy the first stage's embedding into this stage's tied copy (zeros + all-reduce).

        GPTModel already did this for the first and last stages when the LM head is tied;
        the remaining members of the embedding group join here, in the same group order.
        """
        if self.vp_stage is not None:
            return  # virtual stages: sync_tied_weights_init, once all chunks exist
        if self._embedding_group_with_peers() is None:
            return
        if self.tied_exit_output_weight() is None:
            raise RuntimeError("stage is in the embedding group but holds no tied weight")
        sync_tied_weights_init([self])  # one stage: the same rule as for a rank's chunks

    def allreduce_tied_exit_grads(self) -> None:
        """All-reduce the tied weight's grad over the embedding group.

        megatron-core's finalize_model_grads does this only when the LM head is tied; with
        an untied LM head and tied exits we do it ourselves (call after finalize).
        """
        if self.share_embeddings_and_output_weights:
            return
        allreduce_tied_weight_grads([self])  # one stage: the same rule as for a rank's chunks

    # ----------------------------------------------------------------- exit capture
    def _register_exit_hooks(self, pre_exit: bool) -> None:
        for n in self.local_exit_layers:
            layer = self.decoder.layers[n - 1 - self.layer_offset]
            if pre_exit:
                layer.register_forward_pre_hook(self._make_pre_hook(n), with_kwargs=True)
            else:
                layer.register_forward_hook(self._make_post_hook(n), with_kwargs=True)

    def _make_pre_hook(self, layer_number: int):
        def hook(module, args, kwargs):
            if self._capture is not None and not self._hooks_muted:
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                self.record_exit_state(
                    layer_number, hidden, kwargs.get("attention_mask"), kwargs.get("rotary_pos_emb")
                )

        return hook

    def _make_post_hook(self, layer_number: int):
        def hook(module, args, kwargs, output):
            if self._capture is not None and not self._hooks_muted:
                hidden = output[0] if isinstance(output, tuple) else output
                self.record_exit_state(
                    layer_number, hidden, kwargs.get("attention_mask"), kwargs.get("rotary_pos_emb")
                )

        return hook

    def record_exit_state(self, layer_number, hidden, attention_mask, rotary_pos_emb) -> None:
        """Capture an exit's input during `forward` (hooks, or the recomputing block)."""
        if self._capture is None:
            return  # a recomputation in backward, or a bare decoder call
        if layer_number in self._capture:
            # Would silently train the exit on the wrong tensor (e.g. one without a graph).
            raise RuntimeError(f"exit state of layer {layer_number} captured twice")
        self._capture[layer_number] = ExitState(hidden, attention_mask, rotary_pos_emb)

    @contextlib.contextmanager
    def exit_hooks_muted(self):
        """Layers run inside a checkpointed chunk: their hidden states have no graph."""
        self._hooks_muted = True
        try:
            yield
        finally:
            self._hooks_muted = False

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> ExitForwardOutput:
        self._capture = {}
        try:
            output = super().forward(
                input_ids, position_ids, attention_mask, labels=labels, **kwargs
            )
            return ExitForwardOutput(output, self._capture)
        finally:
            self._capture = None

    # ----------------------------------------------------------------- exit outputs
    def exit_logits(
        self, layer_number: int, state: ExitState, capture: dict | None = None
    ) -> torch.Tensor:
        """Vocab-parallel logits [s, b, V/tp] of the exit at `layer_number`; `capture` (if
        given) receives the head's detached features under "features"."""
        head = self.exit_heads.get(layer_number)
        h = head.features(state.hidden, state.attention_mask, state.rotary_pos_emb)
        if capture is not None:
            capture["features"] = h.detach()
        return head.project(h, self._tied_exit_weight_in_forward() if head.tied else None)

    def exit_loss(
        self,
        layer_number: int,
        state: ExitState,
        labels: torch.Tensor,
        with_max_prob: bool = False,
        capture: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token cross entropy [b, s] and, if asked, the exit's detached max probability.
        `capture`: see `_capture_exit`."""

        def head_and_loss(hidden):
            logits = self.exit_logits(layer_number, replace(state, hidden=hidden), capture)
            max_prob = None
            with torch.no_grad():  # before the loss: megatron's vocab-parallel CE is in place
                if with_max_prob:
                    max_prob = vocab_parallel_max_prob(logits.float()).transpose(0, 1)
                _capture_exit(capture, logits)
            return self.compute_language_model_loss(labels, logits), max_prob

        return self._exit_head_call(head_and_loss, state.hidden)

    def _exit_head_call(self, fn, hidden: torch.Tensor):
        """`fn(hidden)`, recomputed in backward when the run recomputes activations (see
        model/recompute.py: no s x b x V exit logits kept between forward and backward)."""
        recompute = self.config.recompute_granularity is not None and self.training
        if recompute and torch.is_grad_enabled():
            return checkpoint_exit_head(fn, hidden)
        return fn(hidden)

    def exit_distillation_loss(
        self,
        layer_number: int,
        state: ExitState,
        labels: torch.Tensor,
        teacher_log_probs: torch.Tensor,
        with_max_prob: bool = False,
        capture: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-token KL(teacher || exit) [b, s] (differentiable), the exit's cross entropy with
        `labels` [b, s] (detached, a metric) and, if asked, its detached max probability.

        `teacher_log_probs`: the final layer's detached log-probabilities [s, b, V/tp], or
        its top-k reduction (a `TopKTeacher`: exit distillation across pipeline stages, or
        EE-Tuning from a teacher cache).
        """

        def head_and_loss(hidden):
            logits = self.exit_logits(layer_number, replace(state, hidden=hidden), capture)
            max_prob = None
            with torch.no_grad():
                if with_max_prob:
                    max_prob = vocab_parallel_max_prob(logits.float()).transpose(0, 1)
                _capture_exit(capture, logits)
            if isinstance(teacher_log_probs, TopKTeacher):
                kl = vocab_parallel_top_k_kl(logits, teacher_log_probs).transpose(0, 1)
            else:
                kl = vocab_parallel_kl_divergence(logits, teacher_log_probs).transpose(0, 1)
            with torch.no_grad():
                # Last: megatron's CE works in place on the logits. The KL saved its own
                # log-softmax, not the logits (autograd's version check would catch it).
                ce = self.compute_language_model_loss(labels, logits.detach())
            return kl, ce, max_prob

        return self._exit_head_call(head_and_loss, state.hidden)

    def exit_confidence(self, layer_number: int, state: ExitState) -> torch.Tensor:
        """The exit's learned estimate [s, b] (sigmoid of its confidence head on the exit's
        features) that its top-1 equals the final layer's: metric "learned", as the
        inference engine computes it one position at a time."""
        head = self.exit_heads.get(layer_number)
        h = head.features(state.hidden, state.attention_mask, state.rotary_pos_emb)
        return torch.sigmoid(head.confidence_logit(h).float())

    def exit_confidence_loss(
        self,
        layer_number: int,
        state: ExitState,
        final_top1: torch.Tensor,
        captured: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token BCE [b, s] of the exit's confidence head and its target [b, s] (1.0 where
        the exit's top-1 equals `final_top1` [b, s], the final layer's top-1 ids).

        The features and the exit's top-1 are detached: this loss reaches the confidence head
        only, never the backbone or the exit's own layers/projection. They come from
        `captured` (what the exit's own loss recorded, `_capture_exit`), else from one more
        exit forward without autograd."""
        head = self.exit_heads.get(layer_number)
        with torch.no_grad():
            if captured and "top1" in captured:
                h, exit_top1 = captured["features"], captured["top1"]
            else:
                h = head.features(state.hidden.detach(), state.attention_mask, state.rotary_pos_emb)
                weight = self._tied_exit_weight_in_forward() if head.tied else None
                exit_top1 = vocab_parallel_argmax(head.project(h, weight))  # [s, b]
            if self.config.sequence_parallel:
                # h holds this rank's s/tp positions; every TP rank scores all positions, so
                # the head's grads are the same full sums on each (no TP all-reduce needed).
                h = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False)
            target = (exit_top1 == final_top1.transpose(0, 1)).float()
        logit = head.confidence_logit(h.detach()).float()  # [s, b]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logit, target, reduction="none")
        return bce.transpose(0, 1), target.transpose(0, 1)


def _capture_exit(capture: dict | None, logits: torch.Tensor) -> None:
    """An exit loss records its top-1 ids [s, b] next to its features (exit_logits), so a
    confidence head learns from them without running the exit again. Call it before
    megatron's cross entropy, which works in place on the logits."""
    if capture is not None:
        capture["top1"] = vocab_parallel_argmax(logits.detach())


@torch.no_grad()
def sync_tied_weights_init(chunks: list[EarlyExitGPTModel]) -> None:
    """Virtual stages: every copy of the word embeddings on this rank starts as the first
    stage's embedding. Each member of the embedding group takes part in one all-reduce
    (zeros + the embedding): GPTModel's, made in the constructor of the chunk with the
    embedding or a tied LM head, or else ours with the rank's first copy. The rank's other
    copies (chunks with tied exits) then copy locally, e.g. rank 0's from the embedding."""
    held = [(m, w) for m in chunks if (w := m.tied_exit_output_weight()) is not None]
    if not held:
        return
    by_gpt_model = [
        w
        for m, w in held
        if m.share_embeddings_and_output_weights and (m.pre_process or m.post_process)
    ]
    source = by_gpt_model[0] if by_gpt_model else held[0][1]
    group = held[0][0]._embedding_group_with_peers()
    if not by_gpt_model and group is not None:
        dist.all_reduce(source.data, group=group)
    for _, weight in held:
        if weight is not source:
            weight.data.copy_(source.data)


@torch.no_grad()
def allreduce_tied_weight_grads(chunks: list[EarlyExitGPTModel]) -> None:
    """Virtual stages: the tied word-embedding gradient of this rank's chunks (embedding,
    tied LM head, tied-exit copies) summed locally, all-reduced over the embedding group,
    and given to every copy, so all copies take the same step. Replaces megatron-core's
    embedding all-reduce, which reduces one chunk per rank (the first on middle ranks).
    Call after the data-parallel reduction (a DP shard of each copy lines up: each tied
    weight has its own distributed-optimizer bucket)."""
    weights = [w for m in chunks if (w := m.tied_exit_output_weight()) is not None]
    if not weights:
        return
    grads = [getattr(w, "main_grad", None) for w in weights]  # DDP's buffer, else .grad
    grads = [w.grad if g is None else g for w, g in zip(weights, grads)]
    present = [g for g in grads if g is not None]
    # Frozen (no grad anywhere here): zeros still take part so the group does not hang.
    total = present[0] if present else torch.zeros_like(weights[0])
    for g in present[1:]:
        total.add_(g)
    group = chunks[0]._embedding_group_with_peers()
    if group is not None:
        dist.all_reduce(total, group=group)
    for g in present[1:]:
        g.copy_(total)


@torch.no_grad()
def vocab_parallel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Global top-1 token ids over a vocabulary split across TP ranks: [.., V/tp] -> [..]
    (ties: the smallest id, as torch.argmax over the whole vocabulary)."""
    local_max, local_idx = logits.float().max(dim=-1)
    global_max = _tp_all_reduce(local_max.clone(), dist.ReduceOp.MAX)
    offset = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
    none = torch.full_like(local_idx, torch.iinfo(torch.long).max)
    return _tp_all_reduce(
        torch.where(local_max == global_max, local_idx + offset, none), dist.ReduceOp.MIN
    )


def _tp_all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(tensor, op=op, group=parallel_state.get_tensor_model_parallel_group())
    return tensor


def vocab_parallel_max_prob(logits: torch.Tensor) -> torch.Tensor:
    """max softmax probability over a vocabulary split across TP ranks: [s, b, V/tp] -> [s, b]."""
    global_max = _tp_all_reduce(logits.max(dim=-1).values, dist.ReduceOp.MAX)
    sum_exp = _tp_all_reduce(torch.exp(logits - global_max.unsqueeze(-1)).sum(dim=-1))
    return 1.0 / sum_exp


@torch.no_grad()
def vocab_parallel_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax over a vocabulary split across TP ranks: [.., V/tp] -> [.., V/tp]
    (this rank's slice of the full log-probabilities). Not differentiable."""
    logits = logits.float()
    global_max = _tp_all_reduce(logits.max(dim=-1).values, dist.ReduceOp.MAX)
    shifted = logits - global_max.unsqueeze(-1)
    sum_exp = _tp_all_reduce(shifted.exp().sum(dim=-1))
    return shifted - sum_exp.log().unsqueeze(-1)


class _VocabParallelKL(torch.autograd.Function):
    """KL(p || q) per token with q = softmax(student logits), p given as log-probabilities;
    vocabularies split across TP ranks. d KL / d logits = q - p (sum p = 1), so backward
    keeps only the two log-probability slices; the teacher gets no gradient."""

    @staticmethod
    def forward(ctx, student_logits, teacher_log_probs):
        log_q = vocab_parallel_log_softmax(student_logits)
        local = (teacher_log_probs.exp() * (teacher_log_probs - log_q)).sum(dim=-1)
        ctx.save_for_backward(log_q, teacher_log_probs)
        ctx.logits_dtype = student_logits.dtype
        return _tp_all_reduce(local)  # every TP rank holds the full per-token KL

    @staticmethod
    def backward(ctx, grad_kl):
        log_q, log_p = ctx.saved_tensors
        grad = (log_q.exp() - log_p.exp()) * grad_kl.unsqueeze(-1)
        return grad.to(ctx.logits_dtype), None


def vocab_parallel_kl_divergence(
    student_logits: torch.Tensor, teacher_log_probs: torch.Tensor
) -> torch.Tensor:
    """Per-token KL(p_teacher || softmax(student_logits)) in float32: [.., V/tp] -> [..].

    Differentiable in the student logits only; `teacher_log_probs` comes from
    `vocab_parallel_log_softmax` (same layout). Every TP rank gets the same values, and each
    rank's logit slice its own slice of the gradient, as with megatron's vocab-parallel CE.
    """
    return _VocabParallelKL.apply(student_logits, teacher_log_probs.detach())


@dataclass
class TopKTeacher:
    """The final layer's distribution as its top-k tokens plus one bucket for the rest of the
    vocabulary: what the last pipeline stage sends to the stages that own exits.

    log_probs [s, b, k] float32 (descending), ids [s, b, k] int64 (global token ids),
    tail [s, b] float32: the probability outside the top k, summed directly (no 1 - sum
    cancellation), so exactly 0 when k covers the (padded) vocabulary."""

    log_probs: torch.Tensor
    ids: torch.Tensor
    tail: torch.Tensor

    @property
    def k(self) -> int:
        return self.ids.shape[-1]


def _tp_rank_and_size() -> tuple[int, int]:
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )


def _local_ids(ids: torch.Tensor, local_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global ids -> (index into this TP rank's vocabulary slice, clamped; whether it is in it)."""
    rank, _ = _tp_rank_and_size()
    local = ids - rank * local_vocab
    valid = (local >= 0) & (local < local_vocab)
    return local.clamp(0, local_vocab - 1), valid


def _scatter_local(values: torch.Tensor, like: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`values` [.., k] at global `ids` into a zero tensor shaped like this rank's slice
    (scatter_add: clamped out-of-slice indices add 0 instead of racing a real write)."""
    local, valid = _local_ids(ids, like.shape[-1])
    out = torch.zeros_like(like, dtype=values.dtype)
    return out.scatter_add_(-1, local, torch.where(valid, values, torch.zeros_like(values)))


def _tp_all_gather_last(tensor: torch.Tensor) -> torch.Tensor:
    _, size = _tp_rank_and_size()
    if size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(
        parts, tensor.contiguous(), group=parallel_state.get_tensor_model_parallel_group()
    )
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def vocab_parallel_top_k_teacher(log_probs: torch.Tensor, k: int) -> TopKTeacher:
    """The top-k reduction of full log-probabilities split across TP ranks ([.., V/tp], from
    `vocab_parallel_log_softmax`); every TP rank gets the same teacher. k >= V keeps all."""
    rank, size = _tp_rank_and_size()
    local_vocab = log_probs.shape[-1]
    k = min(k, local_vocab * size)
    values, index = log_probs.topk(min(k, local_vocab), dim=-1)
    ids = index + rank * local_vocab
    if size > 1:  # the global top k is among the ranks' local top k
        values, pick = _tp_all_gather_last(values).topk(k, dim=-1)
        ids = _tp_all_gather_last(ids).gather(-1, pick)
    inside = _scatter_local(torch.ones_like(values), log_probs, ids) > 0
    tail = _tp_all_reduce(log_probs.exp().masked_fill(inside, 0.0).sum(dim=-1))
    return TopKTeacher(values.float().contiguous(), ids.contiguous(), tail.float().contiguous())


class _VocabParallelTopKKL(torch.autograd.Function):
    """KL between the (k + 1)-bucket reductions of teacher and student: the top-k tokens
    one by one, the rest of the vocabulary as one bucket (teacher mass r, student mass
    q_tail). d KL / d z_v = q_v - p_v on the top k and q_v (1 - r / q_tail) on the rest:
    the student's tail keeps its shape and is only scaled toward the teacher's mass."""

    @staticmethod
    def forward(ctx, student_logits, log_p, ids, tail):
        log_q = vocab_parallel_log_softmax(student_logits)
        local, valid = _local_ids(ids, log_q.shape[-1])
        log_q_k = _tp_all_reduce(torch.where(valid, log_q.gather(-1, local), 0.0))
        inside = _scatter_local(torch.ones_like(log_p), log_q, ids) > 0
        q_tail = _tp_all_reduce(log_q.exp().masked_fill(inside, 0.0).sum(dim=-1))
        q_tail = q_tail.clamp_min(torch.finfo(torch.float32).tiny)
        head = (log_p.exp() * (log_p - log_q_k)).sum(dim=-1)
        bucket = torch.where(tail > 0, tail * (tail.clamp_min(1e-38).log() - q_tail.log()), 0.0)
        ctx.save_for_backward(log_q, log_p, ids, tail, q_tail)
        ctx.logits_dtype = student_logits.dtype
        return head + bucket

    @staticmethod
    def backward(ctx, grad_kl):
        log_q, log_p, ids, tail, q_tail = ctx.saved_tensors
        q = log_q.exp()
        p_k = _scatter_local(log_p.exp(), q, ids)
        inside = _scatter_local(torch.ones_like(log_p), q, ids) > 0
        tail_scale = (tail / q_tail).unsqueeze(-1)
        grad = q - p_k - (q * tail_scale).masked_fill(inside, 0.0)
        return (grad * grad_kl.unsqueeze(-1)).to(ctx.logits_dtype), None, None, None


def vocab_parallel_top_k_kl(student_logits: torch.Tensor, teacher: TopKTeacher) -> torch.Tensor:
    """Per-token KL of the (k + 1)-bucket reductions, float32: [.., V/tp] -> [..].

    A lower bound of the full KL (data processing inequality), equal to it when k covers the
    vocabulary; the logit gradient differs from the full KL's by at most 2 r in L1 per token
    (r: the teacher's tail mass). Every TP rank gets the same values."""
    return _VocabParallelTopKKL.apply(
        student_logits, teacher.log_probs.detach(), teacher.ids, teacher.tail.detach()
    )


def build_model(
    config: EarlyExitTransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    share_embeddings_and_output_weights: bool,
    position_embedding_type: str,
    rotary_base: int = 10000,
    rotary_percent: float = 1.0,
    rope_scaling: bool = False,
    rope_scaling_factor: float = 8.0,
    use_te: bool = False,
    vp_stage: int | None = None,
) -> EarlyExitGPTModel:
    """Build this rank's pipeline stage, or its model chunk `vp_stage` of the interleaved
    schedule (parallel state must be initialised). The embedding lives on the first chunk
    of the first stage, the LM head on the last chunk of the last stage."""
    specs = get_layer_specs(config, use_te)
    virtual = vp_stage is not None
    return EarlyExitGPTModel(
        config=config,
        specs=specs,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=parallel_state.is_pipeline_first_stage(
            ignore_virtual=not virtual, vp_stage=vp_stage
        ),
        post_process=parallel_state.is_pipeline_last_stage(
            ignore_virtual=not virtual, vp_stage=vp_stage
        ),
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type=position_embedding_type,
        rotary_base=rotary_base,
        rotary_percent=rotary_percent,
        rope_scaling=rope_scaling,
        rope_scaling_factor=rope_scaling_factor,
        vp_stage=vp_stage,
    )
