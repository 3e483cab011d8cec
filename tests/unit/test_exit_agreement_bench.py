"""The exit-agreement benchmark's analysis (cost model and coverage/agreement) on data
whose answers are known."""

import importlib.util
import os

import pytest

pytestmark = pytest.mark.unit

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "exit_agreement.py")


def _bench():
    spec = importlib.util.spec_from_file_location("exit_agreement", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _data(rows, exits=(2, 4), L=8, layer_rows=(1.0, 1.0), overhead=0.0):
    # a measured cost model (inference/cost_model.py) in ms: a layer 1 ms (at 1 and 8
    # rows, unless told), the LM head 2 ms (2 layers), exit heads 2.5 ms of which an exit
    # block 0.5 ms
    from megatron.early_exit.inference.cost_model import CostModel

    cm = CostModel(num_layers=L, vocab_size=4, rows=[1, 8], layer_ms=list(layer_rows),
                   weights_ms=[0.5, 0.5], head_ms=[2.0, 2.0],
                   exit_head_ms={e: 2.5 for e in exits}, exit_block_ms={e: 0.5 for e in exits},
                   step_overhead_ms=overhead)  # fmt: skip
    return {"exits": list(exits), "rows": rows, "cost_model": cm.to_dict(), "L": L}


def test_perfect_confident_exit_fires_everywhere():
    full = [5, 6, 7, 8]
    rows = {"full": full, "2": full, "4": full, "conf2": [1.0] * 4, "conf4": [1.0] * 4}
    res = _bench().analyse(_data(rows), 0.95, draft_vocab=1)
    assert res["agreement"] == {2: 1.0, 4: 1.0}
    first = next(r for r in res["early_exit"] if r["exits"] == [2] and r["threshold"] == 0.99)
    assert first["coverage"] == 1.0 and first["agreement"] == 1.0
    # full step = 8 layers + 2 (LM head) = 10; firing at exit 2 costs 2 + 2.5
    assert first["speedup_ceiling"] == pytest.approx(10 / 4.5)
    spec = next(r for r in res["self_speculative"] if r["exit"] == 2 and r["draft_length"] == 1)
    # acceptance 1: 2 tokens per round for one draft (2 + 2.5) and one verification: the
    # draft through layers 1..2 and its exit block's cache (0.5), both positions through
    # 3..8 and the LM head: a full step (10) plus the block
    assert spec["tokens_per_round"] == 2
    assert spec["speedup_ceiling"] == pytest.approx(2 * 10 / (4.5 + 10 + 0.5))
    # a 1-of-4-token draft vocabulary cuts the draft projection (2 layers) to a quarter, so
    # 1.5x needs less acceptance
    need, need_small = (
        res["acceptance_needed_for_1_5x"],
        res["acceptance_needed_for_1_5x_draft_vocab"],
    )
    assert need_small[2] < need[2]


def test_unconfident_exits_cost_their_heads_and_keep_full_agreement():
    full = [1, 2, 3, 4]
    rows = {"full": full, "2": [0] * 4, "4": full, "conf2": [0.3] * 4, "conf4": [0.5, 0.5, 0, 0]}
    res = _bench().analyse(_data(rows), 0.95)
    assert res["agreement"] == {2: 0.0, 4: 1.0}
    both = next(r for r in res["early_exit"] if r["exits"] == [2, 4] and r["threshold"] == 0.5)
    # tokens 0,1 fire at exit 4 (4 + 2.5 + 2.5), tokens 2,3 run everything (10 + 5)
    assert both["coverage"] == 0.5 and both["agreement"] == 1.0
    assert both["speedup_ceiling"] == pytest.approx(40 / (2 * 9 + 2 * 15))
    wrong = next(r for r in res["early_exit"] if r["exits"] == [2] and r["threshold"] == 0.3)
    assert wrong["coverage"] == 1.0 and wrong["agreement"] == 0.0
    assert res["best_early_exit_at_target"]["agreement"] >= 0.95


def test_measured_row_curve_and_overhead_enter_the_ceilings():
    """Extra verification rows cost what the layer curve says; step overhead is paid by
    every step, including one that leaves early."""
    full = [5, 6, 7, 8]
    rows = {"full": full, "2": full, "4": full, "conf2": [1.0] * 4, "conf4": [1.0] * 4}
    flat = _bench().analyse(_data(rows), 0.95)
    # a layer on 8 rows costs 4.5 ms: 2 rows cost 1.5 ms
    steep = _bench().analyse(_data(rows, layer_rows=(1.0, 4.5), overhead=1.0), 0.95)

    def spec(res):
        return next(r for r in res["self_speculative"] if r["exit"] == 2 and r["draft_length"] == 1)

    # full step 1 + 8 + 2 = 11; one draft 1 + 2 + 2.5; verification 1 + 2 + 0.5 + 6 * 1.5 + 2
    assert spec(steep)["speedup_ceiling"] == pytest.approx(2 * 11 / (5.5 + 14.5))
    assert spec(steep)["speedup_ceiling"] < spec(flat)["speedup_ceiling"]
    first = next(r for r in steep["early_exit"] if r["exits"] == [2] and r["threshold"] == 0.99)
    assert first["speedup_ceiling"] == pytest.approx(11 / (1 + 2 + 2.5))


def test_learned_metric_prices_declining_exits_at_their_estimator():
    """With confidence heads the analysis adds `learned` rows: a declining exit costs its
    estimator (0.5 ms here), not its whole head (2.5 ms)."""
    full = [1, 2, 3, 4]
    rows = {"full": full, "2": [0] * 4, "4": full, "conf2": [0.3] * 4, "conf4": [0.5, 0.5, 0, 0],
            "learned2": [0.1] * 4, "learned4": [0.9, 0.9, 0.9, 0.1]}  # fmt: skip
    data = _data(rows)
    data["cost_model"]["exit_estimator_ms"] = {"2": 0.5, "4": 0.5}
    res = _bench().analyse(data, 0.95)

    def row(metric, thr):
        return next(r for r in res["early_exit"] if r["exits"] == [2, 4]
                    and r["threshold"] == thr and r["metric"] == metric)  # fmt: skip

    # max_prob at 0.5: as before, both heads priced whole (tokens 0,1 at exit 4: 4+2.5+2.5)
    assert row("max_prob", 0.5)["speedup_ceiling"] == pytest.approx(40 / (2 * 9 + 2 * 15))
    # learned at 0.5: tokens 0-2 fire at exit 4 (4 + 0.5 + 2.5), token 3 runs all (10 + 1)
    got = row("learned", 0.5)
    assert got["coverage"] == 0.75 and got["agreement"] == 1.0
    assert got["speedup_ceiling"] == pytest.approx(40 / (3 * 7 + 11))
