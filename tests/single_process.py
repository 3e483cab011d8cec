"""One-process gloo world for in-process unit tests, on a free port (tests may run in parallel
with other jobs, so a fixed MASTER_PORT can collide)."""

import socket

import torch.distributed as dist


def init_single_process_group() -> None:
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
