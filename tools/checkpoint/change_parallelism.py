"""Re-save a checkpoint for another tensor/pipeline-parallel layout.

    python tools/checkpoint/change_parallelism.py --load ckpt/a --save ckpt/a_tp2pp2 \
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2

Our checkpoints are megatron-core dist checkpoints sharded by global tensor, so they are
layout-independent: `--load` works at ANY TP/PP directly and this tool is never required.
It exists to check a layout before a long run and to produce a checkpoint written by
that layout: it starts TP x PP processes (torchrun, gloo on CPU), loads the checkpoint
there, runs a forward through all stages, and saves the weights (no optimizer state)
with the same ee_args.json and tokenizer files. Already under torchrun, it runs in place.
Impossible layouts (TP not dividing heads or query groups, PP not dividing layers) exit
with code 2 before any process starts; the output appears only when complete.
"""

import argparse
import os
import subprocess
import sys


def parse(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--load", required=True, help="source checkpoint root")
    p.add_argument("--save", required=True, help="checkpoint root to create")
    p.add_argument("--target-tensor-parallel-size", type=int, required=True)
    p.add_argument("--target-pipeline-parallel-size", type=int, required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save")
    p.add_argument(
        "--timeout", type=int, default=3600, help="seconds before the workers are stopped"
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    from megatron.early_exit.cli import quiet_startup, run_cli
    from megatron.early_exit.errors import ConversionError

    quiet_startup()
    tp, pp = args.target_tensor_parallel_size, args.target_pipeline_parallel_size
    worker = ["reshard", "--load", args.load, "--save", args.save, "--tp", str(tp), "--pp", str(pp)]
    if args.overwrite:
        worker.append("--overwrite")
    if "RANK" in os.environ:  # launched by torchrun already
        from megatron.early_exit.convert.workers import main as worker_main

        return worker_main(worker)

    def check():  # fail fast, in this process, on impossible layouts and bad paths
        from megatron.early_exit.convert.hf_files import check_output_dir
        from megatron.early_exit.convert.megatron_side import (
            build_run,
            read_raw_args,
            resolved_args,
        )

        if tp < 1 or pp < 1:
            raise ConversionError("target sizes must be >= 1")
        iter_dir, raw = read_raw_args(args.load)
        build_run(resolved_args(iter_dir, raw), tp, pp, tp * pp)
        check_output_dir(args.save, args.overwrite)

    rc = run_cli(check)
    if rc:
        return rc
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp * pp),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "megatron.early_exit.convert.workers", *worker]  # fmt: skip
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONWARNINGS", "ignore::UserWarning,ignore::FutureWarning")
    try:
        return subprocess.run(cmd, env=env, timeout=args.timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"error: workers did not finish within {args.timeout} s", file=sys.stderr)
        return 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
