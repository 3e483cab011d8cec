"""add_exits refuses bad input before touching anything (no process group, no output)."""

import json
import os

import pytest

from megatron.early_exit.checkpoint.files import (
    ARGS_FILE,
    TRACKER_FILE,
    checkpoint_dir,
)
from megatron.early_exit.tuning.add_exits import AddExitsError, AddExitsOptions, add_exits

pytestmark = pytest.mark.unit

ARGS = {
    "num_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "tokenizer_type": "NullTokenizer",
    "vocab_size": 100, "exit_layer_nums": [2], "use_exit_norm": True, "use_exit_mlp": False,
    "use_exit_block": False, "untie_exit_output_weights": False, "exit_layer_temperature": [],
}  # fmt: skip


def _fake_checkpoint(root, args=ARGS, metadata=True):
    d = checkpoint_dir(str(root), 0)
    os.makedirs(d)
    with open(os.path.join(d, ARGS_FILE), "w") as f:
        json.dump(args, f)
    if metadata:
        open(os.path.join(d, "metadata.json"), "w").close()
    with open(os.path.join(root, TRACKER_FILE), "w") as f:
        f.write("0\n")
    return str(root)


def _opts(src, dst, layers, **kw):
    return AddExitsOptions(load=src, save=str(dst), exit_layer_nums=layers, **kw)


@pytest.mark.parametrize(
    "layers, kw, message",
    [
        ([5], {"use_exit_norm": True}, "exit layer 5 is out of range: the model has layers 1..4"),
        ([0], {"use_exit_norm": True}, "exit layer 0 is out of range"),
        ([2, 3], {"use_exit_norm": True}, "already has exits at layers [2]"),
        ([3], {"use_exit_mlp": True}, "other head options"),
        ([1, 1], {"use_exit_norm": True}, "duplicates"),
        ([1, 3], {"use_exit_norm": True, "exit_layer_temperature": [1, 2, 3]}, "one per exit"),
    ],
)
def test_bad_exits_are_refused(tmp_path, layers, kw, message):
    src = _fake_checkpoint(tmp_path / "src")
    with pytest.raises(AddExitsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        add_exits(_opts(src, tmp_path / "out", layers, **kw))
    assert not os.path.exists(tmp_path / "out")


def test_missing_or_incomplete_checkpoint(tmp_path):
    with pytest.raises(AddExitsError, match="latest_checkpointed_iteration.txt is missing"):
        add_exits(_opts(str(tmp_path / "nothing"), tmp_path / "out", [1]))
    src = _fake_checkpoint(tmp_path / "src", metadata=False)
    with pytest.raises(AddExitsError, match="metadata.json is missing"):
        add_exits(_opts(src, tmp_path / "out", [1]))
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / TRACKER_FILE).write_text("oops")
    with pytest.raises(AddExitsError, match="corrupt"):
        add_exits(_opts(str(tmp_path / "corrupt"), tmp_path / "out", [1]))
    assert not os.path.exists(tmp_path / "out")


def test_existing_output_is_not_overwritten(tmp_path):
    src = _fake_checkpoint(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(AddExitsError, match="exists and is not empty"):
        add_exits(_opts(src, tmp_path / "out", [1], use_exit_norm=True))
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_checkpoint_without_recorded_flags(tmp_path):
    src = _fake_checkpoint(tmp_path / "src")
    os.remove(os.path.join(checkpoint_dir(src, 0), ARGS_FILE))
    with pytest.raises(AddExitsError, match="records no model flags"):
        add_exits(_opts(src, tmp_path / "out", [1]))


@pytest.mark.parametrize(
    "override, message",
    [
        ({"hidden_size": 30}, "--hidden-size 30 is not divisible"),  # ConfigError
        (
            {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": "gone.json"},
            "--tokenizer-model .*gone.json",  # TokenizerError
        ),
    ],
)
def test_cli_config_and_tokenizer_errors_are_one_line(tmp_path, capsys, override, message):
    import importlib.util
    import re
    from pathlib import Path

    tool = Path(__file__).resolve().parents[2] / "tools" / "checkpoint" / "add_exits.py"
    spec = importlib.util.spec_from_file_location("add_exits_tool", tool)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = {**ARGS, **override}
    if "tokenizer_model" in override:
        args["vocab_size"] = None  # force the tokenizer to be read
    src = _fake_checkpoint(tmp_path / "src", args)
    argv = ["--load", src, "--save", str(tmp_path / "out"), "--exit-layer-nums", "3"]
    assert mod.main([*argv, "--use-exit-norm"]) == 2
    stderr = capsys.readouterr().err
    err = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and re.search(message, err[0]), stderr
    assert "Traceback" not in stderr
    assert not os.path.exists(tmp_path / "out")
