"""Exit-loss weight schedule: exact values at chosen iterations."""

from __future__ import annotations

import math

import pytest

from megatron.early_exit.arguments import parse_run_config
from megatron.early_exit.config import ExitConfig
from megatron.early_exit.pipeline.loss_weights import ExitLossWeights

pytestmark = pytest.mark.unit

EXACT = dict(abs=1e-12)


def _weights(**kwargs) -> ExitLossWeights:
    exits = ExitConfig(**kwargs)
    exits.validate(num_layers=8)
    return ExitLossWeights(exits)


@pytest.mark.parametrize(
    ("iteration", "expected"),
    [(0, 0.0), (1, 0.1), (5, 0.5), (9, 0.9), (10, 1.0), (11, 1.0), (1000, 1.0)],
)
def test_linear_warmup(iteration, expected):
    w = _weights(
        exit_layer_nums=[2],
        exit_layer_weight=[1.0],
        exit_layer_weight_init=[0.0],
        exit_layer_weight_warmup_iters=10,
    )
    assert w.at(iteration) == {2: pytest.approx(expected, **EXACT)}


def test_linear_warmup_per_exit_and_keys_are_layer_numbers():
    w = _weights(
        exit_layer_nums=[1, 3],
        exit_layer_weight=[1.0, 0.5],
        exit_layer_weight_init=[0.0, 0.1],
        exit_layer_weight_warmup_iters=4,
    )
    assert list(w.at(0)) == [1, 3]
    assert w.at(0) == {1: pytest.approx(0.0, **EXACT), 3: pytest.approx(0.1, **EXACT)}
    assert w.at(1) == {1: pytest.approx(0.25, **EXACT), 3: pytest.approx(0.2, **EXACT)}
    assert w.at(2) == {1: pytest.approx(0.5, **EXACT), 3: pytest.approx(0.3, **EXACT)}
    assert w.at(4) == {1: pytest.approx(1.0, **EXACT), 3: pytest.approx(0.5, **EXACT)}


@pytest.mark.parametrize(("iteration", "r"), [(0, 0.0), (2, 0.25), (4, 0.5), (6, 0.75)])
def test_cosine_warmup(iteration, r):
    w = _weights(
        exit_layer_nums=[1, 2],
        exit_layer_weight=[1.0, 1.0],
        exit_layer_weight_init=[0.0, 0.2],
        exit_layer_weight_warmup_iters=8,
        exit_layer_weight_warmup_style="cosine",
    )
    s = (1.0 - math.cos(math.pi * r)) / 2.0
    got = w.at(iteration)
    assert got[1] == pytest.approx(s, **EXACT)
    assert got[2] == pytest.approx(0.2 + s * 0.8, **EXACT)


def test_cosine_known_points():
    w = _weights(
        exit_layer_nums=[1],
        exit_layer_weight=[1.0],
        exit_layer_weight_init=[0.0],
        exit_layer_weight_warmup_iters=8,
        exit_layer_weight_warmup_style="cosine",
    )
    assert w.at(2)[1] == pytest.approx((1 - math.sqrt(0.5)) / 2, **EXACT)  # r = 0.25
    assert w.at(4)[1] == pytest.approx(0.5, **EXACT)  # r = 0.5
    assert w.at(8)[1] == pytest.approx(1.0, **EXACT)
    assert w.at(80)[1] == pytest.approx(1.0, **EXACT)


@pytest.mark.parametrize(
    ("iteration", "expected"), [(0, 1.0), (1, 0.8125), (2, 0.625), (4, 0.25), (9, 0.25)]
)
def test_linear_cooldown(iteration, expected):
    w = _weights(
        exit_layer_nums=[4],
        exit_layer_weight=[0.25],
        exit_layer_weight_init=[1.0],
        exit_layer_weight_warmup_iters=4,
    )
    assert w.at(iteration)[4] == pytest.approx(expected, **EXACT)


def test_cosine_cooldown_midpoint():
    w = _weights(
        exit_layer_nums=[4],
        exit_layer_weight=[0.0],
        exit_layer_weight_init=[2.0],
        exit_layer_weight_warmup_iters=10,
        exit_layer_weight_warmup_style="cosine",
    )
    assert w.at(0)[4] == pytest.approx(2.0, **EXACT)
    assert w.at(5)[4] == pytest.approx(1.0, **EXACT)
    assert w.at(10)[4] == pytest.approx(0.0, **EXACT)


@pytest.mark.parametrize("iteration", [0, 1, 7, 10_000])
def test_no_warmup_is_constant_target(iteration):
    w = _weights(exit_layer_nums=[2, 5], exit_layer_weight=[0.3, 0.7])
    assert w.at(iteration) == {2: pytest.approx(0.3, **EXACT), 5: pytest.approx(0.7, **EXACT)}


@pytest.mark.parametrize("iteration", [0, 3, 100])
def test_default_weight_is_one(iteration):
    w = _weights(exit_layer_nums=[1, 2, 3])
    assert w.at(iteration) == {
        1: pytest.approx(1.0, **EXACT),
        2: pytest.approx(1.0, **EXACT),
        3: pytest.approx(1.0, **EXACT),
    }


def test_default_weight_from_command_line():
    run = parse_run_config(["--mock-data", "--vocab-size", "128", "--exit-layer-nums", "1", "3"], 1)
    assert ExitLossWeights(run.exits).at(0) == {
        1: pytest.approx(1.0, **EXACT),
        3: pytest.approx(1.0, **EXACT),
    }


def test_warmup_from_command_line():
    argv = [
        "--mock-data",
        "--vocab-size",
        "128",
        "--exit-layer-nums",
        "2",
        "--exit-layer-weight",
        "1.0",
        "--exit-layer-weight-init",
        "0.0",
        "--exit-layer-weight-warmup-iters",
        "10",
    ]
    w = ExitLossWeights(parse_run_config(argv, 1).exits)
    assert w.at(5)[2] == pytest.approx(0.5, **EXACT)


def test_no_exits_gives_empty_weights():
    assert _weights().at(0) == {}
