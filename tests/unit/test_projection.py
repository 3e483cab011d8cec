"""Row-count-dependent vocabulary projection (inference/projection.py): equal to F.linear,
and the engine's heads give the same tokens through it; the cost model's calibration on the
same tiny engine (one process world for both: its setup is the expensive part)."""

import pytest
import torch
import torch.nn.functional as F

from megatron.early_exit.inference import projection, rows_kernel
from tests.single_process import tp1pp1_world

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("bias", [False, True])
def test_project_equals_linear_for_every_row_count(bias, monkeypatch):
    big = torch.empty(512, 512)  # MIN_THIN_NUMEL: 256k elements, 1 MB in fp32
    assert [projection.thin_rows(r, big) for r in (1, 2, 8, 9)] == [False, True, True, False]
    assert not projection.thin_rows(4, big[:, :256])  # small weights stay on F.linear
    monkeypatch.setattr(projection, "MIN_THIN_NUMEL", 0)  # the same kernels on a small weight
    monkeypatch.setattr(projection, "MIN_COLUMN_NUMEL", 0)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3000, 256, generator=g) / 16
    b = torch.randn(3000, generator=g) if bias else None
    for rows in range(1, 11):
        for shape in ((rows, 256), (1, rows, 256)):
            h = torch.randn(*shape, generator=g)
            out = projection.project(h, w, b)
            assert out.shape == (*shape[:-1], 3000) and out.is_contiguous()
            torch.testing.assert_close(out, F.linear(h, w, b), rtol=1e-5, atol=1e-5)
    assert projection.column_major(w) is not None  # 1-3 rows above took the copy
    assert projection.column_major(w.t()) is None  # narrow weights keep F.linear


def test_column_major_copy_follows_in_place_changes(monkeypatch):
    """A weight overwritten in place (a checkpoint loaded into the same model) is copied
    again: the products never use stale values. Turning the copies off drops them."""
    monkeypatch.setattr(projection, "MIN_COLUMN_NUMEL", 0)
    w = torch.nn.Parameter(torch.randn(300, 64), requires_grad=False)
    h = torch.randn(2, 64)
    first = projection.column_major(w)
    assert first is not None and first.shape == (64, 300) and first.is_contiguous()
    assert projection.column_major(w) is first  # reused while the weight is unchanged
    with torch.no_grad():
        w.copy_(torch.randn(300, 64))
    torch.testing.assert_close(projection.project(h, w), F.linear(h, w), rtol=1e-5, atol=1e-5)
    assert projection.column_major(w) is not first
    projection.set_column_major_copies(False)
    try:
        assert projection.column_major(w) is None
        torch.testing.assert_close(projection.project(h, w), F.linear(h, w))
    finally:
        projection.set_column_major_copies(True)


@pytest.fixture(scope="module")
def dist_world():
    yield from tp1pp1_world(seed=7)


@pytest.fixture(scope="module")
def engine(dist_world):
    from tests.unit.test_inference import _engine

    return _engine(llama=True)


def test_engine_heads_through_thin_path_equal_linear(engine, monkeypatch):
    """Every head and layer matmul of a tiny model forced onto W @ x^T (4-8 rows) and the
    column-major copies (1-3 rows): the same tokens and exits (full model, lossy early
    exit, self-speculative, whose verification projects 4 rows)."""
    from tests.unit.test_inference import PROMPTS, _req

    modes = [
        {},
        {"mode": "early_exit", "threshold": 0.6},
        {"mode": "self_speculative", "draft_exit_layer": 2, "draft_length": 3},
    ]

    def run():
        return [engine.generate([_req(p, 8, **ee) for p in PROMPTS]) for ee in modes]

    ref = run()
    monkeypatch.setattr(rows_kernel, "_enabled", False)  # the layers' 1-8-row products too
    monkeypatch.setattr(projection, "MIN_THIN_NUMEL", 0)
    monkeypatch.setattr(projection, "MIN_COLUMN_NUMEL", 0)
    copied = []
    column_major = projection.column_major
    monkeypatch.setattr(
        projection, "column_major", lambda w: copied.append(column_major(w)) or copied[-1]
    )
    calls = []
    thin_rows = projection.thin_rows
    monkeypatch.setattr(
        projection, "thin_rows", lambda *a: calls.append(thin_rows(*a)) or calls[-1]
    )
    thin = run()
    monkeypatch.undo()
    assert any(calls), "the thin path was not taken"
    assert any(c is not None for c in copied), "no column-major copy was used"
    for a_mode, b_mode in zip(ref, thin):
        for a, b in zip(a_mode, b_mode):
            assert a.token_ids == b.token_ids and a.exit_layers == b.exit_layers


def test_engine_through_the_rows_kernel_equals_torch_kernels(engine, monkeypatch):
    """On one thread every 1-8-row product (layers, heads, exits, drafts, 4-row
    verification) and the attention of those rows go to the C kernels: the same tokens and
    exits as torch's kernels, and no column-major copy is made."""
    from tests.unit.test_inference import PROMPTS, _req

    modes = [
        {},
        {"mode": "early_exit", "threshold": 0.6},
        {"mode": "self_speculative", "draft_exit_layer": 2, "draft_length": 3},
    ]

    def run():
        return [engine.generate([_req(p, 8, **ee) for p in PROMPTS]) for ee in modes]

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(projection, "MIN_COLUMN_NUMEL", 0)  # copies even of tiny weights
    try:
        rows_kernel.set_rows_kernel(False)
        projection._COPIES.clear()
        ref = run()
        assert len(projection._COPIES) > 0  # torch's kernels took column-major copies
        rows_kernel.set_rows_kernel(True)
        calls = []
        linear = rows_kernel.linear

        def recording(h, *args):
            out = linear(h, *args)
            if out is not None:
                calls.append(h.shape)
            return out

        monkeypatch.setattr(rows_kernel, "linear", recording)
        attended, head_dims = [], set()
        attention = rows_kernel.attention

        def recording_attention(q, *args):
            out = attention(q, *args)
            if out is not None:
                attended.append(q.shape[0])
            head_dims.add(q.shape[-1])
            return out

        monkeypatch.setattr(rows_kernel, "attention", recording_attention)
        projection._COPIES.clear()
        got = run()
        assert len(projection._COPIES) == 0  # the kernel needs no column-major copies
    finally:
        rows_kernel.set_rows_kernel(True)
        torch.set_num_threads(before)
    assert {s.numel() // s[-1] for s in calls} >= {1, 4}  # decode rows and a verification
    # the C attention too: decode steps, and a verification where the body takes 4 rows
    (d,) = head_dims
    assert set(attended) >= ({1, 4} if rows_kernel._attention_fn.takes(4, d) else {1})
    for a_mode, b_mode in zip(ref, got):
        for a, b in zip(a_mode, b_mode):
            assert a.token_ids == b.token_ids and a.exit_layers == b.exit_layers


def test_cost_model_calibrates_on_tiny_engine(engine):
    from megatron.early_exit.inference.cost_model import calibrate

    cm = calibrate(engine, rows=(1, 2, 4), rounds=2, tokens=4)
    assert cm.rows == [1, 2, 4] and cm.num_layers == engine.limits.num_layers
    for curve in (cm.layer_ms, cm.weights_ms, cm.head_ms):
        assert len(curve) == 3 and all(t > 0 for t in curve)
    assert set(cm.exit_head_ms) == set(engine.limits.exit_layers) == set(cm.exit_block_ms)
    assert all(cm.exit_block_ms[e] > 0 for e in cm.exit_block_ms)  # llama: exit blocks
    assert cm.step_overhead_ms >= 0 and cm.full_step(1) > cm.layer(1)


def test_decode_steps_run_their_layers_with_the_decode_thread_count(engine, monkeypatch):
    """At 2 torch threads the layers of a decode step (<= 8 rows) run on
    `--inference-decode-threads` threads and the count is restored after every step;
    prefill chunks and 0 (off) keep torch's count. Tokens do not change."""
    from megatron.early_exit.inference import stage
    from tests.unit.test_inference import PROMPTS, _req

    seen = []  # (rows, threads) of every layer call
    layer_forward = stage.layer_forward

    def recording(layer, h, *args):
        seen.append((h.shape[0] * h.shape[1], torch.get_num_threads()))
        return layer_forward(layer, h, *args)

    def run(threads):
        seen.clear()
        projection.set_decode_threads(threads)
        out = [r.token_ids for r in engine.generate([_req(p, 6) for p in PROMPTS])]
        assert torch.get_num_threads() == 2  # restored
        return out, sorted(set(seen))

    before = torch.get_num_threads()
    monkeypatch.setattr(stage, "layer_forward", recording)
    torch.set_num_threads(2)
    try:
        ref, unchanged = run(0)
        tokens, counted = run(1)
    finally:
        projection.set_decode_threads(1)
        torch.set_num_threads(before)
    assert tokens == ref
    assert {t for _, t in unchanged} == {2}
    prefill = max(PROMPTS, key=len)
    assert len(prefill) > projection.MAX_THIN_ROWS  # the prompt's chunk keeps both threads
    assert {t for r, t in counted if r <= projection.MAX_THIN_ROWS} == {1}
    assert {t for r, t in counted if r > projection.MAX_THIN_ROWS} == {2}
    with pytest.raises(ValueError, match="decode threads must be >= 0"):
        projection.set_decode_threads(-1)
