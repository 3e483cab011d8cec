"""The interleaved (virtual-stage) schedule with exit losses equals the plain one.

Same LM loss, every exit loss and grad norm (the grad norm covers every parameter's
gradient) as a single process, starting from one reference checkpoint that the virtual
stages load chunk by chunk.
"""

import pytest

from tests.distributed.launch import assert_close_records, layout_args, train
from tests.distributed.test_parity import ITERS, UNTIED, _reference

pytestmark = pytest.mark.distributed

VPP = ["--num-layers-per-virtual-pipeline-stage", "1"]


def test_interleaved_pp2_vpp2_matches_pp1(tmp_path_factory, tmp_path):
    """PP=2 x 2 chunks of one layer: exit 1 on rank 0's first chunk (with the embedding),
    exit 3 on rank 0's second chunk; the LM head on rank 1's second chunk. 4 microbatches
    (warm-up, steady state and cool-down)."""
    ckpt = _reference(tmp_path_factory, "vpp2", UNTIED)
    base = train(1, [*UNTIED, *ITERS, "--load", str(ckpt)], tmp_path / "pp1.jsonl")
    got = train(
        2,
        [*UNTIED, *ITERS, "--load", str(ckpt), *layout_args(1, 2), *VPP, "--no-batch-p2p-comm"],
        tmp_path / "vpp.jsonl",
    )
    assert_close_records(base, got, rel=1e-5, label="PP2 VPP2")
