"""tools/demo.py's report on a fabricated generation.json: token marks, table, PNGs."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("demo_tool", ROOT / "tools" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _entry(run, mode, tokens, layers, texts, elapsed=1.0, threshold=0.8, **stats):
    return {
        "token_ids": tokens,
        "exit_layers": layers,
        "finish_reason": "length",
        "logprobs": None,
        "text": "".join(texts),
        "stats": {"elapsed_s": elapsed, "drafted_tokens": 0, "accepted_tokens": 0, **stats},
        "prompt_token_ids": [5, 6],
        "run": run,
        "prompt": "ROMEO:",
        "early_exit": {"mode": mode, "threshold": threshold},
        "num_layers": 8,
        "token_texts": texts,
    }


def _entries(demo):
    words = [" But", " soft", ",", " what"]
    return [
        _entry(demo.FULL, "none", [1, 2, 3, 4], [8, 8, 8, 8], words, elapsed=2.0),
        _entry("early exit @ 0.9", "early_exit", [1, 2, 3, 4], [8, 2, 8, 8], words),
        _entry("early exit @ 0.5", "early_exit", [1, 2, 9, 9], [2, 2, 4, 8],
               [" But", " soft", " to", " be"], elapsed=0.5),
        _entry(demo.SPEC, "self_speculative", [1, 2, 3, 4], [8, 2, 8, 8], words,
               drafted_tokens=8, accepted_tokens=6),
    ]  # fmt: skip


def test_plain_marks_name_the_exit_layer_of_early_tokens_only(demo):
    e = _entries(demo)[2]
    assert demo.mark_tokens(e, colour=False) == " But[2] soft[2] to[4] be"


def test_colour_marks_use_one_colour_per_exit_and_leave_last_layer_plain(demo):
    e = _entries(demo)[2]
    marked = demo.mark_tokens(e, colour=True)
    green, yellow = demo._COLOURS[:2]
    assert marked == f"{green} But{demo._RESET}{green} soft{demo._RESET}{yellow} to{demo._RESET} be"


def test_table_rows_compare_each_run_with_the_full_model(demo):
    rows = {r["run"]: r for r in demo.summarize(_entries(demo))}
    assert rows[demo.FULL]["agreement"] == 1.0 and rows[demo.FULL]["acceptance"] is None
    assert rows[demo.FULL]["tokens_per_s"] == 2.0 and rows[demo.FULL]["avg_layers"] == 8.0
    lo = rows["early exit @ 0.5"]
    assert lo["agreement"] == 0.5 and lo["avg_layers"] == 4.0 and lo["tokens_per_s"] == 8.0
    assert rows[demo.SPEC]["acceptance"] == 0.75
    table = demo.format_table(demo.summarize(_entries(demo)), 8)
    lines = table.splitlines()
    assert lines[0].split() == ["run", "tokens/s", "avg", "layers", "agreement", "acceptance"]
    assert lines[3].split()[-6:] == ["8.0", "4.00", "/", "8", "50%", "-"]
    assert lines[4].rstrip().endswith("75%")


def test_exit_histogram_counts_the_early_exit_runs_only(demo):
    hist = demo.exit_histogram(_entries(demo))
    assert hist == {"early exit @ 0.9": {8: 3, 2: 1}, "early exit @ 0.5": {2: 2, 4: 1, 8: 1}}


def test_report_command_prints_marks_and_table_and_writes_pngs(demo, tmp_path, capsys):
    gen = tmp_path / "generation.json"
    gen.write_text(json.dumps(_entries(demo)))
    metrics = tmp_path / "metrics.jsonl"
    recs = [
        {"split": s, "iteration": i, "lm_loss": 7.0 - i / 10, "exit_losses": {"2": 7.1, "4": 7.05}}
        for s in ("train", "valid")
        for i in (0, 10, 20)
    ]
    metrics.write_text("\n".join(map(json.dumps, recs)) + "\n")
    argv = ["report", "--generation", str(gen), "--metrics", str(metrics)]
    assert demo.main([*argv, "--plots-dir", str(tmp_path / "png"), "--colour", "never"]) == 0
    out = capsys.readouterr().out
    assert (
        ">>> prompt 1: 'ROMEO:'" in out
        and "ROMEO: But[2]" in out
        and " But[2] soft[2] to[4] be" in out
        and "\033[" not in out
    )
    for name in ("demo_losses.png", "demo_exit_layers.png"):
        assert (tmp_path / "png" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_on_a_missing_file_is_one_line_error(demo, tmp_path, capsys):
    argv = ["report", "--generation", str(tmp_path / "nope.json"), "--metrics", "x"]
    assert demo.main([*argv, "--plots-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read the demo's outputs") and err.count("\n") == 1


def test_report_writes_to_the_given_stream(demo):
    buf = io.StringIO()
    demo.report(_entries(demo), colour=False, out=buf)
    assert buf.getvalue().count("--- ") == 4


def test_marks_go_before_a_line_break(demo):
    e = _entry("early exit @ 0.5", "early_exit", [1, 2, 3], [2, 8, 4], [":", "\n", "\n"])
    assert demo.mark_tokens(e, colour=False) == ":[2]\n[4]\n"
    green, yellow = demo._COLOURS[:2]
    assert (
        demo.mark_tokens(e, colour=True) == f"{green}:{demo._RESET}\n{yellow}\u21b5{demo._RESET}\n"
    )
