"""Fill the ctm-lab weight cache on a machine with internet (e.g. the login node).

    python -m cluster.prefetch                      # every entry of the registry
    python -m cluster.prefetch --only vgg16_lpips   # just one (repeatable)
    python -m cluster.prefetch --list               # what is present / missing, no downloads
    python -m cluster.prefetch --cache-dir /shared/ctm-cache ...

Compute nodes then read the files from the same cache (point CTM_LAB_CACHE at it) without
touching the network. Each file is written under a temporary name and renamed into place,
so an interrupted download never leaves a truncated file that looks present.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ctm_core.pretrained import WEIGHTS, WeightEntry, resolve_cache_dir


def _atomic_target(final: Path):
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    os.close(fd)
    return Path(tmp)


def _save_state_dict_atomically(state: dict, final: Path) -> None:
    import torch

    tmp = _atomic_target(final)
    try:
        torch.save(state, tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _fetch_torchvision(entry: WeightEntry, final: Path) -> None:
    import torchvision

    builder, member = entry.source.split(":")
    weights_enum = torchvision.models.get_model_weights(builder)
    state = weights_enum[member].get_state_dict(progress=True)
    _save_state_dict_atomically(state, final)


def _fetch_timm(entry: WeightEntry, final: Path) -> None:
    import timm

    model = timm.create_model(entry.source, pretrained=True)
    _save_state_dict_atomically(model.state_dict(), final)


def _fetch_url(entry: WeightEntry, final: Path) -> None:
    import torch

    tmp = _atomic_target(final)
    try:
        torch.hub.download_url_to_file(entry.source, str(tmp), hash_prefix=entry.hash_prefix, progress=True)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


FETCHERS = {"torchvision": _fetch_torchvision, "timm": _fetch_timm, "url": _fetch_url}


def fetch_entry(entry: WeightEntry, cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Download one registry entry into the cache (skipped when present, unless force)."""
    final = entry.path(cache_dir)
    if final.is_file() and not force:
        return final
    if entry.source_kind not in FETCHERS:
        raise ValueError(f"entry {entry.name!r} has unknown source_kind {entry.source_kind!r}")
    FETCHERS[entry.source_kind](entry, final)
    return final


def format_listing(cache_dir: str | os.PathLike | None = None) -> str:
    """One line per registry entry: name, present/missing, path, description."""
    root = resolve_cache_dir(cache_dir)
    lines = [f"cache dir: {root}"]
    width = max(len(name) for name in WEIGHTS)
    for entry in WEIGHTS.values():
        path = entry.path(root)
        state = "present" if path.is_file() else "missing"
        lines.append(f"{entry.name:<{width}}  {state:<7}  {path}  ({entry.description})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.prefetch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None, help="cache directory (default: $CTM_LAB_CACHE or ~/.cache/ctm-lab)")
    parser.add_argument("--only", nargs="+", action="extend", default=None, metavar="NAME",
                        choices=sorted(WEIGHTS), help="fetch only these entries")
    parser.add_argument("--list", action="store_true", help="show entries and whether they are present; no downloads")
    parser.add_argument("--force", action="store_true", help="download again even when present")
    args = parser.parse_args(argv)

    if args.list:
        print(format_listing(args.cache_dir))
        return 0

    names = list(dict.fromkeys(args.only)) if args.only else list(WEIGHTS)
    failures = []
    for name in names:
        entry = WEIGHTS[name]
        try:
            path = fetch_entry(entry, args.cache_dir, force=args.force)
            print(f"{name}: ok  {path}")
        except Exception as err:  # report every entry, then fail
            failures.append(name)
            print(f"{name}: FAILED ({type(err).__name__}: {err})", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
