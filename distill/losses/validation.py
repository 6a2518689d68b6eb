"""Config-time checks for loss settings, runnable before any tensor or cluster exists.

Every error is a ConfigError that quotes the value found and says how to fix it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

from distill.errors import ConfigError
from distill.losses.registry import get


def check_temperature(temperature: float) -> None:
    """Temperature divides logits: it must be a positive number."""
    if not isinstance(temperature, Real) or isinstance(temperature, bool) or not temperature > 0:
        raise ConfigError(
            f"temperature={temperature!r} must be a number > 0 (it divides the logits); 1.0 means no softening."
        )


def check_k(k: int, vocab_size: int | None = None) -> None:
    """Top-k size: at least 1 and at most the vocabulary size."""
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"top-k k={k!r} must be an integer >= 1; e.g. k=64.")
    if vocab_size is not None and k > vocab_size:
        raise ConfigError(
            f"top-k k={k} is larger than the vocabulary ({vocab_size}); set k <= {vocab_size} "
            "(k = vocab size gives the exact full-vocab loss)."
        )


def validate_term(
    name: str,
    *,
    temperature: float,
    k: int | None = None,
    vocab_size: int | None = None,
    params: Mapping[str, Any] | None = None,
) -> None:
    """Check one configured loss term: its name, temperature, top-k size and parameters."""
    term = get(name)  # unknown name -> ConfigError listing the valid ones
    check_temperature(temperature)
    if k is not None:
        check_k(k, vocab_size)
    term.check_params(params or {})


def validate_layer_map(
    layer_map: Sequence[tuple[int, int]], student_layers: int, teacher_layers: int
) -> None:
    """Check (student_layer, teacher_layer) pairs against the models' depths.

    Indices address `hidden_states` as HF models return them: 0 is the embedding output and i is the
    output of block i, so valid indices are 0..num_layers inclusive.
    """
    for pair in layer_map:
        if len(pair) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair):
            raise ConfigError(
                f"layer_map entry {pair!r} must be a pair of ints (student_layer, teacher_layer); "
                "e.g. [[2, 4], [4, 8]]."
            )
        s, t = pair
        if not 0 <= s <= student_layers:
            raise ConfigError(
                f"layer_map entry {pair!r}: student layer {s} is outside 0..{student_layers} "
                f"(0 = embeddings, {student_layers} = last block); use an index in that range."
            )
        if not 0 <= t <= teacher_layers:
            raise ConfigError(
                f"layer_map entry {pair!r}: teacher layer {t} is outside 0..{teacher_layers} "
                f"(0 = embeddings, {teacher_layers} = last block); use an index in that range."
            )
