"""Progress on long jobs: a tqdm bar (rate, ETA) on a terminal, plain lines in logs.

    from megatron.early_exit.progress import progress

    with progress(total=n_bytes, desc="download", unit="B", unit_scale=True) as bar:
        for chunk in chunks:
            bar.update(len(chunk))

    for item in progress(items, desc="convert"):  # wraps an iterable
        ...

On a terminal (the stream is a TTY) the bar is tqdm's. Otherwise (CI logs, a pipe, a
file) carriage-return bars would turn into megabytes of noise, so the job prints one plain
line at most every `interval_s` seconds, plus one when it ends:

    download: 12.0 MB/98.0 MB (12%), 4.1 MB/s, elapsed 3s, ETA 21s

``EE_PROGRESS`` overrides the choice: ``bar``, ``plain`` or ``off``; ``EE_PROGRESS_INTERVAL``
sets the plain-line period in seconds (default 30). `enabled=False` (e.g. on ranks other
than 0) makes every call a no-op.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

DEFAULT_INTERVAL_S = 30.0
MODES = ("bar", "plain", "off")


def _fmt(n: float, unit: str, scale: bool, rate: bool = False) -> str:
    if scale:
        for prefix, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(n) >= size:
                return f"{n / size:.1f} {prefix}{unit}"
        return f"{n:.0f} {unit}"
    return f"{n:.2f} {unit}" if rate else f"{n:.0f} {unit}"


def _fmt_s(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def choose_mode(stream: IO[str], env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    forced = env.get("EE_PROGRESS", "").strip().lower()
    if forced in MODES:
        return forced
    isatty = getattr(stream, "isatty", None)
    try:
        return "bar" if isatty is not None and isatty() else "plain"
    except ValueError:  # closed stream
        return "off"


class Progress:
    """One job's progress; use `progress()` to make one. Also iterable when wrapping."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: float | None = None,
        desc: str = "",
        unit: str = "it",
        unit_scale: bool = False,
        initial: float = 0,
        stream: IO[str] | None = None,
        mode: str | None = None,
        enabled: bool = True,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.desc = desc
        self.unit = unit
        self.unit_scale = unit_scale
        self.n = initial
        self._stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.mode = "off" if not enabled else (mode or choose_mode(self._stream))
        if interval_s is None:
            try:
                interval_s = float(os.environ.get("EE_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S))
            except ValueError:
                interval_s = DEFAULT_INTERVAL_S
        self.interval_s = interval_s
        self._clock = clock
        self._start = clock()
        self._last_line = self._start
        self._postfix = ""
        self._closed = False
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=desc,
                unit=unit,
                unit_scale=unit_scale,
                initial=initial,
                file=self._stream,
                dynamic_ncols=True,
                mininterval=0.5,
            )

    # ---- updates -----------------------------------------------------------------------
    def update(self, n: float = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "plain":
            now = self._clock()
            if now - self._last_line >= self.interval_s:
                self._last_line = now
                self._print(self.line(now))

    def set_postfix(self, text: str) -> None:
        """A short status shown after the counts (e.g. the current loss)."""
        self._postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def write(self, message: str) -> None:
        """Print a message without breaking the bar (also with EE_PROGRESS=off; not when
        disabled)."""
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        elif self.enabled:
            self._print(message)

    def echo(self, message: str, out: IO[str] | None = None) -> None:
        """Print a result line to `out` (stdout): above the bar when both the bar and `out`
        are on a terminal, otherwise a plain print, so that piped results stay on stdout."""
        out = sys.stdout if out is None else out
        isatty = getattr(out, "isatty", None)
        if self._bar is not None and isatty is not None and isatty():
            self._bar.write(message, file=out)
        else:
            with contextlib.suppress(OSError, ValueError):
                print(message, file=out, flush=True)

    def close(self, summary: bool = True) -> None:
        """End the job; `summary=False` (it failed) prints no final plain line."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "plain" and summary:
            self._print(self.line(self._clock(), final=True))

    # ---- plain lines -------------------------------------------------------------------
    def line(self, now: float, final: bool = False) -> str:
        elapsed = max(now - self._start, 0.0)
        parts = []
        if self.unit_scale:  # "12.5 MB/98.0 MB"
            counts = _fmt(self.n, self.unit, True)
            if self.total:
                counts += "/" + _fmt(self.total, self.unit, True)
        else:  # "20/100 layer"
            counts = f"{self.n:.0f}" + (f"/{self.total:.0f}" if self.total else "")
            counts += f" {self.unit}"
        if self.total:
            counts += f" ({100.0 * self.n / self.total:.0f}%)"
        parts.append(counts)
        rate = self.n / elapsed if elapsed > 0 else 0.0
        if elapsed > 0:
            parts.append(f"{_fmt(rate, self.unit, self.unit_scale, rate=True)}/s")
        parts.append(f"elapsed {_fmt_s(elapsed)}")
        if not final and self.total and rate > 0:
            parts.append(f"ETA {_fmt_s(max(self.total - self.n, 0) / rate)}")
        if self._postfix:
            parts.append(self._postfix)
        head = f"{self.desc}: " if self.desc else ""
        return head + ", ".join(p for p in parts if p) + (" (done)" if final else "")

    def _print(self, text: str) -> None:
        # a closed pipe must never kill the job
        with contextlib.suppress(OSError, ValueError):
            print(text, file=self._stream, flush=True)

    # ---- context manager / iteration ---------------------------------------------------
    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(summary=exc_type is None)

    def __iter__(self) -> Iterator[Any]:
        if self._iterable is None:
            raise TypeError("this Progress wraps no iterable")
        for item in self._iterable:
            yield item
            self.update(1)
        self.close()


def progress(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Progress:
    """A Progress over `iterable` (iterate it) or over `total` units (call `update`)."""
    return Progress(iterable, **kwargs)
