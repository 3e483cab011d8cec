"""How many decoder layers each pipeline stage holds (pure arithmetic, no torch).

megatron-core's split (TransformerConfig `num_layers_in_first/last_pipeline_stage`,
`account_for_embedding/loss_in_pipeline_split`), written once here so every part of the
project that needs to know which stage owns a layer (exit ownership, tied-exit embedding
groups, bubble filling, dry-run layout, EE-Tuning depth, inference) agrees with the model
megatron-core builds. tests/unit/test_stage_split.py compares it with megatron-core's own
`get_num_layers_to_build` / `get_transformer_layer_offset`.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.early_exit.errors import ConfigError


@dataclass(frozen=True)
class StageSplit:
    """The inputs of the split: the model's layers over `pipeline_size` stages."""

    num_layers: int
    pipeline_size: int
    first: int | None = None  # --decoder-first-pipeline-num-layers
    last: int | None = None  # --decoder-last-pipeline-num-layers
    account_for_embedding: bool = False
    account_for_loss: bool = False
    # Virtual stages (interleaved schedule, even split only): rank r holds the model chunks
    # r, r + pp, r + 2 pp, ... of num_layers / (pp * virtual) layers each.
    virtual: int | None = None

    @property
    def uneven(self) -> bool:
        return (
            self.first is not None
            or self.last is not None
            or self.account_for_embedding
            or self.account_for_loss
        )

    def counts(self) -> list[int]:
        """Layers per stage; raises ConfigError naming the flags for a split that does not work."""
        n, pp = self.num_layers, self.pipeline_size
        if pp < 1 or n < 1:
            raise ConfigError(f"cannot split {n} layers over {pp} pipeline stages")
        explicit = self.first is not None or self.last is not None
        if explicit and (self.account_for_embedding or self.account_for_loss):
            raise ConfigError(
                "--decoder-first/last-pipeline-num-layers exclude "
                "--account-for-embedding-in-pipeline-split / --account-for-loss-in-pipeline-split"
            )
        if pp == 1:
            if self.uneven:
                raise ConfigError(
                    "--decoder-first/last-pipeline-num-layers and --account-for-*-in-pipeline-"
                    "split need --pipeline-model-parallel-size > 1"
                )
            return [n]
        if explicit:
            return self._explicit_counts()
        if self.account_for_embedding or self.account_for_loss:
            return self._accounted_counts()
        if n % pp:
            raise ConfigError(
                f"--num-layers {n} is not divisible by --pipeline-model-parallel-size {pp} "
                "(or give --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers)"
            )
        return [n // pp] * pp

    def _explicit_counts(self) -> list[int]:
        n, pp, first, last = self.num_layers, self.pipeline_size, self.first, self.last
        for name, value in (
            ("--decoder-first-pipeline-num-layers", first),
            ("--decoder-last-pipeline-num-layers", last),
        ):
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        middle_stages = pp - (first is not None) - (last is not None)
        middle_layers = n - (first or 0) - (last or 0)
        given = " + ".join(str(v) for v in (first, last) if v is not None)
        if middle_layers < 0 or (middle_stages == 0 and middle_layers != 0):
            raise ConfigError(
                f"--decoder-first/last-pipeline-num-layers ({given}) must add up to --num-layers "
                f"{n} with the remaining layers spread over the {middle_stages} middle stages"
            )
        if middle_stages and (middle_layers < middle_stages or middle_layers % middle_stages):
            raise ConfigError(
                f"--num-layers {n} minus --decoder-first/last-pipeline-num-layers ({given}) "
                f"leaves {middle_layers} layers, which do not divide evenly (at least one "
                f"each) over the {middle_stages} middle pipeline stages"
            )
        per = middle_layers // middle_stages if middle_stages else 0
        counts = [per] * pp
        if first is not None:
            counts[0] = first
        if last is not None:
            counts[-1] = last
        return counts

    def _accounted_counts(self) -> list[int]:
        # megatron-core counts the embedding (loss) as one more layer on the first (last)
        # stage and splits the total evenly.
        n, pp = self.num_layers, self.pipeline_size
        total = n + self.account_for_embedding + self.account_for_loss
        flags = " and ".join(
            f
            for f, on in (
                ("--account-for-embedding-in-pipeline-split", self.account_for_embedding),
                ("--account-for-loss-in-pipeline-split", self.account_for_loss),
            )
            if on
        )
        if total % pp:
            raise ConfigError(
                f"with {flags}, --num-layers {n} + {total - n} = {total} must be divisible by "
                f"--pipeline-model-parallel-size {pp}"
            )
        per = total // pp
        counts = [per] * pp
        counts[0] -= int(self.account_for_embedding)
        counts[-1] -= int(self.account_for_loss)
        if min(counts) < 1:
            raise ConfigError(
                f"with {flags}, a pipeline stage would get no transformer layer ({counts}); "
                "use fewer stages or more layers"
            )
        return counts

    def offsets(self) -> list[int]:
        """Layers before each stage (0 for the first)."""
        out, acc = [], 0
        for c in self.counts():
            out.append(acc)
            acc += c
        return out

    def ranges(self) -> list[tuple[int, int]]:
        """(first, last) 1-based inclusive layer numbers of each stage."""
        return [(o + 1, o + c) for o, c in zip(self.offsets(), self.counts())]

    def stage_of(self, layer_number: int) -> int:
        """Pipeline stage owning the (1-based) layer."""
        if self.virtual is not None and 1 <= layer_number <= self.num_layers:
            per_chunk = self.num_layers // (self.pipeline_size * self.virtual)
            return (layer_number - 1) // per_chunk % self.pipeline_size
        for stage, (first, last) in enumerate(self.ranges()):
            if first <= layer_number <= last:
                return stage
        raise ValueError(f"layer {layer_number} is outside 1..{self.num_layers}")

    def megatron_kwargs(self) -> dict:
        """The TransformerConfig fields of this split."""
        return {
            "num_layers_in_first_pipeline_stage": self.first,
            "num_layers_in_last_pipeline_stage": self.last,
            "account_for_embedding_in_pipeline_split": self.account_for_embedding,
            "account_for_loss_in_pipeline_split": self.account_for_loss,
        }


def split_of_config(config) -> StageSplit:
    """The split of a megatron-core TransformerConfig (or anything with its field names)."""
    return StageSplit(
        num_layers=config.num_layers,
        pipeline_size=config.pipeline_model_parallel_size,
        first=getattr(config, "num_layers_in_first_pipeline_stage", None),
        last=getattr(config, "num_layers_in_last_pipeline_stage", None),
        account_for_embedding=bool(getattr(config, "account_for_embedding_in_pipeline_split", 0)),
        account_for_loss=bool(getattr(config, "account_for_loss_in_pipeline_split", False)),
        virtual=getattr(config, "virtual_pipeline_model_parallel_size", None),
    )


__all__ = ["StageSplit", "split_of_config"]
