"""A missing or damaged checkpoint is one error line that names the file and the problem:
in the checkpoint checks, in tools/generate.py, in the server's start-up and when a model
loads it (training, inference, conversion all load through checkpoint.store)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.single_process import tp1pp1_world

pytestmark = pytest.mark.unit
TOOLS = Path(__file__).resolve().parents[2] / "tools"
ITER = "iter_0000001"


@pytest.fixture(autouse=True)
def _restore_environment():
    # A tool run in this process starts a world of one and sets RANK, WORLD_SIZE and
    # MASTER_PORT for it (platform/distributed.py); later tests' subprocesses must not
    # inherit them.
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _tiny():
    from megatron.early_exit.config import ExitConfig, RunConfig, build_transformer_config
    from megatron.early_exit.model import build_stage_model
    from megatron.early_exit.platform import init_platform

    run = RunConfig()
    run.data.mock_data, run.data.vocab_size = True, 64
    run.model.num_layers, run.model.hidden_size, run.model.seq_length = 2, 32, 16
    run.exits = ExitConfig(exit_layer_nums=[1])
    run.validate()
    model = build_stage_model(run, build_transformer_config(run), init_platform(True), False)
    return run, model


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    """A real (tiny) checkpoint: iteration 1, with ee_args.json."""
    from megatron.early_exit.checkpoint import args_from_run
    from megatron.early_exit.checkpoint.store import save_checkpoint

    root = tmp_path_factory.mktemp("checkpoints") / "intact"
    world = tp1pp1_world(seed=3)
    next(world)
    try:
        run, model = _tiny()
        save_checkpoint(str(root), 1, model, args=args_from_run(run))
    finally:
        next(world, None)  # tear the world down: the tools below start their own
    return root


def _truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _largest_shard(root: Path) -> Path:
    return max((root / ITER).glob("*.distcp"), key=lambda p: p.stat().st_size)


TRACKER = "latest_checkpointed_iteration.txt"
NUMBER = r"is corrupt \(expected an iteration number, got"


def _remove(*parts: str):
    return lambda root: root.joinpath(*parts).unlink()


def _write_tracker(text: str):
    return lambda root: (root / TRACKER).write_text(text)


# name -> (damage(root), what the error line must say: the file and the problem)
DAMAGE = {
    "no directory": (
        lambda r: shutil.rmtree(r),
        rf"{TRACKER} is missing \(the directory does not exist\)",
    ),
    "no tracker": (_remove(TRACKER), rf"no checkpoint in .*: {TRACKER} is missing"),
    "empty tracker": (_write_tracker(""), rf"{TRACKER} {NUMBER} ''\)"),
    "bad tracker": (_write_tracker("abc\n"), rf"{TRACKER} {NUMBER} 'abc'\)"),
    "tracker past the iterations": (
        _write_tracker("7\n"),
        r"points to iteration 7 but .*iter_0000007 is missing",
    ),
    "no metadata.json": (
        _remove(ITER, "metadata.json"),
        rf"{ITER} is not a complete checkpoint: metadata.json is missing",
    ),
    "truncated metadata.json": (
        lambda r: _truncate(r / ITER / "metadata.json", 10),
        rf"{ITER}/metadata.json is corrupt",
    ),
    "no common.pt": (
        _remove(ITER, "common.pt"),
        rf"{ITER} is not a complete checkpoint: common.pt is missing",
    ),
    "truncated common.pt": (
        lambda r: _truncate(r / ITER / "common.pt"),
        rf"{ITER}/common.pt is truncated or corrupt",
    ),
    "no .metadata": (
        _remove(ITER, ".metadata"),
        rf"{ITER} is not a complete checkpoint: .metadata is missing",
    ),
    "truncated .metadata": (
        lambda r: _truncate(r / ITER / ".metadata"),
        rf"{ITER}/.metadata is truncated or corrupt",
    ),
    "truncated shard": (
        lambda r: _truncate(_largest_shard(r), 1000),
        rf"{ITER}/__0_\d\.distcp is truncated: 1000 bytes, the index .metadata needs \d+",
    ),
    "missing shard": (
        lambda r: _largest_shard(r).unlink(),
        rf"{ITER}/__0_\d\.distcp is missing \(the index .metadata lists it\)",
    ),
}


@pytest.fixture(params=sorted(DAMAGE))
def damaged(request, intact, tmp_path):
    damage, message = DAMAGE[request.param]
    root = tmp_path / "ckpt"
    shutil.copytree(intact, root)
    damage(root)
    return root, message


def _load_tool(name: str):
    tool = name.replace("/", "_")
    spec = importlib.util.spec_from_file_location(f"{tool}_tool", TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_intact_checkpoint_passes_the_checks(intact):
    from megatron.early_exit.checkpoint import checked_checkpoint_dir

    assert checked_checkpoint_dir(str(intact)) == os.path.join(str(intact), ITER)


def test_checks_name_the_file_and_the_problem(damaged):
    from megatron.early_exit.checkpoint import checked_checkpoint_dir
    from megatron.early_exit.errors import CheckpointError

    root, message = damaged
    with pytest.raises(CheckpointError, match=message):
        checked_checkpoint_dir(str(root))


def test_generate_reports_one_line_before_any_setup(damaged, capsys):
    root, message = damaged
    rc = _load_tool("generate").main(["--load", str(root), "--prompt-ids", "1,2"])
    assert rc == 2
    line = _one_error_line(capsys)
    assert re.search(message, line), line
    assert "tokenizer" not in line.lower()  # not blamed on the flags it could not restore


def test_server_reports_one_line_before_any_setup(damaged, capsys):
    root, message = damaged
    assert _load_tool("run_text_generation_server").main(["--load", str(root)]) == 2
    line = _one_error_line(capsys)
    assert re.search(message, line), line


def test_conversion_tool_reports_one_line(damaged, tmp_path, capsys):
    # megatron_to_hf reads the flags, builds the stage (a world of one) and loads it, like
    # change_parallelism's workers; every damage is one error line and nothing is written.
    root, message = damaged
    out = tmp_path / "hf"
    assert (
        _load_tool("checkpoint/megatron_to_hf").main(["--load", str(root), "--out", str(out)]) == 2
    )
    line = _one_error_line(capsys)
    assert re.search(message, line), line
    assert not out.exists()


def test_backbone_check_reports_one_line(damaged, intact, capsys):
    from megatron.early_exit.tuning.compare import main

    root, message = damaged
    assert main([str(intact), str(root)]) == 2
    assert re.search(message, _one_error_line(capsys))


def test_generate_without_recorded_flags_says_so(intact, tmp_path, capsys):
    root = tmp_path / "ckpt"
    shutil.copytree(intact, root)
    (root / ITER / "ee_args.json").unlink()
    assert _load_tool("generate").main(["--load", str(root), "--prompt-ids", "1"]) == 2
    line = _one_error_line(capsys)
    assert "records no model flags, no ee_args.json" in line and str(root / ITER) in line


@pytest.mark.parametrize("case", ["truncated shard", "truncated common.pt", "no .metadata"])
def test_loading_into_a_model_names_the_file(intact, tmp_path, case):
    # The path of training (--load), inference and conversion: checkpoint.store.load_checkpoint.
    from megatron.early_exit.checkpoint.store import load_checkpoint
    from megatron.early_exit.errors import CheckpointError

    damage, message = DAMAGE[case]
    root = tmp_path / "ckpt"
    shutil.copytree(intact, root)
    damage(root)
    world = tp1pp1_world(seed=3)
    next(world)
    try:
        _run, model = _tiny()
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(str(root), model, load_rng=False)
        assert load_checkpoint(str(intact), model, load_rng=False) == 1  # the intact one loads
    finally:
        next(world, None)


def test_the_ee_args_of_the_intact_checkpoint_are_complete(intact):
    # The tools above restore the whole model from it (what --load alone relies on).
    args = json.loads((intact / ITER / "ee_args.json").read_text())
    assert args["num_layers"] == 2 and args["exit_layer_nums"] == [1]
    assert args["vocab_size"] == 64 and args["tokenizer_type"] == "NullTokenizer"
