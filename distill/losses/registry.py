"""Registry of loss terms, looked up by name; unknown names and parameters fail loudly.

A term is a `LossTerm`: a name, a kind ("logits", "hidden" or "attention"), the function, and the extra
parameters it accepts with their defaults (`params`, e.g. {"beta": 0.5} for jsd). Calling a term checks
its keyword arguments (unknown name -> ConfigError, bad value -> ConfigError) and fills in defaults.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from numbers import Real
from types import MappingProxyType
from typing import Any

from distill.errors import ConfigError

KINDS = ("logits", "hidden", "attention")
SELECT_BY = ("confidence", "entropy")
SELECT_KEEP = ("above", "below")
ATTENTION_METRICS = ("kl", "mse")

# Keyword arguments every logit term takes; they are call arguments, not tunable term parameters.
_SHARED = frozenset({"temperature", "labels", "chunk_size"})

_REGISTRY: dict[str, LossTerm] = {}


@dataclass(frozen=True)
class LossTerm:
    """A registered loss term. Call it like the function it wraps."""

    name: str
    kind: str
    fn: Callable[..., Any] = field(repr=False)
    params: Mapping[str, Any]  # tunable parameters this term accepts -> default
    accepted: frozenset[str] = field(repr=False)  # every keyword the call accepts
    rows: Callable[..., Any] | None = field(default=None, repr=False)
    """Logit terms: (teacher, mask, *, vocab_size, temperature, labels, **params) -> (RowTerm, num_tokens), the
    term without the student's logits, for the fused head (distill.losses.fused)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        unknown = sorted(set(kwargs) - self.accepted)
        if unknown:
            raise ConfigError(
                f"loss term {self.name!r} got unknown argument(s) {unknown}; it accepts "
                f"{sorted(self.accepted)}. Fix the spelling or remove them from the loss config."
            )
        self.check_params({k: v for k, v in kwargs.items() if k in self.params})
        return self.fn(*args, **{**self.params, **kwargs})

    def row_term(self, teacher: Any, mask: Any, **kwargs: Any) -> Any:
        """(RowTerm, num_tokens) of a logit term: what the call computes, before any student logits exist.
        kwargs as for the call, with `vocab_size` (the student's) in place of the logits."""
        if self.rows is None:
            raise ConfigError(f"loss term {self.name!r} ({self.kind}) has no row form; only logit terms do.")
        params = {k: v for k, v in kwargs.items() if k not in ("chunk_size",)}
        unknown = sorted(set(params) - self.accepted - {"vocab_size"})
        if unknown:
            raise ConfigError(
                f"loss term {self.name!r} got unknown argument(s) {unknown}; it accepts "
                f"{sorted(self.accepted)}. Fix the spelling or remove them from the loss config."
            )
        self.check_params({k: v for k, v in params.items() if k in self.params})
        return self.rows(teacher, mask, **{**self.params, **params})

    def check_params(self, params: Mapping[str, Any]) -> None:
        """Raise ConfigError for a parameter this term does not have or a value out of range."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise ConfigError(
                f"loss term {self.name!r} has no parameter(s) {unknown}; its parameters are "
                f"{sorted(self.params) or 'none'}. Fix the spelling or remove them."
            )
        check_param_values(self.name, {**self.params, **params})


def register(
    name: str, kind: str, params: Mapping[str, Any] | None = None, rows: Callable[..., Any] | None = None
) -> Callable:
    """Decorator: register `fn` as loss term `name` of `kind`; returns the LossTerm. `rows`: a logit term's
    row form (LossTerm.rows).

    The term's parameters are its keyword-only arguments with defaults (minus the shared temperature,
    labels, chunk_size) plus `params` (for arguments the function takes through **kwargs).
    """
    assert kind in KINDS, f"kind {kind!r} not in {KINDS}"

    def wrap(fn: Callable[..., Any]) -> LossTerm:
        assert name not in _REGISTRY, f"loss term {name!r} registered twice"
        sig = inspect.signature(fn).parameters.values()
        declared = {
            p.name: p.default
            for p in sig
            if p.kind is p.KEYWORD_ONLY and p.default is not p.empty and p.name not in _SHARED
        }
        all_params = {**declared, **(params or {})}
        named = {p.name for p in sig if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        accepted = frozenset(named | set(all_params))
        term = LossTerm(name, kind, fn, MappingProxyType(all_params), accepted, rows)
        _REGISTRY[name] = term
        return term

    return wrap


def get(name: str) -> LossTerm:
    """The loss term registered as `name`; ConfigError listing the valid names otherwise."""
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown loss term {name!r}; valid names: {', '.join(names())}. Use one of them in the loss config."
        )
    return _REGISTRY[name]


def names(kind: str | None = None) -> list[str]:
    """Sorted names of the registered terms, optionally only those of one kind."""
    return sorted(n for n, t in _REGISTRY.items() if kind is None or t.kind == kind)


def check_param_values(term: str, params: Mapping[str, Any]) -> None:
    """Range checks for the parameters terms share by name (beta, alpha, select_*, metric)."""
    if "beta" in params:
        _check_range(term, "beta", params["beta"], 0.0, 1.0, low_open=True, hint="0.5 is the symmetric JSD")
    if "alpha" in params:
        _check_range(term, "alpha", params["alpha"], 0.0, 1.0, low_open=False, hint="DistiLLM uses 0.1")
    if "select_by" in params and params["select_by"] is not None:
        _check_choice(term, "select_by", params["select_by"], SELECT_BY, extra="or null to keep every token")
        # Terms that take select_by also declare select_threshold, so the merged params hold it.
        if not _is_number(params["select_threshold"]):
            raise ConfigError(
                f"loss term {term!r}: select_by={params['select_by']!r} needs a numeric select_threshold, "
                f"got {params['select_threshold']!r}; e.g. select_threshold=0.5."
            )
    if "select_keep" in params:
        _check_choice(term, "select_keep", params["select_keep"], SELECT_KEEP)
    if "metric" in params:
        _check_choice(term, "metric", params["metric"], ATTENTION_METRICS)


def _is_number(x: object) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _check_range(
    term: str, key: str, value: object, lo: float, hi: float, *, low_open: bool, hint: str
) -> None:
    interval = f"{'(' if low_open else '['}{lo}, {hi})"
    ok = _is_number(value) and (lo < value if low_open else lo <= value) and value < hi  # type: ignore[operator]
    if not ok:
        raise ConfigError(f"loss term {term!r}: {key}={value!r} must be in {interval}; {hint}.")


def _check_choice(term: str, key: str, value: object, choices: tuple[str, ...], extra: str = "") -> None:
    if value not in choices:
        raise ConfigError(
            f"loss term {term!r}: {key}={value!r} is not one of {list(choices)}; use one of them {extra}".rstrip()
            + "."
        )
