"""examples/ee_tuning/*.sh run from any directory: the tools run from the repository root,
and relative OUT/SRC/DEST/... paths are taken from where the script was called. Checked with
a stand-in interpreter that records each call (no model, seconds); the real recipe runs in
tests/slow/test_smollm2_recipe.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.call_log import read_call_log

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "examples" / "ee_tuning"

# Records cwd + argv per call; answers the asset look-ups the scripts parse.
STUB = r"""#!/bin/bash
{ echo "CALL $PWD"; printf "%s\n" "$@"; } >> "$CALL_LOG"
case "$1 $2" in
  "tools/fetch_assets.py "*) if [[ " $* " == *" --json "* ]]; then
      echo '{"shakespeare": {"path": "/texts"}}'; else printf 'shakespeare\t/texts\n'; fi ;;
  "-c import json"*) echo 3 ;;
  "-c "*) echo /texts ;;
  "- "*) cat > /dev/null ;;
esac
"""


def _calls(tmp_path: Path, script: str, env: dict) -> list[tuple[str, list[str]]]:
    caller = tmp_path / "elsewhere"
    caller.mkdir(exist_ok=True)
    stub = tmp_path / "python-stub"
    stub.write_text(STUB)
    stub.chmod(0o755)
    log = tmp_path / "calls"
    proc = subprocess.run(
        ["bash", os.path.relpath(SCRIPTS / script, caller)],  # a relative script path too
        cwd=caller,
        env={**os.environ, **env, "PY": str(stub), "CALL_LOG": str(log)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return read_call_log(log)


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_convert_script_from_another_directory(tmp_path):
    calls = _calls(tmp_path, "convert_smollm2.sh", {"OUT": "rel/smollm2", "HF": "", "OURS": ""})
    assert {cwd for cwd, _ in calls} == {str(ROOT)}
    by_tool = {argv[0]: argv for _, argv in calls}
    out = tmp_path / "elsewhere" / "rel" / "smollm2"
    assert out.is_dir()
    assert _flag(by_tool["tools/checkpoint/gguf_to_hf.py"], "--out") == str(out / "hf")
    assert _flag(by_tool["tools/checkpoint/hf_to_megatron.py"], "--out") == str(out / "ours")
    verify = next(argv for _, argv in calls if "megatron.early_exit.convert.workers" in argv)
    assert _flag(verify, "--out") == str(out / "parity_tp1pp1.json")
    assert _flag(verify, "--text-file") == str(out / "hamlet.txt")


def test_tune_script_from_another_directory(tmp_path):
    caller = tmp_path / "elsewhere"
    (caller / "src" / "iter_0000001" / "tokenizer").mkdir(parents=True)
    calls = _calls(tmp_path, "tune_smollm2.sh", {"SRC": "src", "DEST": "tuned", "OUT": "o"})
    assert {cwd for cwd, _ in calls} == {str(ROOT)}
    by_tool = {argv[0]: argv for _, argv in calls}
    prep = by_tool["tools/preprocess_data.py"]
    assert _flag(prep, "--output-prefix") == str(caller / "o" / "data" / "shakespeare")
    assert _flag(prep, "--tokenizer-model") == str(caller / "src" / "iter_0000001" / "tokenizer")
    add = by_tool["tools/checkpoint/add_exits.py"]
    assert _flag(add, "--load") == str(caller / "src")
    assert _flag(add, "--save") == str(caller / "o" / "with-exits")
    train = next(argv for _, argv in calls if "pretrain_early_exit_gpt.py" in argv)
    assert _flag(train, "--save") == str(caller / "tuned")
    assert _flag(train, "--data-path") == str(caller / "o" / "data" / "shakespeare_text_document")
    count = by_tool["tools/count_tokens.py"]
    assert _flag(count, "--save") == str(caller / "tuned")
    assert _flag(count, "--data-path") == _flag(train, "--data-path")


def test_general_tune_script_from_another_directory(tmp_path):
    caller = tmp_path / "elsewhere"
    (caller / "src" / "iter_0000001" / "tokenizer").mkdir(parents=True)
    env = {"SRC": "src", "DEST": "tuned", "OUT": "o", "ITERS": "7"}
    calls = _calls(tmp_path, "tune_smollm2_general.sh", env)
    assert {cwd for cwd, _ in calls} == {str(ROOT)}
    prompts = [argv for _, argv in calls if argv[0] == "tools/make_prompts.py"]
    assert [a[1] for a in prompts] == ["shakespeare", "fortunes", "fortunes-cal"]
    assert all(_flag(a, "--num") == "all" for a in prompts[:2])
    prep = next(argv for _, argv in calls if argv[0] == "tools/preprocess_data.py")
    data = caller / "o" / "data"
    assert prep[prep.index("--input") + 1 : prep.index("--input") + 3] == [
        str(data / "shakespeare.jsonl"), str(data / "fortunes.jsonl")]  # fmt: skip
    assert _flag(prep, "--json-keys") == "prompt"
    runs = [argv for _, argv in calls if "torch.distributed.run" in argv]
    cache, train = runs
    assert "tools/cache_teacher.py" in cache and "pretrain_early_exit_gpt.py" in train
    assert _flag(cache, "--teacher-cache") == _flag(train, "--teacher-cache")
    assert _flag(cache, "--teacher-cache") == str(caller / "o" / "teacher-cache")
    for flag in ("--train-iters", "--data-path", "--load", "--seq-length", "--eval-interval"):
        assert _flag(cache, flag) == _flag(train, flag), flag  # the cache fits the run
    assert _flag(train, "--train-iters") == "7"
    assert _flag(train, "--data-path") == str(data / "general_prompt_document")
    assert {"--exit-distillation", "--exit-confidence-head"} <= set(train)
    assert _flag(train, "--save") == str(caller / "tuned")
    count = next(argv for _, argv in calls if argv[0] == "tools/count_tokens.py")
    assert _flag(count, "--data-path") == _flag(train, "--data-path")
    cal = [argv for _, argv in calls if argv[0] == "tools/calibrate_exits.py"]
    assert [_flag(a, "--metric") for a in cal] == ["learned", "max_prob"]
    assert all(_flag(a, "--load") == str(caller / "tuned") for a in cal)
    assert all(_flag(a, "--prompts-file") == _flag(prompts[2], "--out") for a in cal)


def test_layerskip_script_reads_the_general_recipe_outputs(tmp_path):
    caller = tmp_path / "elsewhere"
    (caller / "g" / "with-exits" / "iter_0000000").mkdir(parents=True)
    (caller / "g" / "with-exits" / "iter_0000000" / "ee_args.json").write_text("{}")
    env = {"GENERAL": "g", "DEST": "ls", "OUT": "lo", "ITERS": "5", "RATE": "0.2"}
    calls = _calls(tmp_path, "layerskip_smollm2.sh", env)
    train = next(argv for _, argv in calls if "pretrain_early_exit_gpt.py" in argv)
    assert _flag(train, "--load") == str(caller / "g" / "with-exits")
    assert _flag(train, "--data-path") == str(caller / "g" / "data" / "general_prompt_document")
    assert _flag(train, "--layer-dropout-rate") == "0.2" and "--tune-exit" not in train
    i = train.index("--exit-layer-weight")
    assert train[i + 1 : i + 4] == ["0.25"] * 3 and train[i + 4].startswith("--")
    assert _flag(train, "--save") == str(caller / "ls")
    assert _flag(train, "--train-iters") == "5"


def test_layerskip_script_without_the_general_recipe_says_so(tmp_path):
    caller = tmp_path / "elsewhere"
    caller.mkdir()
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "layerskip_smollm2.sh")], cwd=caller, capture_output=True,
        text=True, env={**os.environ, "GENERAL": "missing", "PY": "/bin/false"}, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "run examples/ee_tuning/tune_smollm2_general.sh" in proc.stderr
