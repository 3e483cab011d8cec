"""The measured decode-cost model (inference/cost_model.py): calibration on a tiny engine
gives positive, complete curves; predictions follow their formulas."""

import json

import pytest

from megatron.early_exit.inference.cost_model import CostModel

pytestmark = pytest.mark.unit


def _flat(**kw) -> CostModel:
    d = dict(num_layers=8, vocab_size=100, rows=[1, 2, 4], layer_ms=[1.0, 1.0, 2.0],
             weights_ms=[0.5, 0.5, 0.5], head_ms=[2.0, 2.0, 4.0], exit_head_ms={2: 2.5},
             exit_block_ms={2: 0.5})  # fmt: skip
    d.update(kw)
    return CostModel(**d)


def test_curves_interpolate_and_predictions_add_up():
    cm = _flat()
    assert cm.layer(3) == pytest.approx(1.5) and cm.layer(6) == pytest.approx(3.0)
    assert cm.full_step(1) == pytest.approx(8 + 2)
    assert cm.full_step(4) == pytest.approx(8 * 2 + 4)
    # exit 2 fires after evaluating its own head
    assert cm.early_exit_token(2, [2]) == pytest.approx(2 + 2.5)
    # verify 3 drafts: last draft through 1..2 + block, 4 rows through 3..8, head on 4 rows
    assert cm.verification(2, 3) == pytest.approx(2 + 0.5 + 6 * 2 + 4)
    assert cm.speculative_round(2, 3) == pytest.approx(3 * (2 + 2.5) + cm.verification(2, 3))
    # a 10-of-100 draft vocabulary keeps a tenth of the projection (2 ms at 1 row)
    assert cm.exit_head(2, draft_vocab=10) == pytest.approx(2.5 - 2 * 0.9)
    fixed, per_row = CostModel.fit([1, 2, 3], [3.0, 5.0, 7.0])
    assert (fixed, per_row) == (pytest.approx(1.0), pytest.approx(2.0))
    again = CostModel.from_dict(json.loads(json.dumps(cm.to_dict())))
    assert again == cm
