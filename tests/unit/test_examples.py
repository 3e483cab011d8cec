"""The cluster launch scripts in examples/ee_training/ parse, validate and lay out as the
EE-LLM paper says, checked on CPU through their DRY_RUN=1 mode (the real parser and
validation, for the full world size, as on GPUs).

Also: the dry run's parameter counts equal `numel()` of models built by megatron-core.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.call_log import read_call_log
from tests.single_process import tp1pp1_world

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "ee_training"


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for key in ("NNODES", "NODE_RANK", "GPUS_PER_NODE", "DATA_PATH", "CHECKPOINT_PATH"):
        env.pop(key, None)
    env.pop("EXTRA_ARGS", None)
    env.update(PYTHON=sys.executable, DRY_RUN="1", OMP_NUM_THREADS="1", **extra)
    return env


def _layout_from_stdout(out: str, label: str) -> dict:
    lines = [line for line in out.splitlines() if line.startswith("DRY_RUN_JSON ")]
    assert len(lines) == 1, f"{label}: no layout printed:\n{out}"
    return json.loads(lines[0].removeprefix("DRY_RUN_JSON "))


def _entry():
    spec = importlib.util.spec_from_file_location(
        "pretrain_entry", ROOT / "pretrain_early_exit_gpt.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _capture_launch(tmp_path: Path, script: Path, env: dict) -> list[tuple[str, list[str]]]:
    """Run a launch script with a stand-in interpreter that records each call's WORLD_SIZE
    and argv (bash only, no Python start-up per script)."""
    log = tmp_path / f"calls-{script.stem}-{len(list(tmp_path.iterdir()))}"
    stub = tmp_path / "python-stub"
    stub.write_text(
        '#!/bin/bash\n{ echo "CALL ${WORLD_SIZE:-}"; printf "%s\\n" "$@"; } >> "$CALL_LOG"\n'
    )
    stub.chmod(0o755)
    proc = subprocess.run(
        ["bash", str(script)],
        cwd=tmp_path,
        env={**env, "PYTHON": str(stub), "CALL_LOG": str(log)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return read_call_log(log)


def _dry_run_in_process(world_size: str, argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    assert argv[0] == "pretrain_early_exit_gpt.py" and argv[1] == "--dry-run", argv
    monkeypatch.setenv("WORLD_SIZE", world_size)
    capsys.readouterr()
    code = _entry().main(argv[1:])
    out, err = capsys.readouterr()
    return code, out + err


# script, environment, expected layout (world, TP, PP, DP, SP, microbatches, exit -> stage,
# params in billions, untied exit heads)
CASES = {
    "1.3B": ({}, (8, 1, 4, 2, False, 256, {"6": 0, "12": 1}, 1.28, False)),
    "1.3B-4nodes": ({"NNODES": "4"}, (32, 1, 4, 8, False, 64, {"6": 0, "12": 1}, 1.28, False)),
    "7B": ({}, (8, 1, 4, 2, False, 512, {"8": 0, "16": 1}, 6.98, True)),
    "13B": ({}, (8, 2, 4, 1, True, 2048, {"10": 0, "20": 1}, 13.26, True)),
    "30B": ({}, (16, 4, 4, 1, True, 2048, {"15": 0, "30": 1}, 32.81, True)),
    "30B-8nodes": (
        {"NNODES": "8", "GLOBAL_BATCH": "1024"},
        (64, 4, 4, 4, True, 256, {"15": 0, "30": 1}, 32.81, True),
    ),
}
NUM_LAYERS = {"1.3B": 24, "7B": 32, "13B": 40, "30B": 60}


@pytest.mark.parametrize("case", list(CASES))
def test_paper_configuration_layout(case, tmp_path, capsys, monkeypatch):
    model = case.split("-")[0]
    calls = _capture_launch(tmp_path, EXAMPLES / f"{model}.sh", _env(**CASES[case][0]))
    assert len(calls) == 1
    code, out = _dry_run_in_process(*calls[0], capsys, monkeypatch)
    assert code == 0, out
    layout = _layout_from_stdout(out, case)
    world, tp, pp, dp, sp, micro, exits, billions, untied = CASES[case][1]
    assert layout["world_size"] == world
    assert layout["tensor_parallel"] == tp
    assert layout["pipeline_parallel"] == pp
    assert layout["data_parallel"] == dp
    assert layout["sequence_parallel"] is sp  # megatron turns SP off at TP=1
    assert layout["num_microbatches"] == micro
    assert layout["params_dtype"] == "bfloat16"
    assert layout["exit_stages"] == exits
    assert round(layout["params_total"] / 1e9, 2) == billions
    assert (layout["params_exits"] > 0) is untied  # tied heads add no weights
    per_stage = NUM_LAYERS[model] // pp
    assert layout["layers_per_stage"] == per_stage
    assert [(s["first_layer"], s["last_layer"]) for s in layout["stages"]] == [
        (s * per_stage + 1, (s + 1) * per_stage) for s in range(pp)
    ]
    assert [s["embedding"] for s in layout["stages"]] == [True] + [False] * (pp - 1)
    assert [s["lm_head"] for s in layout["stages"]] == [False] * (pp - 1) + [True]


def test_dry_run_end_to_end():
    """One script through the real interpreter, as a user runs it."""
    proc = subprocess.run(
        ["bash", str(EXAMPLES / "13B.sh")],
        env=_env(NNODES="2"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    layout = _layout_from_stdout(proc.stdout, "13B")
    assert (layout["world_size"], layout["data_parallel"]) == (16, 2)
    assert "stage 1: layers 11-20, exit after layer 20" in proc.stdout


def test_slurm_script_launches_every_node_with_its_rank(tmp_path):
    """Run the sbatch file with stand-ins for scontrol and srun (two nodes)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a\\ngpu-b\\n'\n")
    # srun: run the task once per node, as Slurm would, with that node's SLURM_NODEID.
    (bin_dir / "srun").write_text(
        "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n"
        'for n in 0 1; do SLURM_NODEID=$n "$@" || exit $?; done\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = _env(
        MODEL="30B",
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="gpu-[a-b]",
        SLURM_JOB_ID="4242",
        SLURM_SUBMIT_DIR=str(ROOT),
        DATA_PATH="0.7 /data/a_text_document 0.3 /data/b_text_document",
        TOKENIZER_MODEL="/data/tokenizer.model",
        PATH=f"{bin_dir}:{os.environ['PATH']}",
    )
    env.pop("DRY_RUN")  # the real launch path: torchrun's arguments per node
    calls = _capture_launch(tmp_path, EXAMPLES / "slurm_ee_llm.sbatch", env)
    assert len(calls) == 2
    for node, (_, argv) in enumerate(calls):
        head = argv[: argv.index("pretrain_early_exit_gpt.py")]
        assert head == [
            "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
            "--nproc-per-node", "8", "--master-addr", "gpu-a", "--master-port", "24242",
        ]  # fmt: skip
        blend = argv.index("--data-path")
        assert argv[blend + 1 : blend + 5] == [
            "0.7", "/data/a_text_document", "0.3", "/data/b_text_document"
        ]  # fmt: skip
        assert argv[argv.index("--tokenizer-model") + 1] == "/data/tokenizer.model"


def test_launch_needs_data_unless_dry_run():
    env = _env()
    env.pop("DRY_RUN")
    proc = subprocess.run(
        ["bash", str(EXAMPLES / "1.3B.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "set DATA_PATH" in proc.stderr


def test_dry_run_reports_an_impossible_layout(tmp_path, capsys, monkeypatch):
    # 30B needs TP4 x PP4 = 16 GPUs per replica: one node of 8 cannot hold it.
    calls = _capture_launch(tmp_path, EXAMPLES / "30B.sh", _env(NNODES="1"))
    code, out = _dry_run_in_process(*calls[0], capsys, monkeypatch)
    assert code == 2
    assert "world size 8 is not divisible by tensor-parallel size 4 x pipeline" in out


# ---- the dry run's parameter counts are megatron-core's -----------------------------------
@pytest.fixture(scope="module")
def one_process_world():
    yield from tp1pp1_world(seed=3)


BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4"]
BASE += ["--seq-length", "16", "--mock-data", "--vocab-size", "300"]
LLAMA = ["--normalization", "RMSNorm", "--position-embedding-type", "rope", "--swiglu"]
LLAMA += ["--disable-bias-linear", "--untie-embeddings-and-output-weights"]


@pytest.mark.parametrize(
    "flags",
    [
        ["--exit-layer-nums", "1", "3"],
        ["--exit-layer-nums", "2", "--use-exit-norm", "--use-exit-mlp", "--use-exit-block"],
        [*LLAMA, "--exit-layer-nums", "1", "3", "--untie-exit-output-weights"],
        [
            *LLAMA,
            "--group-query-attention",
            "--num-query-groups",
            "2",
            "--exit-layer-nums",
            "2",
            "--use-exit-mlp",
            "--use-exit-norm",
            "--ffn-hidden-size",
            "96",
        ],
    ],  # fmt: skip
    ids=["gpt2-tied", "gpt2-all-head-parts", "llama-untied", "llama-gqa"],
)
def test_dry_run_parameter_counts_match_built_models(one_process_world, flags):
    from megatron.early_exit.arguments import parse_run_config
    from megatron.early_exit.config import build_transformer_config
    from megatron.early_exit.model.build import build_stage_model
    from megatron.early_exit.training.layout import describe_run

    run = parse_run_config([*BASE, *flags], 1)
    run.resolve_vocab(300)
    model = build_stage_model(run, build_transformer_config(run), _cpu(), use_te=False)
    layout = describe_run(run)
    built = sum(p.numel() for p in model.parameters())
    assert layout.params_total == built
    assert layout.stages[0].params == built
    exits = sum(p.numel() for p in model.exit_heads.parameters())
    assert layout.params_exits == exits


def _cpu():
    from megatron.early_exit.platform import init_platform

    platform = init_platform(force_cpu=True)
    assert platform.device() == torch.device("cpu")
    return platform


# ---- benchmarks/perf_model.py's schedule simulator ---------------------------------------
def _perf_model():
    spec = importlib.util.spec_from_file_location("perf_model", ROOT / "benchmarks/perf_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("perf_model", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stages,m", [(2, 1), (2, 5), (4, 4), (4, 16), (3, 7)])
def test_perf_model_simulator_reproduces_textbook_1f1b(stages, m):
    pm = _perf_model()
    f, rho = 1.0, 2.0
    pipe = pm.Pipeline([f] * stages, [rho * f] * stages, [f] * stages, [rho * f] * stages)
    total, _ = pipe.run(m)
    assert total == pytest.approx((m + stages - 1) * (1 + rho) * f)
    assert pm.bubble_fraction(pipe, m) == pytest.approx((stages - 1) / (m + stages - 1))
    assert pm.schedule_bubble_fraction(pipe, m) == pytest.approx((stages - 1) / (m + stages - 1))
    # Warm-up: stage 0 waits (P-1) x rho x f for its first gradient; a depth-1 fill costs
    # (1 + rho) x f there, so floor((P-1) rho / (1 + rho)) of them are free (when the
    # warm-up and cool-down phases do not overlap, m >= 2P).
    free, _, more = pm.max_free_fills(pipe, max(m, 2 * stages), "warmup", 1)
    assert free == int((stages - 1) * rho // (1 + rho))
    assert more > 0


@pytest.mark.parametrize(
    "size, env, backbone, layout",
    [
        # Published parameter counts of Llama-3.2-1B (tied) and Llama-3.1-8B (untied).
        ("1b", {}, 1_235_814_400, [(1, 16, [4, 8, 12])]),
        (
            "8b",
            {"TP": "2", "PP": "2", "GPUS": "8"},
            8_030_261_248,
            [(1, 16, [8, 16]), (17, 32, [24])],
        ),
    ],
)
def test_llama3_ee_tuning_recipe_dry_run(size, env, backbone, layout, tmp_path):
    """examples/ee_tuning/llama3.sh validates the tuning run at the real Llama 3 shapes."""
    proc = subprocess.run(
        ["bash", str(ROOT / "examples" / "ee_tuning" / "llama3.sh")],
        env=_env(SIZE=size, OUT=str(tmp_path / "out"), **env),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = _layout_from_stdout(proc.stdout, f"llama3 {size}")
    assert got["params_backbone"] == backbone
    assert got["padded_vocab_size"] == 128256
    stages = [(s["first_layer"], s["last_layer"], s["exit_layers"]) for s in got["stages"]]
    assert stages == layout


def test_llama3_recipe_needs_inputs_unless_dry_run(tmp_path):
    env = _env(OUT=str(tmp_path / "out"))
    env.pop("DRY_RUN")
    proc = subprocess.run(
        ["bash", str(ROOT / "examples" / "ee_tuning" / "llama3.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: set HF"), proc.stderr
    assert not (tmp_path / "out").exists()


def test_llama3_recipe_converts_adds_exits_and_tunes(tmp_path):
    """The real path, with a stand-in interpreter: the three steps get the right arguments."""
    env = _env(
        SIZE="8b", OUT=str(tmp_path / "out"), HF="/models/llama", DATA_PATH="/data/d", TP="2"
    )
    env.pop("DRY_RUN")
    calls = _capture_launch(tmp_path, ROOT / "examples" / "ee_tuning" / "llama3.sh", env)
    assert [argv[0] for _, argv in calls] == [
        "tools/checkpoint/hf_to_megatron.py",
        "tools/checkpoint/add_exits.py",
        "-m",
    ]
    convert, exits, tune = (argv for _, argv in calls)
    assert convert[convert.index("--hf-dir") + 1] == "/models/llama"
    assert exits[exits.index("--exit-layer-nums") + 1 : exits.index("--use-exit-norm")] == [
        "8",
        "16",
        "24",
    ]
    assert "--tune-exit" in tune and tune[tune.index("--load") + 1].endswith("out/with-exits")
    assert tune[tune.index("--nproc-per-node") + 1] == "2"
    assert tune[tune.index("--tensor-model-parallel-size") + 1] == "2"
