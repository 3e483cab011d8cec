"""Bubble-filling schedule: alignment (emulated message passing), placement, counts, errors."""

from __future__ import annotations

import queue
import threading

import pytest

from megatron.early_exit.arguments import parse_run_config
from megatron.early_exit.config import ConfigError
from megatron.early_exit.pipeline.bubble_filling import Inbox
from megatron.early_exit.pipeline.fill_plan import (
    B,
    F,
    exit_stages,
    fill_sample_indices,
    one_f_one_b,
    place_fills,
    plan_schedule,
)

pytestmark = pytest.mark.unit


def _cases():
    for P in (2, 3, 4):
        for M in (1, 2, 3, 5, 8):
            yield P, M, None, None  # automatic counts
        for w, c in ((1, 0), (0, 1)):
            yield P, 6, w, c
    yield 4, 8, 2, 1
    yield 4, 3, 1, 1
    yield 3, 4, 1, 1


def _emulate(schedule):
    """Run every stage's action list in a thread, as the executor does, with FIFO channels.

    Payloads are microbatch ids: a stage sends the id it computed, data reads yield the
    id of the sample read. Returns per stage [(action, data id, activation id, grad id)].
    """
    P, M = schedule.num_stages, schedule.num_microbatches
    acts = {r: queue.Queue() for r in range(P)}  # r -> activations sent to r
    grads = {r: queue.Queue() for r in range(P)}  # r -> gradients sent to r
    logs: dict[int, list] = {r: [] for r in range(P)}
    errors = []

    def recv(q):
        def get(tag):
            got_tag, payload = q.get(timeout=10)
            assert got_tag == tag, f"tag {got_tag} arrived, {tag} expected"
            return payload

        return get

    def stage(r):
        try:
            act_in = Inbox(schedule.activation_order(r - 1), recv(acts[r])) if r else None
            grad_in = Inbox(schedule.gradient_order(r + 1), recv(grads[r])) if r < P - 1 else None
            main_data = iter(range(M))  # the main data iterator: sample i is microbatch i
            held = {}
            for a in schedule.stages[r]:
                mb, fill = a.mb, schedule.fill(a.mb)
                if a.kind == F:
                    data = next(main_data) if fill is None else M + fill.index
                    act = act_in.get(mb) if act_in else None
                    if r < schedule.depth(mb):
                        acts[r + 1].put((mb, mb))
                    held[mb] = data
                    logs[r].append((str(a), data, act, None))
                else:
                    grad = grad_in.get(mb) if r < schedule.depth(mb) else None
                    if r > schedule.floor(mb):
                        grads[r - 1].put((mb, mb))
                    logs[r].append((str(a), held.pop(mb), None, grad))
            assert not held or all(schedule.floor(m) > r for m in held), held
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(f"stage {r}: {e!r}")

    threads = [threading.Thread(target=stage, args=(r,)) for r in range(P)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    return logs


@pytest.mark.parametrize("P,M,warm,cool", list(_cases()))
def test_every_stage_sees_the_same_microbatch_id(P, M, warm, cool):
    s = plan_schedule(P, M, list(range(P)), 2.0, warm, cool)
    logs = _emulate(s)
    for r in range(P):
        forwards = [a for a in s.stages[r] if a.kind == F]
        backwards = [a for a in s.stages[r] if a.kind == B]
        # Main microbatches all run everywhere; fills only within their depth/floor.
        expected_f = set(range(M)) | {f.id for f in s.fills if f.depth >= r}
        expected_b = set(range(M)) | {f.id for f in s.fills if f.floor <= r <= f.depth}
        assert {a.mb for a in forwards} == expected_f
        assert {a.mb for a in backwards} == expected_b
        for name, data, act, grad in logs[r]:
            mb = int(name[1:])
            fill = s.fill(mb)
            assert data == (mb if fill is None else M + fill.index), (r, name, data)
            if name[0] == F and r > 0:
                assert act == mb, (r, name, act)
            if name[0] == B and r < s.depth(mb):
                assert grad == mb, (r, name, grad)


def test_no_fill_is_plain_1f1b_order():
    for P in (2, 3, 4):
        for M in (1, 3, 8):
            assert place_fills(P, M, []) == one_f_one_b(P, M)
    assert [str(a) for a in one_f_one_b(2, 3)[0]] == ["F0", "F1", "B0", "F2", "B1", "B2"]
    assert [str(a) for a in one_f_one_b(2, 3)[1]] == ["F0", "B0", "F1", "B1", "F2", "B2"]


def test_automatic_counts_never_lengthen_the_modelled_iteration():
    s = plan_schedule(4, 8, [0, 1, 2, 3], 2.0)
    assert s.num_fill >= 2 and s.model_time == s.base_time
    assert all(f.depth <= 2 for f in s.fills)
    # PP=2: any fill costs stage 0 a forward time, so the automatic count is 0 ...
    assert plan_schedule(2, 8, [0, 1], 2.0).num_fill == 0
    # ... and a given count that fits the bubble is placed (and costs what the model says).
    s = plan_schedule(2, 8, [0, 1], 2.0, 1, 0)
    assert s.count("warmup") == 1 and s.model_time == s.base_time + 1


def test_table_lists_every_stage():
    s = plan_schedule(4, 8, [0, 1, 2, 3], 2.0)
    text = s.table()
    for r in range(4):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"stage {r}: "))
        assert len(line.split(": ")[1].split()) == len(s.stages[r])
    assert "f8" in text and "b8" in text


def test_fill_samples_are_distinct_and_after_the_training_samples():
    seen = set()
    for it in range(3):
        for d in range(2):
            for k in range(2):
                idx = fill_sample_indices(it, k, 2, 3, 8, 2, d, 2)
                assert min(idx) >= 3 * 8 and not seen & set(idx)
                seen |= set(idx)


TINY = ["--mock-data", "--vocab-size", "128", "--num-layers", "4", "--global-batch-size", "16"]


@pytest.mark.parametrize(
    "argv,world,needle",
    [
        (["--fill-explicit-bubbles", "--exit-layer-nums", "1"], 1, "pipeline-model-parallel-size"),
        (
            [
                "--fill-explicit-bubbles",
                "--exit-layer-nums",
                "4",
                "--pipeline-model-parallel-size",
                "2",
            ],
            2,
            "no --exit-layer-nums exit lives there",
        ),
        (
            ["--fill-explicit-bubbles", "--pipeline-model-parallel-size", "2"],
            2,
            "no --exit-layer-nums exit lives there",
        ),
        (
            [
                "--fill-explicit-bubbles",
                "--exit-layer-nums",
                "1",
                "--pipeline-model-parallel-size",
                "2",
                "--num-fill-warmup-microbatches",
                "2",
            ],
            2,
            "larger than the pipeline bubbles can hold",
        ),  # fmt: skip
        (
            [
                "--fill-explicit-bubbles",
                "--exit-layer-nums",
                "1",
                "--pipeline-model-parallel-size",
                "2",
                "--num-fill-warmup-microbatches",
                "1",
                "--num-fill-cooldown-microbatches",
                "1",
            ],
            2,
            "--num-fill-cooldown-microbatches 1 is larger",
        ),  # fmt: skip
        (["--num-fill-warmup-microbatches", "1"], 1, "needs --fill-explicit-bubbles"),
        (
            [
                "--fill-explicit-bubbles",
                "--exit-layer-nums",
                "1",
                "--pipeline-model-parallel-size",
                "2",
                "--backward-forward-ratio",
                "0",
            ],
            2,
            "--backward-forward-ratio must be > 0",
        ),  # fmt: skip
    ],
)
def test_bad_combinations_are_config_errors(argv, world, needle):
    with pytest.raises(ConfigError, match=None) as info:
        parse_run_config([*TINY, *argv], world)
    assert needle in str(info.value), str(info.value)


def test_valid_fill_config_parses():
    run = parse_run_config(
        [*TINY, "--fill-explicit-bubbles", "--exit-layer-nums", "1", "2",
         "--pipeline-model-parallel-size", "4"],
        4,
    )  # fmt: skip
    assert run.fill.fill_explicit_bubbles and run.fill.backward_forward_ratio == 2.0


def test_exit_stages_follow_the_model_split_and_refuse_uneven_layers():
    # 8 layers on 4 stages: stage s owns layers 2s+1..2s+2 (EarlyExitGPTModel's split).
    assert exit_stages([1, 2, 3, 6, 8], 8, 4) == [0, 1, 2, 3]
    assert exit_stages([4], 12, 3) == [0]
    assert exit_stages([5], 12, 3) == [1]
    with pytest.raises(ConfigError, match="not divisible"):
        exit_stages([2], 10, 4)
    with pytest.raises(ConfigError, match="outside 1..8"):
        exit_stages([9], 8, 2)
