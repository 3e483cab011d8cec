"""Typed configs, validated before any process group exists.

`RunConfig` groups everything one training run needs; components receive the sub-config
they need. Every field that is a command-line flag declares it here, once (`flags.flag`:
default, help, Megatron-LM name); `arguments.py` generates the parser from these classes.
`EarlyExitTransformerConfig` extends megatron-core's `TransformerConfig` with the exit
settings, so the model is built from one config like any megatron-core model.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron.early_exit.data.tokenizers import TokenizerConfig
from megatron.early_exit.errors import ConfigError
from megatron.early_exit.flags import flag, tagged
from megatron.early_exit.stage_split import StageSplit


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# Tags of exit flags: HEADS shape the exit heads' parameters (a checkpoint's heads must
# match them); RECORDED go into a checkpoint's ee_args.json. Loss weights are training
# choices: neither.
HEADS, RECORDED = "heads", "recorded"


@dataclass
class ExitConfig:
    """Where early exits sit, what an exit head is, and how exit losses are weighted."""

    FLAG_GROUP: ClassVar[str] = "early exit"

    exit_layer_nums: list[int] = flag(
        [], help="1-based layers that get an exit (after the layer; before with --pre-exit)",
        tags=(HEADS, RECORDED),
    )  # fmt: skip
    pre_exit: bool = flag(
        False, help="exits take the layer's input instead of its output", tags=(HEADS, RECORDED)
    )
    use_exit_norm: bool = flag(
        False, help="norm before the exit's output projection", tags=(HEADS, RECORDED)
    )
    use_exit_mlp: bool = flag(False, help="residual MLP in the exit head", tags=(HEADS, RECORDED))
    use_exit_block: bool = flag(
        False, help="a full transformer layer in the exit head", tags=(HEADS, RECORDED)
    )
    untie_exit_output_weights: bool = flag(
        False, help="own output projection per exit (default: the word embeddings)",
        tags=(HEADS, RECORDED),
    )  # fmt: skip
    exit_layer_temperature: list[float] = flag(
        [], help="divide exit logits by T (one value, or one per exit)", tags=(RECORDED,)
    )
    exit_layer_weight: list[float] = flag([], help="loss weight per exit (default 1.0)")
    exit_layer_weight_init: list[float] = flag(
        [], help="per-exit start weights of the warm-up (or cool-down)"
    )
    exit_layer_weight_warmup_iters: int = flag(
        0, help="iterations from --exit-layer-weight-init to --exit-layer-weight"
    )
    exit_layer_weight_warmup_style: str = flag(
        "linear", choices=["linear", "cosine"], help="shape of the weight warm-up"
    )
    use_dynamic_exit_layer_weight: bool = flag(
        False, help="scale each token's exit loss by the exit's detached max probability"
    )
    exit_distillation: bool = flag(
        False,
        help="train exits on KL(final layer || exit) instead of cross entropy with the data "
        "(the final layer's distribution is detached)",
    )
    exit_distillation_top_k: int | None = flag(
        None,
        help="teacher = the final layer's top-K tokens plus one bucket for the rest of the "
        "vocabulary (what the last pipeline stage sends to stages with exits; default: the "
        "whole vocabulary, exact)",
    )
    exit_loss_curriculum: str = flag(
        "none",
        choices=["none", "rotational", "gradual"],
        help="which exits get a loss at each iteration (LayerSkip): rotational = exit i when "
        "i %% P == iteration %% P (P = --exit-loss-curriculum-period); gradual = deepest exit "
        "first, the others switched on one by one over --exit-loss-curriculum-iters",
    )
    exit_loss_curriculum_period: int = flag(
        2, help="rotational curriculum: an exit gets a loss every P iterations"
    )
    exit_loss_curriculum_iters: int | None = flag(
        None,
        help="gradual curriculum: iterations until every exit has a loss (default: --train-iters)",
    )

    exit_confidence_head: bool = flag(
        False,
        help="a learned confidence estimator per exit (linear hidden -> 1 on the exit's normed "
        "hidden state) for the 'learned' inference metric; trained on whether the exit's top-1 "
        "equals the final layer's (needs PP=1)",
        tags=(HEADS, RECORDED),
    )
    exit_confidence_loss_weight: float = flag(
        1.0, help="weight of the confidence heads' BCE loss (it reaches only those heads)"
    )

    @property
    def num_exits(self) -> int:
        return len(self.exit_layer_nums)

    def temperature(self, index: int) -> float:
        if not self.exit_layer_temperature:
            return 1.0
        if len(self.exit_layer_temperature) == 1:
            return self.exit_layer_temperature[0]
        return self.exit_layer_temperature[index]

    @property
    def needs_final_logits(self) -> bool:
        """The training forward returns the final logits (not the per-token LM loss): exit
        distillation's teacher and the confidence heads' targets come from them."""
        return self.exit_distillation or self.exit_confidence_head

    def target_weight(self, index: int) -> float:
        return self.exit_layer_weight[index] if self.exit_layer_weight else 1.0

    def validate(self, num_layers: int) -> None:
        nums = self.exit_layer_nums
        for n in nums:
            _require(
                1 <= n <= num_layers,
                f"--exit-layer-nums: exit layer {n} is out of range; the model has layers "
                f"1..{num_layers} (layer numbers are 1-based)",
            )
        _require(len(set(nums)) == len(nums), f"--exit-layer-nums has duplicates: {nums}")
        if not nums:
            _require(
                not (self.exit_layer_weight or self.exit_layer_weight_init),
                "exit layer weights given but no --exit-layer-nums",
            )
        _require(nums == sorted(nums), f"--exit-layer-nums must be increasing, got {nums}")
        n = len(nums)
        if self.exit_layer_weight:
            _require(
                len(self.exit_layer_weight) == n,
                f"--exit-layer-weight has {len(self.exit_layer_weight)} values but there are "
                f"{n} exits (--exit-layer-nums {' '.join(map(str, nums))}); give one per exit",
            )
        if self.exit_layer_weight_init:
            _require(
                len(self.exit_layer_weight_init) == n,
                f"--exit-layer-weight-init has {len(self.exit_layer_weight_init)} values but "
                f"there are {n} exits; give one per exit",
            )
        for w in [*self.exit_layer_weight, *self.exit_layer_weight_init]:
            _require(w >= 0 and math.isfinite(w), f"exit layer weights must be >= 0, got {w}")
        if self.exit_layer_temperature:
            _require(
                len(self.exit_layer_temperature) in (1, n),
                f"--exit-layer-temperature takes one value or one per exit ({n}), got "
                f"{len(self.exit_layer_temperature)}",
            )
            for t in self.exit_layer_temperature:
                _require(
                    t > 0 and math.isfinite(t), f"--exit-layer-temperature must be > 0, got {t}"
                )
        _require(
            self.exit_loss_curriculum in ("none", "rotational", "gradual"),
            "--exit-loss-curriculum must be none, rotational or gradual, got "
            f"{self.exit_loss_curriculum!r}",
        )
        if self.exit_loss_curriculum != "none":
            _require(n > 0, "--exit-loss-curriculum needs exits (--exit-layer-nums)")
        _require(
            self.exit_loss_curriculum_period >= 1,
            f"--exit-loss-curriculum-period must be >= 1, got {self.exit_loss_curriculum_period}",
        )
        _require(
            self.exit_loss_curriculum_iters is None or self.exit_loss_curriculum_iters >= 0,
            "--exit-loss-curriculum-iters must be >= 0",
        )
        _require(
            self.exit_confidence_loss_weight >= 0
            and math.isfinite(self.exit_confidence_loss_weight),
            f"--exit-confidence-loss-weight must be >= 0, got {self.exit_confidence_loss_weight}",
        )
        _require(
            not self.exit_confidence_head or bool(nums),
            "--exit-confidence-head adds a head per exit but there are no --exit-layer-nums",
        )
        _require(
            self.exit_layer_weight_warmup_style in ("linear", "cosine"),
            "--exit-layer-weight-warmup-style must be 'linear' or 'cosine', got "
            f"{self.exit_layer_weight_warmup_style!r}",
        )
        _require(
            self.exit_layer_weight_warmup_iters >= 0,
            "--exit-layer-weight-warmup-iters must be >= 0",
        )
        if self.exit_layer_weight_warmup_iters > 0:
            _require(
                bool(self.exit_layer_weight_init),
                "--exit-layer-weight-warmup-iters needs --exit-layer-weight-init (start values)",
            )
        elif self.exit_layer_weight_init:
            raise ConfigError(
                "--exit-layer-weight-init has no effect without --exit-layer-weight-warmup-iters"
            )


# The one list of exit-architecture fields (see HEADS, RECORDED above).
EXIT_HEAD_FIELDS = tagged(ExitConfig, HEADS)
EXIT_ARCH_FIELDS = tagged(ExitConfig, RECORDED)
TOKENIZER_FIELDS = tuple(f.name for f in dataclasses.fields(TokenizerConfig))


@dataclass
class EarlyExitTransformerConfig(TransformerConfig):
    """megatron-core TransformerConfig plus the early-exit settings."""

    early_exit: ExitConfig = field(default_factory=ExitConfig)

    def __post_init__(self) -> None:
        self.early_exit.validate(self.num_layers)
        super().__post_init__()


@dataclass
class ModelConfig:
    """Architecture of the GPT backbone (GPT-2 style by default, Llama style by flags).

    A checkpoint records all of it (ee_args.json)."""

    FLAG_GROUP: ClassVar[str] = "model"

    num_layers: int = flag(4, help="transformer layers")
    hidden_size: int = flag(64, help="hidden size")
    num_attention_heads: int = flag(4, help="attention heads")
    ffn_hidden_size: int | None = flag(
        None, help="MLP hidden size (default 4 x hidden, or 8/3 x hidden with --swiglu)"
    )
    kv_channels: int | None = flag(None, help="per-head size (default hidden / heads)")
    seq_length: int = flag(64, help="training sequence length")
    max_position_embeddings: int | None = flag(None, help="default: --seq-length")
    normalization: str = flag("LayerNorm", choices=["LayerNorm", "RMSNorm"], help="norm type")
    norm_epsilon: float = flag(1e-5, help="epsilon of every norm")
    position_embedding_type: str = flag(
        "learned_absolute", choices=["learned_absolute", "rope"], help="position encoding"
    )
    rotary_base: int = flag(10000, help="RoPE theta")
    rotary_percent: float = flag(1.0, help="share of each head's dimensions that RoPE rotates")
    use_rope_scaling: bool = flag(
        False,
        help="Llama 3.x RoPE frequency scaling (megatron-core's: low/high frequency factors 1 "
        "and 4, original context 8192)",
    )
    rope_scaling_factor: float = flag(8.0, help="factor of --use-rope-scaling")
    swiglu: bool = flag(False, help="SwiGLU MLP (Llama)")
    group_query_attention: bool = flag(False, help="grouped-query attention")
    num_query_groups: int | None = flag(None, help="key/value heads with --group-query-attention")
    untie_embeddings_and_output_weights: bool = flag(
        False, help="own LM-head weights (default: tied to the word embeddings)"
    )
    disable_bias_linear: bool = flag(False, help="no biases in linear layers (Llama)")
    add_qkv_bias: bool = flag(
        False, help="biases on the QKV projection even with --disable-bias-linear (Qwen2)"
    )
    qk_layernorm: bool = flag(False, help="normalise each head's queries and keys (Qwen3)")
    openai_gelu: bool = flag(False, help="tanh-approximated GELU (GPT-2's gelu_new)")
    hidden_dropout: float = flag(0.0, help="dropout after attention and MLP")
    attention_dropout: float = flag(0.0, help="dropout of attention probabilities")
    init_method_std: float = flag(0.02, help="std of the weight initialisation")
    make_vocab_size_divisible_by: int = flag(
        128, help="pad the vocabulary to a multiple of this x TP"
    )

    def resolved_ffn_hidden_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.swiglu:  # Llama convention: 2/3 of 4h, rounded up to a multiple of 64
            return int(math.ceil(8 * self.hidden_size / 3 / 64) * 64)
        return 4 * self.hidden_size

    def resolved_max_position_embeddings(self) -> int:
        return self.max_position_embeddings or self.seq_length

    def validate(self, tp: int) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            _require(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be > 0")
        _require(
            self.hidden_size % self.num_attention_heads == 0 or self.kv_channels is not None,
            f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
            f"{self.num_attention_heads} (or give --kv-channels)",
        )
        _require(
            self.num_attention_heads % tp == 0,
            f"--num-attention-heads {self.num_attention_heads} is not divisible by "
            f"--tensor-model-parallel-size {tp}",
        )
        _require(
            self.normalization in ("LayerNorm", "RMSNorm"),
            f"--normalization must be LayerNorm or RMSNorm, got {self.normalization!r}",
        )
        _require(
            self.position_embedding_type in ("learned_absolute", "rope"),
            "--position-embedding-type must be learned_absolute or rope, got "
            f"{self.position_embedding_type!r}",
        )
        if self.group_query_attention:
            g = self.num_query_groups
            _require(g is not None and g > 0, "--group-query-attention needs --num-query-groups")
            _require(
                self.num_attention_heads % g == 0,
                f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                f"--num-query-groups {g}",
            )
            _require(
                g % tp == 0,
                f"--num-query-groups {g} is not divisible by --tensor-model-parallel-size {tp}",
            )
        _require(
            self.resolved_max_position_embeddings() >= self.seq_length,
            f"--max-position-embeddings {self.max_position_embeddings} < --seq-length "
            f"{self.seq_length}",
        )
        _require(
            0.0 <= self.hidden_dropout < 1.0 and 0.0 <= self.attention_dropout < 1.0,
            "dropout probabilities must be in [0, 1)",
        )
        _require(self.make_vocab_size_divisible_by > 0, "--make-vocab-size-divisible-by > 0")
        _require(0.0 < self.rotary_percent <= 1.0, "--rotary-percent must be in (0, 1]")
        _require(self.init_method_std > 0, "--init-method-std must be > 0")
        _require(
            not self.use_rope_scaling or self.position_embedding_type == "rope",
            "--use-rope-scaling needs --position-embedding-type rope",
        )
        _require(self.rope_scaling_factor >= 1.0, "--rope-scaling-factor must be >= 1")
        _require(
            not (self.openai_gelu and self.swiglu),
            "--openai-gelu selects the GELU of a non-gated MLP; it cannot go with --swiglu",
        )
        if self.num_query_groups is not None and not self.group_query_attention:
            raise ConfigError("--num-query-groups needs --group-query-attention")


@dataclass
class ParallelConfig:
    FLAG_GROUP: ClassVar[str] = "parallelism"

    tensor_model_parallel_size: int = flag(1, help="TP size")
    pipeline_model_parallel_size: int = flag(1, help="PP size (stages)")
    # Uneven stages (megatron-core's num_layers_in_first/last_pipeline_stage and its
    # account-for-embedding/loss split); stage_split.py does the arithmetic.
    decoder_first_pipeline_num_layers: int | None = flag(
        None, help="layers on the first pipeline stage (the rest split evenly)"
    )
    decoder_last_pipeline_num_layers: int | None = flag(
        None, help="layers on the last pipeline stage (the rest split evenly)"
    )
    account_for_embedding_in_pipeline_split: bool = flag(
        False, help="count the embedding as one layer of the first stage in the even split"
    )
    account_for_loss_in_pipeline_split: bool = flag(
        False, help="count the LM head and loss as one layer of the last stage in the even split"
    )
    num_layers_per_virtual_pipeline_stage: int | None = flag(
        None,
        help="layers per virtual pipeline stage: the interleaved 1F1B schedule, each rank "
        "holding (layers per stage / this) model chunks",
    )
    # Megatron-LM's other spelling; from --num-layers-per-virtual-pipeline-stage if given.
    virtual_pipeline_model_parallel_size: int | None = flag(
        None, help="model chunks per pipeline rank (the interleaved schedule)"
    )
    sequence_parallel: bool = flag(False, help="sequence parallelism (needs TP > 1)")
    use_distributed_optimizer: bool = flag(False, help="shard optimizer state over DP")
    batch_p2p_comm: bool = flag(
        True, name="--no-batch-p2p-comm", help="separate pipeline sends and receives"
    )
    # EE-Tuning: run only the first k of the pipeline_model_parallel_size stages.
    tune_exit_pipeline_parallel_size: int | None = flag(
        None,
        help="with --tune-exit: run (and load) only the first k pipeline stages; all exits "
        "must live there (world size TP x k x DP)",
    )
    # Not a flag: from the launcher.
    world_size: int = 1

    @property
    def runtime_pipeline_parallel_size(self) -> int:
        return self.tune_exit_pipeline_parallel_size or self.pipeline_model_parallel_size

    def stage_split(self, num_layers: int) -> StageSplit:
        return StageSplit(
            num_layers=num_layers,
            pipeline_size=self.pipeline_model_parallel_size,
            first=self.decoder_first_pipeline_num_layers,
            last=self.decoder_last_pipeline_num_layers,
            account_for_embedding=self.account_for_embedding_in_pipeline_split,
            account_for_loss=self.account_for_loss_in_pipeline_split,
            virtual=self.virtual_pipeline_model_parallel_size,
        )

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (
            self.tensor_model_parallel_size * self.runtime_pipeline_parallel_size
        )

    def validate(self, num_layers: int) -> None:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        _require(tp >= 1, f"--tensor-model-parallel-size must be >= 1, got {tp}")
        _require(pp >= 1, f"--pipeline-model-parallel-size must be >= 1, got {pp}")
        _require(self.world_size >= 1, f"world size must be >= 1, got {self.world_size}")
        k = self.tune_exit_pipeline_parallel_size
        if k is not None:
            _require(
                1 <= k <= pp,
                f"--tune-exit-pipeline-parallel-size {k} must be in 1..{pp} "
                "(--pipeline-model-parallel-size)",
            )
        stages = self.runtime_pipeline_parallel_size  # EE-Tuning may run only the first k
        _require(
            self.world_size % (tp * stages) == 0,
            f"world size {self.world_size} is not divisible by tensor-parallel size {tp} x "
            f"pipeline-parallel size {stages} = {tp * stages}",
        )
        split = self.stage_split(num_layers)
        split.counts()  # raises ConfigError naming the split flags
        vpp = self.virtual_pipeline_model_parallel_size
        flags = "--num-layers-per-virtual-pipeline-stage / --virtual-pipeline-model-parallel-size"
        if vpp is not None:
            _require(pp > 1, f"{flags} needs --pipeline-model-parallel-size > 1")
            _require(
                vpp > 1,
                f"{flags}: one virtual stage per pipeline stage is the plain schedule; drop the "
                "flag or use more virtual stages",
            )
            split.chunk_counts()  # megatron-core's divisibility rules, naming the flags
            # Upstream megatron-core pairs the forward and backward messages between the two
            # ranks of PP=2 wrongly in batched p2p (silently wrong losses); refuse it.
            _require(
                not (pp == 2 and self.batch_p2p_comm),
                "interleaved pipeline (virtual stages) with --pipeline-model-parallel-size 2 and "
                "batched p2p communication gives wrong losses in megatron-core 0.16.1; "
                "pass --no-batch-p2p-comm",
            )
            _require(
                self.tune_exit_pipeline_parallel_size is None,
                "--tune-exit-pipeline-parallel-size runs only the first k pipeline ranks, but "
                f"with {flags} every rank holds layers from across the model (chunk c of rank "
                "r is virtual stage c x P + r); drop one of the two",
            )
        if self.sequence_parallel and tp == 1:
            warnings.warn("--sequence-parallel has no effect with TP=1; disabling it", stacklevel=2)
            self.sequence_parallel = False


@dataclass
class TrainingConfig:
    FLAG_GROUP: ClassVar[str] = "training"

    micro_batch_size: int = flag(2, help="sequences per microbatch")
    global_batch_size: int | None = flag(None, help="default: micro batch x data-parallel size")
    train_iters: int = flag(10, help="iterations to train")
    eval_interval: int | None = flag(None, help="validate every N iterations and at the end")
    eval_iters: int = flag(10, help="global batches per validation")
    exit_interval: int | None = flag(
        None, help="stop after an iteration divisible by this (saving if --save)"
    )
    lr: float = flag(1e-3, help="peak learning rate")
    min_lr: float = flag(0.0, help="learning rate at the end of the decay")
    lr_decay_style: str = flag(
        "cosine", choices=["cosine", "linear", "constant"], help="learning-rate decay"
    )
    lr_warmup_iters: int = flag(0, help="linear warm-up iterations")
    lr_decay_iters: int | None = flag(None, help="decay iterations (default: --train-iters)")
    clip_grad: float = flag(1.0, help="gradient-norm clipping (0: off)")
    weight_decay: float = flag(0.01, help="AdamW weight decay")
    adam_beta1: float = flag(0.9, help="Adam beta1")
    adam_beta2: float = flag(0.999, help="Adam beta2")
    adam_eps: float = flag(1e-8, help="Adam epsilon")
    seed: int = flag(1234, help="random seed")
    bf16: bool = flag(False, help="bfloat16 parameters (GPU)")
    fp16: bool = flag(False, help="float16 parameters with loss scaling (GPU)")
    loss_scale: float | None = flag(None, help="fixed fp16 loss scale (default: dynamic)")
    initial_loss_scale: float = flag(2.0**32, help="start of the dynamic fp16 loss scale")
    tune_exit: bool = flag(
        False,
        help="EE-Tuning: freeze the loaded backbone, train only the exit heads on exit losses",
    )
    # Cheaper EE-Tuning (tuning/session.py, tuning/teacher_cache.py).
    tune_exit_truncate_backbone: bool = flag(
        False,
        help="with --tune-exit: build and run the frozen backbone only up to the deepest exit "
        "(no LM head, no frozen LM loss); saves the full model",
    )
    teacher_cache: str | None = flag(
        None,
        metavar="DIR",
        help="with --tune-exit: train the exit heads from a teacher cache written by "
        "tools/cache_teacher.py (the backbone is not run)",
    )

    @property
    def params_dtype(self) -> torch.dtype:
        if self.bf16:
            return torch.bfloat16
        if self.fp16:
            return torch.float16
        return torch.float32

    def num_microbatches(self, data_parallel_size: int) -> int:
        return self.resolved_global_batch_size(data_parallel_size) // (
            self.micro_batch_size * data_parallel_size
        )

    def resolved_global_batch_size(self, data_parallel_size: int) -> int:
        if self.global_batch_size is None:
            return self.micro_batch_size * data_parallel_size
        return self.global_batch_size

    def validate(self, data_parallel_size: int, device_is_cuda: bool) -> None:
        _require(self.micro_batch_size >= 1, "--micro-batch-size must be >= 1")
        gbs = self.resolved_global_batch_size(data_parallel_size)
        _require(gbs >= 1, "--global-batch-size must be >= 1")
        _require(
            gbs % (self.micro_batch_size * data_parallel_size) == 0,
            f"--global-batch-size {gbs} is not divisible by --micro-batch-size "
            f"{self.micro_batch_size} x data-parallel size {data_parallel_size} = "
            f"{self.micro_batch_size * data_parallel_size}",
        )
        _require(self.train_iters >= 0, "--train-iters must be >= 0")
        _require(
            self.exit_interval is None or self.exit_interval > 0, "--exit-interval must be > 0"
        )
        _require(
            self.eval_interval is None or self.eval_interval > 0, "--eval-interval must be > 0"
        )
        _require(self.eval_iters >= 1, "--eval-iters must be >= 1")
        _require(self.lr >= 0 and self.min_lr >= 0, "--lr and --min-lr must be >= 0")
        _require(self.min_lr <= self.lr, f"--min-lr {self.min_lr} is larger than --lr {self.lr}")
        _require(
            self.lr_decay_style in ("cosine", "linear", "constant"),
            f"--lr-decay-style must be cosine, linear or constant, got {self.lr_decay_style!r}",
        )
        _require(self.lr_warmup_iters >= 0, "--lr-warmup-iters must be >= 0")
        _require(self.clip_grad >= 0, "--clip-grad must be >= 0 (0 disables clipping)")
        _require(self.weight_decay >= 0, "--weight-decay must be >= 0")
        for name, beta in (("--adam-beta1", self.adam_beta1), ("--adam-beta2", self.adam_beta2)):
            _require(0.0 <= beta < 1.0, f"{name} must be in [0, 1), got {beta}")
        _require(self.adam_eps > 0, "--adam-eps must be > 0")
        _require(
            self.lr_decay_iters is None or self.lr_decay_iters > 0, "--lr-decay-iters must be > 0"
        )
        _require(self.seed >= 0, "--seed must be >= 0")
        _require(self.loss_scale is None or self.loss_scale > 0, "--loss-scale must be > 0")
        _require(self.initial_loss_scale > 0, "--initial-loss-scale must be > 0")
        _require(not (self.bf16 and self.fp16), "--bf16 and --fp16 are mutually exclusive")
        if (self.bf16 or self.fp16) and not device_is_cuda:
            raise ConfigError(
                "--bf16/--fp16 need a CUDA GPU; on CPU training runs in fp32 (drop the flag)"
            )


@dataclass
class DataConfig(TokenizerConfig):
    """Training data, plus the tokenizer flags (inherited: declared in data/tokenizers.py).

    `vocab_size` is NullTokenizer's vocabulary; other tokenizers set it (resolve_vocab)."""

    FLAG_GROUP: ClassVar[str] = "data"

    mock_data: bool = flag(False, help="seeded synthetic token ids")
    data_path: list[str] = flag([], help="PREFIX or weighted blend 'W1 P1 W2 P2 ...'")
    split: str = flag("969,30,1", help="train,valid,test weights")
    data_cache_path: str | None = flag(None, help="index cache (shared by all nodes)")

    def tokenizer_config(self) -> TokenizerConfig:
        return TokenizerConfig(**{k: getattr(self, k) for k in TOKENIZER_FIELDS})

    def validate(self, needs_data: bool = True) -> None:
        """`needs_data=False` (inference): only the tokenizer settings are checked."""
        from megatron.early_exit.data.tokenizers import TOKENIZER_TYPES

        if needs_data:
            _require(
                self.mock_data or self.data_path,
                "no training data: pass --data-path PREFIX (from tools/preprocess_data.py) or "
                "--mock-data",
            )
        _require(
            not (self.mock_data and self.data_path),
            "--mock-data and --data-path exclude each other",
        )
        _require(
            self.tokenizer_type in TOKENIZER_TYPES,
            f"--tokenizer-type {self.tokenizer_type!r} is unknown; choose one of "
            f"{', '.join(TOKENIZER_TYPES)}",
        )
        if self.tokenizer_type == "NullTokenizer":
            _require(
                self.vocab_size is not None and self.vocab_size > 1,
                "--tokenizer-type NullTokenizer needs --vocab-size N (N > 1)",
            )
        elif self.mock_data:
            raise ConfigError("--mock-data generates token ids; use --tokenizer-type NullTokenizer")


@dataclass
class CheckpointConfig:
    FLAG_GROUP: ClassVar[str] = "checkpointing"

    save: str | None = flag(None, help="checkpoint directory to save to")
    load: str | None = flag(
        None, help="checkpoint to load; its recorded model and tokenizer flags become defaults"
    )
    save_interval: int | None = flag(None, help="save every N iterations (and at the end)")
    no_load_optim: bool = flag(False, help="do not load optimizer and LR-schedule state")
    no_load_rng: bool = flag(False, help="do not load the RNG state")
    finetune: bool = flag(False, help="load weights only and restart at iteration 0")

    def validate(self) -> None:
        if self.save_interval is not None:
            _require(self.save_interval > 0, "--save-interval must be > 0")
            _require(self.save is not None, "--save-interval needs --save DIR")


@dataclass
class LoggingConfig:
    FLAG_GROUP: ClassVar[str] = "logging"

    log_interval: int = flag(1, help="print (and record) every N iterations")
    metrics_file: str | None = flag(None, help="JSON lines of every logged record")
    # TensorBoard / W&B / timers / memory (training/monitor.py); the logging rank writes.
    tensorboard_dir: str | None = flag(None, help="write TensorBoard scalars to this directory")
    tensorboard_log_interval: int = flag(1, help="write TensorBoard/W&B scalars every N iterations")
    wandb_project: str | None = flag(
        None, help="log to this W&B project (needs `pip install wandb`)"
    )
    wandb_exp_name: str | None = flag(None, help="W&B run name")
    wandb_save_dir: str | None = flag(
        None, help="W&B run directory (default: --tensorboard-dir/wandb, or ./wandb)"
    )
    timing_log_level: int = flag(
        0, choices=[0, 1, 2],
        help="timers: 0 none; 1 forward-backward, optimizer, data, grad sync; 2 also forward, "
        "backward, exit heads and p2p",
    )  # fmt: skip
    log_timers_to_tensorboard: bool = flag(False, help="write the timers as scalars too")
    log_memory_to_tensorboard: bool = flag(
        False, help="record memory (max over ranks): CPU RSS, or torch.cuda memory statistics"
    )

    def validate(self) -> None:
        _require(self.log_interval >= 1, "--log-interval must be >= 1")
        _require(self.tensorboard_log_interval >= 1, "--tensorboard-log-interval must be >= 1")
        if self.wandb_project is None:
            for name, value in (
                ("--wandb-exp-name", self.wandb_exp_name),
                ("--wandb-save-dir", self.wandb_save_dir),
            ):
                _require(value is None, f"{name} needs --wandb-project")
        else:
            import importlib.util

            _require(
                importlib.util.find_spec("wandb") is not None,
                "--wandb-project needs the wandb package: pip install wandb==0.31.0 (or "
                "pip install -e .[wandb]); set WANDB_MODE=offline to log without a network",
            )
        _require(
            not self.log_timers_to_tensorboard or self.timing_log_level > 0,
            "--log-timers-to-tensorboard needs --timing-log-level 1 or 2",
        )
        if self.log_timers_to_tensorboard or self.log_memory_to_tensorboard:
            _require(
                self.tensorboard_dir is not None or self.wandb_project is not None,
                "--log-timers-to-tensorboard / --log-memory-to-tensorboard need "
                "--tensorboard-dir or --wandb-project",
            )


@dataclass
class InferenceConfig:
    """How the inference engine runs the decode step (inference/layers.py)."""

    FLAG_GROUP: ClassVar[str] = "inference"

    inference_compile: str = flag(
        "none",
        choices=["none", "inductor"],
        help="inductor: torch.compile the per-layer decode step (compiled once per process, "
        "on the first decode, reused by every request; eager if compiling fails)",
    )
    inference_column_major_copies: bool = flag(
        True,
        name="--no-inference-column-major-copies",
        help="do not keep column-major copies of wide CPU weights (LM/exit heads, QKV, "
        "gate-up) for 1-3-row products where the C rows kernel does not serve them: saves "
        "their memory, decodes slower on MKL CPUs",
    )
    inference_rows_kernel: bool = flag(
        True,
        name="--no-inference-rows-kernel",
        help="do not use the C kernel (compiled on first use with $CC or cc) for 1-8-row "
        "fp32 CPU products on one thread; torch's kernels compute them instead, slower",
    )
    inference_decode_threads: int = flag(
        1,
        help="CPU threads for the layers of a decode step of at most 8 rows (prefill and "
        "the heads keep torch's thread count): a token's layer products are too small to "
        "split across threads; 0 keeps torch's thread count everywhere",
    )

    def validate(self) -> None:
        _require(
            self.inference_decode_threads >= 0,
            f"--inference-decode-threads must be >= 0, got {self.inference_decode_threads}",
        )


@dataclass
class RecomputeConfig:
    """Activation recomputation (megatron-core's recompute_granularity/method/num_layers).

    With `full`, the stages with exits checkpoint their layers in chunks that end at each
    exit (model/recompute.py), so an exit's hidden state is a chunk output with a graph;
    with either granularity each exit head's projection and loss are recomputed in backward,
    so no stage holds s x b x V exit logits between its forward and backward."""

    FLAG_GROUP: ClassVar[str] = "activation recomputation"

    recompute_granularity: str | None = flag(
        None,
        choices=["full", "selective"],
        help="full: recompute whole layers in backward (with --recompute-method); selective: "
        "only the attention core",
    )
    recompute_method: str | None = flag(
        None,
        choices=["uniform", "block"],
        help="with full: uniform recomputes chunks of --recompute-num-layers layers; block "
        "recomputes the first --recompute-num-layers layers of each stage",
    )
    recompute_num_layers: int | None = flag(
        None, help="with --recompute-method: layers per chunk (uniform) or per stage (block)"
    )

    def validate(self, stage_layer_counts: list[int]) -> None:
        g, m, n = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        _require(
            g in (None, "full", "selective"),
            f"--recompute-granularity must be full or selective, got {g!r}",
        )
        _require(
            m in (None, "uniform", "block"),
            f"--recompute-method must be uniform or block, got {m!r}",
        )
        if g is None:
            _require(
                m is None and n is None,
                "--recompute-method and --recompute-num-layers need --recompute-granularity full",
            )
            return
        if g == "selective":
            _require(
                m is None and n is None,
                "--recompute-granularity selective recomputes the attention core of every layer; "
                "--recompute-method and --recompute-num-layers are for --recompute-granularity "
                "full",
            )
            return
        _require(
            m is not None and n is not None,
            "--recompute-granularity full needs --recompute-method uniform|block and "
            "--recompute-num-layers N",
        )
        most = max(stage_layer_counts)
        _require(
            1 <= n <= most,
            f"--recompute-num-layers {n} must be in 1..{most} (the most layers a pipeline stage "
            "holds)",
        )

    @property
    def recompute_exit_heads(self) -> bool:
        return self.recompute_granularity is not None

    def megatron_kwargs(self) -> dict:
        return {
            "recompute_granularity": self.recompute_granularity,
            "recompute_method": self.recompute_method,
            "recompute_num_layers": self.recompute_num_layers,
        }


@dataclass
class FillConfig:
    """Bubble filling of the 1F1B schedule (pipeline/fill_plan.py, bubble_filling.py)."""

    FLAG_GROUP: ClassVar[str] = "bubble filling"

    fill_explicit_bubbles: bool = flag(
        False, help="train exits with extra microbatches in 1F1B pipeline bubbles"
    )
    num_fill_warmup_microbatches: int | None = flag(None, help="default: automatic")
    num_fill_cooldown_microbatches: int | None = flag(None, help="default: automatic")
    backward_forward_ratio: float = flag(
        2.0, help="backward/forward time, for the automatic fill counts"
    )
    print_pipeline_schedule: bool = flag(
        False, help="print each stage's order of forward/backward/fill steps at start-up"
    )

    def validate(self, run: RunConfig) -> None:
        if not self.fill_explicit_bubbles:
            for flag, value in (
                ("--num-fill-warmup-microbatches", self.num_fill_warmup_microbatches),
                ("--num-fill-cooldown-microbatches", self.num_fill_cooldown_microbatches),
            ):
                _require(value is None, f"{flag} needs --fill-explicit-bubbles")
            return
        _require(
            not getattr(run.training, "tune_exit", False),
            "--fill-explicit-bubbles is for pretraining; --tune-exit has its own schedule",
        )
        from megatron.early_exit.pipeline.fill_plan import plan_for_run

        plan_for_run(run)  # raises ConfigError for counts or layouts it cannot schedule


@dataclass
class OverlapConfig:
    """Data-parallel communication overlapped with compute (megatron-core's DDP buckets)."""

    FLAG_GROUP: ClassVar[str] = "communication overlap"

    overlap_grad_reduce: bool = flag(
        False, help="reduce each gradient bucket during the step's last backward, once ready"
    )
    overlap_param_gather: bool = flag(
        False,
        help="all-gather updated parameters during the next forward (needs "
        "--use-distributed-optimizer and --overlap-grad-reduce)",
    )
    ddp_bucket_size: int | None = flag(
        None, help="parameters per gradient bucket (default: megatron-core's, 40M or more)"
    )

    def validate(self, run: RunConfig) -> None:
        if self.overlap_param_gather:
            _require(
                run.parallel.use_distributed_optimizer,
                "--overlap-param-gather needs --use-distributed-optimizer (parameters are "
                "gathered from optimizer shards)",
            )
            _require(
                self.overlap_grad_reduce,
                "--overlap-param-gather needs --overlap-grad-reduce (as in Megatron-LM)",
            )
        _require(
            self.ddp_bucket_size is None or self.ddp_bucket_size > 0,
            "--ddp-bucket-size must be > 0",
        )


@dataclass
class LayerDropoutConfig:
    """Layer dropout with rates rising with depth (LayerSkip; model/layer_dropout.py)."""

    FLAG_GROUP: ClassVar[str] = "layer dropout (LayerSkip)"

    layer_dropout_rate: float = flag(
        0.0, help="largest probability of skipping a layer in training (0 = off, as today)"
    )
    layer_dropout_depth_scale: str = flag(
        "exponential",
        choices=["uniform", "linear", "exponential"],
        help="how the rate rises with depth: layer 1 gets 0 (linear, exponential), the last "
        "layer the full rate",
    )
    layer_dropout_time_scale: str = flag(
        "constant",
        choices=["constant", "linear", "exponential"],
        help="how the rate rises over --train-iters (constant: full rate from the start)",
    )

    def validate(self) -> None:
        r = self.layer_dropout_rate
        _require(
            0.0 <= r <= 1.0 and math.isfinite(r),
            f"--layer-dropout-rate must be in [0, 1], got {r}",
        )
        for name, value, choices in (
            ("--layer-dropout-depth-scale", self.layer_dropout_depth_scale,
             ("uniform", "linear", "exponential")),
            ("--layer-dropout-time-scale", self.layer_dropout_time_scale,
             ("constant", "linear", "exponential")),
        ):  # fmt: skip
            _require(value in choices, f"{name} must be one of {', '.join(choices)}, got {value!r}")

    @property
    def enabled(self) -> bool:
        return self.layer_dropout_rate > 0.0


@dataclass
class RunConfig:
    FLAG_GROUP: ClassVar[str] = "run"

    model: ModelConfig = field(default_factory=ModelConfig)
    exits: ExitConfig = field(default_factory=ExitConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    fill: FillConfig = field(default_factory=FillConfig)
    overlap: OverlapConfig = field(default_factory=OverlapConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    layer_dropout: LayerDropoutConfig = field(default_factory=LayerDropoutConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    dry_run: bool = flag(
        False,
        help="parse and validate for WORLD_SIZE GPUs, print the parallel layout and parameter "
        "counts, and exit without creating process groups",
    )

    def validate(self, device_is_cuda: bool = False, needs_data: bool = True) -> RunConfig:
        """Check everything that can be checked without process groups; raise ConfigError.

        `needs_data=False` for inference: no training data flags are required."""
        self.parallel.validate(self.model.num_layers)
        self.recompute.validate(self.parallel.stage_split(self.model.num_layers).counts())
        self.model.validate(self.parallel.tensor_model_parallel_size)
        self.exits.validate(self.model.num_layers)
        self._validate_exit_tuning()
        self._validate_exit_distillation()
        if needs_data:  # training: inference runs the heads at any PP
            self._validate_exit_confidence()
        self.training.validate(self.parallel.data_parallel_size, device_is_cuda)
        self.data.validate(needs_data)
        self.checkpoint.validate()
        self.logging.validate()
        self.fill.validate(self)
        self.overlap.validate(self)
        self.layer_dropout.validate()
        self.inference.validate()
        _require(
            not (self.layer_dropout.enabled and self.training.tune_exit),
            "--layer-dropout-rate trains the backbone; --tune-exit freezes it",
        )
        self._validate_virtual_pipeline()
        return self

    def _validate_virtual_pipeline(self) -> None:
        """What the interleaved schedule (pipeline/interleaved.py) does not do yet."""
        p = self.parallel
        if p.virtual_pipeline_model_parallel_size is None:
            return
        flag_ = "--num-layers-per-virtual-pipeline-stage"
        pp = p.pipeline_model_parallel_size
        m = self.training.num_microbatches(p.data_parallel_size)
        _require(
            m % pp == 0,
            f"{flag_}: the interleaved schedule needs the number of microbatches ({m} = global "
            f"batch / (micro batch x data-parallel size)) divisible by "
            f"--pipeline-model-parallel-size {pp}",
        )

    def _validate_exit_tuning(self) -> None:
        k = self.parallel.tune_exit_pipeline_parallel_size
        t = self.training
        if not t.tune_exit:
            _require(k is None, "--tune-exit-pipeline-parallel-size needs --tune-exit")
            _require(
                not t.tune_exit_truncate_backbone, "--tune-exit-truncate-backbone needs --tune-exit"
            )
            _require(t.teacher_cache is None, "--teacher-cache needs --tune-exit")
            return
        self._validate_cheap_tuning()
        _require(
            self.exits.num_exits > 0,
            "--tune-exit trains exit heads but the model has none: add them to the checkpoint "
            "first with tools/checkpoint/add_exits.py (or pass --exit-layer-nums)",
        )
        _require(
            self.checkpoint.load is not None,
            "--tune-exit tunes the exits of a pretrained model: pass --load CHECKPOINT "
            "(made with tools/checkpoint/add_exits.py)",
        )
        if k is not None:
            split = self.parallel.stage_split(self.model.num_layers)
            # The partial-stage checkpoint hook (tuning/partial.py) maps dropped stages'
            # layers by a uniform stride.
            _require(
                not split.uneven,
                "--tune-exit-pipeline-parallel-size needs the even layer split; drop "
                "--decoder-first/last-pipeline-num-layers and --account-for-*-in-pipeline-split",
            )
            depth = sum(split.counts()[:k])
            deepest = max(self.exits.exit_layer_nums)
            _require(
                deepest <= depth,
                f"--tune-exit-pipeline-parallel-size {k}: the first {k} of "
                f"{self.parallel.pipeline_model_parallel_size} stages hold layers 1..{depth} "
                f"but there is an exit at layer {deepest}",
            )

    def _validate_cheap_tuning(self) -> None:
        t, par = self.training, self.parallel
        pp, tp = par.pipeline_model_parallel_size, par.tensor_model_parallel_size
        if t.tune_exit_truncate_backbone:
            _require(
                not self.exits.exit_distillation,
                "--tune-exit-truncate-backbone drops the final layer that --exit-distillation "
                "needs as teacher; cache the teacher instead (tools/cache_teacher.py, "
                "--teacher-cache DIR)",
            )
            _require(
                pp == 1,
                "--tune-exit-truncate-backbone is for --pipeline-model-parallel-size 1; with "
                f"{pp} stages use --tune-exit-pipeline-parallel-size k",
            )
        if t.teacher_cache is not None:
            _require(
                tp == 1 and pp == 1,
                "--teacher-cache trains the exit heads on cached hidden states with "
                "--tensor-model-parallel-size 1 and --pipeline-model-parallel-size 1 (got "
                f"{tp} and {pp}); use data parallelism",
            )
            _require(
                par.tune_exit_pipeline_parallel_size is None,
                "--teacher-cache runs no backbone: drop --tune-exit-pipeline-parallel-size",
            )
            _require(
                self.recompute.recompute_granularity is None,
                "--teacher-cache: activation recomputation has nothing to recompute; drop "
                "--recompute-granularity",
            )

    def _validate_exit_confidence(self) -> None:
        if not self.exits.exit_confidence_head:
            return
        pp = self.parallel.pipeline_model_parallel_size
        k = self.parallel.tune_exit_pipeline_parallel_size
        _require(
            (k is None or k == pp) and pp == 1,
            "--exit-confidence-head trains on the final layer's top-1 token, which lives on the "
            f"last pipeline stage; with --pipeline-model-parallel-size {pp} the exits are "
            "elsewhere (train it with PP=1; tensor and data parallelism work; inference with "
            "'learned' works at any PP)",
        )
        _require(
            not self.training.tune_exit_truncate_backbone,
            "--exit-confidence-head trains on the final layer's top-1 token; "
            "--tune-exit-truncate-backbone runs no final layer (a --teacher-cache holds it)",
        )

    def _validate_exit_distillation(self) -> None:
        top_k = self.exits.exit_distillation_top_k
        if not self.exits.exit_distillation:
            _require(top_k is None, "--exit-distillation-top-k needs --exit-distillation")
            return
        _require(
            top_k is None or top_k >= 1,
            f"--exit-distillation-top-k must be >= 1 (got {top_k})",
        )
        _require(
            self.exits.num_exits > 0,
            "--exit-distillation trains exits toward the final layer but the model has no "
            "exits (--exit-layer-nums)",
        )
        pp = self.parallel.pipeline_model_parallel_size
        k = self.parallel.tune_exit_pipeline_parallel_size
        _require(
            k is None or k == pp,
            f"--exit-distillation needs the final layer's logits, but "
            f"--tune-exit-pipeline-parallel-size {k} drops the last of the {pp} stages",
        )
        _require(
            not (pp > 1 and self.fill.fill_explicit_bubbles),
            "--exit-distillation with --pipeline-model-parallel-size > 1 does not fit "
            "--fill-explicit-bubbles (fill microbatches have no teacher): drop one of them",
        )

    def resolve_vocab(self, tokenizer_vocab_size: int) -> None:
        """Take the vocabulary from the tokenizer; --vocab-size may only be larger."""
        given = self.data.vocab_size
        if self.data.tokenizer_type != "NullTokenizer" and given is not None:
            _require(
                given >= tokenizer_vocab_size,
                f"the tokenizer has {tokenizer_vocab_size} tokens but --vocab-size is {given}: "
                "the model's vocabulary must hold every token id",
            )
        self.data.vocab_size = max(given or 0, tokenizer_vocab_size)

    def padded_vocab_size(self) -> int:
        return pad_vocab_size(
            self.data.vocab_size or 0,
            self.model.make_vocab_size_divisible_by,
            self.parallel.tensor_model_parallel_size,
        )


def pad_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Pad so every TP shard of the vocabulary has the same size (Megatron convention)."""
    multiple = divisible_by * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def _activation(m: ModelConfig):
    if m.swiglu:
        return torch.nn.functional.silu
    if m.openai_gelu:  # megatron-core's tanh GELU (as Megatron-LM's --openai-gelu)
        from megatron.core.transformer.utils import openai_gelu

        return openai_gelu
    return torch.nn.functional.gelu


def build_transformer_config(run: RunConfig, use_te: bool = False) -> EarlyExitTransformerConfig:
    """Translate the run config into the megatron-core config the model is built from."""
    m, p, t = run.model, run.parallel, run.training
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=m.resolved_ffn_hidden_size(),
        kv_channels=m.kv_channels,
        num_query_groups=m.num_query_groups if m.group_query_attention else None,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=m.swiglu,
        activation_func=_activation(m),
        add_bias_linear=not m.disable_bias_linear,
        add_qkv_bias=m.add_qkv_bias,
        qk_layernorm=m.qk_layernorm,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        batch_p2p_comm=p.batch_p2p_comm,
        # Free sent activations' data (autograd keeps only grad_fn); see pipeline/schedules.py.
        deallocate_pipeline_outputs=True,
        params_dtype=t.params_dtype,
        pipeline_dtype=t.params_dtype,
        bf16=t.bf16,
        fp16=t.fp16,
        autocast_dtype=t.params_dtype,
        use_cpu_initialization=True,
        perform_initialization=True,
        early_exit=run.exits,
        **p.stage_split(m.num_layers).megatron_kwargs(),
        **run.recompute.megatron_kwargs(),
    )
    if not use_te:
        # Fused kernels need apex/TE/CUDA; the local path uses plain torch ops.
        kwargs.update(
            gradient_accumulation_fusion=False,
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            bias_dropout_fusion=False,
            persist_layer_norm=False,
            apply_rope_fusion=False,
        )
    return EarlyExitTransformerConfig(**kwargs)
