"""Datasets: the embedded task as a `DatasetDict`, and user data from jsonl, parquet or a saved folder.

Both return `DatasetDict({"train", "eval"})` whose rows have `messages` (a list of {role, content}) or
`text`, which is all `formatting.encode_example` needs.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import datasets
import numpy as np

from distill.data.task import iter_problems
from distill.errors import ConfigError

# A question is held out iff its hash falls in this fraction of the hash space. The split depends on the
# question text alone, so a question is in the same split for every seed, size and mixture of domains.
HELD_OUT_FRACTION = 0.2

_EVAL_SPLIT_NAMES = ("eval", "validation", "valid", "test")
_SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")


def is_held_out(question: str) -> bool:
    """Whether `question` belongs to the task's held-out (eval) split."""
    digest = hashlib.sha256(question.encode()).digest()
    return int.from_bytes(digest[:8], "big") < HELD_OUT_FRACTION * 2**64


def _quotas(total: int, parts: int) -> list[int]:
    """Split `total` into `parts` near-equal counts (the first ones get the remainder)."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def _task_row(problem: dict) -> dict:
    messages = [
        {"role": "user", "content": problem["question"]},
        {"role": "assistant", "content": problem["reasoning"]},
    ]
    keys = ("answer", "domain", "level", "id")
    return {"messages": messages, **{key: problem[key] for key in keys}}


def _draw_split(domain: str, level: int, seed: int, num_train: int, num_eval: int) -> tuple[list, list]:
    """Read one (domain, level) stream until both splits have their quota."""
    train, held_out = [], []
    for problem in iter_problems(domain, level, seed):
        if len(train) >= num_train and len(held_out) >= num_eval:
            break
        bucket = held_out if is_held_out(problem["question"]) else train
        quota = num_eval if bucket is held_out else num_train
        if len(bucket) < quota:
            bucket.append(_task_row(problem))
    return train, held_out


def build_task_dataset(
    domains: Iterable[str], levels: Iterable[int], num_train: int, num_eval: int, seed: int
) -> datasets.DatasetDict:
    """The embedded task over every (domain, level) pair, in near-equal shares.

    Rows: `messages` (user = question, assistant = reasoning ending in `#### <answer>`), `answer` (int),
    `domain`, `level`, `id`. `eval` is held out by question hash (see `is_held_out`): no question text is
    in both splits. Questions may repeat within a split. Train rows are shuffled by `seed` so that domains
    and levels interleave; eval rows keep stream order.
    """
    pairs = [(domain, level) for domain in domains for level in levels]
    if not pairs:
        raise ConfigError(f"the task needs at least one domain and one level, got pairs={pairs}")
    if num_train < 0 or num_eval < 0:
        raise ConfigError(f"num_train={num_train} and num_eval={num_eval} must be >= 0")
    train, held_out = [], []
    for (domain, level), n_train, n_eval in zip(
        pairs, _quotas(num_train, len(pairs)), _quotas(num_eval, len(pairs)), strict=True
    ):
        pair_train, pair_eval = _draw_split(domain, level, seed, n_train, n_eval)
        train += pair_train
        held_out += pair_eval
    random.Random(seed).shuffle(train)
    return datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(train), "eval": datasets.Dataset.from_list(held_out)}
    )


# ---------------------------------------------------------------------------------------------------------
# User datasets


def _load_files(kind: str, files: Sequence[Path], cache_dir: str | None) -> datasets.Dataset:
    for f in files:
        _check_not_empty(f)
        if kind == "json":
            _check_utf8(f)
    try:
        return datasets.load_dataset(
            kind, data_files=[str(f) for f in files], split="train", cache_dir=cache_dir
        )
    except Exception as err:  # datasets reports a bad line without its file and line number: find them
        place = _first_bad_json_line(files) if kind == "json" else None
        if place is None:
            raise
        raise ConfigError(
            f"{place}; fix or remove that line (every line of a .jsonl file is one JSON object)"
        ) from err


def _check_not_empty(path: Path) -> None:
    size = path.stat().st_size
    if size == 0 or (size < 2**20 and not path.read_bytes().strip()):
        raise ConfigError(f"dataset file {path} is empty; point data.path at a file with rows")


def _check_utf8(path: Path, chunk_bytes: int = 2**24) -> None:
    """ConfigError naming the line of the first byte that is not UTF-8 (the JSON reader would replace it
    silently). One streaming pass at C speed (about 1 GB/s)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = lines = 0
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                line = lines + chunk.count(b"\n", 0, err.start) + 1
                raise ConfigError(
                    f"{path}:{line}: not valid UTF-8 ({err.reason} at byte {offset + err.start}); re-encode the "
                    "file as UTF-8 or remove that line"
                ) from err
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")


def _first_bad_json_line(files: Sequence[Path]) -> str | None:
    """`file:line: what is wrong` for the first line of a .jsonl file that is not one JSON object, else None.

    Only read after a failed load, so a good dataset is parsed once (by datasets)."""
    for path in files:
        if path.suffix != ".jsonl":
            continue
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.rstrip(b"\r\n"))
                except json.JSONDecodeError as err:
                    return f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})"
                if not isinstance(row, dict):
                    return f"{path}:{number}: a JSON {type(row).__name__}, not an object with named fields"
    return None


def _load_folder(path: Path, cache_dir: str | None) -> datasets.Dataset | datasets.DatasetDict:
    """A `save_to_disk` folder, or a folder of parquet / jsonl files."""
    if any((path / marker).exists() for marker in _SAVED_DATASET_MARKERS):
        return datasets.load_from_disk(str(path))
    for kind, patterns in (("parquet", ("*.parquet",)), ("json", ("*.jsonl", "*.json"))):
        files = sorted(f for pattern in patterns for f in path.rglob(pattern))
        if files:
            return _load_files(kind, files, cache_dir)
    found = sorted(p.name for p in path.iterdir())[:20]
    raise ConfigError(
        f"dataset folder {path} is neither a `save_to_disk` folder nor holds .parquet/.jsonl files; "
        f"it contains {found}"
    )


def _load_any(path: Path, cache_dir: str | None) -> datasets.Dataset | datasets.DatasetDict:
    if not path.exists():
        raise ConfigError(
            f"dataset path {path} does not exist; set data.path to a jsonl/parquet file or folder"
        )
    if path.is_dir():
        return _load_folder(path, cache_dir)
    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    if path.suffix not in kinds:
        raise ConfigError(f"dataset file {path} has suffix {path.suffix!r}; supported are {sorted(kinds)}")
    return _load_files(kinds[path.suffix], [path], cache_dir)


def _pick_splits(loaded: datasets.DatasetDict) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, eval or None) from a loaded DatasetDict."""
    splits = list(loaded)
    held_out = next((loaded[name] for name in _EVAL_SPLIT_NAMES if name in loaded), None)
    if "train" in loaded:
        return loaded["train"], held_out
    if len(splits) == 1:
        return loaded[splits[0]], None
    raise ConfigError(f"dataset has splits {splits} but no `train` split; save it with a split named train")


def _split(
    ds: datasets.Dataset, eval_fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out a seeded random `eval_fraction` of the rows (at least one when the fraction is > 0)."""
    num_eval = max(1, round(ds.num_rows * eval_fraction)) if eval_fraction > 0 else 0
    if num_eval >= ds.num_rows:
        raise ConfigError(
            f"eval_fraction={eval_fraction} of {ds.num_rows} rows leaves no training rows; "
            "lower eval_fraction or use more data"
        )
    order = np.random.default_rng(seed).permutation(ds.num_rows)
    # keep_in_memory: never write index files into the user's dataset folder (or the datasets cache).
    return (
        ds.select(np.sort(order[num_eval:]), keep_in_memory=True),
        ds.select(np.sort(order[:num_eval]), keep_in_memory=True),
    )


def _check_messages(ds: datasets.Dataset, field: str) -> None:
    """Fail early, on the first row, if `field` is not a list of {role, content} dicts."""
    if ds.num_rows == 0:
        return
    first = ds[0][field]
    if not (
        isinstance(first, list) and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in first)
    ):
        raise ConfigError(
            f"messages field {field!r} must hold lists of {{role, content}} dicts; its first row is "
            f"{str(first)[:200]}. Point data.messages_field at a chat column, or use data.text_field"
        )


def _canonical_field(ds: datasets.Dataset, text_field: str, messages_field: str) -> datasets.Dataset:
    """Rename the user's field to `messages` (preferred) or `text`, the names encode_example reads."""
    columns = ds.column_names
    for field, canonical in ((messages_field, "messages"), (text_field, "text")):
        if field in columns:
            if canonical == "messages":
                _check_messages(ds, field)
            if field != canonical and canonical in columns:
                ds = ds.remove_columns(canonical)  # a same-named column the user did not choose
            return ds.rename_column(field, canonical) if field != canonical else ds
    raise ConfigError(
        f"dataset has neither a text field {text_field!r} nor a messages field {messages_field!r}; "
        f"its fields are {columns}. Set data.text_field or data.messages_field to one of them"
    )


def load_user_dataset(
    path: str | Path,
    *,
    text_field: str = "text",
    messages_field: str = "messages",
    eval_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> datasets.DatasetDict:
    """Load a user dataset as `DatasetDict({"train", "eval"})` with a `messages` or `text` column.

    `path` is a .jsonl/.json or .parquet file, a folder of such files, or a `datasets.save_to_disk` folder
    (Dataset or DatasetDict). A saved DatasetDict's `train` split is used, and its eval/validation/test
    split when it has one; otherwise `eval_fraction` of the rows (seeded by `seed`) is held out. The chosen
    field is renamed to `messages` or `text`; `messages` wins when both fields exist. `cache_dir` is where
    `datasets` caches jsonl/parquet conversions (default: its usual cache).
    """
    if not 0 <= eval_fraction < 1:
        raise ConfigError(f"eval_fraction={eval_fraction} must be in [0, 1)")
    loaded = _load_any(Path(path), None if cache_dir is None else str(cache_dir))
    if isinstance(loaded, datasets.DatasetDict):
        train, held_out = _pick_splits(loaded)
    else:
        train, held_out = loaded, None
    train = _canonical_field(train, text_field, messages_field)
    if held_out is None:
        train, held_out = _split(train, eval_fraction, seed)
    else:
        held_out = _canonical_field(held_out, text_field, messages_field)
    return datasets.DatasetDict({"train": train, "eval": held_out})
