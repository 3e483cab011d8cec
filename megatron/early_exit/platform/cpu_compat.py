"""Let megatron-core 0.16.1 run on a CPU-only torch build (gloo backend).

megatron-core calls CUDA-only APIs at a known, small set of sites (the kinds below).
Instead of a global TorchFunctionMode, which taxes every torch call (~25% on a tiny
forward+backward), we redirect only what would otherwise raise:

* `torch.cuda.*` functions that raise without CUDA (device queries, sync, streams, RNG)
  become CPU equivalents or no-ops. The CUDA RNG maps to the CPU default generator, so
  megatron's RNG tracker keeps its fork/restore semantics.
* `Tensor.cuda()` returns the tensor itself (it can only raise on this build).
* `Tensor.type()` reports `torch.cuda.*Tensor` to callers inside megatron.core only,
  which dispatch on that string (optimizer, grad clipping).
* The few megatron modules that allocate with a literal `device='cuda'` get a private
  view of the torch module whose factory functions map CUDA devices to CPU. Other
  modules, and the hot path of the model, are untouched.

Nothing here is imported on a machine with CUDA.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types

import torch

_applied = False

# megatron.core modules that allocate with device="cuda" literals on the CPU path.
_MODULES_WITH_CUDA_LITERALS = (
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.transformer.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.rerun_state_machine",
    "megatron.core.utils",
)
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like")


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


def _redirect_factory(fn):
    def factory(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    factory.__name__ = fn.__name__
    factory.__doc__ = fn.__doc__
    return factory


def _cpu_torch_view() -> types.ModuleType:
    """A module object sharing torch's namespace, with CUDA-redirecting factories."""
    view = types.ModuleType("torch")
    view.__dict__.update(torch.__dict__)
    for name in _FACTORIES:
        setattr(view, name, _redirect_factory(getattr(torch, name)))
    return view


class _NullStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _noop():
    # A distinct function per patched name: torch._dynamo rejects one object under two names.
    def noop(*args, **kwargs):
        return None

    return noop


def _zero():
    def zero(*args, **kwargs):
        return 0

    return zero


def _called_from_megatron_core() -> bool:
    frame = sys._getframe(2)
    return frame.f_globals.get("__name__", "").startswith("megatron.core")


def apply() -> None:
    """Install the compatibility layer (idempotent). Only valid without CUDA."""
    global _applied
    if _applied:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_compat must not be applied on a machine with CUDA")
    _applied = True
    # Import megatron-core (and through it torch._dynamo) before touching torch.cuda.
    importlib.import_module("megatron.core")
    cuda = torch.cuda

    # Device queries, synchronisation, streams, memory stats.
    cuda.current_device = lambda: "cpu"
    cuda.set_device = _noop()
    cuda.synchronize = _noop()
    cuda.empty_cache = _noop()
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.memory_allocated = _zero()
    cuda.max_memory_allocated = _zero()
    cuda.memory_reserved = _zero()
    cuda.reset_peak_memory_stats = _noop()
    cuda.nvtx.range_push = _noop()
    cuda.nvtx.range_pop = _noop()

    # CUDA RNG -> CPU default generator (megatron's tracker forks/restores it).
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = cuda.manual_seed
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    mcore_random = importlib.import_module("megatron.core.tensor_parallel.random")
    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)

    # Tensor.cuda() can only raise on this build: make it the identity.
    torch.Tensor.cuda = lambda self, *a, **k: self

    # megatron.core dispatches on 'torch.cuda.FloatTensor' strings; spoof for it alone.
    original_type = torch.Tensor.type

    def type_for_megatron(self, *args, **kwargs):
        result = original_type(self, *args, **kwargs)
        if (
            not args
            and not kwargs
            and isinstance(result, str)
            and result.startswith("torch.")
            and not result.startswith("torch.cuda.")
            and _called_from_megatron_core()
        ):
            return "torch.cuda." + result[len("torch.") :]
        return result

    torch.Tensor.type = type_for_megatron

    # device="cuda" literals: give only those modules a redirecting torch view.
    view = _cpu_torch_view()
    for name in _MODULES_WITH_CUDA_LITERALS:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = view

    # Inference p2p helpers assert tensor.is_cuda.
    with contextlib.suppress(ImportError):
        comm = importlib.import_module("megatron.core.inference.communication_utils")
        comm._is_cuda = _noop()


def is_applied() -> bool:
    return _applied
