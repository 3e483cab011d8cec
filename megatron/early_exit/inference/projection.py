"""Products of a few hidden rows with a weight: layer matmuls, LM head, exit heads, drafts.

Decoding multiplies 1-8 rows (one per sequence, or the k+1 positions a self-speculative
verification checks) by weights that stream from memory once per call (SmolLM2-135M's LM
head: 49152 x 576, 113 MB in fp32), so the product should cost one read of the weight. On
this project's CPUs (MKL on AVX2, benchmarks/projection_shapes.py) `F.linear(x, W)` with
W stored [out, in] falls short of that in two ways:
* 1-3 rows times a wide weight (out > in: LM head, exit heads, QKV, gate-up) run at about
  half the memory bandwidth. The same product with the weight stored column-major
  (x @ W^T with W^T [in, out] contiguous) reaches it: the LM head at 1 row goes from about
  15 to 8 ms. We keep such a copy next to the weight (`column_major`): it costs that
  weight's memory again, so it is made only on CPU, for wide weights, and can be turned off
  (`--no-inference-column-major-copies`).
* 2-8 rows cost 2-4x one row. W @ x^T (a tall weight times a thin matrix, transposed back)
  keeps 4-8 rows near one weight read; 3 and 7 rows are slow shapes for it too, so they are
  padded to 4 and 8. On such large weights (the heads) the column-major copy takes only 1-2
  rows: at 3 rows the padded W @ x^T is faster.
1-8 fp32 rows go to a small C kernel instead (rows_kernel.py) where the product runs on one
thread (a decode step's layers) or is a head (split across the threads): it streams the
weight at the memory bandwidth at one row, and at 2-8 rows costs 1.1-1.6x that. The rules
above serve where it does not apply (a layer at more threads, more rows, other dtypes, no
C compiler).
All kernels compute the same dot products: fp32 results within 1e-5 of F.linear.

Threads: a token's layer products (1-8 rows times weights of 1-7 MB) are too small to split
across threads. At 2 threads MKL's synchronisation costs more than the second core's share
of the memory bandwidth gains: decoding SmolLM2 with the layers single-threaded is 1.2x
faster (benchmarks/results/decode_speed.md). `decode_threads` runs such steps with
`--inference-decode-threads` threads; prefill and the large heads keep torch's setting.

The rule is fixed rather than calibrated at load: a calibration on a shared CPU picks by
noise, and a fixed rule gives the same kernel, hence the same logits, on every run.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from megatron.early_exit.inference import rows_kernel

MAX_THIN_ROWS = 8  # up to this many rows use W @ x^T; prefill-sized chunks keep F.linear
MIN_THIN_NUMEL = 1 << 18  # below 256k elements (1 MB fp32) F.linear is as fast
MAX_COLUMN_ROWS = 3  # 1-3 rows use the column-major copy; from 4 rows W @ x^T is faster
MAX_COLUMN_ROWS_THIN = 2  # on weights that take W @ x^T, the copy serves 1-2 rows
THIN_PAD = {3: 4, 7: 8}  # row counts W @ x^T computes padded (measured slow shapes)
MIN_COLUMN_NUMEL = 1 << 18  # below 256k elements the copy saves too little to keep

_copies_enabled = True
_decode_threads = 1  # threads for decode steps of <= MAX_THIN_ROWS rows; 0: torch's setting
# weight -> (its _version and data_ptr when copied, the [in, out] copy). A weight changed in
# place (a checkpoint loaded into the same model) gets a new copy on its next use.
_COPIES = WeakIdKeyDictionary()


def set_column_major_copies(enabled: bool) -> None:
    """Whether wide CPU weights get a column-major copy for 1-3-row products."""
    global _copies_enabled
    _copies_enabled = enabled
    if not enabled:
        _COPIES.clear()


def set_decode_threads(threads: int) -> None:
    """CPU threads for the layers of decode steps of at most MAX_THIN_ROWS rows (0: keep
    torch's thread count)."""
    global _decode_threads
    if threads < 0:
        raise ValueError(f"decode threads must be >= 0, got {threads}")
    _decode_threads = threads


def get_decode_threads() -> int:
    return _decode_threads


@contextmanager
def decode_threads(rows: int, device: torch.device):
    """Run a step of `rows` rows on `device` with the decode thread count, if it is below
    torch's current one (the count is restored afterwards)."""
    have = torch.get_num_threads()
    if not (0 < _decode_threads < have and rows <= MAX_THIN_ROWS and device.type == "cpu"):
        yield
        return
    torch.set_num_threads(_decode_threads)
    try:
        yield
    finally:
        torch.set_num_threads(have)


def column_major(weight: torch.Tensor) -> torch.Tensor | None:
    """The [in, out] contiguous copy of a wide CPU weight [out, in], or None."""
    if (
        not (
            _copies_enabled
            and weight.device.type == "cpu"
            and weight.dim() == 2
            and weight.shape[0] > weight.shape[1]
            and weight.numel() >= MIN_COLUMN_NUMEL
        )
        or torch.compiler.is_compiling()
    ):
        return None
    key = (weight._version, weight.data_ptr())
    entry = _COPIES.get(weight)
    if entry is None or entry[0] != key:
        with torch.no_grad():
            entry = (key, weight.detach().t().contiguous())
        _COPIES[weight] = entry
    return entry[1]


def thin_rows(rows: int, weight: torch.Tensor) -> bool:
    """Whether `project` computes `rows` rows as W @ x^T (see the module docstring)."""
    return (
        1 < rows <= MAX_THIN_ROWS
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.numel() >= MIN_THIN_NUMEL
    )


def project(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    column: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.linear(h, weight, bias) for h [..., in], with the kernel chosen by row count.
    `column`: the weight's column-major copy if the caller has it (a compiled step, which
    cannot look it up), else `column_major(weight)` is used."""
    rows = h.numel() // max(1, h.shape[-1])
    if torch.compiler.is_compiling():
        # a column-major copy passed in means the step's caller found the kernel would not
        # serve it (layers._kernel_takes: more than one thread)
        if column is None and rows_kernel.in_graph(rows, h, weight):
            return torch.ops.ee_megatron.rows_linear(h, weight, bias)
    else:
        out = rows_kernel.linear(h, weight, bias)
        if out is not None:
            return out
    thin = thin_rows(rows, weight)
    if rows <= (MAX_COLUMN_ROWS_THIN if thin else MAX_COLUMN_ROWS):
        wt = column if column is not None else column_major(weight)
        if wt is not None:
            out = torch.matmul(h, wt)
            return out if bias is None else out + bias
    if not thin:
        return F.linear(h, weight, bias)
    x = h.reshape(rows, h.shape[-1])
    if rows in THIN_PAD:
        x = torch.cat((x, x.new_zeros(THIN_PAD[rows] - rows, x.shape[1])))
    out = torch.mm(weight, x.t()).t()[:rows]  # [rows, out]: a view of the [out, rows] product
    if bias is not None:
        out = out + bias
    return out.contiguous().view(*h.shape[:-1], weight.shape[0])
