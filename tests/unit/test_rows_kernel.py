"""The C kernels for decode-sized work (inference/rows_kernel.py): 1-8-row fp32 products
equal to F.linear and attention equal to torch's, taken only where they run on one thread,
and a clean fallback (one warning, torch's kernels) when they cannot be built or disagree."""

import logging

import pytest
import torch
import torch.nn.functional as F

from megatron.early_exit.inference import projection, rows_kernel

pytestmark = pytest.mark.unit


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """A process that has not loaded the kernel yet, with an empty cache folder."""
    monkeypatch.setattr(rows_kernel, "_fn", None)
    monkeypatch.setattr(rows_kernel, "_attention_fn", None)
    monkeypatch.setenv("EE_CACHE", str(tmp_path))
    yield tmp_path


@pytest.fixture(params=["native", "portable"])
def body(request, monkeypatch, tmp_path):
    """The kernel built for this CPU (AVX-512 intrinsics where torch runs AVX512 kernels),
    and the portable C body that CPUs without AVX-512 get."""
    if request.param == "portable":
        flags = rows_kernel._flags
        monkeypatch.setattr(rows_kernel, "_flags", lambda: [f for f in flags() if f != "-mavx512f"])
        monkeypatch.setattr(rows_kernel, "_fn", None)
        monkeypatch.setattr(rows_kernel, "_attention_fn", None)
        monkeypatch.setenv("EE_CACHE", str(tmp_path))
    assert rows_kernel.kernel() is not None, "the rows kernel did not build on this machine"
    yield request.param


@pytest.mark.parametrize("k", [53, 576, 1536])  # a ragged tail, SmolLM2's hidden and fc2
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_equals_linear(k, bias, body, one_thread):
    g = torch.Generator().manual_seed(k)
    w = torch.randn(300, k, generator=g) / k**0.5
    b = torch.randn(300, generator=g) if bias else None
    for rows in range(1, rows_kernel.MAX_KERNEL_ROWS + 1):
        wide = torch.randn(rows, 2 * k, generator=g)
        # strided rows (2-D: passed as they are; 3-D: copied), and contiguous 3-D rows
        for h in (wide[:, :k], wide[:, :k].unsqueeze(0), wide[:, :k].unsqueeze(0).contiguous()):
            assert rows_kernel.plan(rows, h, w, b)
            out = rows_kernel.linear(h, w, b)
            assert out.shape == (*h.shape[:-1], 300)
            torch.testing.assert_close(out, F.linear(h, w, b), rtol=1e-5, atol=1e-5)
            # a row's result does not depend on the rows computed with it (bitwise)
            assert torch.equal(
                out.reshape(rows, -1)[-1],
                rows_kernel.linear(h[..., -1:, :], w, b)[..., 0, :].reshape(-1),
            )


def test_more_rows_than_a_pass_take_further_passes(body, one_thread):
    """The C function itself takes any row count: beyond 8 rows (a pass) it walks w again,
    each row summed as at one row."""
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(301, 80, generator=g), torch.randn(301, generator=g)
    h = torch.randn(19, 80, generator=g)
    out = rows_kernel._call(rows_kernel.kernel(), h, w, b)
    torch.testing.assert_close(out, F.linear(h, w, b), rtol=1e-5, atol=1e-5)
    for r in (0, 8, 18):
        assert torch.equal(out[r], rows_kernel._call(rows_kernel.kernel(), h[r : r + 1], w, b)[0])


@pytest.mark.parametrize(
    ("machine", "capability", "simd"),
    [
        ("x86_64", "AVX512", ["-mavx2", "-mfma", "-mavx512f"]),
        ("x86_64", "AVX2", ["-mavx2", "-mfma"]),
        ("x86_64", "DEFAULT", []),
        ("aarch64", "DEFAULT", []),
    ],
)
def test_flags_follow_the_cpu_torch_runs_on(machine, capability, simd, monkeypatch):
    monkeypatch.setattr(rows_kernel.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    flags = rows_kernel._flags()
    assert [f for f in flags if f.startswith("-m")] == simd


def _attention_case(g, n, b, groups, per, d, length, masked, cache_rows=None, g_pad=0):
    """q [n, b, heads, d], caches of 5 sequences (groups padded by g_pad channels: strided),
    cache rows, limits (each position's keys: the last n positions before `length`)."""
    k, v = torch.randn(2, 5, length + 3, groups, d + g_pad, generator=g)[..., :d]
    q = torch.randn(n, b, groups * per, d, generator=g)
    rows = torch.tensor(cache_rows if cache_rows is not None else [4, 1, 2][:b])
    pos = torch.arange(length - n, length).repeat(b, 1)
    pos[0] = pos[0] - 2  # sequences at different positions
    limits = (pos + 1).contiguous() if masked else None
    return q, k, v, rows, limits


@pytest.mark.parametrize(("groups", "per", "d"), [(1, 1, 16), (2, 3, 64), (3, 2, 80)])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_equals_torch(groups, per, d, masked, body, one_thread):
    g = torch.Generator().manual_seed(d + per)
    fn = rows_kernel._attention_fn
    took = set()
    for n in range(1, rows_kernel.MAX_KERNEL_ROWS + 1):
        for b, length in ((1, 40), (3, 161)):
            q, k, v, rows, limits = _attention_case(
                g, n, b, groups, per, d, length, masked, g_pad=8
            )
            want = rows_kernel.reference_attention(q, k, v, rows, limits, length, 0.3)
            out = rows_kernel.attention(q, k, v, rows, limits, length, 0.3)
            if not fn.takes(n, d):
                assert out is None
                continue
            took.add(n)
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
            # each row alone gives the same values, bitwise (verification = decoding)
            for j in (0, n - 1):
                one = rows_kernel.attention(
                    q[j : j + 1].contiguous(), k, v, rows, None if limits is None else
                    limits[:, j : j + 1].contiguous(), length, 0.3,
                )  # fmt: skip
                assert torch.equal(one[0], out[j])
    # the AVX-512 body takes 1-8 positions, the portable one decode steps (1)
    assert took == (set(range(1, 9)) if body == "native" and _avx512() else {1})


def _avx512() -> bool:
    return "-mavx512f" in rows_kernel._flags()


def test_attention_declines_what_it_cannot_take(one_thread):
    assert rows_kernel.kernel() is not None
    g = torch.Generator().manual_seed(0)
    n = 2 if rows_kernel._attention_fn.takes(2, 32) else 1  # the portable body: 1 position
    q, k, v, rows, limits = _attention_case(g, n, 2, 2, 2, 32, 20, True)
    assert rows_kernel.attention(q, k, v, rows, limits, 20, 0.5) is not None
    declined = [
        (q.double(), k.double(), v.double(), rows, limits, 20),
        (torch.randn(n, 2, 4, 64)[..., :32], k, v, rows, limits, 20),  # q not contiguous
        (q, k, v[:, :-1], rows, limits, 20),  # caches of different shapes
        (q[..., :16].contiguous(), k, v, rows, limits, 20),  # another head size
        (q[:, :, :3].contiguous(), k, v, rows, limits, 20),  # heads not a multiple of groups
        (q, k, v, rows, limits, 0),
        (q, k, v, rows, limits, k.shape[1] + 1),  # longer than the cache
        (q, k, v, rows.int(), limits, 20),
        (q, k, v, rows[:1], limits, 20),
        (q, k, v, rows, limits.t().contiguous().t(), 20),  # limits not contiguous
        (q.to("meta"), k, v, rows, limits, 20),
        (q, k, v, rows.to("meta"), limits, 20),
        (torch.randn(9, 2, 4, 32), k, v, rows, None, 20),  # more than 8 positions
    ]
    for args in declined:
        assert rows_kernel.attention(*args, 0.5) is None
    with torch.enable_grad():
        assert rows_kernel.attention(q.requires_grad_(), k, v, rows, limits, 20, 0.5) is None
    q = q.detach()
    torch.set_num_threads(2)
    assert rows_kernel.attention(q, k, v, rows, limits, 20, 0.5) is None  # torch's threads
    torch.set_num_threads(1)
    with pytest.raises(IndexError, match="outside"):
        rows_kernel.attention(q, k, v, torch.tensor([0, 5]), limits, 20, 0.5)
    rows_kernel.set_rows_kernel(False)
    try:
        assert rows_kernel.attention(q, k, v, rows, limits, 20, 0.5) is None
    finally:
        rows_kernel.set_rows_kernel(True)


def test_attention_propagates_nan_like_torch(body, one_thread):
    """A NaN key or query gives NaN rows, as SDPA does (not a key quietly left out)."""
    g = torch.Generator().manual_seed(5)
    q, k, v, rows, _ = _attention_case(g, 1, 2, 2, 2, 32, 30, False)
    k[rows[0], 3, 0, 5] = float("nan")  # a key of group 0 in sequence 0
    q[0, 1, 2, 0] = float("nan")  # a query head of sequence 1
    out = rows_kernel.attention(q, k, v, rows, None, 30, 0.5)
    want = rows_kernel.reference_attention(q, k, v, rows, None, 30, 0.5)
    assert torch.equal(out.isnan(), want.isnan()) and bool(want.isnan().any())
    torch.testing.assert_close(out.nan_to_num(), want.nan_to_num(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_a_product_split_across_threads_equals_linear(bias, monkeypatch):
    """Heads (>= SPLIT_MIN_NUMEL) are split by output rows across torch's threads, also into
    uneven slices; here every weight is, at 2 and 3 threads."""
    monkeypatch.setattr(rows_kernel, "SPLIT_MIN_NUMEL", 0)
    before = torch.get_num_threads()
    g = torch.Generator().manual_seed(1)
    w = torch.randn(301, 64, generator=g)
    b = torch.randn(301, generator=g) if bias else None
    try:
        for threads in (2, 3):
            torch.set_num_threads(threads)
            for rows in (1, 4):
                h = torch.randn(rows, 64, generator=g)
                assert rows_kernel.plan(rows, h, w, b)
                out = rows_kernel.linear(h, w, b)
                torch.testing.assert_close(out, F.linear(h, w, b), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_project_takes_the_kernel_where_it_applies(one_thread):
    w = torch.randn(64, 32)
    h = torch.randn(2, 32)
    assert rows_kernel.plan(2, h, w, None)
    assert not rows_kernel.plan(rows_kernel.MAX_KERNEL_ROWS + 1, h, w, None)
    assert not rows_kernel.plan(2, h.double(), w.double(), None)
    assert not rows_kernel.plan(2, h, w.t(), None)  # a non-contiguous weight
    w_grad = w.clone().requires_grad_()
    assert not rows_kernel.plan(2, h, w_grad, None)  # autograd keeps torch's kernels
    with torch.no_grad():
        assert rows_kernel.plan(2, h, w_grad, None)
    torch.set_num_threads(2)
    assert not rows_kernel.plan(2, h, w, None)  # a layer's product on 2 threads: torch's
    head = torch.empty(rows_kernel.SPLIT_MIN_NUMEL // 32, 32)
    assert rows_kernel.plan(2, h, head, None)  # a head: split across the 2 threads
    rows_kernel.set_rows_kernel(False)
    try:
        torch.set_num_threads(1)
        assert not rows_kernel.plan(2, h, w, None)  # --no-inference-rows-kernel
    finally:
        rows_kernel.set_rows_kernel(True)


def test_without_a_compiler_one_warning_and_torch_kernels(fresh_kernel, monkeypatch, caplog,
                                                          one_thread):  # fmt: skip
    monkeypatch.setenv("CC", str(fresh_kernel / "no-such-compiler"))
    w, h = torch.randn(40, 16), torch.randn(3, 16)
    with caplog.at_level(logging.WARNING, logger=rows_kernel.__name__):
        first = projection.project(h, w)
        second = projection.project(h, w)
    warnings = [r for r in caplog.records if r.name == rows_kernel.__name__]
    assert len(warnings) == 1 and "rows kernels unavailable" in warnings[0].getMessage()
    assert "no-such-compiler" in warnings[0].getMessage()
    assert not rows_kernel.plan(3, h, w, None)  # not tried again in this process
    torch.testing.assert_close(first, F.linear(h, w))
    torch.testing.assert_close(second, F.linear(h, w))


def test_a_kernel_that_disagrees_with_linear_is_not_used(fresh_kernel, monkeypatch, caplog,
                                                         one_thread):  # fmt: skip
    call = rows_kernel._call
    monkeypatch.setattr(rows_kernel, "_call", lambda *a: call(*a) + 1e-3)  # a miscompiled kernel
    with caplog.at_level(logging.WARNING, logger=rows_kernel.__name__):
        assert rows_kernel.kernel() is None
    assert "disagrees with F.linear" in caplog.text
    assert list(fresh_kernel.glob("kernels/rows_kernels-*.so"))  # built and cached, just not used


def test_an_attention_that_disagrees_with_torch_is_not_used(fresh_kernel, monkeypatch, caplog,
                                                             one_thread):  # fmt: skip
    attend = rows_kernel._attend
    monkeypatch.setattr(rows_kernel, "_attend", lambda *a: attend(*a) + 1e-3)
    with caplog.at_level(logging.WARNING, logger=rows_kernel.__name__):
        assert rows_kernel.kernel() is None
    assert "attention disagrees with torch's" in caplog.text
    q, k, v, rows, limits = _attention_case(torch.Generator(), 1, 1, 1, 1, 16, 8, False)
    assert rows_kernel.attention(q, k, v, rows, limits, 8, 0.5) is None


def test_a_built_kernel_is_reused_from_the_cache(fresh_kernel, monkeypatch, one_thread):
    assert rows_kernel.kernel() is not None
    (lib,) = fresh_kernel.glob("kernels/rows_kernels-*.so")
    stamp = lib.stat().st_mtime_ns
    monkeypatch.setattr(rows_kernel, "_fn", None)  # a new process
    monkeypatch.setattr(rows_kernel, "_attention_fn", None)
    monkeypatch.setattr(rows_kernel.subprocess, "run", None)  # a build would raise TypeError
    assert rows_kernel.kernel() is not None and lib.stat().st_mtime_ns == stamp


def test_a_compiled_graph_calls_the_kernel_as_an_op(one_thread, monkeypatch):
    """dynamo cannot trace the ctypes call: a compiled projection calls the kernel through
    the `ee_megatron::rows_linear` op (backend "eager": no C++ build in this fast test)."""
    assert rows_kernel.kernel() is not None
    calls = []
    linear = rows_kernel.linear

    def recording(h, *args):
        out = linear(h, *args)
        if out is not None:  # the kernel computed it (None: the op fell back to F.linear)
            calls.append(h.shape)
        return out

    monkeypatch.setattr(rows_kernel, "linear", recording)
    torch._dynamo.reset()
    f = torch.compile(projection.project, backend="eager", fullgraph=True)
    w, b = torch.randn(40, 16), torch.randn(40)
    for rows in (1, 3):
        h = torch.randn(1, rows, 16)
        torch.testing.assert_close(f(h, w, b), F.linear(h, w, b), rtol=1e-5, atol=1e-5)
    assert calls == [(1, 1, 16), (1, 3, 16)]


def test_a_compiled_graph_calls_the_attention_as_an_op(one_thread, monkeypatch):
    """The lean step's attention in a compiled graph is the op `ee_megatron::decode_attention`:
    the C kernel where it takes the rows, torch's SDPA where it declines (here: 2 threads),
    both equal to torch's attention."""
    from megatron.early_exit.inference import layers  # noqa: F401  (registers the op)

    assert rows_kernel.kernel() is not None
    calls = []
    attention = rows_kernel.attention

    def recording(q, *args):
        out = attention(q, *args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(rows_kernel, "attention", recording)

    def step(q, k, v, rows, limits, length: int):
        assert rows_kernel.attention_in_graph(q, k)
        return torch.ops.ee_megatron.decode_attention(q, k, v, rows, limits, length, 0.3)

    torch._dynamo.reset()
    f = torch.compile(step, backend="eager", fullgraph=True)
    g = torch.Generator().manual_seed(4)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for masked in (False, True):
            q, k, v, rows, limits = _attention_case(g, 1, 2, 2, 2, 32, 25, masked)
            want = rows_kernel.reference_attention(q, k, v, rows, limits, 25, 0.3)
            torch.testing.assert_close(f(q, k, v, rows, limits, 25), want, rtol=1e-5, atol=1e-5)
    torch.set_num_threads(1)
    assert calls == [True, True, False, False]  # the kernel on one thread, SDPA on two


def test_inputs_the_kernel_cannot_take_go_to_torch(one_thread):
    """Wrong inner size, a bias that is short or would broadcast, a trainable bias, an input
    off the CPU, no columns: the kernel declines, so F.linear raises or answers as usual."""
    assert rows_kernel.kernel() is not None
    w, h = torch.randn(7, 16), torch.randn(2, 16)
    declined = [
        (h, torch.randn(7, 8), None),
        (h, w, torch.randn(3)),
        (h, w, torch.randn(1)),
        (h, w, torch.tensor(0.5)),
        (h, w, torch.randn(7, requires_grad=True)),
        (h.to("meta"), w, None),
        (torch.randn(3, 0), torch.randn(7, 0), torch.randn(7)),
    ]
    for x, weight, bias in declined:
        assert not rows_kernel.plan(2, x, weight, bias)
        assert rows_kernel.linear(x, weight, bias) is None
    with pytest.raises(RuntimeError):
        projection.project(h, torch.randn(7, 8))
    torch.testing.assert_close(
        projection.project(h, w, torch.randn(1).fill_(2.0)), F.linear(h, w) + 2
    )
    empty = projection.project(torch.randn(3, 0), torch.randn(7, 0), torch.ones(7))
    assert torch.equal(empty, torch.ones(3, 7))
    with torch.enable_grad():
        b = torch.zeros(7, requires_grad=True)
        projection.project(h, w, b).sum().backward()
    assert torch.equal(b.grad, torch.full((7,), 2.0))


def test_a_failure_while_split_waits_for_every_slice(monkeypatch):
    """An error while the slices are handed out propagates only after the slices already
    running have finished (they write into the output, read the input)."""
    monkeypatch.setattr(rows_kernel, "SPLIT_MIN_NUMEL", 0)
    assert rows_kernel.kernel() is not None
    pool = rows_kernel._pool(3)
    submitted = []

    class Failing:
        def submit(self, fn, *args):
            if submitted:
                raise RuntimeError("cannot schedule")
            submitted.append(pool.submit(fn, *args))
            return submitted[-1]

    monkeypatch.setattr(rows_kernel, "_pool", lambda threads: Failing())
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with pytest.raises(RuntimeError, match="cannot schedule"):
            rows_kernel.linear(torch.randn(2, 512), torch.randn(3000, 512))
    finally:
        torch.set_num_threads(before)
    assert submitted and submitted[0].done()


def test_callers_on_several_threads_with_different_thread_counts(monkeypatch):
    """torch's thread count is per Python thread: two callers split into 2 and 3 slices at
    once, on pools of their own, and both get F.linear's answers."""
    import threading

    monkeypatch.setattr(rows_kernel, "SPLIT_MIN_NUMEL", 0)
    assert rows_kernel.kernel() is not None
    g = torch.Generator().manual_seed(2)
    w, h = torch.randn(301, 64, generator=g), torch.randn(3, 64, generator=g)
    want = F.linear(h, w)
    errors = []

    def caller(threads):
        torch.set_num_threads(threads)
        for _ in range(200):
            out = rows_kernel.linear(h, w)
            if out is None or not torch.allclose(out, want, rtol=1e-5, atol=1e-5):
                errors.append(threads)
                return

    workers = [threading.Thread(target=caller, args=(t,)) for t in (2, 3)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert errors == []


def test_a_forked_child_splits_on_pools_of_its_own(monkeypatch):
    """The parent's pool workers do not exist in a forked child (they would never run its
    slices): the child makes its own pools."""
    import multiprocessing as mp

    monkeypatch.setattr(rows_kernel, "SPLIT_MIN_NUMEL", 0)
    assert rows_kernel.kernel() is not None
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w, h = torch.randn(301, 64), torch.randn(2, 64)
        want = rows_kernel.linear(h, w)  # the parent's pool for 2 threads exists now
        torch.testing.assert_close(want, F.linear(h, w), rtol=1e-5, atol=1e-5)
        ctx = mp.get_context("fork")
        # the child runs no torch op that could enter OpenMP (not fork-safe once its threads
        # started in the parent): it compares with the parent's split result, bitwise
        child = ctx.Process(target=_split_once, args=(h, w, want))
        child.start()
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
        assert child.exitcode == 0
    finally:
        torch.set_num_threads(before)


def _split_once(h, w, want):
    torch.set_num_threads(2)
    out = rows_kernel.linear(h, w)
    raise SystemExit(0 if out is not None and torch.equal(out, want) else 1)
