"""Typed configs, validated before any process group exists.

`RunConfig` groups everything one training run needs; `arguments.py` is the only code
that builds it from the command line. Components receive the sub-config they need.
`EarlyExitTransformerConfig` extends megatron-core's `TransformerConfig` with the exit
settings, so the model is built from one config like any megatron-core model.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron.early_exit.errors import ConfigError


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class ExitConfig:
    """Where early exits sit, what an exit head is, and how exit losses are weighted."""

    exit_layer_nums: list[int] = field(default_factory=list)  # 1-based global layer numbers
    pre_exit: bool = False  # exit before the layer instead of after it
    use_exit_norm: bool = False
    use_exit_mlp: bool = False
    use_exit_block: bool = False
    untie_exit_output_weights: bool = False
    exit_layer_temperature: list[float] = field(default_factory=list)  # one, or one per exit
    exit_layer_weight: list[float] = field(default_factory=list)  # one per exit (default 1.0)
    exit_layer_weight_init: list[float] = field(default_factory=list)  # warm-up start values
    exit_layer_weight_warmup_iters: int = 0
    exit_layer_weight_warmup_style: str = "linear"
    use_dynamic_exit_layer_weight: bool = False
    # Train exits toward the final layer's (detached) distribution: KL(p_final || p_exit).
    exit_distillation: bool = False

    @property
    def num_exits(self) -> int:
        return len(self.exit_layer_nums)

    def temperature(self, index: int) -> float:
        if not self.exit_layer_temperature:
            return 1.0
        if len(self.exit_layer_temperature) == 1:
            return self.exit_layer_temperature[0]
        return self.exit_layer_temperature[index]

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


@dataclass
class EarlyExitTransformerConfig(TransformerConfig):
    """megatron-core TransformerConfig plus the early-exit settings."""

    early_exit: ExitConfig = field(default_factory=ExitConfig)

    def __post_init__(self) -> None:
        self.early_exit.validate(self.num_layers)
        super().__post_init__()


@dataclass
class ModelConfig:
    """Architecture of the GPT backbone (GPT-2 style by default, Llama style by flags)."""

    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: int | None = None  # default 4 * hidden (or 8/3 * hidden with SwiGLU)
    kv_channels: int | None = None
    seq_length: int = 64
    max_position_embeddings: int | None = None
    normalization: str = "LayerNorm"
    norm_epsilon: float = 1e-5
    position_embedding_type: str = "learned_absolute"
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    swiglu: bool = False
    group_query_attention: bool = False
    num_query_groups: int | None = None
    untie_embeddings_and_output_weights: bool = False
    disable_bias_linear: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128

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
        if self.num_query_groups is not None and not self.group_query_attention:
            raise ConfigError("--num-query-groups needs --group-query-attention")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    batch_p2p_comm: bool = True
    world_size: int = 1
    # EE-Tuning: run only the first k of the pipeline_model_parallel_size stages.
    tune_exit_pipeline_parallel_size: int | None = None

    @property
    def runtime_pipeline_parallel_size(self) -> int:
        return self.tune_exit_pipeline_parallel_size or self.pipeline_model_parallel_size

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
        _require(
            num_layers % pp == 0,
            f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size {pp}",
        )
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            # Upstream megatron-core gives silently wrong losses for PP=2 + interleaving with
            # batched p2p; refuse it rather than train on wrong gradients.
            _require(
                not (pp == 2 and self.batch_p2p_comm),
                "interleaved pipeline (virtual stages) with --pipeline-model-parallel-size 2 and "
                "batched p2p communication gives wrong losses in megatron-core 0.16.1; "
                "pass --no-batch-p2p-comm",
            )
            raise ConfigError(
                "the interleaved (virtual) pipeline schedule is not supported with early-exit "
                "losses yet; drop --num-layers-per-virtual-pipeline-stage"
            )
        if self.sequence_parallel and tp == 1:
            warnings.warn("--sequence-parallel has no effect with TP=1; disabling it", stacklevel=2)
            self.sequence_parallel = False


@dataclass
class TrainingConfig:
    micro_batch_size: int = 2
    global_batch_size: int | None = None  # default: micro batch x data-parallel size
    train_iters: int = 10
    exit_interval: int | None = None  # stop (and save) once iteration % exit_interval == 0
    eval_interval: int | None = None  # validate every N iterations (and at the end)
    eval_iters: int = 10  # global batches per validation
    lr: float = 1e-3
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None
    clip_grad: float = 1.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    seed: int = 1234
    bf16: bool = False
    fp16: bool = False
    loss_scale: float | None = None  # fixed fp16 loss scale; dynamic when None
    initial_loss_scale: float = 2.0**32
    tune_exit: bool = False  # EE-Tuning: train only exit heads on a frozen backbone

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
class DataConfig:
    mock_data: bool = False
    data_path: list[str] = field(default_factory=list)  # ["PREFIX"] or ["0.7", "A", "0.3", "B"]
    split: str = "969,30,1"
    data_cache_path: str | None = None
    tokenizer_type: str = "NullTokenizer"
    vocab_file: str | None = None
    merge_file: str | None = None
    tokenizer_model: str | None = None
    vocab_size: int | None = None  # NullTokenizer's vocabulary; else taken from the tokenizer

    def tokenizer_config(self):
        from megatron.early_exit.data.tokenizers import tokenizer_config_from_args

        return tokenizer_config_from_args(self)  # same field names as the flags

    def validate(self) -> None:
        from megatron.early_exit.data.tokenizers import TOKENIZER_TYPES

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
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    finetune: bool = False  # load weights, restart at iteration 0

    def validate(self) -> None:
        if self.save_interval is not None:
            _require(self.save_interval > 0, "--save-interval must be > 0")
            _require(self.save is not None, "--save-interval needs --save DIR")


@dataclass
class LoggingConfig:
    log_interval: int = 1
    metrics_file: str | None = None

    def validate(self) -> None:
        _require(self.log_interval >= 1, "--log-interval must be >= 1")


@dataclass
class FillConfig:
    """Bubble filling of the 1F1B schedule (pipeline/bubble_filling.py)."""

    fill_explicit_bubbles: bool = False
    num_fill_warmup_microbatches: int | None = None  # None: automatic
    num_fill_cooldown_microbatches: int | None = None  # None: automatic
    backward_forward_ratio: float = 2.0
    print_pipeline_schedule: bool = False

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
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    exits: ExitConfig = field(default_factory=ExitConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    fill: FillConfig = field(default_factory=FillConfig)

    def validate(self, device_is_cuda: bool = False) -> RunConfig:
        """Check everything that can be checked without process groups; raise ConfigError."""
        self.parallel.validate(self.model.num_layers)
        self.model.validate(self.parallel.tensor_model_parallel_size)
        self.exits.validate(self.model.num_layers)
        self._validate_exit_tuning()
        self._validate_exit_distillation()
        self.training.validate(self.parallel.data_parallel_size, device_is_cuda)
        self.data.validate()
        self.checkpoint.validate()
        self.logging.validate()
        self.fill.validate(self)
        return self

    def _validate_exit_tuning(self) -> None:
        k = self.parallel.tune_exit_pipeline_parallel_size
        if not self.training.tune_exit:
            _require(k is None, "--tune-exit-pipeline-parallel-size needs --tune-exit")
            return
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
            depth = self.model.num_layers * k // self.parallel.pipeline_model_parallel_size
            deepest = max(self.exits.exit_layer_nums)
            _require(
                deepest <= depth,
                f"--tune-exit-pipeline-parallel-size {k}: the first {k} of "
                f"{self.parallel.pipeline_model_parallel_size} stages hold layers 1..{depth} "
                f"but there is an exit at layer {deepest}",
            )

    def _validate_exit_distillation(self) -> None:
        if not self.exits.exit_distillation:
            return
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
            pp == 1,
            f"--exit-distillation needs every exit on the stage that computes the final logits; "
            f"with --pipeline-model-parallel-size {pp} they live on other stages (use PP=1; "
            "tensor and data parallelism work)",
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
        activation_func=torch.nn.functional.silu if m.swiglu else torch.nn.functional.gelu,
        add_bias_linear=not m.disable_bias_linear,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
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
