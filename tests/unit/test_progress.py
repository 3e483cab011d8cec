"""Progress helper: plain periodic lines when the stream is not a terminal."""

from __future__ import annotations

import io

import pytest

from megatron.early_exit.progress import choose_mode, progress

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_at_the_interval_with_rate_and_eta():
    out, clock = io.StringIO(), FakeClock()
    with progress(total=100, desc="convert", unit="layer", stream=out, interval_s=10,
                  clock=clock, mode=None) as bar:  # fmt: skip
        assert bar.mode == "plain"  # StringIO is not a TTY
        for _ in range(100):
            clock.t += 0.5  # 2 layers/s
            bar.update()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # one line per 10 s of a 50 s job, plus the final one
    assert len(lines) == 6, lines
    assert lines[0] == "convert: 20/100 layer (20%), 2.00 layer/s, elapsed 10s, ETA 40s"
    assert lines[-1] == "convert: 100/100 layer (100%), 2.00 layer/s, elapsed 50s (done)"


def test_plain_bytes_scaled_unknown_total_postfix_and_write():
    out, clock = io.StringIO(), FakeClock()
    bar = progress(desc="download", unit="B", unit_scale=True, stream=out, interval_s=5,
                   clock=clock)  # fmt: skip
    bar.set_postfix("loss 2.31")
    clock.t += 5
    bar.update(12_500_000)
    bar.write("a message")
    bar.close()
    bar.close()  # idempotent
    assert out.getvalue().splitlines() == [
        "download: 12.5 MB, 2.5 MB/s, elapsed 5s, loss 2.31",
        "a message",
        "download: 12.5 MB, 2.5 MB/s, elapsed 5s, loss 2.31 (done)",
    ]


def test_echo_keeps_result_lines_on_their_own_stream():
    err, out = io.StringIO(), io.StringIO()
    bar = progress(total=2, desc="bench", stream=err, interval_s=1000, clock=FakeClock())
    bar.echo("row 1", out=out)  # a pipe: a plain print, never on the progress stream
    bar.close()
    assert out.getvalue() == "row 1\n"
    assert err.getvalue() == "bench: 0/2 it (0%), elapsed 0s (done)\n"
    err, out = TTY(), TTY()
    with progress(total=2, desc="bench", stream=err, mode="bar") as bar:
        bar.echo("row 2", out=out)  # both terminals: tqdm writes it above the bar
    assert "row 2" in out.getvalue()
    assert "row 2" not in err.getvalue()
    out = io.StringIO()
    progress(total=1, enabled=False).echo("row 3", out=out)  # results print on every rank
    assert out.getvalue() == "row 3\n"


def test_wrapping_an_iterable_and_disabled():
    out, clock = io.StringIO(), FakeClock()
    assert list(progress(range(3), desc="x", stream=out, clock=clock)) == [0, 1, 2]
    assert out.getvalue() == "x: 3/3 it (100%), elapsed 0s (done)\n"
    quiet = io.StringIO()
    with progress(total=5, stream=quiet, enabled=False) as bar:
        bar.update(5)
        bar.write("hidden")
    assert quiet.getvalue() == ""
    failed = io.StringIO()
    with pytest.raises(RuntimeError), progress(total=5, desc="job", stream=failed):
        raise RuntimeError("boom")
    assert failed.getvalue() == ""  # no "(done)" line for a job that failed


def test_mode_choice():
    assert choose_mode(io.StringIO(), env={}) == "plain"
    assert choose_mode(TTY(), env={}) == "bar"
    assert choose_mode(TTY(), env={"EE_PROGRESS": "plain"}) == "plain"
    assert choose_mode(io.StringIO(), env={"EE_PROGRESS": "off"}) == "off"
    tty = TTY()
    with progress(total=4, desc="tuning", stream=tty, mode=None) as bar:
        assert bar.mode == "bar"
        bar.update(4)
    assert "tuning" in tty.getvalue() and "4/4" in tty.getvalue()
