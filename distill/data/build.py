"""The run's data, built beside `data.*`: encoded train / held-out rows, the named slices curriculum stages and
continual increments draw from, and the micro-batch stream over a slice."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import datasets

from distill.data.batching import BatchStream
from distill.data.dataset import build_task_dataset, load_user_dataset
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


def raw_dataset(cfg):
    """The run's raw train/eval splits: `data.path` (a user dataset) or the embedded task `data.name`."""
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
    return EMBEDDED_TASKS[d.name](d)


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


def _user_dataset(d, path: str):
    return load_user_dataset(
        path,
        text_field=d.text_field,
        messages_field=d.messages_field,
        eval_fraction=d.eval_fraction,
        seed=d.seed,
    )


def build_data(cfg, encode: RowEncoder) -> RunData:
    """Encoded train/held-out rows and the named slices the run mixes (`encode`: see `RowEncoder`)."""
    ds = raw_dataset(cfg)
    train, heldout = encode(ds["train"]), encode(ds["eval"])
    data = RunData(train, heldout, list(ds["eval"]))
    data.slices["train"] = DataSlice(train, heldout, data.eval_examples)
    for name in data_sources(cfg):
        if name in data.slices or name not in cfg.data.subsets:
            continue  # `replay` is built by the run, unknown names failed validation
        data.slices[name] = _subset_slice(cfg, name, ds, data, encode)
    return data


def _subset_slice(cfg, name: str, ds, data: RunData, encode: RowEncoder) -> DataSlice:
    sub = cfg.data.subsets[name]
    if sub.path:
        own = _user_dataset(cfg.data, sub.path)
        part = DataSlice(encode(own["train"]), encode(own["eval"]), list(own["eval"]))
    elif _lacks_subset_fields(sub, ds["train"]):
        # A user dataset without domain / level columns is the target data itself.
        log.warning(
            "data.subsets.%s filters by domain/level, but the dataset has no such fields: using all of it "
            "(give the subset its own `path` to train on another slice)",
            name,
        )
        part = DataSlice(data.train_rows, data.eval_rows, data.eval_examples)
    else:
        keep_train = [i for i, ex in enumerate(ds["train"]) if _in_subset(sub, ex)]
        keep_eval = [i for i, ex in enumerate(ds["eval"]) if _in_subset(sub, ex)]
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


def _in_subset(sub, example: dict) -> bool:
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
