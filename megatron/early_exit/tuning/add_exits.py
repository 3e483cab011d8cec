"""Add early-exit heads to an existing checkpoint (first step of EE-Tuning).

Runs in one process: dist checkpoints are layout-independent, so the model is built at
TP=PP=1, the source tensors are loaded into it, the new heads are initialised, and a new
checkpoint (iteration 0, no optimizer state) is written to a temporary directory that is
renamed into place only when complete.

Copy initialisation (the default) makes every new head start from the model's own head:
final norm -> exit norm, output embedding -> untied exit output (tied exits use the
embeddings anyway), layer n's MLP -> exit MLP, last layer -> exit block. An exit with a
norm and an output projection therefore starts as "the LM head applied at layer n".

`exit_confidence_head` gives every exit (old and new) a learned confidence estimator
(model/exit_head.py), zero-initialised (sigmoid 0.5) until EE-Tuning trains it; with no
new layers it adds just those estimators to a checkpoint's existing exits.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import torch

from megatron.early_exit.checkpoint.files import TOKENIZER_PATH_KEYS
from megatron.early_exit.config import ConfigError
from megatron.early_exit.errors import AddExitsError, CheckpointError

_HEAD_FLAGS = ("use_exit_norm", "use_exit_mlp", "use_exit_block", "untie_exit_output_weights")


@dataclass
class AddExitsOptions:
    load: str
    save: str
    exit_layer_nums: list[int]
    use_exit_norm: bool = False
    use_exit_mlp: bool = False
    use_exit_block: bool = False
    untie_exit_output_weights: bool = False
    exit_layer_temperature: list[float] = field(default_factory=list)  # one, or one per new exit
    random_init: bool = False
    seed: int = 1234
    # Start the copied MLP's output projection at zero: the head then begins exactly as the
    # final norm + LM head on that layer's hidden state. A pre-norm layer's MLP expects a
    # normalised input, so an exact copy fed with the raw residual stream starts far worse
    # (SmolLM2: validation loss ~16-24 at add time instead of the logit-lens loss).
    zero_mlp_output: bool = True
    exit_confidence_head: bool = False  # estimators for every exit (kept if already there)


def _per_exit(values: list[float], n: int, what: str) -> list[float]:
    if not values:
        return [1.0] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise AddExitsError(f"{what}: give one value or one per exit ({n}), got {len(values)}")
    return list(values)


def _merged_args(opts: AddExitsOptions):
    """argparse namespace of the source checkpoint with the new exits merged in."""
    from megatron.early_exit.arguments import parse_args
    from megatron.early_exit.checkpoint.files import read_checkpoint_args

    saved = read_checkpoint_args(opts.load)
    if saved is None:
        raise AddExitsError(
            f"checkpoint {opts.load} records no model flags (ee_args.json): save it with this "
            "framework or convert it with tools/checkpoint/ first"
        )
    args = parse_args(["--load", opts.load])
    num_layers = args.num_layers
    new = list(opts.exit_layer_nums)
    old = list(saved.get("exit_layer_nums") or [])
    had_conf = bool(saved.get("exit_confidence_head"))
    if not new and not (opts.exit_confidence_head and old and not had_conf):
        raise AddExitsError(
            "no exits to add: pass --exit-layer-nums (or --exit-confidence-head for a "
            "checkpoint whose exits have no confidence heads yet)"
        )
    if len(set(new)) != len(new):
        raise AddExitsError(f"--exit-layer-nums has duplicates: {new}")
    for n in new:
        if not 1 <= n <= num_layers:
            raise AddExitsError(
                f"exit layer {n} is out of range: the model has layers 1..{num_layers} (1-based)"
            )
    clash = sorted(set(old) & set(new))
    if clash:
        raise AddExitsError(f"the checkpoint already has exits at layers {clash}")
    if old and new:  # with no new exits the head flags are the checkpoint's
        differ = [f for f in _HEAD_FLAGS if bool(saved.get(f)) != bool(getattr(opts, f))]
        if differ:
            raise AddExitsError(
                f"the checkpoint's exits at {old} use other head options ({', '.join(differ)} "
                "differ); every exit head of a model has the same structure: pass the same "
                "head flags as the existing exits"
            )
    old_t = _per_exit(list(saved.get("exit_layer_temperature") or []), len(old), "temperature")
    new_t = _per_exit(opts.exit_layer_temperature, len(new), "--exit-layer-temperature")
    for t in new_t:
        if not t > 0:
            raise AddExitsError(f"--exit-layer-temperature must be > 0, got {t}")
    by_layer = dict(zip(old, old_t)) | dict(zip(new, new_t))
    merged = sorted(by_layer)
    temps = [by_layer[n] for n in merged]
    args.exit_layer_nums = merged
    args.exit_layer_temperature = [] if set(temps) == {1.0} else temps
    for f in _HEAD_FLAGS:
        setattr(args, f, getattr(opts, f) if new else bool(saved.get(f)))
    args.exit_confidence_head = had_conf or opts.exit_confidence_head
    args.tensor_model_parallel_size = 1
    args.pipeline_model_parallel_size = 1
    args.num_layers_per_virtual_pipeline_stage = None
    args.virtual_pipeline_model_parallel_size = None
    args.sequence_parallel = False
    args.use_distributed_optimizer = False
    args.seed = opts.seed
    return args, new


def _run_config(args):
    from megatron.early_exit.arguments import config_from_args

    run = config_from_args(args, world_size=1)
    run.parallel.validate(run.model.num_layers)
    run.model.validate(1)
    run.exits.validate(run.model.num_layers)
    if run.data.vocab_size is None:
        from megatron.early_exit.data.tokenizers import build_tokenizer

        run.resolve_vocab(build_tokenizer(run.data.tokenizer_config()).vocab_size)
    return run


@torch.no_grad()
def copy_init(model, layers: list[int], zero_mlp_output: bool = False) -> None:
    """Initialise the exit heads at `layers` from the model's own parts (module docstring)."""
    for n in layers:
        head = model.exit_heads.get(n)
        if head.norm is not None:
            head.norm.load_state_dict(model.decoder.final_layernorm.state_dict())
        if not head.tied:
            source = (
                model.embedding.word_embeddings.weight
                if model.share_embeddings_and_output_weights
                else model.output_layer.weight
            )
            head.output_layer.weight.copy_(source)
        if head.mlp is not None:
            layer_mlp = model.decoder.layers[n - 1 - model.layer_offset].mlp.state_dict()
            wanted = head.mlp.state_dict()
            missing = sorted(set(wanted) - set(layer_mlp))
            if missing:
                raise AddExitsError(f"cannot copy layer {n}'s MLP into the exit MLP: {missing}")
            head.mlp.load_state_dict({k: layer_mlp[k] for k in wanted})
            if zero_mlp_output:
                head.mlp.linear_fc2.weight.zero_()
                if getattr(head.mlp.linear_fc2, "bias", None) is not None:
                    head.mlp.linear_fc2.bias.zero_()
        if head.block is not None:
            head.block.load_state_dict(model.decoder.layers[-1].state_dict())


def _copy_tokenizer_files(args: dict, iter_dir: str) -> None:
    """Keep the checkpoint self-contained: tokenizer files next to it, recorded relative."""
    for key in TOKENIZER_PATH_KEYS:
        path = args.get(key)
        if not path or not os.path.exists(path):
            continue
        name = os.path.basename(os.path.normpath(path))
        target = os.path.join(iter_dir, name)
        if os.path.isdir(path):
            shutil.copytree(path, target, dirs_exist_ok=True)
        else:
            shutil.copy2(path, target)
        args[key] = name


def add_exits(opts: AddExitsOptions) -> str:
    """Write `opts.save` = `opts.load` plus new exit heads; return the new iteration dir."""
    from megatron.core import dist_checkpointing, parallel_state
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron.early_exit.checkpoint.files import (
        args_from_run,
        checkpoint_dir,
        latest_checkpoint_dir,
        write_checkpoint_args,
    )
    from megatron.early_exit.checkpoint.integrity import check_checkpoint_files
    from megatron.early_exit.checkpoint.store import save_checkpoint
    from megatron.early_exit.config import build_transformer_config
    from megatron.early_exit.model.build import build_stage_model, init_model_parallel, unwrap
    from megatron.early_exit.platform import init_platform

    try:
        src = latest_checkpoint_dir(opts.load)
    except CheckpointError as exc:
        raise AddExitsError(str(exc)) from exc
    if not os.path.isfile(os.path.join(src, "metadata.json")):
        raise AddExitsError(f"{src} is not a complete checkpoint (metadata.json is missing)")
    if os.path.exists(opts.save) and os.listdir(opts.save):
        raise AddExitsError(f"--save {opts.save} exists and is not empty; choose a new directory")
    try:
        args, new = _merged_args(opts)
        run = _run_config(args)
    except (ConfigError, CheckpointError) as exc:
        raise AddExitsError(str(exc)) from exc

    platform = init_platform()
    config = build_transformer_config(run, use_te=False)
    if parallel_state.model_parallel_is_initialized():
        raise AddExitsError("add_exits runs in its own process (model parallel state exists)")
    init_model_parallel(run, config, platform)
    model = unwrap(build_stage_model(run, config, platform, use_te=False))

    new_prefixes = tuple(f"exit_heads.{n}." for n in new)

    def fresh(key: str) -> bool:  # not in the source checkpoint: initialised here
        return key.startswith(new_prefixes) or (not had_conf and ".confidence." in key)

    from megatron.early_exit.checkpoint.files import read_checkpoint_args

    had_conf = bool((read_checkpoint_args(opts.load) or {}).get("exit_confidence_head"))
    sharded = {k: v for k, v in model.sharded_state_dict().items() if not fresh(k)}
    try:
        check_checkpoint_files(src)
        loaded = dist_checkpointing.load(sharded, src)
    except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
        lines = [x.strip() for x in str(exc).splitlines() if x.strip()] or [type(exc).__name__]
        cause = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
        raise AddExitsError(
            f"could not read checkpoint {src} (missing or corrupt files?): {cause}"
        ) from exc
    # The load also returns the checkpoint's common (non-tensor) entries: keep model keys.
    result = model.load_state_dict({k: loaded[k] for k in sharded if k in loaded}, strict=False)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if not fresh(k)]
    if missing or unexpected:
        raise AddExitsError(
            f"checkpoint {src} does not match its recorded flags: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    if not opts.random_init:
        copy_init(model, new, zero_mlp_output=opts.zero_mlp_output)

    save = os.path.abspath(opts.save)
    tmp = f"{save}.tmp-add-exits"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        saved_args = args_from_run(run)
        save_checkpoint(  # iteration 0 without optimizer state: EE-Tuning starts from here
            tmp,
            0,
            model,
            extra={"add_exits": {"source": os.path.abspath(opts.load), "layers": new}},
            args=saved_args,
        )
        iter_dir = checkpoint_dir(tmp, 0)
        _copy_tokenizer_files(saved_args, iter_dir)
        write_checkpoint_args(iter_dir, saved_args)
        if os.path.isdir(save):
            os.rmdir(save)  # empty (checked above)
        os.replace(tmp, save)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return checkpoint_dir(save, 0)


def make_self_contained(root: str) -> None:
    """Copy the tokenizer files the latest checkpoint under `root` points to into it and
    record them relative (a tuned checkpoint then outlives the run's temporary folders)."""
    import json

    from megatron.early_exit.checkpoint.files import (
        ARGS_FILE,
        checkpoint_dir,
        read_tracker,
        write_checkpoint_args,
    )

    iter_dir = checkpoint_dir(root, read_tracker(root))
    with open(os.path.join(iter_dir, ARGS_FILE)) as f:
        args = json.load(f)
    for key in TOKENIZER_PATH_KEYS:
        if args.get(key) and not os.path.isabs(args[key]):
            args[key] = os.path.join(iter_dir, args[key])
    _copy_tokenizer_files(args, iter_dir)
    write_checkpoint_args(iter_dir, args)
