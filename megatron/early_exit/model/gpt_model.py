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
weights, and has its gradient all-reduced with the embedding's every step.
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

    def __init__(self, config: EarlyExitTransformerConfig, vocab_size: int, tp_size: int):
        super().__init__(config=config)
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
        replica_id = (
            1 + parallel_state.get_pipeline_model_parallel_rank(),
            0,
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
            self.tied_exit_weight = TiedExitWeight(config, vocab_size, tp)
        if tied and self.local_exit_layers and self.pre_process:
            # The embedding is shared with this stage's exits; give it its own DP bucket too.
            self.embedding.word_embeddings.weight.shared_embedding = True
        heads = {
            n: ExitHead(config, specs, n, ee.exit_layer_nums.index(n), vocab_size, tied)
            for n in self.local_exit_layers
        }
        self.exit_heads = ExitHeads(config, heads)
        self._sync_tied_exit_weight_init(share_embeddings_and_output_weights)
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
        """The weight tied exits project with on this stage (the word embeddings or a copy)."""
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

    def _sync_tied_exit_weight_init(self, share_embeddings: bool) -> None:
        """Copy the first stage's embedding into this stage's tied copy (zeros + all-reduce).

        GPTModel already did this for the first and last stages when the LM head is tied;
        the remaining members of the embedding group join here, in the same group order.
        """
        if self.vp_stage is not None:
            return  # virtual stages: tied exits are refused, GPTModel syncs a tied LM head
        group = self._embedding_group_with_peers()
        if group is None:
            return
        gpt_model_did_it = share_embeddings and (self.pre_process or self.post_process)
        if gpt_model_did_it:
            return
        weight = self.tied_exit_output_weight()
        if weight is None:
            raise RuntimeError("stage is in the embedding group but holds no tied weight")
        dist.all_reduce(weight.data, group=group)

    def allreduce_tied_exit_grads(self) -> None:
        """All-reduce the tied weight's grad over the embedding group.

        megatron-core's finalize_model_grads does this only when the LM head is tied; with
        an untied LM head and tied exits we do it ourselves (call after finalize).
        """
        if self.share_embeddings_and_output_weights:
            return
        group = self._embedding_group_with_peers()
        if group is None:
            return
        weight = self.tied_exit_output_weight()
        grad = getattr(weight, "main_grad", None)
        if grad is None:
            grad = weight.grad
        if grad is None:  # frozen or unused: still take part so the group does not hang
            grad = torch.zeros_like(weight)
        dist.all_reduce(grad, group=group)

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
    def exit_logits(self, layer_number: int, state: ExitState) -> torch.Tensor:
        """Vocab-parallel logits [s, b, V/tp] of the exit at `layer_number`."""
        head = self.exit_heads.get(layer_number)
        return head(
            state.hidden,
            attention_mask=state.attention_mask,
            rotary_pos_emb=state.rotary_pos_emb,
            output_weight=self._tied_exit_weight_in_forward() if head.tied else None,
        )

    def exit_loss(
        self, layer_number: int, state: ExitState, labels: torch.Tensor, with_max_prob: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token cross entropy [b, s] and, if asked, the exit's detached max probability."""

        def head_and_loss(hidden):
            logits = self.exit_logits(layer_number, replace(state, hidden=hidden))
            max_prob = None
            if with_max_prob:
                with torch.no_grad():  # before the loss: megatron's vocab-parallel CE is in place
                    max_prob = vocab_parallel_max_prob(logits.float()).transpose(0, 1)
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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-token KL(teacher || exit) [b, s] (differentiable), the exit's cross entropy with
        `labels` [b, s] (detached, a metric) and, if asked, its detached max probability.

        `teacher_log_probs`: the final layer's detached log-probabilities [s, b, V/tp].
        """

        def head_and_loss(hidden):
            logits = self.exit_logits(layer_number, replace(state, hidden=hidden))
            max_prob = None
            with torch.no_grad():
                if with_max_prob:
                    max_prob = vocab_parallel_max_prob(logits.float()).transpose(0, 1)
            kl = vocab_parallel_kl_divergence(logits, teacher_log_probs).transpose(0, 1)
            with torch.no_grad():
                # Last: megatron's CE works in place on the logits. The KL saved its own
                # log-softmax, not the logits (autograd's version check would catch it).
                ce = self.compute_language_model_loss(labels, logits.detach())
            return kl, ce, max_prob

        return self._exit_head_call(head_and_loss, state.hidden)


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
