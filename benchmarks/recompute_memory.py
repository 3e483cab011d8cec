"""Peak activation memory per rank with and without activation recomputation, one launch.

    python benchmarks/recompute_memory.py [--out DIR | --write-results]

The launcher starts `torch.distributed.run --nproc-per-node 2` (PP=2, gloo on CPU) on this
file with `--worker`. Every rank builds one `Trainer` per variant inside the one process
group (the variants differ only in their recompute flags, so they share the layout),
runs one unmeasured forward/backward per variant (lazy buffers), then measures one full
1F1B forward/backward (all microbatches, exit losses included) per variant.

Measure: on CPU, the peak of live tensor bytes allocated during that forward/backward.
A TorchDispatchMode sees every aten op's outputs; each new storage adds its bytes and a
weakref finalizer on the storage subtracts them when it is freed. So the figure is exact
tensor memory (activations, saved tensors, temporaries, new gradients) above what existed
before (parameters, gradient buffers), independent of the C allocator's caching, which
makes RSS unreliable. With GPUs, `torch.cuda.max_memory_allocated` minus the allocation
before the step. Writes recompute_memory.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import weakref

from megatron.early_exit.cli import add_results_args

HERE = os.path.dirname(os.path.abspath(__file__))
NPROC = 2
VARIANTS = {
    "none": [],
    "selective": ["--recompute-granularity", "selective"],
    "full-block-2": ["--recompute-granularity", "full", "--recompute-method", "block",
                     "--recompute-num-layers", "2"],
    "full-uniform-1": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                       "--recompute-num-layers", "1"],
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    add_results_args(p, HERE)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--global-batch-size", type=int, default=4)
    p.add_argument("--exit-layer-nums", type=int, nargs="+", default=[2, 3, 6])
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--raw-out", default=None, help=argparse.SUPPRESS)
    return p


def run_argv(a: argparse.Namespace, variant: str) -> list[str]:
    return [
        "--num-layers", str(a.num_layers), "--hidden-size", str(a.hidden_size),
        "--num-attention-heads", str(a.num_attention_heads), "--seq-length", str(a.seq_length),
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(a.vocab_size),
        "--micro-batch-size", str(a.micro_batch_size),
        "--global-batch-size", str(a.global_batch_size),
        "--pipeline-model-parallel-size", str(NPROC), "--untie-exit-output-weights",
        "--exit-layer-nums", *map(str, a.exit_layer_nums), "--train-iters", "4",
        *VARIANTS[variant],
    ]  # fmt: skip


# ====================================================================== measurement
def live_bytes_tracker():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveTensorBytes(TorchDispatchMode):
        """Peak bytes of tensor storages created while active and still alive."""

        def __init__(self) -> None:
            super().__init__()
            self.live = self.peak = 0
            self.ptrs: set[int] = set()

        def _free(self, ptr: int, n: int) -> None:
            self.live -= n
            self.ptrs.discard(ptr)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                    continue
                storage = t.untyped_storage()
                ptr, n = storage.data_ptr(), storage.nbytes()
                if n == 0 or ptr in self.ptrs:  # views, in-place results
                    continue
                self.ptrs.add(ptr)
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, ptr, n)
            return out

    return LiveTensorBytes()


def worker(a: argparse.Namespace) -> None:
    import megatron.early_exit  # noqa: F401, I001  (first: guards broken accelerators)
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron.early_exit.arguments import parse_run_config
    from megatron.early_exit.pipeline import get_forward_backward_func
    from megatron.early_exit.platform import init_platform
    from megatron.early_exit.platform.distributed import destroy_distributed, world_size_from_env
    from megatron.early_exit.training.trainer import Trainer

    plat = init_platform()
    cuda = plat.is_cuda
    trainers = {
        v: Trainer(parse_run_config(run_argv(a, v), world_size_from_env()), plat) for v in VARIANTS
    }

    def step(v: str, it: int) -> None:
        t = trainers[v]
        t.state.model.zero_grad_buffer()
        get_forward_backward_func()(
            forward_step_func=lambda data, m: t._forward_step(t.exit_weights.at(0), data, m),
            data_iterator=t._microbatches(it),
            model=t.state.model,
            num_microbatches=t.num_microbatches,
            seq_length=t.run.model.seq_length,
            micro_batch_size=t.run.training.micro_batch_size,
            config=t.config,
        )

    for v in VARIANTS:
        step(v, 0)  # warm-up: lazy buffers, p2p shapes
    peaks = {}
    for v in VARIANTS:
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(v, 1)
            torch.cuda.synchronize()
            peaks[v] = torch.cuda.max_memory_allocated() - base
        else:
            tracker = live_bytes_tracker()
            with tracker:
                step(v, 1)
            peaks[v] = tracker.peak
    record = {
        "rank": dist.get_rank(),
        "stage": parallel_state.get_pipeline_model_parallel_rank(),
        "peak_bytes": peaks,
        "cuda": cuda,
    }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, record)
    if dist.get_rank() == 0:
        with open(a.raw_out, "w") as f:
            json.dump(gathered, f)
    destroy_distributed()


# ====================================================================== launcher
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(NPROC),
               "--master-port", str(_free_port()), os.path.abspath(__file__), "--worker",
               "--raw-out", raw, *(argv or sys.argv[1:])]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        proc = subprocess.run(cmd, env=env, cwd=os.path.dirname(HERE))
        if proc.returncode:
            print(f"error: the benchmark launch failed ({proc.returncode})", file=sys.stderr)
            return 1
        with open(raw) as f:
            ranks = sorted(json.load(f), key=lambda r: r["rank"])
    base = "none"
    result = {
        "config": {k: v for k, v in vars(a).items() if k not in ("worker", "raw_out", "out")},
        "pipeline_parallel": NPROC,
        "variants": {v: " ".join(flags) or "(no recomputation)" for v, flags in VARIANTS.items()},
        "method": "torch.cuda.max_memory_allocated - allocated before the step"
        if ranks[0]["cuda"]
        else "peak live tensor bytes during the step (TorchDispatchMode + storage finalizers)",
        "ranks": [
            {
                "rank": r["rank"],
                "stage": r["stage"],
                "peak_mib": {v: r["peak_bytes"][v] / 2**20 for v in VARIANTS},
                "ratio_to_none": {v: r["peak_bytes"][v] / r["peak_bytes"][base] for v in VARIANTS},
            }
            for r in ranks
        ],
    }
    with open(os.path.join(a.out, "recompute_memory.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        "# Peak memory per rank with and without activation recomputation",
        "",
        "Produced by `python benchmarks/recompute_memory.py` (one launch, PP=2, every variant "
        "built in the same process group and measured one after another on the same microbatches).",
        "",
        f"Model: {a.num_layers} layers, hidden {a.hidden_size}, {a.num_attention_heads} heads, "
        f"sequence {a.seq_length}, vocabulary {a.vocab_size}, micro batch {a.micro_batch_size}, "
        f"{a.global_batch_size // a.micro_batch_size} microbatches, untied exits after layers "
        f"{', '.join(map(str, a.exit_layer_nums))}; fp32.",
        "",
        f"Measure: {result['method']}. Parameters and gradient buffers exist before the step "
        "and are not counted: the figures are what the step adds (activations kept for "
        "backward, exit and LM-head logits, temporaries).",
        "",
        "| stage | " + " | ".join(f"{v} MiB (ratio)" for v in VARIANTS) + " |",
        "|---|" + "---|" * len(VARIANTS),
    ]
    for r in result["ranks"]:
        cells = [f"{r['peak_mib'][v]:.1f} ({r['ratio_to_none'][v]:.2f})" for v in VARIANTS]
        lines.append(f"| {r['stage']} | " + " | ".join(cells) + " |")
    lines += ["", "Variants: " + "; ".join(f"`{v}`: {f}" for v, f in result["variants"].items())]
    with open(os.path.join(a.out, "recompute_memory.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if not a.no_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.6))
        width = 0.8 / len(VARIANTS)
        for i, v in enumerate(VARIANTS):
            xs = [r["stage"] + i * width for r in result["ranks"]]
            ax.bar(xs, [r["peak_mib"][v] for r in result["ranks"]], width, label=v)
        ax.set_xticks([r["stage"] + 0.4 - width / 2 for r in result["ranks"]])
        ax.set_xticklabels([f"stage {r['stage']}" for r in result["ranks"]])
        ax.set_ylabel("peak step memory (MiB)")
        ax.set_title("Activation recomputation with exits (PP=2)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, "recompute_memory.png"), dpi=120)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":  # torch.distributed.run re-imports this file: keep the guard
    sys.exit(main())
