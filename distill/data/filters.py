"""Filters for generated answers, looked up by name: `distill generate` keeps the candidates they accept.

A filter factory takes its parameters (from `generate.filter_args`) and returns a predicate over one
`Candidate`. Register a new one with `@register_filter("name", needs=("column", ...))`; `needs` lists the
prompt-set columns it reads, so a dataset without them fails before any sampling starts.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from distill.data.task import answer_matches
from distill.errors import ConfigError


@dataclass(frozen=True)
class Candidate:
    """One sampled answer to one prompt.

    example    the prompt-set row it answers (with `answer` on the embedded task)
    text       the decoded answer, without the stop token
    num_tokens generated tokens, stop token included
    finished   True if the model emitted the stop token (not cut at max_new_tokens)
    """

    example: Mapping[str, Any]
    text: str
    num_tokens: int
    finished: bool


Predicate = Callable[[Candidate], bool]


@dataclass(frozen=True)
class FilterSpec:
    name: str
    factory: Callable[..., Predicate]
    needs: tuple[str, ...]
    """Prompt-set columns the filter reads."""


_FILTERS: dict[str, FilterSpec] = {}


def register_filter(name: str, *, needs: Sequence[str] = ()) -> Callable:
    def wrap(factory: Callable[..., Predicate]) -> Callable[..., Predicate]:
        assert name not in _FILTERS, f"filter {name!r} registered twice"
        _FILTERS[name] = FilterSpec(name, factory, tuple(needs))
        return factory

    return wrap


def filter_names() -> list[str]:
    return sorted(_FILTERS)


def get_filter(name: str) -> FilterSpec:
    if name not in _FILTERS:
        raise ConfigError(f"unknown generate.filter {name!r}; valid filters are {filter_names()}")
    return _FILTERS[name]


def build_filter(
    name: str, args: Mapping[str, Any] | None = None, columns: Sequence[str] | None = None
) -> Predicate:
    """The predicate of filter `name` built with `args`; checks the args and, if given, the dataset `columns`."""
    spec = get_filter(name)
    args = dict(args or {})
    accepted = list(inspect.signature(spec.factory).parameters)
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise ConfigError(
            f"generate.filter_args {unknown} are not parameters of filter {name!r}; it takes {accepted or 'none'}"
        )
    missing = [c for c in spec.needs if columns is not None and c not in columns]
    if missing:
        raise ConfigError(
            f"filter {name!r} needs the prompt-set columns {list(spec.needs)}, but the dataset has {list(columns)}; "
            f"pick another generate.filter (valid: {filter_names()})"
        )
    return spec.factory(**args)


# ---- the filters --------------------------------------------------------------------------------------------
@register_filter("none")
def keep_all() -> Predicate:
    """Keep every candidate (rejection sampling off)."""
    return lambda cand: True


@register_filter("answer_correct", needs=("answer",))
def answer_correct() -> Predicate:
    """Keep an answer whose final answer (`\\boxed{...}` after `</think>`, or `#### N`: `task.extract_answer`)
    equals the example's reference answer (the embedded task)."""
    return lambda cand: answer_matches(cand.text, cand.example["answer"])


@register_filter("min_length")
def min_length(min_tokens: int = 1, max_tokens: int | None = None) -> Predicate:
    """Keep answers with min_tokens <= generated tokens (<= max_tokens when given)."""
    if min_tokens < 0 or (max_tokens is not None and max_tokens < min_tokens):
        raise ConfigError(
            f"min_length filter needs 0 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}"
        )
    return lambda cand: (
        cand.num_tokens >= min_tokens and (max_tokens is None or cand.num_tokens <= max_tokens)
    )
