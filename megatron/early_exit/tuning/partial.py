"""Run, load and save only the first k of a checkpoint's P pipeline stages.

The processes build a shallower model: L*k/P layers split over k stages, so megatron-core
gives every local layer its true global number. Two things make its checkpoint view match
the full model's:

* layer tensors are stacked along a leading layer axis whose global size is the number of
  layers; we widen that axis from L*k/P to L, so loading reads only our layers' slices;
* a save must still be a complete model: the tensors this run never held (deeper layers,
  final norm, untied LM head) are read from the loaded checkpoint and written back
  unchanged. Deeper layers reuse the sharding of a local layer (stage s goes to the rank of
  stage s mod k), so the saved layout is regular and loads into any TP/PP.

A truncated backbone (`--tune-exit-truncate-backbone`, one stage of R < L layers) is the
same with a layer-wise stride: global layer g >= R reuses local layer g mod R's sharding.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
)

LAYER_PREFIX = "decoder.layers."


def _is_stacked_layer(sh) -> bool:
    if isinstance(sh, ShardedObject):  # per-layer extra state, one object per layer
        return sh.key.startswith(LAYER_PREFIX) and len(sh.global_shape) >= 1
    return (
        isinstance(sh, ShardedTensor)
        and sh.key.startswith(LAYER_PREFIX)
        and sh.prepend_axis_num >= 1
    )


class PartialStagesCheckpoint:
    """Checkpoint hook (see checkpoint/store.py) for a run of the first k stages."""

    def __init__(self, run_layers: int, full_layers: int, full_pipeline_size: int) -> None:
        self.run_layers = run_layers
        self.full_layers = full_layers
        self.layers_per_stage = full_layers // full_pipeline_size
        self.full_pipeline_size = full_pipeline_size
        # A truncated single stage rather than the first k of P whole stages.
        self.truncated = full_pipeline_size == 1 and run_layers < full_layers
        self.source: str | None = None  # the iteration dir last loaded: carry-over source

    # ------------------------------------------------------------- shapes
    def _widen(self, sh, is_loading: bool):
        if not _is_stacked_layer(sh) or sh.global_shape[0] != self.run_layers:
            return sh
        if isinstance(sh, ShardedObject):
            return replace(sh, global_shape=(self.full_layers, *sh.global_shape[1:]))
        if is_loading:
            # Read only our layers' slices: the request keeps our (shallower) global shape.
            return replace(sh, allow_shape_mismatch=True)
        frag = sh.axis_fragmentations
        return replace(
            sh,
            global_shape=(self.full_layers, *sh.global_shape[1:]),
            axis_fragmentations=None if frag is None else (self.full_layers, *frag[1:]),
        )

    def model_sd(self, model_sd: dict, is_loading: bool) -> dict:
        """The model's sharded state dict with layer axes sized for the full model."""

        def widen(sh):
            return self._widen(sh, is_loading)

        def visit(v):
            if isinstance(v, ShardedTensorFactory):
                build = v.build_fn

                def widened_build(*args, _build=build, **kwargs):
                    return dict_list_map_inplace(widen, _build(*args, **kwargs))

                v.build_fn = widened_build
                return v
            return widen(v)

        return dict_list_map_inplace(visit, model_sd)

    # ------------------------------------------------------------- carry-over
    def carry_over(self, model_sd: dict) -> dict:
        """Tensors of the full model that this run does not hold, read from `self.source`."""
        if self.source is None:
            raise RuntimeError("partial-stage save needs the checkpoint it was loaded from")
        local = []
        for v in nested_values(model_sd):
            if isinstance(v, ShardedTensorFactory):
                local.extend(x for x in nested_values(v.build()) if isinstance(x, ShardedTensor))
            elif isinstance(v, (ShardedTensor, ShardedObject)):
                local.append(v)
        wanted: dict[str, ShardedTensor] = {}
        scratch: dict[str, ShardedTensor] = {}
        rank = parallel_state.get_pipeline_model_parallel_rank()
        k = parallel_state.get_pipeline_model_parallel_world_size()
        # In a world of one, megatron-core's torch strategy needs every grid cell of a read
        # to be local: also read (and drop) our own layers' cells.
        first = 0 if dist.get_world_size() == 1 else k
        if self.truncated:  # one stage of run_layers: copies of it shifted by R, 2R, ...
            shifts = range(0 if first == 0 else self.run_layers, self.full_layers, self.run_layers)
        else:
            shifts = [
                (stage - rank) * self.layers_per_stage
                for stage in range(first, self.full_pipeline_size)
                if stage % k == rank
            ]
        for shift in shifts:
            for i, sh in enumerate(t for t in local if _is_stacked_layer(t)):
                offset = (sh.global_offset[0] + shift, *sh.global_offset[1:])
                if offset[0] >= self.full_layers:
                    continue
                data = torch.empty_like(sh.data) if isinstance(sh, ShardedTensor) else None
                into = wanted if shift > 0 else scratch
                into[f"layer{offset[0]}/{i}"] = replace(sh, data=data, global_offset=offset)
        # Whole tensors no rank holds (final norm, an untied LM head): global rank 0 copies.
        held = [None] * dist.get_world_size()
        dist.all_gather_object(held, sorted({sh.key for sh in local if hasattr(sh, "dtype")}))
        held_keys = set().union(*held)
        if dist.get_rank() == 0:
            metadata = dist_checkpointing.load_tensors_metadata(self.source)
            for key, md in metadata.items():
                if key in held_keys or key.startswith("optimizer."):
                    continue
                wanted[f"whole/{key}"] = ShardedTensor.from_rank_offsets(
                    key, torch.empty(md.global_shape, dtype=md.dtype), replica_id=0
                )
        templates = dict(wanted)
        request = {**wanted, **scratch}
        loaded = dist_checkpointing.load(request, self.source, validate_access_integrity=False)
        return {name: replace(sh, data=loaded[name]) for name, sh in templates.items()}
