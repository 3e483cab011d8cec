"""Exit calibration (inference/calibration.py) on synthetic data with a known answer, the
calibration file, the prompts-file reader and the benchmark's timing statistics."""

from __future__ import annotations

import importlib.util
import json
import os
import random

import pytest

from megatron.early_exit.errors import CheckpointError, ConfigError
from megatron.early_exit.inference import calibration as cal

pytestmark = pytest.mark.unit


def _synthetic(n_prompts: int, per_prompt: int, seed: int):
    """One exit (layer 3) whose confidence c ~ U(0, 1) is calibrated: its token matches the
    full model's with probability c. Lossy early exit at threshold t then agrees with the
    full model on 1 - (1 - t)^2 / 2 of the tokens: the target a needs t = 1 - sqrt(2(1-a))."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_prompts):
        conf = [rng.random() for _ in range(per_prompt)]
        match = [rng.random() < c for c in conf]
        out.append({3: (conf, match)})
    return out


@pytest.mark.parametrize("target", [0.95, 0.99])
def test_calibration_meets_the_target_on_held_out_data(target):
    entries, sizes = cal.calibrate(_synthetic(40, 150, seed=1), [target], tolerance=0.02)
    (e,) = entries
    exact = 1 - (2 * (1 - target)) ** 0.5
    assert e["thresholds"][3] == pytest.approx(exact, abs=0.05)
    assert e["calibration"]["agreement"] >= target - 1e-12
    assert e["test"]["agreement"] >= target - 0.02 and e["test_meets_target"]
    assert e["test"]["coverage"] == pytest.approx(1 - exact, abs=0.06)  # it does exit
    assert sizes == {"calibration": {"prompts": 20}, "test": {"prompts": 20}}
    assert e["calibration"]["tokens"] == e["test"]["tokens"] == 3000


def test_greedy_thresholds_two_exits_known_answer():
    # exit 1 is always wrong, exit 2 always right: exit 1 must never fire, exit 2 always
    conf = {1: [0.9] * 10, 2: [0.5] * 10}
    match = {1: [False] * 10, 2: [True] * 10}
    for target in (0.99, 0.5):  # exit 1 firing anywhere costs agreement 1 / 10 per token
        th = cal.choose_thresholds(conf, match, target)
        assert th[1] > 0.9 and th[2] == 0.0  # exit 1 never fires, exit 2 always
        agr, cov, per = cal.agreement(conf, match, th)
        assert (agr, cov, per) == (1.0, 1.0, {1: 0.0, 2: 1.0})
    assert cal.choose_thresholds(conf, match, 0.7)[1] > 0.9  # all-or-nothing: 0.0 < 0.7
    # exit 1 can fire only on its one right token (1 in 10): kept at min_coverage 0.1,
    # turned off at 0.2; exit 2 is always wrong
    conf3 = {1: [0.9] + [0.1] * 9, 2: [0.0] * 10}
    match3 = {1: [True] + [False] * 9, 2: [False] * 10}
    th = cal.choose_thresholds(conf3, match3, 0.99, min_coverage=0.1)
    assert 0.1 < th[1] <= 0.9 and th[2] > 1
    th = cal.choose_thresholds(conf3, match3, 0.99, min_coverage=0.2)
    assert th == {1: cal.NEVER, 2: cal.NEVER}  # exit 1 would fire for 1 token in 10


def test_calibration_file_roundtrip_and_merge(tmp_path):
    path = str(tmp_path / cal.FILE)
    cal.write_calibration(path, {"texts": "x"}, [
        {"metric": "max_prob", "target": 0.95, "thresholds": {8: 0.7, 15: cal.NEVER}},
        {"metric": "max_prob", "target": 0.99, "thresholds": {8: cal.NEVER, 15: 0.9}},
    ])  # fmt: skip
    cal.write_calibration(path, {"texts": "y"}, [
        {"metric": "max_prob", "target": 0.99, "thresholds": {8: 0.95, 15: 0.9}},
    ])  # fmt: skip
    raw = json.loads((tmp_path / cal.FILE).read_text())
    assert raw["entries"][0]["thresholds"] == {"8": 0.7, "15": None}  # NEVER stored as null
    data = cal.find_calibration(str(tmp_path))
    assert cal.available(data) == (("max_prob", 0.95), ("max_prob", 0.99))
    assert cal.lookup(data, "max_prob", 0.99) == {8: 0.95, 15: 0.9}
    assert cal.lookup(data, "max_prob", 0.95) == {8: 0.7, 15: cal.NEVER}
    assert cal.lookup(data, "entropy", 0.95) is None
    (tmp_path / cal.FILE).write_text("{")
    with pytest.raises(CheckpointError, match="cannot read the exit calibration"):
        cal.find_calibration(str(tmp_path))


def test_prompts_file_reader_errors(tmp_path):
    from megatron.early_exit.data.text_prompts import read_prompts_file

    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "a", "text": "b"}\n\n{"prompt": "c", "text": "d"}\n')
    assert read_prompts_file(str(good)) == ["a", "c"]
    assert read_prompts_file(str(good), "text") == ["b", "d"]
    with pytest.raises(ConfigError, match=r"line 1: no non-empty string field 'body'"):
        read_prompts_file(str(good), "body")
    with pytest.raises(ConfigError, match=r"--prompts-file .*missing.jsonl: cannot read"):
        read_prompts_file(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(ConfigError, match="line 2: invalid JSON"):
        read_prompts_file(str(bad))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match="no prompts"):
        read_prompts_file(str(tmp_path / "empty.jsonl"))


def test_text_split_does_not_overlap():
    from megatron.early_exit.data.text_prompts import CORPORA, SPLIT

    names = [n for group in SPLIT.values() for n in group]
    assert sorted(names) == sorted(CORPORA) and len(set(names)) == len(names)
    files = [(CORPORA[n][0], f) for n in names for f in CORPORA[n][1]]
    assert len(set(files)) == len(files)  # no file is in two corpora
    # the fortunes-min files used for calibration and measurement are disjoint, and
    # not in the tuning asset
    assert {a for a, _ in files if a == "fortunes"} and CORPORA["fortunes"][0] != "fortunes-min"


def test_make_prompts_all_is_every_passage_in_a_seeded_order(monkeypatch):
    from megatron.early_exit.data import text_prompts
    from megatron.early_exit.errors import ConfigError

    pool = [{"text": f"passage {i}", "source": "f"} for i in range(20)]
    monkeypatch.setattr(text_prompts, "passages", lambda *a, **k: pool)
    rows = text_prompts.make_prompts("fortunes", None, seed=3)
    order = [r["index"] for r in rows]
    assert sorted(order) == list(range(20)) and order != list(range(20))
    assert order == [r["index"] for r in text_prompts.make_prompts("fortunes", None, seed=3)]
    assert order != [r["index"] for r in text_prompts.make_prompts("fortunes", None, seed=4)]
    assert all(r["prompt"] == f"passage {r['index']}" and r["split"] == "tune" for r in rows)
    picked = [r["index"] for r in text_prompts.make_prompts("fortunes", 5, seed=3)]
    assert len(picked) == 5 and picked == sorted(picked)
    with pytest.raises(ConfigError, match="has 20 passages; asked for 21"):
        text_prompts.make_prompts("fortunes", 21)


def _bench():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks",
                        "inference_early_exit.py")  # fmt: skip
    spec = importlib.util.spec_from_file_location("inference_early_exit_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_median_ci_and_pareto_front():
    b = _bench()
    ci = b.median_ci([1.0, 1.2, 0.9, 1.1, 1.05])
    assert ci["median"] == 1.05 and (ci["lo"], ci["hi"]) == (0.9, 1.2)
    assert ci["coverage"] == pytest.approx(1 - 2 / 32)  # n = 5: min..max
    ci = b.median_ci([float(x) for x in range(1, 21)])  # n = 20: x(6)..x(15) covers 95.9%
    assert (ci["lo"], ci["hi"]) == (6.0, 15.0) and ci["coverage"] >= 0.95
    pts = [(1.0, 1.0), (0.9, 1.3), (0.95, 1.1), (0.8, 1.2), (0.99, 1.05)]
    assert b.pareto_front(pts) == [1, 2, 4, 0]


def test_alternation_ratios_use_neighbouring_full_runs():
    b = _bench()
    times = iter([2.0, 1.0, 4.0, 2.0, 4.0] * 2)  # F V1 F V2 F per round

    def run():
        return "r", next(times)

    out = b.timed_in_alternation(run, [("a", run), ("b", run)], rounds=2)
    assert out[0]["ratios"] == [3.0, 3.0]  # (2 + 4) / 2 / 1
    assert out[1]["ratios"] == [2.0, 2.0]  # (4 + 4) / 2 / 2
