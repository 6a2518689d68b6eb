"""Sequence alignment between two tokenizations of the same text: pure functions over character spans.

Both tokenizers cut the same text (or, for chat data, the same message contents) into tokens with offset
mappings. A position where a token ends on both sides at the same character is a common boundary; the text
between two consecutive common boundaries is one aligned *group*: one or several tokens on each side that
cover exactly the same characters. The prediction made just before a group (student position
`group.student.start - 1`, teacher position `group.teacher.start - 1`) is a prediction of the same next
piece of text on both sides, so the teacher's distribution there can teach the student's.

Units. Byte-level tokenizers can split one multi-byte character over several tokens that all report the
same character span; such tokens (any token starting before the previous one ended) are merged into one
unit, and a boundary is only ever placed after a whole unit.

Masking. A group is not trained (`valid=False`) when it holds a special token that the other side does not
have as the same single special token (chat-template markers one tokenizer lacks are masked, not guessed),
when it holds text of a chat template (`taint`: the token mixes template and shared characters), or when its
two sides do not cover the same characters. Tokens that carry no shared text at all (a BOS, an appended
EOS, template-only tokens of a side's own chat format) never form groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SideTokens:
    """One side's tokens in the shared coordinate (characters of the shared text).

    spans    [(start, end)] per token; start == end for a token that carries no shared text
    special  per token: the special token's string, or None for an ordinary token
    taint    per token: True if the token also covers characters that are not shared (chat template text)
    pieces   optional, per token: the bytes it stands for (None if unknown). Character offsets cannot place a
             boundary inside a character; when both sides cut a group into the very same byte pieces (always
             so for identical tokenizers), every piece is a prediction of the same bytes (`Group.piecewise`).
    """

    spans: Sequence[tuple[int, int]]
    special: Sequence[str | None]
    taint: Sequence[bool]
    pieces: Sequence[bytes | None] | None = None

    def __post_init__(self) -> None:
        assert len(self.spans) == len(self.special) == len(self.taint), "SideTokens fields differ in length"
        assert self.pieces is None or len(self.pieces) == len(self.spans), "SideTokens.pieces length"

    @classmethod
    def plain(
        cls,
        spans: Sequence[tuple[int, int]],
        special: Sequence[str | None] | None = None,
        pieces: Sequence[bytes | None] | None = None,
    ) -> SideTokens:
        """Tokens of one shared text: no template characters."""
        return cls(list(spans), list(special or [None] * len(spans)), [False] * len(spans), pieces)


@dataclass(frozen=True)
class Group:
    """Tokens `student` and `teacher` (index ranges) that cover characters [start, end) on both sides."""

    student: range
    teacher: range
    start: int
    end: int
    valid: bool
    piecewise: bool = False
    """Both sides hold the same byte pieces in the same order: token i predicts what token i predicts."""

    @property
    def one_to_one(self) -> bool:
        """One token on each side: the next tokens are the very same string."""
        return len(self.student) == 1 and len(self.teacher) == 1


@dataclass(frozen=True)
class _Unit:
    start: int
    end: int
    tokens: range
    special: str | None  # set when the unit is one special token
    taint: bool
    has_special: bool


def _units(side: SideTokens) -> list[_Unit]:
    """Merge tokens that start before the running end (pieces of one character); drop empty tokens."""
    units: list[_Unit] = []
    for i, ((start, end), special, taint) in enumerate(
        zip(side.spans, side.special, side.taint, strict=True)
    ):
        if end <= start:
            continue
        last = units[-1] if units else None
        if last is not None and start < last.end and last.tokens.stop == i:
            units[-1] = _Unit(
                last.start,
                max(last.end, end),
                range(last.tokens.start, i + 1),
                None,
                last.taint or taint,
                True if special is not None else last.has_special,
            )
            continue
        units.append(_Unit(start, end, range(i, i + 1), special, taint, special is not None))
    return units


def _covers(units: Sequence[_Unit], start: int, end: int) -> bool:
    """The units tile [start, end) exactly: contiguous, no gap, no overlap."""
    pos = start
    for u in units:
        if u.start != pos:
            return False
        pos = u.end
    return pos == end


def _specials_match(s: Sequence[_Unit], t: Sequence[_Unit]) -> bool:
    """No special token on either side, or the same single special token on both."""
    if not any(u.has_special for u in (*s, *t)):
        return True
    return len(s) == len(t) == 1 and s[0].special is not None and s[0].special == t[0].special


def align(student: SideTokens, teacher: SideTokens) -> list[Group]:
    """The aligned groups of two tokenizations, in text order (see the module docstring).

    Every group, valid or not, has at least one unit on each side; trailing units after the last common
    boundary form no group.
    """
    s_units, t_units = _units(student), _units(teacher)
    common = sorted({u.end for u in s_units} & {u.end for u in t_units})
    groups: list[Group] = []
    i = j = 0
    for boundary in common:
        gi, gj = i, j
        while i < len(s_units) and s_units[i].end <= boundary:
            i += 1
        while j < len(t_units) and t_units[j].end <= boundary:
            j += 1
        s, t = s_units[gi:i], t_units[gj:j]
        start = min(s[0].start, t[0].start)
        valid = (
            _covers(s, start, boundary)
            and _covers(t, start, boundary)
            and not any(u.taint for u in (*s, *t))
            and _specials_match(s, t)
        )
        s_tokens = range(s[0].tokens.start, s[-1].tokens.stop)
        t_tokens = range(t[0].tokens.start, t[-1].tokens.stop)
        piecewise = valid and _same_pieces(student, s_tokens, teacher, t_tokens)
        groups.append(Group(s_tokens, t_tokens, start, boundary, valid, piecewise))
    return groups


def _same_pieces(student: SideTokens, s: range, teacher: SideTokens, t: range) -> bool:
    if student.pieces is None or teacher.pieces is None or len(s) != len(t) or len(s) < 2:
        return False
    s_pieces, t_pieces = [student.pieces[i] for i in s], [teacher.pieces[i] for i in t]
    return None not in s_pieces and s_pieces == t_pieces


def prediction_pairs(groups: Sequence[Group]) -> list[tuple[int, int]]:
    """(student position, teacher position) pairs that predict the start of a valid group.

    Position p's logits predict token p + 1, so the pair is the token just before each group's first token;
    a piecewise group adds a pair per piece. Pairs with a position before either sequence are skipped.
    """
    pairs = []
    for g in groups:
        if not g.valid:
            continue
        pieces = len(g.student) if g.piecewise else 1
        pairs += [(g.student.start + i - 1, g.teacher.start + i - 1) for i in range(pieces)]
    return [(s, t) for s, t in pairs if s >= 0 and t >= 0]


def teacher_index(pairs: Sequence[tuple[int, int]], num_student: int) -> list[int]:
    """Per student position, the aligned teacher position or -1: the gather index the teacher side uses."""
    index = [-1] * num_student
    for s, t in pairs:
        if s < num_student:
            index[s] = t
    return index


def shared_coordinates(text: str, shared: Sequence[tuple[int, int]]) -> list[int]:
    """Prefix counts of shared characters: out[c] = number of shared characters in text[:c], len(text)+1 long.

    `shared` are the character ranges of `text` that both sides have (message contents for chat data); the
    rest is one side's own template. A token (a, b) covers shared characters [out[a], out[b]).
    """
    flags = [False] * len(text)
    for a, b in shared:
        for c in range(a, b):
            flags[c] = True
    out = [0] * (len(text) + 1)
    for c, flag in enumerate(flags):
        out[c + 1] = out[c] + flag
    return out


def side_tokens(
    offsets: Sequence[tuple[int, int]],
    special: Sequence[str | None],
    coords: Sequence[int] | None = None,
    pieces: Sequence[bytes | None] | None = None,
) -> SideTokens:
    """SideTokens from a tokenizer's offset mapping, optionally mapped through `shared_coordinates`."""
    if coords is None:
        return SideTokens.plain([(a, b) for a, b in offsets], special, pieces)
    spans, taint = [], []
    for a, b in offsets:
        lo, hi = coords[a], coords[b]
        spans.append((lo, hi))
        # Some of the token's characters are template text: it cannot be compared with the other side.
        taint.append(hi > lo and hi - lo != b - a)
    return SideTokens(spans, list(special), taint, pieces)
