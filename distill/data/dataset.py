"""Datasets: the embedded task as a `DatasetDict`, and user data from jsonl, parquet or a saved folder.

Both return `DatasetDict({"train", "eval"})` whose rows have `messages` (a list of {role, content}) or
`text`, which is all `formatting.encode_example` needs. User rows are judged one by one (`RowCheck`): a bad row
is an error naming its file and line, or, under data.on_bad_row=skip, left out and counted by reason.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill.data.rows import JSONL_FIX, RowCheck, RowPlaces, field_of
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
# User datasets: reading files

Loaded = tuple[datasets.Dataset, RowPlaces]
"""A split's rows and where each came from."""


def _check_not_empty(path: Path) -> None:
    size = path.stat().st_size
    if size == 0 or (size < 2**20 and not path.read_bytes().strip()):
        raise ConfigError(f"dataset file {path} is empty; point data.path at a file with rows")


def _check_utf8(path: Path, chunk_bytes: int = 2**24) -> None:
    """ConfigError naming the line of the first byte that is not UTF-8. One streaming pass at C speed (about
    1 GB/s)."""
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


def _read_json_lines(path: Path, check: RowCheck) -> tuple[list[dict], RowPlaces]:
    """The JSON objects of a JSON-lines file and their line numbers; a bad line goes to `check`. Read here, not by
    `datasets`, which reports neither the file nor the line of a bad one and replaces bad bytes silently."""
    rows, lines, offset = [], [], 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            row = _parse_line(raw, f"{path}:{number}", offset, check)
            offset += len(raw)
            if row is not None:
                rows.append(row)
                lines.append(number)
    return rows, RowPlaces.of(str(path), lines, by_line=True)


def _parse_line(raw: bytes, place: str, offset: int, check: RowCheck) -> dict | None:
    """One line as a JSON object; None for a blank line or a bad one (handed to `check`). offset: of the line in
    its file, so a bad byte is named by its file offset."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        fix = "re-encode the file as UTF-8 or remove that line"
        check.bad(place, "invalid_utf8", f"not valid UTF-8 ({err.reason} at byte {offset + err.start})", fix)
        return None
    if not text.strip():
        return None
    try:
        row = json.loads(text.rstrip("\r\n").removeprefix("\ufeff"))  # a byte-order mark opens some files
    except json.JSONDecodeError as err:
        check.bad(place, "malformed_json", f"not valid JSON ({err.msg} at column {err.colno})", JSONL_FIX)
        return None
    if not isinstance(row, dict):
        check.bad(
            place,
            "malformed_json",
            f"a JSON {type(row).__name__}, not an object with named fields",
            JSONL_FIX,
        )
        return None
    return row


def _is_json_array(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"[")


def _read_json_array(path: Path, check: RowCheck) -> tuple[list[dict], RowPlaces]:
    """A .json file holding one array of objects. A bad byte or bad JSON spoils the whole document (an error under
    either policy); an element that is not an object is a bad row."""
    _check_utf8(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno}); fix the file (a .json array "
            "is one document; as .jsonl, one object per line, data.on_bad_row=skip can skip a bad line)"
        ) from err
    rows, numbers = [], []
    for number, row in enumerate(document, start=1):
        if isinstance(row, dict):
            rows.append(row)
            numbers.append(number)
        else:
            check.bad(f"{path} row {number}", "malformed_json", f"a JSON {type(row).__name__}, not an object")
    return rows, RowPlaces.of(str(path), numbers, by_line=False)


def _load_json(files: Sequence[Path], check: RowCheck) -> Loaded:
    rows, parts = [], []
    for path in files:
        read = _read_json_array if path.suffix == ".json" and _is_json_array(path) else _read_json_lines
        file_rows, places = read(path, check)
        rows += file_rows
        parts.append(places)
    places = RowPlaces.concat(parts)
    if not rows:
        check.nothing_left([str(f) for f in files])
    field, canonical = check.field(dict.fromkeys(key for row in rows for key in row))
    keep = check.good([row.get(field) for row in rows], field, canonical, places)
    return _to_dataset([rows[i] for i in keep], files), places.select(keep)


def _to_dataset(rows: list[dict], files: Sequence[Path]) -> datasets.Dataset:
    """Every field any row has (None where a row lacks it); `Dataset.from_list` would keep the first row's only."""
    columns = {key: [row.get(key) for row in rows] for key in dict.fromkeys(k for row in rows for k in row)}
    try:
        return datasets.Dataset.from_dict(columns)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        mixed = next((key for key, values in columns.items() if not _one_type(values)), "?")
        raise ConfigError(
            f"field {mixed!r} of {', '.join(map(str, files))} holds values of different types ({err}); give it "
            "one type in every row, or remove it"
        ) from err


def _one_type(values: list) -> bool:
    try:
        pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return False
    return True


def _parquet_rows(path: Path) -> int:
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except pa.ArrowException as err:
        raise ConfigError(f"dataset file {path} is not a readable parquet file ({err}); rewrite it") from err
    if rows == 0:
        raise ConfigError(f"dataset file {path} has no rows; point data.path at a file with rows")
    return rows


def _load_parquet(files: Sequence[Path], cache_dir: str | None, check: RowCheck) -> Loaded:
    counts = [_parquet_rows(f) for f in files]
    ds = datasets.load_dataset(
        "parquet", data_files=[str(f) for f in files], split="train", cache_dir=cache_dir
    )
    parts = [RowPlaces.of(str(f), range(1, n + 1), by_line=False) for f, n in zip(files, counts, strict=True)]
    return _checked(ds, RowPlaces.concat(parts), check)


def _checked(ds: datasets.Dataset, places: RowPlaces, check: RowCheck) -> Loaded:
    """The usable rows of a loaded split (see `RowCheck.good`)."""
    assert len(places) == ds.num_rows, "every row has a place"
    field, canonical = check.field(ds.column_names)
    keep = check.good(ds[field], field, canonical, places)
    if len(keep) == ds.num_rows:
        return ds, places
    # keep_in_memory: never write index files into the user's dataset folder (or the datasets cache).
    return ds.select(keep, keep_in_memory=True), places.select(keep)


def _load_files(files: Sequence[Path], cache_dir: str | None, check: RowCheck) -> Loaded:
    for f in files:
        _check_not_empty(f)
    if files[0].suffix == ".parquet":
        return _load_parquet(files, cache_dir, check)
    return _load_json(files, check)


def _load_saved(path: Path, check: RowCheck) -> tuple[Loaded, Loaded | None]:
    """A `save_to_disk` Dataset or DatasetDict: (train, its eval split or None), rows named `<path> row N`."""
    saved = datasets.load_from_disk(str(path))
    if isinstance(saved, datasets.Dataset):
        return _checked(
            saved, RowPlaces.of(str(path), range(1, saved.num_rows + 1), by_line=False), check
        ), None
    train, held_out = _pick_splits(saved)

    def checked(name: str) -> Loaded:
        split = saved[name]
        places = RowPlaces.of(f"{path} ({name} split)", range(1, split.num_rows + 1), by_line=False)
        return _checked(split, places, check)

    return checked(train), None if held_out is None else checked(held_out)


def _load_folder(path: Path, cache_dir: str | None, check: RowCheck) -> tuple[Loaded, Loaded | None]:
    """A `save_to_disk` folder, or a folder of parquet / jsonl files."""
    if any((path / marker).exists() for marker in _SAVED_DATASET_MARKERS):
        return _load_saved(path, check)
    for patterns in (("*.parquet",), ("*.jsonl", "*.json")):
        files = sorted(f for pattern in patterns for f in path.rglob(pattern))
        if files:
            return _load_files(files, cache_dir, check), None
    found = sorted(p.name for p in path.iterdir())[:20]
    raise ConfigError(
        f"dataset folder {path} is neither a `save_to_disk` folder nor holds .parquet/.jsonl files; "
        f"it contains {found}"
    )


def _load_any(path: Path, cache_dir: str | None, check: RowCheck) -> tuple[Loaded, Loaded | None]:
    """(train, the dataset's own eval split or None), usable rows only."""
    if not path.exists():
        raise ConfigError(
            f"dataset path {path} does not exist; set data.path to a jsonl/parquet file or folder"
        )
    if path.is_dir():
        return _load_folder(path, cache_dir, check)
    suffixes = (".jsonl", ".json", ".parquet")
    if path.suffix not in suffixes:
        raise ConfigError(f"dataset file {path} has suffix {path.suffix!r}; supported are {sorted(suffixes)}")
    return _load_files([path], cache_dir, check), None


def _pick_splits(loaded: datasets.DatasetDict) -> tuple[str, str | None]:
    """The names of (train, eval or None) in a saved DatasetDict."""
    splits = list(loaded)
    held_out = next((name for name in _EVAL_SPLIT_NAMES if name in loaded), None)
    if "train" in loaded:
        return "train", held_out
    if len(splits) == 1:
        return splits[0], None
    raise ConfigError(f"dataset has splits {splits} but no `train` split; save it with a split named train")


def _split(loaded: Loaded, eval_fraction: float, seed: int) -> tuple[Loaded, Loaded]:
    """Hold out a seeded random `eval_fraction` of the rows (at least one when the fraction is > 0)."""
    ds, places = loaded
    num_eval = max(1, round(ds.num_rows * eval_fraction)) if eval_fraction > 0 else 0
    if num_eval >= ds.num_rows:
        raise ConfigError(
            f"eval_fraction={eval_fraction} of {ds.num_rows} rows leaves no training rows; "
            "lower eval_fraction or use more data"
        )
    order = np.random.default_rng(seed).permutation(ds.num_rows)
    train, held_out = np.sort(order[num_eval:]), np.sort(order[:num_eval])
    # keep_in_memory: never write index files into the user's dataset folder (or the datasets cache).
    return (
        (ds.select(train, keep_in_memory=True), places.select(train)),
        (ds.select(held_out, keep_in_memory=True), places.select(held_out)),
    )


def _canonical_field(ds: datasets.Dataset, text_field: str, messages_field: str) -> datasets.Dataset:
    """Rename the user's field to `messages` (preferred) or `text`, the names encode_example reads."""
    field, canonical = field_of(ds.column_names, text_field, messages_field)
    if field == canonical:
        return ds
    if canonical in ds.column_names:
        ds = ds.remove_columns(canonical)  # a same-named column the user did not choose
    return ds.rename_column(field, canonical)


@dataclass
class UserDataset:
    """A user dataset as read: its train / eval splits, where each of their rows came from, the bad rows skipped."""

    splits: datasets.DatasetDict
    places: dict[str, RowPlaces]
    """Per split, row by row."""
    skipped: Counter[str]
    """Bad rows left out under data.on_bad_row=skip, by reason (see `RowCheck`)."""


def read_user_dataset(
    path: str | Path,
    *,
    text_field: str = "text",
    messages_field: str = "messages",
    eval_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    on_bad_row: str = "error",
) -> UserDataset:
    """Read a user dataset: `DatasetDict({"train", "eval"})` with a `messages` or `text` column, the rows' places
    and the skipped bad rows.

    `path` is a .jsonl/.json or .parquet file, a folder of such files, or a `datasets.save_to_disk` folder
    (Dataset or DatasetDict). A saved DatasetDict's `train` split is used, and its eval/validation/test
    split when it has one; otherwise `eval_fraction` of the rows (seeded by `seed`) is held out. The chosen
    field is renamed to `messages` or `text`; `messages` wins when both fields exist. Every row is checked
    (`RowCheck`): a bad one raises ConfigError naming its place (`on_bad_row="error"`) or is skipped and counted
    (`"skip"`). `cache_dir` is where `datasets` caches parquet conversions (default: its usual cache).
    """
    if not 0 <= eval_fraction < 1:
        raise ConfigError(f"eval_fraction={eval_fraction} must be in [0, 1)")
    check = RowCheck(text_field, messages_field, on_bad_row)
    train, held_out = _load_any(Path(path), None if cache_dir is None else str(cache_dir), check)
    if held_out is None:
        train, held_out = _split(train, eval_fraction, seed)
    splits = {"train": train, "eval": held_out}
    return UserDataset(
        datasets.DatasetDict(
            {name: _canonical_field(ds, text_field, messages_field) for name, (ds, _) in splits.items()}
        ),
        {name: places for name, (_, places) in splits.items()},
        check.skipped,
    )


def load_user_dataset(path: str | Path, **options) -> datasets.DatasetDict:
    """The splits of `read_user_dataset(path, **options)`: `DatasetDict({"train", "eval"})`."""
    return read_user_dataset(path, **options).splits
