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


def gloo_world():
    """Generator for a module-scoped fixture: just the one-process gloo group (converters and
    engines set up their own model-parallel state)."""
    from megatron.early_exit.platform.distributed import destroy_distributed

    init_single_process_group()
    yield
    destroy_distributed()


def tp1pp1_world(seed: int):
    """Generator for a module-scoped fixture: CPU platform, one-process gloo world, TP1PP1
    model-parallel state and megatron-core's RNG seeded; torn down after the module.

        @pytest.fixture(scope="module")
        def dist_world():
            yield from tp1pp1_world(seed=7)
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron.early_exit.platform import init_platform

    init_platform(force_cpu=True)
    init_single_process_group()
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(seed)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
