"""Small file-system helpers shared by every writer: nothing already written is lost on a crash.

Files and folders get the modes the user's umask gives any new file (0644 / 0755 under the usual 022), not the
private 0600 / 0700 of the temp files they are built as: teammates on a shared cluster read run folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from filelock import FileLock


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask would set it for a moment)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = False) -> None:
    """Write via a temp file in the same folder and rename, so readers never see half a file.

    durable: also fsync the file before the rename and the folder after it, so the new content survives a
    power loss or a node crash once this returns (a commit marker; costs two fsyncs).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with open(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)


def atomic_write_text(path: str | Path, text: str, *, durable: bool = False) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def atomic_write_json(path: str | Path, obj: Any, *, durable: bool = False) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", durable=durable)


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries (the files created or renamed in it), to stable storage."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder under `root` (and `root`): what someone else wrote there becomes durable too."""
    root = Path(root)
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder, name))
        fsync_path(folder)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (OpenSSL, ~1.2-1.7 GB/s on one core here; releases the GIL)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_dir(final: str | Path, fill: Callable[[Path], None]) -> Path:
    """Build a folder under a temp sibling name with `fill(tmp)`, then move it into place in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~current_umask())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_lock(folder: str | Path) -> FileLock:
    """Held while a cached folder is checked and built. Jobs that share a cache (a sweep's runs, parallel test
    workers) and want the same folder: one builds it, the others wait and then read it. Without it each builds its
    own copy, and `atomic_dir` replaces the folder under the feet of a job already reading it."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(folder.parent / f".{folder.name}.lock")


def cached_dir(folder: str | Path, marker: str, fill: Callable[[Path], None], rebuild: bool = False) -> Path:
    """`folder`, built once with `atomic_dir(folder, fill)` unless `folder/marker` already exists (or `rebuild`),
    under `build_lock`, so jobs sharing a cache build it once and never read a half-written or replaced copy."""
    folder = Path(folder)
    with build_lock(folder):
        if rebuild or not (folder / marker).is_file():
            atomic_dir(folder, fill)
    return folder


def describe_files(root: str | Path) -> dict[str, dict[str, Any]]:
    """{path under root (posix): {"bytes": size, "sha256": hex}} of every file under `root`. Hashed on a few
    threads: hashlib releases the GIL, and a ZeRO checkpoint has a file per rank."""
    root = Path(root)
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(sha256_file, paths))
    return {
        p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, "sha256": digest}
        for p, digest in zip(paths, digests, strict=True)
    }


def file_problems(
    root: str | Path, files: Mapping[str, Mapping[str, Any]], *, checksums: bool = True
) -> list[str]:
    """One line per file of `files` (as `describe_files` gives them) that is missing under `root`, has another
    size, or (checksums) other bytes; [] when all match. Sizes are checked before any file is hashed."""
    root = Path(root)
    problems, same_size = [], []
    for name, want in files.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif (size := path.stat().st_size) != want["bytes"]:
            problems.append(
                f"{path} is {size} bytes, the manifest says {want['bytes']} (truncated or rewritten)"
            )
        else:
            same_size.append(name)
    if checksums:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            digests = pool.map(sha256_file, [root / name for name in same_size])
            for name, digest in zip(same_size, digests, strict=True):
                if digest != files[name]["sha256"]:
                    problems.append(
                        f"{root / name} has sha256 {digest[:16]}..., the manifest says "
                        f"{files[name]['sha256'][:16]}... (its bytes changed after it was written)"
                    )
    return problems
