"""The rules a user dataset's row must meet, and where each row came from (to name a bad one in a message).

`RowCheck` judges rows under data.on_bad_row: `error` raises ConfigError naming the row's place (`file:line` or
`<source> row N`), the problem and the fix; `skip` leaves the row out and counts it by reason. `RowPlaces` keeps
each row's place as two small arrays, not a string per row.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from distill.data.formatting import CHAT_ROLES
from distill.errors import ConfigError

BAD_ROW_POLICIES = ("error", "skip")
"""data.on_bad_row: a bad row stops the run naming its place (`error`), or is left out and counted (`skip`)."""

JSONL_FIX = "fix or remove that line (every line of a .jsonl file is one JSON object)"
_ROW_FIX = "fix or remove that row"


@dataclass(frozen=True, eq=False)
class RowPlaces:
    """Where each row of a split came from, to name it in a message: `file:line` for JSON lines, `<source> row N`
    for a parquet file, a .json array or a saved split. Two small arrays, not a string per row."""

    sources: tuple[str, ...]
    by_line: tuple[bool, ...]
    """Per source: its numbers are line numbers (`file:N`), not row numbers (`file row N`)."""
    source: np.ndarray
    """int32 [rows]: the row's index into `sources`."""
    number: np.ndarray
    """int64 [rows]: the row's line or row number, from 1."""

    @staticmethod
    def of(source: str, numbers: Iterable[int], *, by_line: bool) -> RowPlaces:
        number = np.fromiter(numbers, dtype=np.int64)
        return RowPlaces((source,), (by_line,), np.zeros(len(number), dtype=np.int32), number)

    @staticmethod
    def concat(parts: Sequence[RowPlaces]) -> RowPlaces:
        first_source = np.cumsum([0, *(len(p.sources) for p in parts)])
        return RowPlaces(
            tuple(s for p in parts for s in p.sources),
            tuple(b for p in parts for b in p.by_line),
            np.concatenate([p.source + first for p, first in zip(parts, first_source[:-1], strict=True)]),
            np.concatenate([p.number for p in parts]),
        )

    def __len__(self) -> int:
        return len(self.number)

    def __getitem__(self, row: int) -> str:
        source, number = int(self.source[row]), int(self.number[row])
        where = self.sources[source]
        return f"{where}:{number}" if self.by_line[source] else f"{where} row {number}"

    def select(self, rows: Sequence[int] | np.ndarray) -> RowPlaces:
        picked = np.asarray(rows, dtype=np.int64)
        return RowPlaces(self.sources, self.by_line, self.source[picked], self.number[picked])


def field_of(columns: Iterable[str], text_field: str, messages_field: str) -> tuple[str, str]:
    """(the user's field holding each row's text, its canonical name): the messages field wins over the text one."""
    columns = list(columns)
    for field, canonical in ((messages_field, "messages"), (text_field, "text")):
        if field in columns:
            return field, canonical
    raise ConfigError(
        f"dataset has neither a text field {text_field!r} nor a messages field {messages_field!r}; "
        f"its fields are {columns}. Set data.text_field or data.messages_field to one of them"
    )


class RowCheck:
    """Judges a user dataset's rows under data.on_bad_row: which field holds the text, whether a row is usable,
    and what becomes of a bad one: `error` raises ConfigError naming its place, the problem and the fix; `skip`
    counts it by reason in `skipped` (missing_field, not_a_string, empty_text, bad_messages, unknown_role,
    malformed_json, invalid_utf8)."""

    def __init__(self, text_field: str, messages_field: str, on_bad_row: str) -> None:
        if on_bad_row not in BAD_ROW_POLICIES:
            raise ConfigError(f"data.on_bad_row={on_bad_row!r}; valid values are {list(BAD_ROW_POLICIES)}")
        self.text_field, self.messages_field, self.on_bad_row = text_field, messages_field, on_bad_row
        self.skipped: Counter[str] = Counter()

    def bad(self, place: str, reason: str, problem: str, fix: str = _ROW_FIX) -> None:
        if self.on_bad_row == "error":
            raise ConfigError(
                f"{place}: {problem}; {fix}, or set data.on_bad_row=skip to skip such rows (they are counted)"
            )
        self.skipped[reason] += 1

    def field(self, columns: Iterable[str]) -> tuple[str, str]:
        return field_of(columns, self.text_field, self.messages_field)

    def good(self, values: Iterable, field: str, canonical: str, places: RowPlaces) -> list[int]:
        """Indices of the usable rows, given each row's value of `field`; a bad one goes to `bad`. ConfigError when
        there were rows and none is usable."""
        problem_of = _messages_problem if canonical == "messages" else _text_problem
        keep = []
        for row, value in enumerate(values):
            problem = problem_of(value, field)
            if problem is None:
                keep.append(row)
            else:
                self.bad(places[row], *problem)
        if len(places) and not keep:
            self.nothing_left(sorted(set(places.sources)))
        return keep

    def nothing_left(self, sources: Sequence[str]) -> None:
        raise ConfigError(
            f"every row of {', '.join(sources)} is bad (skipped: {dict(sorted(self.skipped.items()))}); fix the "
            "data, or set data.on_bad_row=error to stop at the first bad row with its place"
        )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _text_problem(text: object, field: str) -> tuple[str, str] | None:
    """(reason, problem) when a text field's value is no usable text, else None."""
    if text is None:
        return "missing_field", f"no {field!r} field (or it is null)"
    if not isinstance(text, str):
        return "not_a_string", f"field {field!r} is not a string but {type(text).__name__} {_short(text)}"
    if not text.strip():
        return "empty_text", f"field {field!r} is empty"
    return None


def _messages_problem(messages: object, field: str) -> tuple[str, str] | None:
    """(reason, problem) when a messages field's value is not a conversation with some text, else None."""
    if messages is None:
        return "missing_field", f"no {field!r} field (or it is null)"
    if not isinstance(messages, list):
        return (
            "bad_messages",
            f"field {field!r} is {_short(messages)}, not a list of {{role, content}} messages (is "
            "data.messages_field a chat column? else use data.text_field)",
        )
    for turn, message in enumerate(messages):
        if problem := _message_problem(message, turn, field):
            return problem
    if not any(m["content"].strip() or (m.get("reasoning_content") or "").strip() for m in messages):
        return "empty_text", f"field {field!r} has no message with any text"
    return None


def _message_problem(message: object, turn: int, field: str) -> tuple[str, str] | None:
    if not (isinstance(message, dict) and all(isinstance(message.get(k), str) for k in ("role", "content"))):
        return (
            "bad_messages",
            f"message {turn} of field {field!r} is {_short(message)}, not {{role, content}} with string values",
        )
    if message["role"] not in CHAT_ROLES:
        return (
            "unknown_role",
            f"message {turn} has role {message['role']!r}; valid roles are {', '.join(CHAT_ROLES)}",
        )
    if not isinstance(message.get("reasoning_content") or "", str):
        return "bad_messages", f"message {turn}'s reasoning_content is {_short(message['reasoning_content'])}"
    return None
