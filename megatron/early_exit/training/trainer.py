"""The training loop over the library: data -> schedule -> optimizer -> metrics/checkpoints.

What differs between kinds of training (pretraining, EE-Tuning) is a `TrainingMode`
(mode.py) the caller passes in.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from functools import partial

import torch.distributed as dist
from megatron.core import parallel_state

from megatron.early_exit.checkpoint import args_from_run
from megatron.early_exit.checkpoint.store import load_checkpoint, save_checkpoint
from megatron.early_exit.config import ConfigError, RunConfig, build_transformer_config
from megatron.early_exit.data import MockGPTDataset, microbatch_iterator
from megatron.early_exit.data.gpt_data import (
    BatchSource,
    DataError,
    build_gpt_datasets,
    samples_per_split,
)
from megatron.early_exit.data.tokenizers import Tokenizer, build_tokenizer
from megatron.early_exit.model import init_model_parallel, unwrap
from megatron.early_exit.model.build import ModelChunks
from megatron.early_exit.model.layer_dropout import LayerDropout
from megatron.early_exit.pipeline import ExitLossWeights, bubble_filling, fill_plan
from megatron.early_exit.platform import Platform
from megatron.early_exit.progress import progress
from megatron.early_exit.training.metrics import (
    MetricsWriter,
    reduce_exit_confidence,
    reduce_exit_kl,
    reduce_losses,
)
from megatron.early_exit.training.mode import Pretraining, TrainingMode
from megatron.early_exit.training.monitor import RunMonitor
from megatron.early_exit.training.setup import TrainState, setup_training


class Trainer:
    def __init__(
        self,
        run: RunConfig,
        platform: Platform,
        use_te: bool = False,
        tokenizer: Tokenizer | None = None,
        mode: TrainingMode | None = None,
        on_checkpoint_staged: Callable[[int], None] | None = None,
    ) -> None:
        """`mode`: what kind of training (default: Pretraining; `--tune-exit` needs
        tuning.ExitTuning). `on_checkpoint_staged(iteration)`: see checkpoint.store."""
        self.run = run
        self.platform = platform
        self.device = platform.device()
        self.mode = mode if mode is not None else Pretraining(run)
        if run.training.tune_exit != self.mode.tune_exit:
            raise ConfigError(
                "--tune-exit needs the EE-Tuning training mode (tuning.ExitTuning) and only it"
            )
        self.on_checkpoint_staged = on_checkpoint_staged
        # EE-Tuning may build only the first k stages.
        model_run = self.mode.model_run
        self.config = build_transformer_config(model_run, use_te=use_te)
        init_model_parallel(model_run, self.config, platform)
        self.state: TrainState = setup_training(model_run, self.config, platform, use_te, self.mode)
        self.tokenizer = tokenizer or build_tokenizer(run.data.tokenizer_config())
        self.exit_weights = ExitLossWeights(run.exits, run.training.train_iters)
        self.layer_dropout = None
        if run.layer_dropout.enabled:
            self.layer_dropout = LayerDropout(
                run.layer_dropout, run.model.num_layers, run.training.train_iters, run.training.seed
            )
            self.layer_dropout.install([self.state.model])
        self.writer = MetricsWriter(run.logging.metrics_file)
        # Timers (config.timers), TensorBoard/W&B scalars, memory figures.
        self.monitor = RunMonitor(run, self.config, self.device)
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.num_microbatches = run.training.num_microbatches(self.dp_size)
        self.global_batch_size = run.training.resolved_global_batch_size(self.dp_size)
        # Bubble filling: the per-stage action lists, or None for plain 1F1B.
        self.fill_schedule = fill_plan.plan_for_run(run)
        if run.fill.print_pipeline_schedule and dist.get_rank() == 0:
            print(fill_plan.schedule_for_run(run).table(), flush=True)
        self.dataset, self.valid_dataset = self._build_datasets()
        self._eval_runs = 0
        self.iteration = 0
        ck = run.checkpoint
        if ck.load:
            load_optim = not ck.no_load_optim and self.mode.load_optimizer(ck.load)
            self.iteration = load_checkpoint(
                ck.load,
                self.state.model,
                self.state.optimizer if load_optim else None,
                self.state.scheduler if load_optim else None,
                load_rng=not ck.no_load_rng,
                hook=self.mode.checkpoint_hook,
            )
            if ck.finetune:
                self.iteration = 0
        self._last_saved = self.iteration if ck.load and ck.load == ck.save else None

    def _build_datasets(self):
        run = self.run
        # A mode may bring its own data (EE-Tuning from a teacher cache).
        build = getattr(self.mode, "build_datasets", None)
        own = build(self.global_batch_size) if build is not None else None
        if own is not None:
            return own
        if run.data.mock_data:
            # Validation samples come from another seed: never seen in training.
            train = MockGPTDataset(run.data.vocab_size, run.model.seq_length, run.training.seed)
            valid = MockGPTDataset(run.data.vocab_size, run.model.seq_length, run.training.seed + 1)
            return train, valid
        t = run.training
        eval_iters = t.eval_iters if t.eval_interval else 0
        sizes = samples_per_split(
            t.train_iters, self.global_batch_size, t.eval_interval, eval_iters
        )
        sizes[2] = 0  # the test split is not read during training
        sizes[0] += self._fill_samples()  # fill samples follow the training samples
        train, valid, _ = build_gpt_datasets(
            run.data.data_path,
            run.data.split,
            run.model.seq_length,
            t.seed,
            self.tokenizer,
            sizes,
            run.data.data_cache_path,
        )
        if t.eval_interval and valid is None:
            raise DataError(
                f"--eval-interval needs validation data but --split {run.data.split} gives the "
                "valid split no documents"
            )
        return BatchSource(train), (BatchSource(valid) if valid is not None else None)

    # ------------------------------------------------------------------ one step
    def _forward_step(self, exit_weights, data_iterator, model):
        with self.monitor.time("batch-generator"):
            batch = next(data_iterator).to(self.device)
        exits = self.run.exits
        # Exit distillation (the teacher) and confidence heads (their target) need the final
        # logits: the loss function then computes the LM loss from them.
        labels = None if exits.needs_final_logits else batch.labels
        # A mode may produce the output without the model (EE-Tuning from a teacher cache).
        forward = getattr(self.mode, "forward", None)
        output = forward(unwrap(model), batch) if forward is not None else None
        if output is None:
            output = model(batch.tokens, batch.position_ids, None, labels=labels)
        loss_func = self.mode.loss_func(
            batch,
            unwrap(model),  # this model chunk (virtual stages) or the stage
            exit_weights,
            exits.use_dynamic_exit_layer_weight,
            exits.exit_distillation,
        )
        return output, loss_func

    def _schedule(self):
        return self.mode.schedule()

    def _fill_samples(self) -> int:
        fills = self.fill_schedule.num_fill if self.fill_schedule else 0
        t = self.run.training
        return t.train_iters * self.dp_size * fills * t.micro_batch_size

    def _train_schedule(self, iteration: int):
        if self.fill_schedule is None:
            return self._schedule()
        t = self.run.training

        def fill_data(k: int):
            indices = fill_plan.fill_sample_indices(
                iteration, k, self.fill_schedule.num_fill, t.train_iters,
                self.global_batch_size, t.micro_batch_size, self.dp_rank, self.dp_size,
            )  # fmt: skip
            return iter([self.dataset.batch(indices)])

        return partial(
            bubble_filling.forward_backward_bubble_filling,
            schedule=self.fill_schedule,
            fill_data_iterator=fill_data,
        )

    def _microbatches(self, iteration: int, dataset=None):
        if isinstance(self.state.model, ModelChunks):  # each chunk reads every microbatch
            return [self._microbatch_iterator(iteration, dataset) for _ in self.state.model]
        return self._microbatch_iterator(iteration, dataset)

    def _microbatch_iterator(self, iteration: int, dataset=None):
        return microbatch_iterator(
            self.dataset if dataset is None else dataset,
            iteration,
            self.global_batch_size,
            self.run.training.micro_batch_size,
            self.dp_rank,
            self.dp_size,
        )

    def train_step(self, iteration: int) -> dict:
        state = self.state
        start = time.perf_counter()
        state.model.zero_grad_buffer()
        state.optimizer.zero_grad()
        weights = self.exit_weights.at(iteration)
        if self.layer_dropout is not None:
            self.layer_dropout.iteration = iteration
        with self.monitor.time("forward-backward"):
            per_microbatch = self._train_schedule(iteration)(
                forward_step_func=partial(self._forward_step, weights),
                data_iterator=self._microbatches(iteration),
                model=state.model,
                num_microbatches=self.num_microbatches,
                seq_length=self.run.model.seq_length,
                micro_batch_size=self.run.training.micro_batch_size,
                config=self.config,
            )
        lr = state.optimizer.param_groups[0]["lr"]
        with self.monitor.time("optimizer"):
            success, grad_norm, _ = state.optimizer.step()
        if success:
            state.scheduler.step(increment=1)
        lm_loss, exit_losses = reduce_losses(
            per_microbatch, self.run.exits.exit_layer_nums, self.device
        )
        kl = self._exit_kl(per_microbatch)
        kl.update(self._exit_confidence(per_microbatch))
        elapsed = time.perf_counter() - start
        return {
            "split": "train",
            "iteration": iteration + 1,
            "lm_loss": lm_loss,
            "exit_losses": {str(k): v for k, v in exit_losses.items()},
            **kl,
            "exit_weights": {str(k): v for k, v in weights.items()},
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "update_successful": bool(success),
            "lr": lr,
            "iteration_time_s": elapsed,
            "tokens_per_s": self.global_batch_size * self.run.model.seq_length / elapsed,
            "fill_microbatches": self.fill_schedule.num_fill if self.fill_schedule else 0,
        }

    def _exit_confidence(self, per_microbatch: list[dict]) -> dict:
        """{"exit_confidence_bce": .., "exit_agreement": ..} per exit with confidence heads."""
        if not self.run.exits.exit_confidence_head:
            return {}
        bce, agree = reduce_exit_confidence(
            per_microbatch, self.run.exits.exit_layer_nums, self.device
        )
        return {
            "exit_confidence_bce": {str(k): v for k, v in bce.items()},
            "exit_agreement": {str(k): v for k, v in agree.items()},
        }

    def _exit_kl(self, per_microbatch: list[dict]) -> dict:
        """{"exit_kl": {layer: KL(final || exit)}} with exit distillation, else {}."""
        if not self.run.exits.exit_distillation:
            return {}
        kl = reduce_exit_kl(per_microbatch, self.run.exits.exit_layer_nums, self.device)
        return {"exit_kl": {str(k): v for k, v in kl.items()}}

    # ------------------------------------------------------------------ loop
    def train(self) -> list[dict]:
        records = []
        t = self.run.training
        ck = self.run.checkpoint
        if t.eval_interval and self.iteration == 0 and t.train_iters > 0:
            records.append(self.evaluate())  # the baseline every later validation improves on
        bar = progress(
            total=max(t.train_iters - self.iteration, 0),
            desc="EE-Tuning" if self.mode.tune_exit else "training",
            unit="iter",
            enabled=self.writer.enabled and t.train_iters > self.iteration,
        )
        if bar.mode == "bar" and sys.stdout.isatty():  # log lines go above the bar
            self.writer.echo = bar.write
        try:
            while self.iteration < t.train_iters:
                record = self.train_step(self.iteration)
                self.iteration += 1
                records.append(record)
                bar.set_postfix(_loss_summary(record))
                bar.update()
                log_now = (
                    self.iteration % self.run.logging.log_interval == 0
                    or self.iteration == t.train_iters
                )
                scalars_now = self.monitor.scalar_step(self.iteration)
                if log_now or scalars_now:
                    record.update(self.monitor.extras(self.iteration))  # collective
                if log_now:
                    self.writer.log(record)
                if scalars_now:
                    self.monitor.log(record)
                if t.eval_interval and self.iteration % t.eval_interval == 0:
                    records.append(self.evaluate())
                if ck.save and ck.save_interval and self.iteration % ck.save_interval == 0:
                    self.save()
                if t.exit_interval and self.iteration % t.exit_interval == 0:
                    break
        except BaseException:
            bar.close(summary=False)
            raise
        finally:
            bar.close()
            self.writer.echo = None
        if t.eval_interval and (not records or records[-1]["split"] != "valid"):
            records.append(self.evaluate())
        if ck.save and self._last_saved != self.iteration:
            self.save()
        self.monitor.close()
        return records

    def evaluate(self) -> dict:
        """Mean LM and exit losses over `eval_iters` validation global batches (no grads)."""
        start = time.perf_counter()
        self.state.model.eval()
        weights = self.exit_weights.at(self.iteration, curriculum=False)
        per_microbatch = []
        eval_iters = self.run.training.eval_iters
        first = self._eval_runs * eval_iters  # each validation reads new samples
        self._eval_runs += 1
        self.monitor.pause_timers()  # validation is not training time
        try:
            for i in range(first, first + eval_iters):
                per_microbatch += self._schedule()(
                    forward_step_func=partial(self._forward_step, weights),
                    data_iterator=self._microbatches(i, self.valid_dataset),
                    model=self.state.model,
                    num_microbatches=self.num_microbatches,
                    seq_length=self.run.model.seq_length,
                    micro_batch_size=self.run.training.micro_batch_size,
                    config=self.config,
                    forward_only=True,
                )
        finally:
            self.state.model.train()
            self.monitor.resume_timers()
        lm_loss, exit_losses = reduce_losses(
            per_microbatch, self.run.exits.exit_layer_nums, self.device
        )
        record = {
            "split": "valid",
            "iteration": self.iteration,
            "lm_loss": lm_loss,
            "exit_losses": {str(k): v for k, v in exit_losses.items()},
            **self._exit_kl(per_microbatch),
            **self._exit_confidence(per_microbatch),
            "eval_time_s": time.perf_counter() - start,
        }
        self.writer.log(record)
        self.monitor.log(record)
        return record

    def save(self) -> None:
        # --overlap-param-gather leaves the updated parameters to the next forward's
        # all-gather: finish it (synchronously) before reading them.
        param_gather = self.run.overlap.overlap_param_gather
        if param_gather:
            self.state.model.disable_forward_pre_hook()
        try:
            self._save()
        finally:
            if param_gather:
                self.state.model.enable_forward_pre_hook()

    def _save(self) -> None:
        save_checkpoint(
            self.run.checkpoint.save,
            self.iteration,
            self.state.model,
            self.state.optimizer,
            self.state.scheduler,
            extra={"run": _summary(self.run), "tune_exit": self.mode.tune_exit},
            args=args_from_run(self.run),
            hook=self.mode.checkpoint_hook,
            on_staged=self.on_checkpoint_staged,
        )
        self._last_saved = self.iteration
        if dist.get_rank() == 0:
            say = self.writer.echo or (lambda line: print(line, flush=True))
            say(f"saved checkpoint iteration {self.iteration} to {self.run.checkpoint.save}")


def _summary(run: RunConfig) -> dict:
    from dataclasses import asdict

    return {k: v for k, v in asdict(run).items() if k in ("model", "exits", "data")}


def _loss_summary(record: dict) -> str:
    """The progress bar's postfix: LM loss and exit losses, short."""
    parts = []
    if record.get("lm_loss") is not None:
        parts.append(f"lm {record['lm_loss']:.3f}")
    exits = [v for v in (record.get("exit_losses") or {}).values() if v is not None]
    if exits:
        parts.append("exits " + " ".join(f"{v:.3f}" for v in exits))
    return ", ".join(parts)
