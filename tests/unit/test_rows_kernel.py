"""The C kernel for 1-5-row fp32 products (inference/rows_kernel.py): equal to F.linear,
taken only where a product runs on one thread, and a clean fallback (one warning, torch's
kernels) when it cannot be built or disagrees with F.linear."""

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
    monkeypatch.setenv("EE_CACHE", str(tmp_path))
    yield tmp_path


@pytest.mark.parametrize("k", [53, 576, 1536])  # a ragged tail, SmolLM2's hidden and fc2
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_equals_linear(k, bias, one_thread):
    assert rows_kernel.kernel() is not None, "the rows kernel did not build on this machine"
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
    head = torch.empty(rows_kernel.SPLIT_MIN_NUMEL // 64, 64)
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
    assert len(warnings) == 1 and "rows kernel unavailable" in warnings[0].getMessage()
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
    assert list(fresh_kernel.glob("kernels/rows_gemv-*.so"))  # built and cached, just not used


def test_a_built_kernel_is_reused_from_the_cache(fresh_kernel, monkeypatch, one_thread):
    assert rows_kernel.kernel() is not None
    (lib,) = fresh_kernel.glob("kernels/rows_gemv-*.so")
    stamp = lib.stat().st_mtime_ns
    monkeypatch.setattr(rows_kernel, "_fn", None)  # a new process
    monkeypatch.setattr(rows_kernel.subprocess, "run", None)  # a build would raise TypeError
    assert rows_kernel.kernel() is not None and lib.stat().st_mtime_ns == stamp


def test_a_compiled_graph_calls_the_kernel_as_an_op(one_thread, monkeypatch):
    """dynamo cannot trace the ctypes call: a compiled projection calls the kernel through
    the `ee_megatron::rows_linear` op (backend "eager": no C++ build in this fast test)."""
    assert rows_kernel.kernel() is not None
    calls = []
    linear = rows_kernel.linear
    monkeypatch.setattr(rows_kernel, "linear", lambda *a: calls.append(a[0].shape) or linear(*a))
    torch._dynamo.reset()
    f = torch.compile(projection.project, backend="eager", fullgraph=True)
    w, b = torch.randn(40, 16), torch.randn(40)
    for rows in (1, 3):
        h = torch.randn(1, rows, 16)
        torch.testing.assert_close(f(h, w, b), F.linear(h, w, b), rtol=1e-5, atol=1e-5)
    assert calls == [(1, 1, 16), (1, 3, 16)]
