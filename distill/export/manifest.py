"""Every export is one folder with a manifest.json (format, source, each file's size and sha256), built in a temp
sibling and renamed into place; a reader verifies the manifest before it loads anything, so a truncated or
rewritten file is refused by name instead of failing deep inside a runtime (or worse, loading)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distill.errors import CheckpointError
from distill.io import atomic_dir, atomic_write_json, describe_files, file_problems

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


def write_export(final: Path, fmt: str, source: Path, fill: Callable[[Path], None]) -> Path:
    """`fill(tmp)` writes the format's files; the manifest is written last, then the folder renamed to `final`."""

    def build(tmp: Path) -> None:
        fill(tmp)
        files = describe_files(tmp)
        atomic_write_json(
            tmp / MANIFEST,
            {
                "schema_version": SCHEMA_VERSION,
                "format": fmt,
                "source": str(source.resolve()),
                "files": files,
            },
            durable=True,
        )

    return atomic_dir(final, build)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: {folder} is not a finished `distill export` folder (an interrupted export leaves "
            "none); export it again."
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); export the model again.") from err
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(
            f"{path} has schema_version {manifest.get('schema_version')!r}, this version reads {SCHEMA_VERSION}; "
            "export the model again."
        )
    return manifest


def verify_export(folder: str | Path, fmt: str | None = None) -> dict[str, Any]:
    """The folder's manifest, once every file it lists has its size and sha256; else a CheckpointError naming each
    damaged file. fmt: the format the caller expects to find there."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if fmt is not None and manifest["format"] != fmt:
        raise CheckpointError(f"{folder} holds a {manifest['format']} export, not {fmt}")
    problems = file_problems(folder, manifest["files"])
    if problems:
        raise CheckpointError(
            f"export {folder} is damaged, refusing to load it: " + "; ".join(problems) + ". Export it again."
        )
    return manifest


def weight_bytes(folder: str | Path, suffixes: tuple[str, ...]) -> int:
    """Bytes of the export's weight files (model.onnx, *.gguf, *.safetensors, external data), not the tokenizer."""
    manifest = read_manifest(folder)
    return sum(f["bytes"] for name, f in manifest["files"].items() if name.endswith(suffixes))
