"""Logging flags, our timers (megatron-core's interface) and the scalar writers."""

from __future__ import annotations

import importlib.util
import types

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron.early_exit.arguments import parse_run_config
from megatron.early_exit.config import ConfigError, LoggingConfig
from megatron.early_exit.training.metrics import format_log_line
from megatron.early_exit.training.monitor import (
    LEVEL1,
    LEVEL2,
    ScalarLogger,
    Timers,
    gather_max,
    memory_stats,
    scalars,
)

pytestmark = pytest.mark.unit

BASE = ["--mock-data", "--vocab-size", "128"]

RECORD = {
    "split": "train",
    "iteration": 4,
    "lm_loss": 5.5,
    "exit_losses": {"1": 5.75, "3": None},
    "exit_weights": {"1": 0.5, "3": 1.0},
    "exit_kl": {"1": 0.125},
    "grad_norm": 2.0,
    "lr": 1e-4,
    "tokens_per_s": 1000.0,
    "iteration_time_s": 0.5,
    "memory": {"rss-mib": 300.0},
    "timers_s": {"optimizer": 0.01},
}


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--wandb-exp-name", "x"], "--wandb-exp-name needs --wandb-project"),
        (["--wandb-save-dir", "d"], "--wandb-save-dir needs --wandb-project"),
        (["--tensorboard-log-interval", "0"], "--tensorboard-log-interval must be >= 1"),
        (
            ["--tensorboard-dir", "d", "--log-timers-to-tensorboard"],
            "--log-timers-to-tensorboard needs --timing-log-level 1 or 2",
        ),
        (["--log-memory-to-tensorboard"], "need --tensorboard-dir or --wandb-project"),
    ],
)
def test_bad_logging_flags_are_refused(argv, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_run_config([*BASE, *argv], world_size=1)


def test_timing_level_is_a_choice(capsys):
    with pytest.raises(SystemExit):
        parse_run_config([*BASE, "--timing-log-level", "3"], world_size=1)
    assert "invalid choice" in capsys.readouterr().err


def test_wandb_without_the_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"pip install wandb==0\.31\.0"):
        parse_run_config([*BASE, "--wandb-project", "p"], world_size=1)


def test_flags_land_in_the_logging_config():
    run = parse_run_config(
        [*BASE, "--tensorboard-dir", "tb", "--tensorboard-log-interval", "5",
         "--timing-log-level", "2", "--log-timers-to-tensorboard", "--log-memory-to-tensorboard"],
        world_size=1,
    )  # fmt: skip
    cfg = run.logging
    assert (cfg.tensorboard_dir, cfg.tensorboard_log_interval, cfg.timing_log_level) == (
        "tb", 5, 2,
    )  # fmt: skip
    assert cfg.log_timers_to_tensorboard and cfg.log_memory_to_tensorboard


def test_timers_follow_levels_and_megatron_core_usage():
    t = Timers(level=1)
    t("optimizer", log_level=1).start()
    t("optimizer").stop()  # megatron-core stops by name alone
    t("forward-compute", log_level=2).start()  # above the level: a no-op timer
    t("forward-compute").stop()
    t("embedding-grads-all-reduce", log_level=1).start()  # megatron-core's level-1 timer
    t("embedding-grads-all-reduce").stop()
    with t.time("batch-generator"):
        pass
    times = t.elapsed()
    assert tuple(times) == LEVEL1
    assert times["optimizer"] > 0 and times["batch-generator"] > 0
    assert times["all-grads-sync"] == 0.0  # never ran here: still reported (collective list)
    assert t.elapsed()["optimizer"] == 0.0  # reset
    assert tuple(Timers(level=2).elapsed()) == LEVEL1 + LEVEL2
    with pytest.raises(RuntimeError, match="started twice"):
        t("optimizer").start()
        t("optimizer").start()


def test_memory_and_single_process_gather():
    mem = memory_stats(torch.device("cpu"))
    assert mem["rss-mib"] > 10
    assert gather_max({"a": 1.5}, torch.device("cpu")) == {"a": 1.5}


def test_scalar_tags_of_a_record():
    got = scalars(RECORD)
    assert got == {
        "lm loss": 5.5,
        "exit-loss/layer-1": 5.75,  # None values are not written
        "exit-weight/layer-1": 0.5,
        "exit-weight/layer-3": 1.0,
        "exit-kl/layer-1": 0.125,
        "grad-norm": 2.0,
        "learning-rate": 1e-4,
        "tokens-per-sec": 1000.0,
        "iteration-time": 0.5,
        "memory/rss-mib": 300.0,
        "timers/optimizer-time": 0.01,
    }
    valid = scalars({"split": "valid", "iteration": 4, "lm_loss": 5.0, "exit_losses": {"1": 6.0}})
    assert valid == {"validation/lm loss": 5.0, "validation/exit-loss/layer-1": 6.0}


def test_log_line_shows_timers_and_memory():
    line = format_log_line(RECORD)
    assert "memory MiB (max over ranks) rss-mib: 300" in line
    assert "ms/iter (max over ranks) optimizer: 10.00" in line


def test_tensorboard_writer_is_read_back_by_tensorboard(tmp_path):
    logger = ScalarLogger(LoggingConfig(tensorboard_dir=str(tmp_path)))
    logger.log(RECORD)
    logger.log({"split": "valid", "iteration": 4, "lm_loss": 5.0, "exit_losses": {}})
    logger.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    got = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    expected = {tag: [(4, pytest.approx(v, rel=1e-6))] for tag, v in scalars(RECORD).items()}
    expected["validation/lm loss"] = [(4, 5.0)]
    assert got == expected


class FakeWandb(types.ModuleType):
    """Records what the writer asks of the wandb package (wandb itself is an optional extra)."""

    def __init__(self):
        super().__init__("wandb")
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))

    def log(self, values, step):
        self.calls.append(("log", dict(values), step))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_writer_logs_the_same_scalars(tmp_path):
    fake = FakeWandb()
    cfg = LoggingConfig(
        wandb_project="proj", wandb_exp_name="run1", wandb_save_dir=str(tmp_path / "w")
    )
    logger = ScalarLogger(cfg, run_summary={"model": {"num_layers": 2}}, wandb_module=fake)
    logger.log(RECORD)
    logger.close()
    assert fake.calls == [
        (
            "init",
            {
                "project": "proj",
                "name": "run1",
                "dir": str(tmp_path / "w"),
                "config": {"model": {"num_layers": 2}},
            },
        ),
        ("log", scalars(RECORD), 4),
        ("finish",),
    ]
    assert (tmp_path / "w").is_dir()
