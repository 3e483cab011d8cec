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
    # Virtual stages (interleaved schedule): rank r holds model chunks c = 0..virtual-1, the
    # virtual stages c * pp + r, each with 1/virtual of the stage's layers (chunk_counts).
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

    def chunk_counts(self) -> list[list[int]]:
        """Layers of each model chunk of each stage (one chunk per stage without virtual
        stages). megatron-core's rule: a stage's layers, plus the embedding (loss) slot of the
        first (last) stage with --account-for-*, split evenly over its chunks; the slot is
        the first (last) chunk's."""
        counts, v = self.counts(), self.virtual
        if v is None or v == 1:
            return [[c] for c in counts]
        flag = "--virtual-pipeline-model-parallel-size"
        if self.first is not None and self.last is not None and self.pipeline_size == 2:
            # megatron-core 0.16.1 divides by the number of middle stages (zero here) in
            # get_transformer_layer_offset; the other count follows from one of them anyway.
            raise ConfigError(
                f"--decoder-first-pipeline-num-layers with --decoder-last-pipeline-num-layers "
                f"at --pipeline-model-parallel-size 2 fails in megatron-core with {flag} "
                "(no middle stage); give only one of them"
            )
        slots = list(counts)
        slots[0] += int(self.account_for_embedding)
        slots[-1] += int(self.account_for_loss)
        for stage, n in enumerate(slots):
            if n % v:
                raise ConfigError(self._chunk_error(stage, n, v))
        chunks = [[n // v] * v for n in slots]
        chunks[0][0] -= int(self.account_for_embedding)
        chunks[-1][-1] -= int(self.account_for_loss)
        if min(min(c) for c in chunks) < 1:
            raise ConfigError(
                f"with --account-for-*-in-pipeline-split and {flag} {v}, a model chunk would "
                f"get no transformer layer ({chunks}); use fewer virtual stages or more layers"
            )
        return chunks

    def _chunk_error(self, stage: int, n: int, v: int) -> str:
        flag = f"--virtual-pipeline-model-parallel-size {v}"
        pp = self.pipeline_size
        if stage == 0 and self.first is not None:
            return f"--decoder-first-pipeline-num-layers {n} is not divisible by {flag}"
        if stage == pp - 1 and self.last is not None:
            return f"--decoder-last-pipeline-num-layers {n} is not divisible by {flag}"
        if self.account_for_embedding or self.account_for_loss:
            return (
                f"with --account-for-*-in-pipeline-split each pipeline stage holds {n} layers "
                f"(the embedding / loss counted as one), not divisible by {flag}"
            )
        if self.first is not None or self.last is not None:
            return (
                f"the middle pipeline stages hold {n} layers each, not divisible by {flag} "
                "(--decoder-first/last-pipeline-num-layers)"
            )
        return (
            f"--num-layers {self.num_layers} is not divisible by --pipeline-model-parallel-size "
            f"{pp} x {flag}"
        )

    def chunk_ranges(self) -> list[list[tuple[int, int]]]:
        """(first, last) 1-based layer numbers of each model chunk of each stage: virtual
        stage c * pp + r (chunk c of stage r) follows virtual stage c * pp + r - 1."""
        chunks = self.chunk_counts()
        out: list[list[tuple[int, int]]] = [[] for _ in chunks]
        acc = 0
        for c in range(len(chunks[0])):
            for stage, per_chunk in enumerate(chunks):
                out[stage].append((acc + 1, acc + per_chunk[c]))
                acc += per_chunk[c]
        return out

    def chunk_of(self, layer_number: int) -> tuple[int, int]:
        """(stage, model chunk) owning the (1-based) layer."""
        for stage, ranges in enumerate(self.chunk_ranges()):
            for chunk, (first, last) in enumerate(ranges):
                if first <= layer_number <= last:
                    return stage, chunk
        raise ValueError(f"layer {layer_number} is outside 1..{self.num_layers}")

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
        if self.virtual is not None:
            return self.chunk_of(layer_number)[0]
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
