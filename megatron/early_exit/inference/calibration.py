"""Exit thresholds from a quality target: choosing them (tools/calibrate_exits.py) and
storing/looking them up (``exit_calibration.json`` next to ``ee_args.json``).

Method (empirical calibration with a held-out check; the anchor is CALM, arXiv 2207.07061,
whose "consistency" target is exactly this token agreement with the full model). On
teacher-forced calibration text, for every generated position we know each exit's
confidence and whether its top-1 token equals the full model's. Lossy early exit with
per-exit thresholds t_e emits, at each position, the token of the first exit whose
confidence >= t_e (else the full model's). Its agreement with the full model is then
computable for any thresholds without running the model. We choose thresholds greedily,
exit by exit from the deepest to the shallowest: each exit gets the smallest threshold on a
grid (more exiting, faster) for which the agreement on the calibration split stays
>= target + margin, the shallower exits still off; the margin (default 0) buys safety. The
held-out test split then reports the agreement reached; the tool states the tolerance
(default 0.02) it checks against: test agreement >= target - tolerance.

Teacher forcing on full-model continuations measures per-token agreement given the full
model's prefix; generation with early exit conditions on its own (possibly different)
prefix, so measured decode agreement (benchmarks) can differ: the benchmark reports it.

Imports only the standard library: the server and the CLI look thresholds up cheaply.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from megatron.early_exit.errors import CheckpointError

FILE = "exit_calibration.json"
FORMAT = 1
NEVER = 2.0  # a threshold no confidence in [0, 1] reaches (stored as null in the file)
GRID = tuple(round(1.0 - i / 200, 3) for i in range(201))  # 1.0, 0.995, ..., 0.0


def agreement(
    conf: dict[int, Sequence[float]],
    match: dict[int, Sequence[bool]],
    thresholds: dict[int, float],
) -> tuple[float, float, dict[int, float]]:
    """(agreement with the full model, share exiting early, share per exit) of lossy early
    exit with `thresholds` on teacher-forced data: conf[e][i] and match[e][i] per exit e
    and position i."""
    exits = sorted(thresholds)
    n = len(next(iter(match.values()))) if match else 0
    if n == 0:
        return 1.0, 0.0, {e: 0.0 for e in exits}
    same = fired = 0
    per = dict.fromkeys(exits, 0)
    for i in range(n):
        for e in exits:
            if conf[e][i] >= thresholds[e]:
                same += bool(match[e][i])
                fired += 1
                per[e] += 1
                break
        else:
            same += 1
    return same / n, fired / n, {e: c / n for e, c in per.items()}


def choose_thresholds(
    conf: dict[int, Sequence[float]],
    match: dict[int, Sequence[bool]],
    target: float,
    margin: float = 0.0,
    grid: Sequence[float] = GRID,
    min_coverage: float = 0.0,
) -> dict[int, float]:
    """Per-exit thresholds reaching agreement >= target + margin on this data, exiting as
    much as the greedy deep-to-shallow search allows (NEVER for an exit that cannot fire).
    An exit that would fire for less than `min_coverage` of the tokens is turned off
    (NEVER): evaluated but rarely firing, its head costs more than it saves (on SmolLM2 an
    exit head weighs ~9 layers); turning exits off only raises the agreement."""
    exits = sorted(conf)
    th = dict.fromkeys(exits, NEVER)
    goal = min(1.0, target + margin)
    for e in reversed(exits):
        for t in sorted(grid):  # smallest first: the most exiting that still meets the goal
            trial = {**th, e: t}
            if agreement(conf, match, trial)[0] >= goal - 1e-12:
                th[e] = t
                break
    if min_coverage > 0:
        per = agreement(conf, match, th)[2]
        th = {e: (t if per[e] >= min_coverage else NEVER) for e, t in th.items()}
    return th


def calibrate(
    samples: list[dict[int, tuple[Sequence[float], Sequence[bool]]]],
    targets: Sequence[float],
    test_fraction: float = 0.5,
    seed: int = 0,
    margin: float = 0.0,
    tolerance: float = 0.02,
    min_coverage: float = 0.0,
) -> tuple[list[dict], dict]:
    """Calibrate on one part of `samples`, check on the rest.

    samples: one item per prompt (positions of one prompt are correlated, so the split is by
    prompt): {exit: (confidences, matches)} over its generated positions. The prompts are
    shuffled with `seed`; the last `test_fraction` of them is the test split. Returns (one
    entry per target: thresholds, agreement/coverage on both splits, whether the test split
    meets target - tolerance; the split sizes)."""
    import random

    if len(samples) < 2:
        raise ValueError(f"need at least 2 prompts to split, got {len(samples)}")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_test = min(len(samples) - 1, max(1, round(len(samples) * test_fraction)))
    parts = {"calibration": order[n_test:], "test": order[:n_test]}

    def pool(idx: list[int]):
        exits = sorted(samples[0])
        conf = {e: [c for i in idx for c in samples[i][e][0]] for e in exits}
        match = {e: [m for i in idx for m in samples[i][e][1]] for e in exits}
        return conf, match

    cal, test = pool(parts["calibration"]), pool(parts["test"])
    entries = []
    for target in targets:
        th = choose_thresholds(*cal, target, margin, min_coverage=min_coverage)
        row = {"target": float(target), "thresholds": th}
        for name, (conf, match) in (("calibration", cal), ("test", test)):
            agr, cov, per = agreement(conf, match, th)
            row[name] = {
                "tokens": len(next(iter(match.values()))),
                "agreement": agr,
                "coverage": cov,
                "coverage_per_exit": {str(e): v for e, v in per.items()},
            }
        row["test_meets_target"] = row["test"]["agreement"] >= target - tolerance
        entries.append(row)
    sizes = {name: {"prompts": len(idx)} for name, idx in parts.items()}
    return entries, sizes


# ------------------------------------------------------------------ file in the checkpoint


def calibration_path(load: str) -> str | None:
    """exit_calibration.json of the checkpoint `load` (its latest iteration folder, or the
    folder itself when it holds ee_args.json)."""
    if os.path.isfile(os.path.join(load, "ee_args.json")) or os.path.isfile(
        os.path.join(load, FILE)
    ):
        return os.path.join(load, FILE)
    from megatron.early_exit.checkpoint.files import latest_checkpoint_dir

    try:
        return os.path.join(latest_checkpoint_dir(load), FILE)
    except (CheckpointError, OSError, ValueError):
        return None


def find_calibration(load: str) -> dict | None:
    """The parsed exit_calibration.json of checkpoint `load`, or None if it has none."""
    path = calibration_path(load)
    if path is None or not os.path.isfile(path):
        return None
    return read_calibration(path)


def read_calibration(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read the exit calibration: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an exit calibration of format {FORMAT}")
    for entry in data.get("entries", []):
        try:
            entry["thresholds"] = {
                int(e): (NEVER if t is None else float(t)) for e, t in entry["thresholds"].items()
            }
            entry["metric"] = str(entry["metric"])
            entry["target"] = float(entry["target"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CheckpointError(f"{path}: malformed calibration entry {entry!r}") from None
    return data


def write_calibration(path: str, meta: dict, entries: list[dict]) -> None:
    """Write (or merge into) exit_calibration.json: entries replace those with the same
    (metric, target)."""
    old = read_calibration(path)["entries"] if os.path.isfile(path) else []
    keep = {(e["metric"], e["target"]) for e in entries}
    merged = [e for e in old if (e["metric"], e["target"]) not in keep] + entries

    def dump(e: dict) -> dict:
        th = {str(k): (None if v >= 1.5 else v) for k, v in sorted(e["thresholds"].items())}
        return {**e, "thresholds": th}

    data = {"format": FORMAT, **meta, "entries": [dump(e) for e in merged]}
    tmp = path + ".part"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def available(data: dict | None) -> tuple[tuple[str, float], ...]:
    """(metric, target) pairs a calibration holds."""
    if not data:
        return ()
    return tuple(sorted((e["metric"], e["target"]) for e in data.get("entries", [])))


def lookup(data: dict | None, metric: str, target: float) -> dict[int, float] | None:
    """Per-exit thresholds for (metric, target), or None."""
    for e in (data or {}).get("entries", []):
        if e["metric"] == metric and abs(e["target"] - target) < 1e-9:
            return dict(e["thresholds"])
    return None
