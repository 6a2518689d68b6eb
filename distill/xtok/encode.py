"""Encode one example for both tokenizers and align them: the cross-tokenizer data path.

The student row is exactly what `distill.data.encode_example` gives (so CE and masks do not change when a
token map is on); next to it the row carries the teacher's token ids of the same example and, per student
position, the teacher position that predicts the same next piece of text (`align`, -1 where none).

Chat examples: each side renders the conversation with its own chat template. When the two renderings are
the same text, the tokens are aligned over it (special tokens both sides have are aligned like any token,
those one side lacks are masked). When they differ, only the message contents are shared: tokens of either
side's template never align (masked), content tokens align over the contents.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from distill.data.formatting import _render, encode_example
from distill.errors import ConfigError
from distill.xtok.alignment import (
    SideTokens,
    align,
    prediction_pairs,
    shared_coordinates,
    side_tokens,
    teacher_index,
)
from distill.xtok.vocab_map import vocab_bytes

Offsets = list[tuple[int, int]]


def _tokenize(tokenizer: PreTrainedTokenizerBase, text: str, add_special: bool) -> tuple[list[int], Offsets]:
    if not tokenizer.is_fast:
        raise ConfigError(
            f"cross-tokenizer alignment needs character offsets, but {type(tokenizer).__name__} is not a fast "
            "(Rust) tokenizer; load it with use_fast=True."
        )
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _content_ranges(text: str, messages: Sequence[dict], who: str) -> list[tuple[int, int]]:
    """Character ranges of each message's content inside `text`, found in order."""
    ranges, pos = [], 0
    for i, m in enumerate(messages):
        content = m["content"]
        at = text.find(content, pos)
        if at < 0:
            raise ConfigError(
                f"the {who}'s chat template does not render message {i} ({m['role']}) verbatim, so its tokens "
                "cannot be aligned with the other tokenizer's; use templates that keep message contents as is."
            )
        ranges.append((at, at + len(content)))
        pos = at + len(content)
    return ranges


def _sides(
    student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, example: dict
) -> tuple[list[int], Offsets, list | None, list[int], Offsets, list | None]:
    """(student ids, offsets, coords, teacher ids, offsets, coords); coords None = one shared text."""
    if example.get("messages") is not None:
        messages = example["messages"]
        s_text = _render(student, messages, add_generation_prompt=False)
        t_text = _render(teacher, messages, add_generation_prompt=False)
        s_ids, s_off = _tokenize(student, s_text, add_special=False)
        t_ids, t_off = _tokenize(teacher, t_text, add_special=False)
        if s_text == t_text:
            return s_ids, s_off, None, t_ids, t_off, None
        s_coords = shared_coordinates(s_text, _content_ranges(s_text, messages, "student"))
        t_coords = shared_coordinates(t_text, _content_ranges(t_text, messages, "teacher"))
        return s_ids, s_off, s_coords, t_ids, t_off, t_coords
    text = example["text"]
    s_ids, s_off = _tokenize(student, text, add_special=True)
    if student.eos_token_id is not None and (not s_ids or s_ids[-1] != student.eos_token_id):
        # encode_example appends eos; it covers no text, so it never aligns.
        s_ids, s_off = [*s_ids, student.eos_token_id], [*s_off, (len(text), len(text))]
    t_ids, t_off = _tokenize(teacher, text, add_special=True)
    if teacher.eos_token_id is not None and (not t_ids or t_ids[-1] != teacher.eos_token_id):
        t_ids, t_off = [*t_ids, teacher.eos_token_id], [*t_off, (len(text), len(text))]
    return s_ids, s_off, None, t_ids, t_off, None


def _target_chars(offsets: Offsets) -> list[int]:
    """Per position p, the new characters token p + 1 adds (pieces of one character count it once)."""
    out, reached = [], 0
    for a, b in offsets[1:]:
        out.append(max(0, b - max(a, reached)))
        reached = max(reached, b)
    return [*out, 0]


def encode_pair(
    student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, example: dict, max_length: int
) -> dict:
    """One example for a cross-tokenizer run.

    Returns the `encode_example` row of the student (`input_ids`, `loss_mask`) plus
    `teacher_input_ids` (the teacher's tokens of the same example, cut after the last aligned position),
    `align` (per student position: the teacher position predicting the same next text, or -1) and
    `target_chars` (per student position: characters of the predicted token, for bits per character).
    """
    row = encode_example(student, example, max_length)
    s_ids, s_off, s_coords, t_ids, t_off, t_coords = _sides(student, teacher, example)
    n = len(row["input_ids"])
    # Internal invariant: alignment runs on the very tokens the student trains on.
    assert s_ids[:n] == row["input_ids"], "encode_pair: student tokens differ from encode_example's"
    groups = align(_side(student, s_ids, s_off, s_coords), _side(teacher, t_ids, t_off, t_coords))
    pairs = prediction_pairs(groups)
    if (
        example.get("messages") is None
        and _ends_with_eos(student, s_ids, s_off)
        and _ends_with_eos(teacher, t_ids, t_off)
    ):
        # Plain text: both sides end the document with eos after the last character; predicting it is the
        # same event (the map pairs the two eos tokens when their strings match).
        pairs.append((len(s_ids) - 2, len(t_ids) - 2))
    index = teacher_index(pairs, n)
    keep = max(index) + 1 if max(index, default=-1) >= 0 else 1
    chars = _target_chars([(a, b) for a, b in (s_off if s_coords is None else _mapped(s_off, s_coords))])
    return {**row, "teacher_input_ids": t_ids[:keep], "align": index, "target_chars": chars[:n]}


def _side(tokenizer: PreTrainedTokenizerBase, ids: list[int], offsets: Offsets, coords) -> SideTokens:
    pieces_of, specials = vocab_bytes(tokenizer)
    pieces = [pieces_of[i] if i < len(pieces_of) else None for i in ids]
    return side_tokens(offsets, [specials.get(i) for i in ids], coords, pieces)


def _ends_with_eos(tokenizer: PreTrainedTokenizerBase, ids: list[int], offsets: Offsets) -> bool:
    """The last token is an appended eos (no text) right after a token that reaches the end of the text."""
    return (
        len(ids) > 1
        and ids[-1] == tokenizer.eos_token_id
        and offsets[-1][0] == offsets[-1][1] == offsets[-2][1]
    )


def _mapped(offsets: Offsets, coords: Sequence[int]) -> Offsets:
    return [(coords[a], coords[b]) for a, b in offsets]


def encode_pairs(
    student: PreTrainedTokenizerBase,
    teacher: PreTrainedTokenizerBase,
    rows,
    max_length: int,
    keep_example: bool = False,
) -> list[dict]:
    """`encode_pair` over an iterable of examples; keep_example: each row also keeps its `example` (on-policy
    stages re-encode the student's reply from it)."""
    rows = list(rows)
    out = [encode_pair(student, teacher, row, max_length) for row in rows]
    if keep_example:
        out = [{**encoded, "example": row} for encoded, row in zip(out, rows, strict=True)]
    return out
