"""tools/generate.py and tools/run_text_generation_server.py reject bad input up front
(one `error:` line, exit 2, before any process group or model exists)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


generate = _load("generate")
server = _load("run_text_generation_server")


def gen_args(*argv):
    """The GenerateConfig of generation flags (flags.from_args on the tool's parser)."""
    return generate.parse_generate_config(list(argv))[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--batch-size", "-3"], "--batch-size must be >= 1, got -3"),
        (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
        (["--top-k", "-2"], "--top-k must be >= 0"),
        (["--draft-length", "0"], "--draft-length must be >= 1"),
        (["--eos-token-id", "-1"], "--eos-token-id must be >= 0"),
    ],
)
def test_generate_rejects_bad_counts(argv, message):
    with pytest.raises(ValueError, match=message):
        gen_args(*argv).validate()


def test_generate_accepts_defaults_and_valid_counts():
    gen_args().validate()
    gen_args("--batch-size", "1", "--max-new-tokens", "0").validate()


def test_prompts_file_text_and_jsonl(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('plain line\n\n{"prompt": "from json", "id": 3}\n')
    args = gen_args("--prompt", "first", "--prompts-file", str(f))
    assert args.prompt_texts() == ["first", "plain line", "from json"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "x"}\n', r'line 1: expected a JSON object with a string "prompt"'),
        ('ok\n{"prompt": 5}\n', r'line 2: expected a JSON object with a string "prompt"'),
        ('ok\n\n{"prompt": "x",\n', r"line 3: invalid JSON"),
    ],
)
def test_bad_prompts_file_names_file_and_line(tmp_path, content, message):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    with pytest.raises(ValueError, match=message) as exc:
        gen_args("--prompts-file", str(f)).prompt_texts()
    assert str(f) in str(exc.value)


def test_missing_prompts_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match="cannot read") as exc:
        gen_args("--prompts-file", str(missing)).prompt_texts()
    assert f"--prompts-file {missing}" in str(exc.value)


def test_prompt_ids():
    args = gen_args("--prompt-ids", "1, 2,3", "--prompt-ids", "7")
    assert args.prompt_token_ids() == [[1, 2, 3], [7]]
    for bad in ("1,x", "1.5", ",", "-1,2"):
        with pytest.raises(ValueError, match="--prompt-ids"):
            gen_args(f"--prompt-ids={bad}").prompt_token_ids()


def test_generate_main_exits_2_with_one_error_line(tmp_path, capsys):
    assert generate.main(["--batch-size", "0", "--prompt", "x"]) == 2
    assert capsys.readouterr().err.strip() == "error: --batch-size must be >= 1, got 0"
    missing = tmp_path / "nope.txt"
    assert generate.main(["--prompts-file", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --prompts-file {missing}: cannot read")


def test_output_json_is_written_atomically(tmp_path):
    out = tmp_path / "out.json"
    out.write_text("old")
    generate.write_json_atomic(str(out), [{"a": 1}])
    assert json.loads(out.read_text()) == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary left
    with pytest.raises(TypeError):  # unserialisable: the old file stays intact
        generate.write_json_atomic(str(out), [object()])
    assert json.loads(out.read_text()) == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def server_args(*argv):
    p = argparse.ArgumentParser()
    server.add_server_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "70000"], r"--port must be in \[0, 65535\]"),
        (["--max-batch-size", "0"], "--max-batch-size must be >= 1"),
        (["--max-queue", "0"], "--max-queue must be >= 1, got 0"),
        (["--max-queue", "-5"], "--max-queue must be >= 1"),
        (["--request-timeout", "0"], "--request-timeout must be a finite number of seconds > 0"),
        (["--request-timeout", "nan"], "--request-timeout must be"),
        (["--dist-timeout", "-1"], "--dist-timeout must be a finite number of seconds > 0"),
        (["--dist-timeout", "inf"], "--dist-timeout must be"),
    ],
)
def test_server_rejects_bad_flags(argv, message):
    with pytest.raises(ValueError, match=message):
        server.check_server_args(server_args(*argv))


def test_server_accepts_defaults():
    server.check_server_args(server_args())
    server.check_server_args(server_args("--port", "0", "--max-queue", "1"))
