"""The run's data, built beside `data.*`: encoded train / held-out rows, the named slices curriculum stages and
continual increments draw from, and the micro-batch stream over a slice. Bad rows (data.on_bad_row) and rows longer
than data.max_length (data.on_long_row) are errors naming their place, or counted in `RunData.counts`."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import datasets

from distill.data.batching import BatchStream
from distill.data.dataset import build_task_dataset, read_user_dataset
from distill.data.formatting import LongRowError, long_rows
from distill.data.rows import BAD_ROW_POLICIES, RowPlaces
from distill.data.sources import data_sources
from distill.data.task import check_trace_tokens, reasoning_reply
from distill.errors import ConfigError

log = logging.getLogger(__name__)

RowEncoder = Callable[[list[dict]], list[dict]]
"""Raw examples -> encoded rows (input_ids, loss_mask, ...; with a token map also the teacher's tokens)."""


@dataclass
class DataSlice:
    train_rows: list[dict]
    eval_rows: list[dict]
    eval_examples: list[dict]
    """Raw held-out examples (with `answer` on the embedded task) for exact-match generation."""


@dataclass
class RunData(DataSlice):
    slices: dict[str, DataSlice] = field(default_factory=dict)
    """The data.subsets the run's curriculum or increments draw from, by name (`train`: this whole split)."""
    counts: dict[str, int] = field(default_factory=dict)
    """Rows the data rules left out or cut, as metrics (see `DataCounts.metrics`): into eval.json and the report."""


@dataclass
class RawSplits:
    """A source's raw train / eval examples, where each row came from, and the bad rows it skipped."""

    splits: datasets.DatasetDict
    source: str
    """How to name the source in a message: the embedded task, or a user dataset's path."""
    places: dict[str, RowPlaces] | None = None
    """A user dataset's rows by split (file:line, file row N); None for the embedded task."""
    skipped: Counter[str] = field(default_factory=Counter)

    def place(self, split: str, row: int) -> str:
        if self.places is None:
            return f"{self.source} ({split} split) row {row + 1}"
        return self.places[split][row]


@dataclass
class DataCounts:
    """What the data rules did to a run's rows."""

    skipped: Counter[str] = field(default_factory=Counter)
    """Bad rows left out (data.on_bad_row=skip), by reason."""
    dropped_long: int = 0
    """Rows over data.max_length left out (data.on_long_row=drop)."""
    truncated: int = 0
    """Rows cut to data.max_length (data.on_long_row=truncate)."""

    def metrics(self) -> dict[str, int]:
        """`data/skipped_rows`, `data/skipped/<reason>` (reasons that occurred), `data/dropped_long_rows`,
        `data/truncated_rows`."""
        reasons = {f"data/skipped/{reason}": n for reason, n in sorted(self.skipped.items())}
        return {
            "data/skipped_rows": sum(self.skipped.values()),
            **reasons,
            "data/dropped_long_rows": self.dropped_long,
            "data/truncated_rows": self.truncated,
        }

    def log(self, max_length: int) -> None:
        """One line: a warning when rows were left out, info when rows were only cut, nothing otherwise."""
        parts = []
        if self.skipped:
            reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items()))
            parts.append(f"skipped {sum(self.skipped.values())} bad rows ({reasons}; data.on_bad_row=skip)")
        if self.dropped_long:
            parts.append(f"dropped {self.dropped_long} rows longer than data.max_length={max_length}")
        if self.truncated:
            parts.append(f"truncated {self.truncated} rows to data.max_length={max_length}")
        if parts:
            level = logging.WARNING if self.skipped or self.dropped_long else logging.INFO
            log.log(level, "data: %s", "; ".join(parts))


def raw_dataset(cfg) -> datasets.DatasetDict:
    """The run's raw train/eval splits: `data.path` (a user dataset) or the embedded task `data.name`."""
    raw = _raw_splits(cfg)
    DataCounts(skipped=raw.skipped).log(cfg.data.max_length)
    return raw.splits


def _raw_splits(cfg) -> RawSplits:
    d = cfg.data
    if d.path:
        return _user_dataset(d, d.path)
    if d.name not in EMBEDDED_TASKS:
        raise ConfigError(
            f"unknown embedded task data.name={d.name!r}; valid names are {sorted(EMBEDDED_TASKS)} "
            "(or set data.path to a dataset)"
        )
    if d.trace_tokens is not None and d.name != "gsm_synth_reasoning":
        raise ConfigError(
            f"data.trace_tokens={list(d.trace_tokens)} only shapes the reasoning traces of "
            f"data.name=gsm_synth_reasoning, not {d.name!r}; remove it or pick that task"
        )
    return RawSplits(EMBEDDED_TASKS[d.name](d), source=f"embedded task data.name={d.name}")


def _gsm_synth(d):
    return build_task_dataset(list(d.domains), list(d.levels), d.num_train, d.num_eval, d.seed)


def _gsm_synth_reasoning(d):
    """The same problems and split as gsm_synth, each reply an R1-shaped `<think>` trace + `\\boxed{answer}`."""
    if d.trace_tokens is None:
        raise ConfigError(
            "data.name=gsm_synth_reasoning needs data.trace_tokens=[low,high], e.g. [1024,4096]"
        )
    trace_tokens = list(d.trace_tokens)
    check_trace_tokens(trace_tokens)  # fail before any problem is drawn
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_list([_with_trace(row, trace_tokens) for row in rows])
            for split, rows in _gsm_synth(d).items()
        }
    )


def _with_trace(row: dict, trace_tokens: list[int]) -> dict:
    question, solution = (message["content"] for message in row["messages"])
    reply = reasoning_reply(question, solution, row["answer"], trace_tokens, key=row["id"])
    return row | {"messages": [row["messages"][0], {"role": "assistant", "content": reply}]}


EMBEDDED_TASKS: dict[str, Callable] = {"gsm_synth": _gsm_synth, "gsm_synth_reasoning": _gsm_synth_reasoning}
"""`data.name` -> the builder of that embedded task's raw splits from `data.*`."""


def _user_dataset(d, path: str) -> RawSplits:
    user = read_user_dataset(
        path,
        text_field=d.text_field,
        messages_field=d.messages_field,
        eval_fraction=d.eval_fraction,
        seed=d.seed,
        on_bad_row=d.on_bad_row,
    )
    return RawSplits(user.splits, source=str(path), places=user.places, skipped=user.skipped)


def build_data(cfg, encode: RowEncoder) -> RunData:
    """Encoded train/held-out rows and the named slices the run mixes (`encode`: see `RowEncoder`); what the data
    rules skipped, dropped or cut is in `counts` (and one log line)."""
    if cfg.data.on_bad_row not in BAD_ROW_POLICIES:  # checked here too: the embedded task never reads it
        raise ConfigError(
            f"data.on_bad_row={cfg.data.on_bad_row!r}; valid values are {list(BAD_ROW_POLICIES)}"
        )
    counts = DataCounts()
    with long_rows(cfg.data.on_long_row) as tally:
        ds, train, heldout = _encoded(cfg, _raw_splits(cfg), encode, counts)
        data = RunData(train, heldout, list(ds["eval"]))
        data.slices["train"] = DataSlice(train, heldout, data.eval_examples)
        for name in data_sources(cfg):
            if name in data.slices or name not in cfg.data.subsets:
                continue  # `replay` is built by the run, unknown names failed validation
            data.slices[name] = _subset_slice(cfg, name, ds, data, encode, counts)
    counts.truncated = tally.truncated
    counts.log(cfg.data.max_length)
    data.counts = counts.metrics()
    return data


def _encoded(
    cfg, raw: RawSplits, encode: RowEncoder, counts: DataCounts
) -> tuple[datasets.DatasetDict, list[dict], list[dict]]:
    """(the raw splits, less any row dropped for its length; encoded train rows; encoded held-out rows). Raw and
    encoded rows stay index-aligned: subsets and exact-match generation pick raw rows by the encoded ones' index."""
    counts.skipped += raw.skipped
    encoded, kept = {}, {}
    for split in ("train", "eval"):
        encoded[split], kept[split] = _encode_split(cfg.data, raw, split, encode, counts)
    ds = raw.splits
    if any(len(kept[split]) < ds[split].num_rows for split in kept):
        ds = datasets.DatasetDict(
            {split: ds[split].select(rows, keep_in_memory=True) for split, rows in kept.items()}
        )
    return ds, encoded["train"], encoded["eval"]


def _encode_split(
    d, raw: RawSplits, split: str, encode: RowEncoder, counts: DataCounts
) -> tuple[list[dict], list[int]]:
    """(encoded rows, the indices of the raw rows they came from). One example at a time, so that a row over
    max_length (data.on_long_row=drop | error) is dropped or named alone."""
    rows, kept = [], []
    for index, example in enumerate(raw.splits[split]):
        try:
            rows += encode([example])
        except LongRowError as err:
            if d.on_long_row == "error":
                raise ConfigError(
                    f"{raw.place(split, index)}: {err}; raise data.max_length, or set data.on_long_row=truncate "
                    "(keep its first max_length tokens) or data.on_long_row=drop (leave such rows out, counted)"
                ) from err
            counts.dropped_long += 1
            continue
        kept.append(index)
    if raw.splits[split].num_rows and not rows:
        raise ConfigError(
            f"every {split} row of {raw.source} is longer than data.max_length={d.max_length} and was dropped "
            "(data.on_long_row=drop); raise data.max_length or set data.on_long_row=truncate"
        )
    return rows, kept


def _subset_slice(cfg, name: str, ds, data: RunData, encode: RowEncoder, counts: DataCounts) -> DataSlice:
    sub = cfg.data.subsets[name]
    if sub.path:
        own, train, heldout = _encoded(cfg, _user_dataset(cfg.data, sub.path), encode, counts)
        part = DataSlice(train, heldout, list(own["eval"]))
    elif _lacks_subset_fields(sub, ds["train"]):
        # A user dataset without domain / level columns is the target data itself.
        log.warning(
            "data.subsets.%s filters by domain/level, but the dataset has no such fields: using all of it "
            "(give the subset its own `path` to train on another slice)",
            name,
        )
        part = DataSlice(data.train_rows, data.eval_rows, data.eval_examples)
    else:
        keep_train = [i for i, ex in enumerate(ds["train"]) if in_subset(sub, ex)]
        keep_eval = [i for i, ex in enumerate(ds["eval"]) if in_subset(sub, ex)]
        part = DataSlice(
            [data.train_rows[i] for i in keep_train],
            [data.eval_rows[i] for i in keep_eval],
            [data.eval_examples[i] for i in keep_eval],
        )
    if not part.train_rows:
        raise ConfigError(
            f"data.subsets.{name} selects no training rows (domains={sub.domains}, levels={sub.levels}, "
            f"path={sub.path}); the run's data has domains={list(cfg.data.domains)} and levels="
            f"{list(cfg.data.levels)}. Add them to data.domains / data.levels or fix the subset."
        )
    return part


def _lacks_subset_fields(sub, split) -> bool:
    columns = set(split.column_names)
    return (sub.domains is not None and "domain" not in columns) or (
        sub.levels is not None and "level" not in columns
    )


def in_subset(sub, example: dict) -> bool:
    return (sub.domains is None or example.get("domain") in sub.domains) and (
        sub.levels is None or example.get("level") in sub.levels
    )


def batch_stream(
    cfg, rows: list[dict], tokenizer, *, batch_size: int | None = None, seed: int | None = None
) -> BatchStream:
    """Micro-batches of `rows` (cluster.micro_batch_size unless given), shuffled per epoch by the data seed."""
    return BatchStream(
        rows,
        batch_size=batch_size or cfg.cluster.micro_batch_size,
        seed=cfg.data.seed if seed is None else seed,
        pad_id=tokenizer.pad_token_id,
        packing=cfg.data.packing,
        # Fixed-length rows only when packing; otherwise each batch pads to its longest row (less waste).
        seq_len=cfg.data.max_length if cfg.data.packing else None,
    )
