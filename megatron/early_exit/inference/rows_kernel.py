"""C kernels for decode-sized work on the CPU (csrc/rows_kernels.c): products of 1-8 fp32
rows with a weight, and the attention of 1-8 new positions over their KV cache.

Products. Decoding multiplies one row per sequence, or the k+1 rows a verification checks,
by each weight. Such a product is a stream over the weight: its floor is one read of the
weight at the memory bandwidth. Torch's kernels reach about half of it on these shapes; the
C kernel, which walks the weight once with the rows held in L1, reaches it at one row, and
with its own prefetching keeps 2-8 rows at 1.1-1.6x one row
(benchmarks/projection_shapes.py). `projection.project` uses it where a product runs on one
thread (the layers of a decode step with --inference-decode-threads 1, the default, and
everything when torch has one thread) and for the heads, whose output rows are split across
torch's thread count. The layers' products at more threads keep torch's kernels.

Attention. A decode step's attention is a few thousand multiply-adds per layer, for which
torch's batched products and SDPA spend 50-200 us, mostly outside the arithmetic; the C
function reads the cache once (`attention`, used by the lean layer step on one thread).

The library is compiled on first use with the system C compiler ($CC, else `cc`; under a
second) into the cache folder ($EE_CACHE/kernels), keyed by the source, the flags and the
CPU, and checked against torch once per process. Without a compiler, or if the build or the
check fails, one warning says why and torch's kernels are used: the same results, slower.
Compiled steps call the product through the custom op `rows_linear` (dynamo cannot trace
ctypes).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shlex
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MAX_KERNEL_ROWS = 8  # a decode step, verifying k <= 7 drafts, or a small decode batch
# From 4M elements (16 MB in fp32: the LM and exit heads, not a layer's weights) a product
# is split across torch's thread count by output rows; smaller ones stay on one thread.
SPLIT_MIN_NUMEL = 1 << 22
SOURCE = Path(__file__).with_name("csrc") / "rows_kernels.c"
_BUILD_TIMEOUT_S = 120

_enabled = True
_fn = None  # the loaded C function; False once it proved unavailable in this process
_attention_fn = None  # rows_attention from the same library, loaded with _fn
_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _forget_pools_after_fork() -> None:
    """A forked child has none of the parent's worker threads: its first split must not wait
    on them (nor on a lock the parent held at the fork)."""
    global _POOLS, _POOLS_LOCK
    _POOLS, _POOLS_LOCK = {}, threading.Lock()


os.register_at_fork(after_in_child=_forget_pools_after_fork)


def set_rows_kernel(enabled: bool) -> None:
    """Whether 1-8-row CPU products may use the C kernel (--no-inference-rows-kernel)."""
    global _enabled
    _enabled = enabled


def _flags() -> list[str]:
    flags = ["-O3", "-shared", "-fPIC", "-std=c11", "-fopenmp-simd"]
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    capability = torch.backends.cpu.get_cpu_capability() if x86 else ""
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]  # every CPU torch runs its AVX2 kernels on has both
    if capability == "AVX512":
        flags.append("-mavx512f")  # the intrinsics body (csrc/rows_kernels.c)
    return flags


def _build(cache: Path) -> Path:
    """Compile the kernel unless a library built from the same source and flags exists."""
    cc = shlex.split(os.environ.get("CC") or "cc")  # e.g. CC="ccache gcc"
    flags = _flags()
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([*cc, *flags]).encode()).hexdigest()[:16]
    lib = cache / f"rows_kernels-{platform.machine()}-{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")  # renamed: concurrent builds are safe
    os.close(fd)
    try:
        done = subprocess.run(
            [*cc, *flags, str(SOURCE), "-o", tmp, "-lm"],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=_BUILD_TIMEOUT_S,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cc)} failed: {done.stderr.strip()[-500:]}")
        os.chmod(tmp, 0o755)  # mkstemp made it 0600: others sharing the cache load it too
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _load():
    global _attention_fn
    from megatron.early_exit.assets import cache_root

    lib = ctypes.CDLL(str(_build(cache_root() / "kernels")))
    fn = lib.rows_gemv
    fn.restype = None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64]
    attn = lib.rows_attention
    attn.restype = ctypes.c_int
    attn.argtypes = [ptr, ptr, ptr, i64, i64, i64, ptr, i64, ptr, i64, i64, i64, i64, i64, i64,
                     ctypes.c_float, ptr, ptr]  # fmt: skip
    takes = lib.rows_attention_takes
    takes.restype = ctypes.c_int
    takes.argtypes = [i64, i64]
    attn.takes = takes
    # a miscompiled kernel must not decode
    cpu = dict(generator=torch.Generator().manual_seed(0), dtype=torch.float32, device="cpu")
    _check_products(fn, cpu)
    _check_attention(attn, cpu)
    _attention_fn = attn
    return fn


def _check_products(fn, cpu: dict) -> None:
    """Every row count, with and without bias (cpu: randn arguments, whatever the defaults)."""
    w, b = torch.randn(37, 53, **cpu), torch.randn(37, **cpu)
    for rows in range(1, MAX_KERNEL_ROWS + 1):
        x = torch.randn(rows, 53, **cpu)
        for bias in (None, b):
            got = _call(fn, x, w, bias)
            if not torch.allclose(got, F.linear(x, w, bias), rtol=1e-5, atol=1e-5):
                raise RuntimeError(f"the built kernel disagrees with F.linear at {rows} rows")


def _check_attention(attn, cpu: dict) -> None:
    """Each row count the attention takes, with and without key limits."""
    g = cpu["generator"]
    k, v = torch.randn(2, 2, 40, 2, 32, **cpu)
    rows_idx = torch.tensor([1, 0], device="cpu")
    for n in range(1, MAX_KERNEL_ROWS + 1):
        if not attn.takes(n, 32):
            continue
        q = torch.randn(n, 2, 6, 32, **cpu)
        limits = torch.randint(1, 38, (2, n), generator=g, device="cpu")
        for lim in (None, limits):
            got = _attend(attn, q, k, v, rows_idx, lim, 37, 0.2)
            want = reference_attention(q, k, v, rows_idx, lim, 37, 0.2)
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
                raise RuntimeError(f"the built attention disagrees with torch's at {n} rows")


def visible_keys(limits: torch.Tensor, length: int) -> torch.Tensor:
    """[b, 1, n, length] True where a row may attend a key: key < its limit (limits [b, n],
    a row's position + 1). The one definition of the decode mask (layers.Chunk too)."""
    b, n = limits.shape
    keys = torch.arange(length, device=limits.device)
    return keys.view(1, 1, 1, -1) < limits.view(b, 1, n, 1)


def reference_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_rows: torch.Tensor,
    limits: torch.Tensor | None,
    length: int,
    scale: float,
) -> torch.Tensor:
    """What `attention` computes, in torch ops: q [n, b, heads, d] attends keys [0, limit)
    (limits [b, n]; None: `length`) of its sequence's cache row, heads grouped over the
    cache's groups (grouped-query attention)."""
    n, b, heads, d = q.shape
    per = heads // k_cache.shape[2]
    k = k_cache[cache_rows, :length].repeat_interleave(per, dim=2)  # [b, T, heads, d]
    v = v_cache[cache_rows, :length].repeat_interleave(per, dim=2)
    scores = torch.einsum("nbhd,bthd->bhnt", q, k) * scale
    if limits is not None:
        scores = scores.masked_fill(~visible_keys(limits, length), -torch.inf)
    return torch.einsum("bhnt,bthd->nbhd", scores.softmax(-1), v)


def _attend(fn, q, k_cache, v_cache, cache_rows, limits, length: int, scale: float):
    n, b, heads, d = q.shape
    groups = k_cache.shape[2]
    out = q.new_empty(q.shape)
    scratch = q.new_empty(n * heads * (length + 1))
    s_seq, s_t, s_g = k_cache.stride()[:3]
    rc = fn(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), s_seq, s_t, s_g,
        cache_rows.data_ptr(), k_cache.shape[0], None if limits is None else limits.data_ptr(),
        n, b, groups, heads // groups, d, length, scale, scratch.data_ptr(), out.data_ptr(),
    )  # fmt: skip
    if rc != 0:  # the shape was checked (`_attention_takes`): a row outside the cache
        raise IndexError(f"cache rows {cache_rows.tolist()} outside [0, {k_cache.shape[0]})")
    return out


def _index_ok(t: torch.Tensor, shape: tuple) -> bool:
    return (
        t.dtype is torch.long
        and t.device.type == "cpu"
        and tuple(t.shape) == shape
        and t.is_contiguous()
    )


def _attention_takes(fn, q, k_cache, v_cache, cache_rows, limits, length: int) -> bool:
    if fn is None or torch.get_num_threads() != 1 or q.dim() != 4 or k_cache.dim() != 4:
        return False
    n, b, heads, d = q.shape
    tensors = (q, k_cache, v_cache)
    return (
        all(t.dtype is torch.float32 and t.device.type == "cpu" for t in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and q.is_contiguous()
        and k_cache.shape == v_cache.shape
        and k_cache.stride() == v_cache.stride()
        and k_cache.stride(3) == 1
        and k_cache.shape[3] == d
        and k_cache.shape[2] > 0
        and heads % k_cache.shape[2] == 0
        and 0 < length <= k_cache.shape[1]
        and _index_ok(cache_rows, (b,))
        and (limits is None or _index_ok(limits, (b, n)))
        and bool(fn.takes(n, d))
    )


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_rows: torch.Tensor,
    limits: torch.Tensor | None,
    length: int,
    scale: float,
) -> torch.Tensor | None:
    """`reference_attention` by the C kernel where it applies (a decode step on one thread:
    fp32 CPU tensors, no autograd, 1-8 new positions per sequence), else None. q [n, b,
    heads, d] contiguous; caches [B, L, groups, d] with unit stride along d."""
    if not _enabled or _fn is False or torch.compiler.is_compiling():
        return None
    if _fn is None and kernel() is None:
        return None
    if not _attention_takes(_attention_fn, q, k_cache, v_cache, cache_rows, limits, length):
        return None
    return _attend(_attention_fn, q, k_cache, v_cache, cache_rows, limits, length, scale)


def kernel():
    """The C function, compiled and loaded on first use; None if disabled or unavailable."""
    global _fn
    if not _enabled:
        return None
    if _fn is None:
        try:
            _fn = _load()
        except (OSError, RuntimeError, ValueError, AttributeError, subprocess.SubprocessError) as e:
            log.warning("rows kernels unavailable (%s); decoding uses torch's kernels", e)
            _fn = False
    return _fn or None


def _pool(threads: int) -> ThreadPoolExecutor:
    """A pool of threads - 1 workers per thread count, never shut down while in use (torch's
    thread count is per Python thread: two callers may want different pools at once)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            pool = _POOLS[threads] = ThreadPoolExecutor(threads - 1, thread_name_prefix="rows")
        return pool


def _call(
    fn, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, threads: int = 1
) -> torch.Tensor:
    """y = F.linear(x, weight, bias) for x [..., k] whose rows are evenly spaced (a contiguous
    tensor, or a 2-D one with unit stride along k): y [..., n]. With threads > 1 the output
    columns are split into that many slices, one per thread (ctypes releases the GIL), the
    caller's thread taking the last."""
    k = x.shape[-1]
    rows = x.numel() // max(1, k)
    ldx = x.stride(0) if x.dim() == 2 else k
    n = weight.shape[0]
    y = x.new_empty((*x.shape[:-1], n))
    xp, wp, yp = x.data_ptr(), weight.data_ptr(), y.data_ptr()
    bp = None if bias is None else bias.data_ptr()
    if threads <= 1:
        fn(xp, ldx, wp, bp, yp, n, rows, n, k)
        return y
    size = x.element_size()

    def part(o: int, m: int) -> None:
        b = None if bp is None else bp + size * o
        fn(xp, ldx, wp + size * o * k, b, yp + size * o, n, rows, m, k)

    step = -(-n // threads)
    starts = list(range(0, n, step))
    pool, done = _pool(threads), []
    try:
        for o in starts[:-1]:
            done.append(pool.submit(part, o, step))
        part(starts[-1], n - starts[-1])
    finally:
        wait(done)  # never leave a worker writing into y (or reading x) after an error
    for f in done:
        f.result()
    return y


def plan(rows: int, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> int:
    """The threads the kernel computes this product on; 0 where it does not apply. Cheap
    checks first: this runs for every product."""
    if (
        not _enabled
        or _fn is False
        or rows > MAX_KERNEL_ROWS
        or torch.compiler.is_compiling()  # before the calls below, which dynamo cannot trace
        or weight.dtype is not torch.float32
        or h.dtype is not torch.float32
        or weight.device.type != "cpu"
        or h.device.type != "cpu"
        or weight.dim() != 2
        or h.dim() == 0
        or not 0 < h.shape[-1] == weight.shape[1]  # else F.linear raises the shape error
        or not weight.is_contiguous()
        or (
            bias is not None
            and (
                bias.dtype is not torch.float32
                or tuple(bias.shape) != (weight.shape[0],)  # F.linear broadcasts others
                or not bias.is_contiguous()
                or bias.device.type != "cpu"
            )
        )
        or (
            torch.is_grad_enabled()
            and (
                weight.requires_grad or h.requires_grad or (bias is not None and bias.requires_grad)
            )
        )
    ):
        return 0
    threads = torch.get_num_threads()
    if threads == 1:
        return 1
    return threads if weight.numel() >= SPLIT_MIN_NUMEL else 0  # a layer's product: torch's


def linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """F.linear(h, weight, bias) by the C kernel where it applies, else None."""
    rows = math.prod(h.shape[:-1])
    threads = plan(rows, h, weight, bias)
    if not threads:
        return None
    fn = _fn or kernel()
    if fn is None:
        return None
    if not (h.is_contiguous() or (h.dim() == 2 and h.stride(-1) == 1)):
        h = h.contiguous()
    return _call(fn, h, weight, bias, threads)


@torch.library.custom_op("ee_megatron::rows_linear", mutates_args=(), device_types="cpu")
def rows_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel as an op a compiled graph can call (dynamo cannot trace the ctypes call).
    It decides at run time like `linear`, with F.linear where the kernel does not apply."""
    out = linear(h, weight, bias)
    return F.linear(h, weight, bias) if out is None else out


@rows_linear.register_fake
def _(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return h.new_empty((*h.shape[:-1], weight.shape[0]))


def in_graph(rows, h: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a compiled graph calls `rows_linear` for this product: only checks dynamo can
    trace (the kernel must have been loaded before compiling: `kernel()`)."""
    return (
        _enabled
        and _fn is not None
        and _fn is not False
        and rows <= MAX_KERNEL_ROWS
        and weight.dtype == torch.float32
        and h.dtype == torch.float32
        and weight.device.type == "cpu"
    )


def attention_in_graph(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether a compiled graph calls the attention op (layers.decode_attention) for these
    rows: only checks dynamo can trace (the library must have been loaded before compiling);
    the op decides the rest at run time, with torch's SDPA where the kernel declines."""
    return (
        _enabled
        and _fn is not None
        and _fn is not False
        and _attention_fn is not None
        and q.shape[0] <= MAX_KERNEL_ROWS
        and q.dtype == torch.float32
        and k_cache.dtype == torch.float32
        and q.device.type == "cpu"
    )
