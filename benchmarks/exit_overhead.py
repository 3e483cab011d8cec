"""Training overhead of early exits: the same GPT with and without exits, PP=2, one launch.

    python benchmarks/exit_overhead.py [--out DIR | --write-results]

The launcher (this file without `--worker`) starts `torch.distributed.run --nproc-per-node 2`
on this same file with `--worker`. Every rank builds BOTH variants inside the one process
group (two `Trainer`s; the second finds the groups initialised and reuses them, which is
valid because both variants put the word embeddings on the same pipeline stages), warms
each up, and then times them alternately in rounds (A B | B A | A B ...), so slow drifts of
the machine hit both variants alike. Then it measures peak memory per variant and times
the exit head on its own to say where the overhead goes. Rank 0 writes raw numbers; the
launcher turns them into `exit_overhead.json`, `exit_overhead.md` and `exit_overhead.png`.

On CPU the ranks use gloo; with >= 2 GPUs the library picks NCCL and the same code reports
`torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as pyplatform
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("no_exits", "exits")
NPROC = 2  # PP=2 on 2 processes
HERE = os.path.dirname(os.path.abspath(__file__))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    from megatron.early_exit.cli import add_results_args  # the parent process stays light

    add_results_args(p, HERE)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--exit-layer-nums", type=int, nargs="+", default=[2, 6])
    p.add_argument("--warmup", type=int, default=3, help="warm-up iterations per variant")
    p.add_argument("--rounds", type=int, default=24)
    p.add_argument("--iters-per-round", type=int, default=2)
    p.add_argument("--memory-reps", type=int, default=2, help="memory measurements per variant")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-plot", action="store_true")
    # internal
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--raw-out", default=None, help=argparse.SUPPRESS)
    return p


# ====================================================================== worker (each rank)


def _library_argv(a: argparse.Namespace, exits: bool, train_iters: int) -> list[str]:
    argv = [
        "--mock-data",
        "--tokenizer-type", "NullTokenizer",
        "--vocab-size", str(a.vocab_size),
        "--num-layers", str(a.num_layers),
        "--hidden-size", str(a.hidden_size),
        "--num-attention-heads", str(a.num_attention_heads),
        "--seq-length", str(a.seq_length),
        "--micro-batch-size", str(a.micro_batch_size),
        "--global-batch-size", str(a.global_batch_size),
        "--pipeline-model-parallel-size", str(NPROC),
        "--train-iters", str(train_iters),
        "--lr-decay-style", "constant",
        "--seed", str(a.seed),
    ]  # fmt: skip
    if exits:
        argv += ["--exit-layer-nums", *map(str, a.exit_layer_nums)]
    return argv


class _HostMemory:
    """Peak RSS of this process over a region, from the kernel's own high-water mark.

    Writing "5" to /proc/self/clear_refs resets VmHWM (peak RSS) to the current RSS, so
    VmHWM read after the region is the exact peak inside it; no sampling thread needed.
    glibc keeps freed memory in its arenas and raises its mmap threshold as it sees large
    frees, which would hide allocations from RSS; for the memory phase only we pin the
    mmap threshold (large tensors are mmapped and returned on free) and trim before each
    region, so RSS tracks live memory. Small (< 64 KiB) allocations and torch's own
    caching (none on CPU) can still blur it by a few MiB.
    """

    def __init__(self) -> None:
        self.libc = None
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, disables dynamic growth
            self.libc = libc
        except OSError:
            pass
        self.exact = self._reset_peak()

    def _reset_peak(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status_kib(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    def start(self) -> int:
        import gc

        gc.collect()
        if self.libc is not None:
            self.libc.malloc_trim(0)
        self._reset_peak()
        self.base = self._status_kib("VmRSS") * 1024
        return self.base

    def peak(self) -> int:
        if self.exact:
            return self._status_kib("VmHWM") * 1024
        import resource  # fallback: lifetime peak, only an upper bound

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(a: argparse.Namespace) -> None:
    from megatron.early_exit.cli import quiet_startup

    quiet_startup()
    import torch
    import torch.distributed as dist

    from megatron.early_exit.arguments import parse_run_config
    from megatron.early_exit.config import build_transformer_config
    from megatron.early_exit.model import ExitState, tied_embedding_ranks
    from megatron.early_exit.model.specs import transformer_engine_usable
    from megatron.early_exit.pipeline.losses import masked_mean
    from megatron.early_exit.platform import init_platform
    from megatron.early_exit.platform.distributed import destroy_distributed, world_size_from_env
    from megatron.early_exit.progress import progress
    from megatron.early_exit.training.trainer import Trainer

    plat = init_platform()
    from megatron.core import parallel_state  # after the accelerator guard

    cuda = plat.is_cuda
    use_te = transformer_engine_usable(cuda)
    world = world_size_from_env()
    total_iters = a.warmup + a.rounds * a.iters_per_round + a.memory_reps + 10
    runs = {
        v: parse_run_config(_library_argv(a, v == "exits", total_iters), world, cuda)
        for v in VARIANTS
    }
    # The second Trainer reuses the groups made for the first: the embedding group (first
    # stage + stages holding a tied copy of the word embeddings) must be the same for both.
    pp_ranks = list(range(runs["exits"].parallel.pipeline_model_parallel_size))
    emb = {
        v: tied_embedding_ranks(
            build_transformer_config(r, use_te), not r.model.untie_embeddings_and_output_weights
        )(pp_ranks)
        for v, r in runs.items()
    }
    if emb["exits"] != emb["no_exits"]:
        raise SystemExit(
            f"embedding-group stages differ between variants ({emb}); one process group "
            "cannot serve both: move the exits or untie them"
        )

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def allocated() -> int:
        return torch.cuda.memory_allocated() if cuda else 0

    # rank 0 counts train steps; the updates sit outside the timed sections
    n_steps = len(VARIANTS) * (a.warmup + a.rounds * a.iters_per_round + a.memory_reps)
    bar = progress(total=n_steps, desc="exit overhead", unit="step",
                   enabled=os.environ.get("RANK", "0") == "0")  # fmt: skip
    trainers, static_mem, first_loss = {}, {}, {}
    for v in VARIANTS:  # build + warm up one variant after the other
        before = allocated()
        trainers[v] = Trainer(runs[v], plat, use_te=use_te)
        t = trainers[v]
        for i in range(a.warmup):
            rec = t.train_step(i)
            bar.update()
            if i == 0:
                first_loss[v] = {"lm_loss": rec["lm_loss"], "exit_losses": rec["exit_losses"]}
        t.iteration = a.warmup
        sync()
        static_mem[v] = allocated() - before  # params + grad buffers + Adam states (GPU)
    rank = dist.get_rank()
    n_params = {v: sum(p.numel() for p in t.state.model.parameters()) for v, t in trainers.items()}

    # ------------------------------------------------------------------ timing, alternating
    times: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    cpu_times: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    order_log = []
    for r in range(a.rounds):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        order_log.append(list(order))
        for v in order:
            t = trainers[v]
            block, cpu_block = [], []
            dist.barrier()
            for _ in range(a.iters_per_round):
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                t.train_step(t.iteration)  # ends with an all-reduce of the losses
                sync()
                block.append(time.perf_counter() - t0)
                cpu_block.append(time.process_time() - c0)
                t.iteration += 1
                bar.update()
            times[v].append(block)
            cpu_times[v].append(cpu_block)

    # ------------------------------------------------------------------ peak memory
    host = None if cuda else _HostMemory()
    memory: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(a.memory_reps):
        for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            t = trainers[v]
            dist.barrier()
            if cuda:
                sync()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t.train_step(t.iteration)
                sync()
                peak = torch.cuda.max_memory_allocated()
            else:
                base = host.start()
                t.train_step(t.iteration)
                peak = host.peak()
            t.iteration += 1
            bar.update()
            memory[v].append({"base": base, "peak": peak, "delta": peak - base})
    bar.close()

    # ------------------------------------------------------------------ exit head alone
    attribution = _time_exit_head(a, trainers["exits"], cuda, sync, masked_mean, ExitState)
    for t in trainers.values():
        t.state.model.zero_grad_buffer()

    local = {
        "rank": rank,
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "times": times,
        "cpu_times": cpu_times,
        "memory": memory,
        "static_memory_bytes": static_mem,
        "n_params": n_params,
        "exit_head": attribution,
        "host_memory_exact": bool(host.exact) if host else None,
    }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    if rank == 0:
        info = {
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "backend": plat.backend,
            "transformer_engine": use_te,
            "torch_threads": torch.get_num_threads(),
            "embedding_group_stages": emb["exits"],
            "order": order_log,
            "first_iteration_losses": first_loss,
            "num_microbatches": trainers["exits"].num_microbatches,
        }
        with open(a.raw_out, "w") as f:
            json.dump({"ranks": gathered, "info": info}, f)
    dist.barrier()
    destroy_distributed()


def _time_exit_head(a, trainer, cuda, sync, masked_mean, ExitState) -> dict:
    """Forward+backward of this stage's exit head(s) on one microbatch, in isolation.

    Cumulative split: the tied [s*b, h] x [h, V] projection alone (backward from a fixed
    random gradient); the library's `exit_loss` as training calls it by default (projection
    + vocab-parallel cross entropy); and with the detached max-probability that
    --use-dynamic-exit-layer-weight adds. One transformer layer of the same stage, timed
    the same way, gives the scale.
    """
    import torch
    import torch.distributed as dist

    model = trainer.state.unwrapped
    device = trainer.device
    s, b, h = a.seq_length, a.micro_batch_size, a.hidden_size
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, a.vocab_size, (b, s), generator=g).to(device)
    mask = torch.ones(b, s, device=device)
    hidden0 = torch.randn(s, b, h, generator=g).to(device, dtype)
    grad_h = torch.randn(s, b, h, generator=g).to(device, dtype)
    vocab_local = trainer.run.padded_vocab_size() // trainer.config.tensor_model_parallel_size
    grad_logits = torch.randn(s, b, vocab_local, generator=g).to(device, dtype)
    layers = list(model.local_exit_layers)
    result: dict = {"layers": layers}

    def projection(layer, x):
        model.exit_logits(layer, ExitState(x)).backward(grad_logits)

    def exit_loss(layer, x):
        per_token, _ = model.exit_loss(layer, ExitState(x), labels)
        masked_mean(per_token, mask).backward()

    def exit_loss_dynamic(layer, x):
        per_token, max_prob = model.exit_loss(layer, ExitState(x), labels, with_max_prob=True)
        masked_mean(per_token * max_prob, mask).backward()

    def transformer_layer(_layer, x):
        out = model.decoder.layers[0](hidden_states=x, attention_mask=None)
        (out[0] if isinstance(out, tuple) else out).backward(grad_h)

    reps, warm = 10, 2
    cases = (projection, exit_loss, exit_loss_dynamic, transformer_layer)
    samples: dict[str, list[float]] = {f.__name__: [] for f in cases}
    failed: set[str] = set()
    for i in range(warm + reps):  # interleave the cases so noise hits them alike
        for fn in cases:
            if fn.__name__ in failed:
                continue
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            try:
                for layer in layers if fn is not transformer_layer else [None]:
                    fn(layer, hidden0.detach().clone().requires_grad_(True))
            except Exception as exc:  # a diagnostic: never fail the benchmark on it
                result[fn.__name__ + "_error"] = f"{type(exc).__name__}: {exc}"
                failed.add(fn.__name__)
                continue
            sync()
            if i >= warm:
                samples[fn.__name__].append(time.perf_counter() - t0)
    for name, xs in samples.items():
        if xs:
            result[name + "_s"] = statistics.median(xs)
    return result


# ====================================================================== launcher + report


def _machine_info() -> dict:
    import torch

    cpu_model = pyplatform.processor() or pyplatform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        from importlib.metadata import version

        mcore = version("megatron-core")
    except Exception:
        mcore = "?"
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": cpu_model,
        "python": pyplatform.python_version(),
        "torch": torch.__version__,
        "megatron_core": mcore,
        "cuda_available": torch.cuda.is_available(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "platform": pyplatform.platform(),
    }


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _launch(a: argparse.Namespace, argv: list[str], raw_out: str) -> float:
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available() or env.get("EE_FORCE_CPU") == "1":
        # gloo on CPU: split the cores between the ranks (torchrun would set 1 thread).
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or NPROC) // NPROC)))
    elif torch.cuda.device_count() < NPROC:
        raise SystemExit(
            f"PP={NPROC} with NCCL needs {NPROC} GPUs, this machine has "
            f"{torch.cuda.device_count()}; run on CPU with EE_FORCE_CPU=1 is not supported "
            "where CUDA exists (megatron allocates on the GPU), use a machine with 2 GPUs"
        )
    env.setdefault("PYTHONUNBUFFERED", "1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nproc-per-node", str(NPROC),
        os.path.abspath(__file__), "--worker", "--raw-out", raw_out, *argv,
    ]  # fmt: skip
    print("launching:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    return time.perf_counter() - t0


def _bootstrap_ratio(a_iters, b_iters, n=5000, seed=0) -> dict:
    """Paired bootstrap over rounds (a round holds both variants, close in time).

    Resamples rounds with replacement and recomputes the median ratio (median of the
    exits iterations / median of the no-exits iterations) and the mean ratio.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    a_r, b_r = np.asarray(a_iters), np.asarray(b_iters)  # [rounds, iters_per_round]
    idx = rng.integers(0, len(a_r), size=(n, len(a_r)))
    a_s, b_s = a_r[idx].reshape(n, -1), b_r[idx].reshape(n, -1)
    med = np.median(b_s, axis=1) / np.median(a_s, axis=1)
    mean = b_s.mean(axis=1) / a_s.mean(axis=1)
    return {
        "median_ratio_95": [float(x) for x in np.percentile(med, [2.5, 97.5])],
        "mean_ratio_95": [float(x) for x in np.percentile(mean, [2.5, 97.5])],
    }


def _flop_model(a) -> dict:
    """Matmul FLOPs (fwd+bwd = 3x fwd) per microbatch on each stage -> predicted ratio."""
    s, b, h, v = a.seq_length, a.micro_batch_size, a.hidden_size, a.vocab_size
    ffn = 4 * h
    layer = 3 * (2 * s * b * (4 * h * h + 2 * h * ffn) + 4 * s * s * b * h)
    head = 3 * 2 * s * b * h * v
    per_stage = a.num_layers // NPROC
    exits_on = [(n - 1) // per_stage for n in a.exit_layer_nums]
    stages = []
    for st in range(NPROC):
        base = per_stage * layer + (head if st == NPROC - 1 else 0)
        extra = head * exits_on.count(st)
        stages.append(
            {"stage": st, "no_exits_gflop": base / 1e9, "exits_gflop": (base + extra) / 1e9}
        )
    worst_a = max(x["no_exits_gflop"] for x in stages)
    worst_b = max(x["exits_gflop"] for x in stages)
    return {
        "layer_gflop": layer / 1e9,
        "head_gflop": head / 1e9,
        "stages": stages,
        "predicted_ratio_slowest_stage": worst_b / worst_a,
    }


def summarize(a, raw: dict, machine: dict, wall_s: float, command: str) -> dict:
    ranks = raw["ranks"]
    n_rounds = len(ranks[0]["times"]["exits"])
    # an iteration ends with an all-reduce, so the ranks agree; take the slowest rank
    per_iter = {
        v: [
            [max(rk["times"][v][r][i] for rk in ranks) for i in range(len(ranks[0]["times"][v][r]))]
            for r in range(n_rounds)
        ]
        for v in VARIANTS
    }
    flat = {v: [x for blk in per_iter[v] for x in blk] for v in VARIANTS}
    # CPU seconds each rank spent per iteration (all its threads): what the variant costs in
    # work, far less sensitive than wall time to other processes sharing the cores.
    cpu = {
        v: {
            f"rank{rk['rank']}": statistics.median(x for blk in rk["cpu_times"][v] for x in blk)
            for rk in ranks
        }
        for v in VARIANTS
    }
    round_means = {v: [statistics.fmean(blk) for blk in per_iter[v]] for v in VARIANTS}
    variants = {}
    for v in VARIANTS:
        xs = flat[v]
        variants[v] = {
            "median_s": statistics.median(xs),
            "mean_s": statistics.fmean(xs),
            "stdev_s": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min_s": min(xs),
            "max_s": max(xs),
            "n_iterations": len(xs),
            "tokens_per_s": a.global_batch_size * a.seq_length / statistics.median(xs),
            "cpu_s_per_rank_median": cpu[v],
            "memory": {
                f"rank{rk['rank']}": {
                    "peak_delta_bytes": max(m["delta"] for m in rk["memory"][v]),
                    "peak_bytes": max(m["peak"] for m in rk["memory"][v]),
                    "base_bytes": min(m["base"] for m in rk["memory"][v]),
                    "static_bytes": rk["static_memory_bytes"][v],
                    "n_params": rk["n_params"][v],
                }
                for rk in ranks
            },
        }
    per_round_ratio = [b / x for x, b in zip(round_means["no_exits"], round_means["exits"])]
    boot = _bootstrap_ratio(per_iter["no_exits"], per_iter["exits"])
    ratio = {
        "median_ratio": variants["exits"]["median_s"] / variants["no_exits"]["median_s"],
        "mean_ratio": variants["exits"]["mean_s"] / variants["no_exits"]["mean_s"],
        "bootstrap95_median_ratio": boot["median_ratio_95"],
        "bootstrap95_mean_ratio": boot["mean_ratio_95"],
        "per_round_ratio_min": min(per_round_ratio),
        "per_round_ratio_max": max(per_round_ratio),
        "per_round_ratio": per_round_ratio,
        "min_ratio": variants["exits"]["min_s"] / variants["no_exits"]["min_s"],
        "cpu_time_ratio_per_rank": {k: cpu["exits"][k] / cpu["no_exits"][k] for k in cpu["exits"]},
        "target": 1.05,
    }
    ratio["meets_target"] = ratio["median_ratio"] <= ratio["target"]
    delta_ms = 1e3 * (variants["exits"]["median_s"] - variants["no_exits"]["median_s"])
    m = raw["info"]["num_microbatches"]
    heads = {}
    for rk in ranks:
        eh = rk["exit_head"]
        heads[f"rank{rk['rank']}"] = {
            **eh,
            "exit_loss_per_iteration_s": eh.get("exit_loss_s", 0.0) * m,
        }
    return {
        "command": command,
        "machine": machine,
        "run": raw["info"],
        "config": {
            k: getattr(a, k)
            for k in (
                "num_layers",
                "hidden_size",
                "num_attention_heads",
                "seq_length",
                "vocab_size",
                "micro_batch_size",
                "global_batch_size",
                "exit_layer_nums",
                "warmup",
                "rounds",
                "iters_per_round",
                "memory_reps",
                "seed",
            )
        },  # fmt: skip
        "variants": variants,
        "ratio": ratio,
        "delta_median_ms": delta_ms,
        "exit_head_isolated": heads,
        "flop_model": _flop_model(a),
        "host_memory_method": (
            "peak RSS delta per rank: VmHWM reset via /proc/self/clear_refs, then "
            "VmHWM - VmRSS around one train_step; glibc mmap threshold pinned to 64 KiB "
            "and malloc_trim before each region (memory phase only)"
            if not machine["cuda_available"]
            else "torch.cuda.max_memory_allocated after reset_peak_memory_stats, one train_step"
        ),
        "per_iteration_s": per_iter,
        "round_mean_s": round_means,
        "wall_s": wall_s,
        "raw_ranks": ranks,
    }


def _mib(x: float) -> str:
    return f"{x / 2**20:.1f}"


def write_markdown(res: dict, path: str) -> None:
    v, r, mc, run = res["variants"], res["ratio"], res["machine"], res["run"]
    c = res["config"]
    mlo, mhi = r["bootstrap95_median_ratio"]
    lo, hi = r["bootstrap95_mean_ratio"]
    gpu = mc["cuda_available"]
    lines = [
        "# Early-exit training overhead",
        "",
        f"`{res['command']}`",
        "",
        f"GPT {c['num_layers']} layers, hidden {c['hidden_size']}, {c['num_attention_heads']} "
        f"heads, seq {c['seq_length']}, vocab {c['vocab_size']}; micro batch "
        f"{c['micro_batch_size']}, global batch {c['global_batch_size']} "
        f"({run['num_microbatches']} microbatches); PP=2 on 2 processes ({run['backend']}). "
        f"Exits: minimal (no norm/MLP/block, tied output weights) after layers "
        f"{', '.join(map(str, c['exit_layer_nums']))}. {c['warmup']} warm-up iterations per "
        f"variant, then {c['rounds']} alternating rounds x {c['iters_per_round']} iterations "
        "(order flips every round). Iteration time = slowest rank.",
        "",
        "| variant | median ms/iter | mean ms/iter | min-max ms | tokens/s | "
        + " | ".join(f"peak mem delta {k} MiB" for k in v["exits"]["memory"])
        + " |",
        "|---|---|---|---|---|" + "---|" * len(v["exits"]["memory"]),
    ]
    for name in VARIANTS:
        x = v[name]
        mem = " | ".join(_mib(m["peak_delta_bytes"]) for m in x["memory"].values())
        lines.append(
            f"| {name} | {1e3 * x['median_s']:.1f} | {1e3 * x['mean_s']:.1f} | "
            f"{1e3 * x['min_s']:.0f}-{1e3 * x['max_s']:.0f} | {x['tokens_per_s']:.0f} | {mem} |"
        )
    lines += [
        "",
        f"**exits / no exits: {r['median_ratio']:.3f}x (median, paired bootstrap 95% over "
        f"rounds [{mlo:.3f}, {mhi:.3f}])**; {r['mean_ratio']:.3f}x (mean, [{lo:.3f}, {hi:.3f}]); "
        "per-round ratios of round means "
        f"{r['per_round_ratio_min']:.3f}-{r['per_round_ratio_max']:.3f}; fastest iterations "
        f"{r['min_ratio']:.3f}x. Target <= {r['target']:.2f}x: "
        f"{'met' if r['meets_target'] else 'NOT met'}.",
        "",
    ]
    if not gpu:
        lines += [
            "CPU seconds per iteration (median, all threads of the rank; not inflated by "
            "waiting or by other processes taking the cores, so a cross-check of wall time on "
            "a busy machine): "
            + ", ".join(
                f"{k} {1e3 * v['no_exits']['cpu_s_per_rank_median'][k]:.0f} -> "
                f"{1e3 * v['exits']['cpu_s_per_rank_median'][k]:.0f} ms ({x:.3f}x)"
                for k, x in r["cpu_time_ratio_per_rank"].items()
            )
            + ".",
            "",
        ]
    fm = res["flop_model"]
    lines += [
        "## Where the time goes",
        "",
        f"Matmul FLOPs per microbatch (fwd+bwd): one transformer layer {fm['layer_gflop']:.2f} "
        f"GFLOP, one s*b*h x h*V head {fm['head_gflop']:.2f} GFLOP. Per stage (no exits -> exits): "
        + ", ".join(
            f"stage {s['stage']} {s['no_exits_gflop']:.2f} -> {s['exits_gflop']:.2f}"
            for s in fm["stages"]
        )
        + f". The slowest stage predicts {fm['predicted_ratio_slowest_stage']:.3f}x.",
        "",
        "Exit head timed alone on each rank, one microbatch, fwd+bwd (ms):",
        "",
        "| rank | exit layers | projection | exit_loss (+ cross entropy) | with max-prob "
        "(dynamic weights) | exit_loss x microbatches | one transformer layer |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, eh in res["exit_head_isolated"].items():

        def ms(key, eh=eh):
            return f"{1e3 * eh[key]:.1f}" if key in eh else "-"

        lines.append(
            f"| {name} | {eh['layers']} | {ms('projection_s')} | {ms('exit_loss_s')} | "
            f"{ms('exit_loss_dynamic_s')} | {ms('exit_loss_per_iteration_s')} | "
            f"{ms('transformer_layer_s')} |"
        )
    m = run["num_microbatches"]
    heads = res["exit_head_isolated"]
    per_iter = ", ".join(
        f"{k} {1e3 * eh.get('exit_loss_per_iteration_s', 0.0):.0f}" for k, eh in heads.items()
    )
    maxprob = ", ".join(
        f"{k} {1e3 * m * (eh['exit_loss_dynamic_s'] - eh['exit_loss_s']):.0f}"
        for k, eh in heads.items()
        if "exit_loss_dynamic_s" in eh and "exit_loss_s" in eh
    )
    cpu_delta = ", ".join(
        f"{k} {1e3 * (v['exits']['cpu_s_per_rank_median'][k] - x):.0f}"
        for k, x in v["no_exits"]["cpu_s_per_rank_median"].items()
    )
    lines += [
        "",
        f"Measured: the median iteration grows by {res['delta_median_ms']:.0f} ms (wall)"
        + ("" if gpu else f"; CPU time per iteration grows by {cpu_delta} ms")
        + f". The exit head alone, x {m} microbatches, costs {per_iter} ms per iteration "
        "(both stages run theirs concurrently, so the pipeline pays about one stage's share; "
        "isolated timings are good to ~20%). Dynamic exit weights "
        "(--use-dynamic-exit-layer-weight, not used here) would add the detached "
        f"max-probability: {maxprob or 'n/a'} ms per iteration.",
        "",
        f"Rule of thumb from the FLOP model: one exit head costs V/(12h+2s) = "
        f"{fm['head_gflop'] / fm['layer_gflop']:.2f} transformer layers here, so one exit on "
        f"a stage stays under 5% only with >= {19 * fm['head_gflop'] / fm['layer_gflop']:.0f} "
        "layers' worth of work on that stage (e.g. h=4096, V=32000, s=2048: 0.60 layers, "
        ">= 12 layers per stage).",
        "",
        "## Memory",
        "",
        (
            "GPU: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, "
            "around one train_step per variant; delta = peak - allocated before the step."
            if gpu
            else "CPU: peak RSS delta per rank around one train_step per variant (repeated "
            "alternately, max taken). The kernel's peak-RSS mark is reset through "
            "`/proc/self/clear_refs` and read from `VmHWM`, so the peak is exact, not "
            "sampled. Limits: RSS counts pages, not tensors: glibc may serve an allocation "
            "from memory it kept, which RSS does not show as new. For the memory phase the "
            "glibc mmap threshold is pinned to 64 KiB and `malloc_trim(0)` runs before each "
            "region, so large tensors map and unmap and RSS follows live memory; small "
            "allocations and thread arenas still blur it by a few MiB. Parameters, gradient "
            "buffers and Adam states exist before the step and are not in the delta (both "
            "variants live in one process, so absolute RSS covers both)."
        ),
        "",
        "| variant | rank | params | peak delta MiB | peak MiB | static MiB |",
        "|---|---|---|---|---|---|",
    ]
    for name in VARIANTS:
        for rk, m in v[name]["memory"].items():
            static = _mib(m["static_bytes"]) if gpu else "-"
            lines.append(
                f"| {name} | {rk} | {m['n_params']:,} | {_mib(m['peak_delta_bytes'])} | "
                f"{_mib(m['peak_bytes'])} | {static} |"
            )
    c = res["config"]
    logits_bytes = 4 * c["seq_length"] * c["micro_batch_size"] * c["vocab_size"]
    base_mem = v["no_exits"]["memory"]
    extra = ", ".join(
        f"{k} {(m['peak_delta_bytes'] - base_mem[k]['peak_delta_bytes']) / 2**20:+.1f}"
        for k, m in v["exits"]["memory"].items()
    )
    lines += [
        "",
        f"Exits add {extra} MiB to the peak per rank. For scale, one microbatch's fp32 exit "
        f"logits (s*b*V) are {_mib(logits_bytes)} MiB; the library computes exit logits just "
        "before that microbatch's backward, so they are never held for all microbatches in "
        "flight.",
    ]
    fl = run["first_iteration_losses"]
    lines += [
        "",
        "## Machine",
        "",
        f"- device: {run['device']} (backend {run['backend']}, transformer-engine "
        f"{run['transformer_engine']})",
        f"- CPUs: {mc['cpu_count']} ({mc['cpus_usable']} usable), {mc['cpu_model']}; torch "
        f"threads per rank {run['torch_threads']}",
        f"- torch {mc['torch']}, megatron-core {mc['megatron_core']}, Python {mc['python']}",
        f"- {mc['platform']}",
        f"- whole run {res['wall_s']:.0f} s; 1-minute load average {mc['load_before']} before, "
        f"{mc['load_after']} after (above the CPU count means other processes shared the "
        "cores and wall times are noisy)",
        "",
        f"Sanity: first-iteration LM loss no_exits {fl['no_exits']['lm_loss']:.4f}, exits "
        f"{fl['exits']['lm_loss']:.4f} (same init, same data); embedding group stages "
        f"{run['embedding_group_stages']} for both variants.",
        "",
        "![per-round iteration times](exit_overhead.png)",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_iter, rm = res["per_iteration_s"], res["round_mean_s"]
    fig, (ax, ax2) = plt.subplots(
        2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]}
    )
    colors = {"no_exits": "tab:blue", "exits": "tab:orange"}
    for v in VARIANTS:
        for r, blk in enumerate(per_iter[v]):
            ax.scatter([r + 1] * len(blk), [1e3 * x for x in blk], s=10, alpha=0.4, c=colors[v])
        ax.plot(
            range(1, len(rm[v]) + 1),
            [1e3 * x for x in rm[v]],
            "-o",
            c=colors[v],
            label=f"{v} (median {1e3 * res['variants'][v]['median_s']:.0f} ms)",
        )
    ax.set_ylabel("ms / iteration")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right")
    r = res["ratio"]
    ax.set_title(
        f"Early-exit training overhead: {r['median_ratio']:.3f}x median "
        f"({res['run']['device']}, PP=2)"
    )
    rounds = range(1, len(r["per_round_ratio"]) + 1)
    ax2.plot(rounds, r["per_round_ratio"], "-o", c="k", label="exits / no exits (round means)")
    ax2.axhline(1.0, c="gray", lw=0.8)
    ax2.axhline(r["target"], c="red", ls="--", lw=0.8, label=f"target {r['target']}x")
    ax2.set_xlabel("round (variants alternate; order flips every round)")
    ax2.set_ylabel("ratio")
    ax2.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    forwarded = []
    skip = False
    for i, tok in enumerate(argv):  # forward everything but --out/--no-plot to the worker
        if skip:
            skip = False
            continue
        if tok == "--out":
            skip = True
            continue
        if tok.startswith("--out=") or tok == "--no-plot":
            continue
        forwarded.append(argv[i])
    os.makedirs(a.out, exist_ok=True)
    command = "python benchmarks/exit_overhead.py " + " ".join(argv)
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = os.path.join(tmp, "raw.json")
        load_before = _load()
        wall = _launch(a, forwarded, raw_path)
        load_after = _load()
        with open(raw_path) as f:
            raw = json.load(f)
    machine = {**_machine_info(), "load_before": load_before, "load_after": load_after}
    res = summarize(a, raw, machine, wall, command.strip())
    json_path = os.path.join(a.out, "exit_overhead.json")
    with open(json_path, "w") as f:
        json.dump(res, f, indent=1)
    write_markdown(res, os.path.join(a.out, "exit_overhead.md"))
    if not a.no_plot:
        plot(res, os.path.join(a.out, "exit_overhead.png"))
    v, r = res["variants"], res["ratio"]
    print(
        f"no_exits {1e3 * v['no_exits']['median_s']:.1f} ms/iter, exits "
        f"{1e3 * v['exits']['median_s']:.1f} ms/iter -> {r['median_ratio']:.3f}x median, "
        f"95% CI [{r['bootstrap95_median_ratio'][0]:.3f}, "
        f"{r['bootstrap95_median_ratio'][1]:.3f}]"
    )
    print(f"wrote {json_path}, exit_overhead.md, exit_overhead.png in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
