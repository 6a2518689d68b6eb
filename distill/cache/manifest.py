"""The cache folder's layout and its JSON manifest, shared by CacheWriter and CacheReader.

A cache folder holds `shard-00000.safetensors`, `shard-00001.safetensors`, ... and `manifest.json`:

    schema_version  int, bumped when this layout changes
    format          "distill-teacher-cache"
    meta            the cache's identity, given by the writer (teacher_hash, tokenizer_hash, k, vocab_size,
                    ids_encoding, logits_encoding, and any other JSON values); every key is compared on resume
    encoding        Encoding.describe(): names, bits per id, bits and step per logit code
    dtypes          {field: dtype name of the decoded TeacherBatch field}, fixed by the first batch
    shards          [{file, sha256, bytes, batch_ids: [[epoch, index], ...], num_tokens: [...]}] in write order
    num_batches, num_tokens   totals over the shards
    complete        True once the writer was closed; False while (or if killed while) writing

Only shards listed in the manifest exist for readers: a shard is renamed into place before the manifest that
lists it is, so a killed writer leaves at worst an unlisted shard or a temp file, which the next writer removes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from distill.batch import BatchId
from distill.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FORMAT = "distill-teacher-cache"
MANIFEST_NAME = "manifest.json"
SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".safetensors"
REQUIRED_META = ("teacher_hash", "tokenizer_hash", "k", "vocab_size", "ids_encoding", "logits_encoding")
BUILD_HINT = "build it with `distill teacher-cache`"


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}{SHARD_SUFFIX}"


def normalise_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Check the required keys and return the meta as the manifest will hold it (JSON types: tuples -> lists)."""
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise ConfigError(
            f"cache manifest_meta lacks {missing}; it needs {list(REQUIRED_META)} (plus any other JSON values "
            f"that identify the cache). Got keys {sorted(meta)}."
        )
    try:
        return json.loads(json.dumps(meta))
    except TypeError as e:
        raise ConfigError(f"cache manifest_meta must hold JSON values only: {e}") from e


def meta_mismatches(cached: dict[str, Any], wanted: dict[str, Any], label: str = "requested") -> list[str]:
    """One line per key of `wanted` whose value differs from `cached`: field, cached and wanted values."""
    wanted = json.loads(json.dumps(wanted))
    return [
        f"{key}: cached {cached.get(key)!r}, {label} {value!r}"
        for key, value in wanted.items()
        if cached.get(key) != value
    ]


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of `root`, None when there is none; CheckpointError when it is unreadable or too new."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"teacher cache manifest {path} is unreadable ({e}); delete the folder and rebuild."
        ) from e
    if manifest.get("format") != FORMAT or manifest.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(
            f"{path} is not a teacher cache of schema version {SCHEMA_VERSION} (format "
            f"{manifest.get('format')!r}, schema_version {manifest.get('schema_version')!r}); "
            f"rebuild it with `distill teacher-cache` into a new folder."
        )
    return manifest


def new_manifest(meta: dict[str, Any], encoding: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "format": FORMAT,
        "meta": meta,
        "encoding": encoding,
        "dtypes": None,
        "shards": [],
        "num_batches": 0,
        "num_tokens": 0,
        "complete": False,
    }


def check_encoding(root: Path, manifest: dict[str, Any], current: dict[str, Any]) -> None:
    """CheckpointError if this code decodes the cache's encoding names differently from when it was written
    (e.g. a changed gap step): the stored codes would then decode to wrong logits without any error."""
    recorded = manifest["encoding"]
    if recorded != json.loads(json.dumps(current)):
        raise CheckpointError(
            f"teacher cache {root} was written with encoding {recorded}, but this version of distill defines "
            f"{current['ids']}/{current['logits']} as {current}; rebuild it with `distill teacher-cache`."
        )


def manifest_batch_ids(manifest: dict[str, Any]) -> list[BatchId]:
    """Every batch id of the listed shards, in write (= batch-id) order."""
    return [(int(e), int(i)) for shard in manifest["shards"] for e, i in shard["batch_ids"]]


def is_stray(path: Path, manifest: dict[str, Any] | None) -> bool:
    """A leftover of an interrupted writer: a temp file of io.py's or ours, or a shard the manifest lacks."""
    name = path.name
    if name.startswith(f".{SHARD_PREFIX}") or name.startswith(f".{MANIFEST_NAME}."):
        return True
    listed = {shard["file"] for shard in manifest["shards"]} if manifest else set()
    return name.startswith(SHARD_PREFIX) and name.endswith(SHARD_SUFFIX) and name not in listed


def remove_stray_files(root: Path, manifest: dict[str, Any] | None) -> list[Path]:
    """Delete what an interrupted writer left behind (never a listed shard or a foreign file)."""
    removed = [path for path in sorted(root.iterdir()) if path.is_file() and is_stray(path, manifest)]
    for path in removed:
        log.info("teacher cache %s: removing %s left by an interrupted writer", root, path.name)
        path.unlink()
    return removed
