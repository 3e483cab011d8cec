"""add_exits on real checkpoints: copy-init exactness, random init, corrupt input.

Copy-init acceptance: at the moment of adding, an exit that copies the final norm and the
output head gives exactly the logits of applying them to that layer's hidden state. The
check runs in a worker process (this module run with -m) that loads the new checkpoint.
"""

import os
import subprocess
import sys

import pytest

from tests.distributed.launch import ENTRY, ROOT, TINY, torchrun

pytestmark = pytest.mark.distributed
TOOL = ROOT / "tools" / "checkpoint" / "add_exits.py"
LLAMA = [*TINY, "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
         "--disable-bias-linear", "--untie-embeddings-and-output-weights"]  # fmt: skip


def add_exits(src, dst, *args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--load", str(src), "--save", str(dst), *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """GPT-2 style with tied embeddings, Llama style with an untied LM head."""
    root = tmp_path_factory.mktemp("add_exits")
    torchrun(1, ENTRY, [*TINY, "--train-iters", "0", "--save", str(root / "gpt")])
    torchrun(1, ENTRY, [*LLAMA, "--train-iters", "0", "--save", str(root / "llama")])
    return root / "gpt", root / "llama"


def run_worker(ckpt, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.distributed.test_add_exits", str(ckpt), *map(str, args)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_copy_init_reproduces_the_lm_head_exactly(bases, tmp_path):
    gpt, llama = bases
    # Tied exits on a tied model: the LM head is the embedding. The MLP's output projection
    # starts at zero (the default), so x + MLP(x) is x exactly.
    tied = tmp_path / "tied"
    add_exits(gpt, tied, "--exit-layer-nums", "1", "3", "--use-exit-norm", "--use-exit-mlp")
    assert "exact 1 3" in run_worker(tied, "exact", 1, 3)
    # Untied LM head: untied exit outputs copy it. Exits are added to a checkpoint that
    # already has one (its head is kept), with a temperature (undone in the check).
    untied = tmp_path / "untied"
    add_exits(
        llama, untied, "--exit-layer-nums", "2", "--use-exit-norm", "--untie-exit-output-weights"
    )
    more = tmp_path / "more"
    add_exits(
        untied, more, "--exit-layer-nums", "1", "3", "--use-exit-norm",
        "--untie-exit-output-weights", "--exit-layer-temperature", "2.0",
    )  # fmt: skip
    assert "exact 1 2 3" in run_worker(more, "exact", 1, 2, 3)


@pytest.mark.slow  # make test time budget
def test_mlp_and_block_heads_copy_their_sources(bases, tmp_path):
    _, llama = bases
    copied = tmp_path / "copied"
    add_exits(
        llama, copied, "--exit-layer-nums", "2", "--use-exit-mlp", "--use-exit-block",
        "--copy-mlp-output",
    )  # fmt: skip
    mixed = tmp_path / "mixed"  # exit 2 copied (kept as is), exit 3 random
    add_exits(
        copied, mixed, "--exit-layer-nums", "3", "--use-exit-mlp", "--use-exit-block",
        "--random-init",
    )  # fmt: skip
    assert "heads 2 3" in run_worker(mixed, "heads", 2, 3)


@pytest.mark.slow  # make test time budget
def test_confidence_heads_join_existing_exits(bases, tmp_path):
    import json

    gpt, _ = bases
    exits = tmp_path / "exits"
    add_exits(gpt, exits, "--exit-layer-nums", "1", "3", "--use-exit-norm")
    conf = tmp_path / "conf"
    add_exits(exits, conf, "--exit-confidence-head")  # no new layers: estimators only
    args = json.loads((conf / "iter_0000000" / "ee_args.json").read_text())
    assert args["exit_confidence_head"] is True and args["exit_layer_nums"] == [1, 3]
    # the exits are unchanged, the estimators start at zero (sigmoid 0.5)
    assert "exact 1 3" in run_worker(conf, "exact", 1, 3)
    assert "zero 1 3" in run_worker(conf, "zero", 1, 3)
    proc = add_exits(conf, tmp_path / "again", "--exit-confidence-head", check=False)
    assert proc.returncode == 2 and "no exits to add" in proc.stderr


def test_corrupt_checkpoint_leaves_nothing(bases, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bases[0], bad)
    for f in (bad / "iter_0000000").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])
    proc = add_exits(
        bad, tmp_path / "out", "--exit-layer-nums", "1", "--use-exit-norm", check=False
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "could not read checkpoint" in proc.stderr
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith("out.tmp") for p in tmp_path.iterdir())


# ---------------------------------------------------------------- worker (own process)
def _worker(ckpt: str, args: list[str]) -> None:
    import torch

    from megatron.early_exit.arguments import parse_run_config
    from megatron.early_exit.checkpoint.store import load_checkpoint
    from megatron.early_exit.config import build_transformer_config
    from megatron.early_exit.model import build_stage_model, init_model_parallel, unwrap
    from megatron.early_exit.platform import destroy_distributed, init_platform

    mode, layers = args[0], [int(a) for a in args[1:]]
    platform = init_platform()
    run = parse_run_config(["--load", ckpt, "--mock-data"], 1)
    config = build_transformer_config(run)
    init_model_parallel(run, config, platform)
    model = unwrap(build_stage_model(run, config, platform, use_te=False))
    load_checkpoint(ckpt, model, load_rng=False)
    model = model.eval()
    try:
        with torch.no_grad():
            if mode == "exact":
                tokens = torch.randint(0, 200, (2, 32))
                positions = torch.arange(32).expand(2, 32)
                out = model(tokens, positions, None)
                weight = model.output_layer.weight
                if model.share_embeddings_and_output_weights:
                    weight = model.embedding.word_embeddings.weight
                for n in layers:
                    state_n = out.exit_states[n]
                    expected, _ = model.output_layer(
                        model.decoder.final_layernorm(state_n.hidden), weight=weight
                    )
                    head = model.exit_heads.get(n)
                    got = model.exit_logits(n, state_n) * head.temperature
                    assert torch.equal(got, expected), (n, (got - expected).abs().max())
            if mode == "zero":  # confidence heads added by add_exits
                for n in layers:
                    for p in model.exit_heads.get(n).confidence.parameters():
                        assert not p.any(), n
            if mode == "heads":  # first exit copied, second random
                for n, copied in zip(layers, (True, False)):
                    head = model.exit_heads.get(n)
                    mlp = model.decoder.layers[n - 1].mlp.state_dict()
                    mine = head.mlp.state_dict()
                    same = [torch.equal(v, mlp[k]) for k, v in mine.items() if torch.is_tensor(v)]
                    assert all(same) if copied else not any(same), (n, same)
                    last = model.decoder.layers[-1].state_dict()
                    mine = head.block.state_dict()
                    same = [torch.equal(v, last[k]) for k, v in mine.items() if torch.is_tensor(v)]
                    # Random init leaves norms at their constant init: compare weights only.
                    assert all(same) if copied else not all(same), (n, same)
        print(mode, *layers)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2:])
