"""A run's teacher set, resolved once in `prepare`: each teacher's folder and tokenizer, its own checks (the single
teacher's, on its architecture), and the tokenizer rules that let their outputs meet in the student's vocabulary."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.errors import ConfigError
from distill.models.loading import load_tokenizer
from distill.models.resolve import pair_facts, require_teacher
from distill.models.tokenizer import tokenizer_hash
from distill.run.validate import validate_run
from distill.teacher.teacher_set import has_teacher_set, teacher_views


@dataclass
class SetMember:
    """One teacher of a set: its name, the run config as its single-teacher run sees it, folder and tokenizer."""

    name: str
    view: Any
    path: Path
    tokenizer: Any

    @property
    def mapped(self) -> bool:
        return bool(self.view.teacher.token_map.enabled)


def prepare_teacher_set(cfg, student_tokenizer) -> list[SetMember] | None:
    """The set's members, each checked as its own single-teacher run would be; None without `teachers`.

    A teacher on another tokenizer than the student's needs its token map; teachers with token maps must share one
    tokenizer, because each row carries one alignment of the teacher's tokens (distill/xtok/encode.py)."""
    if not has_teacher_set(cfg):
        return None
    members = []
    student_hash = tokenizer_hash(student_tokenizer)
    for name, view in teacher_views(cfg).items():
        path = require_teacher(view)
        tokenizer = load_tokenizer(path)
        validate_run(view, pair_facts(view, tokenizer))
        member = SetMember(name, view, path, tokenizer)
        if not member.mapped and tokenizer_hash(tokenizer) != student_hash:
            raise ConfigError(
                f"teachers.{name} ({path}) has another tokenizer than the student's; set "
                f"teachers.{name}.token_map.enabled=true (cross-tokenizer), or pick a teacher on the student's tokenizer."
            )
        members.append(member)
    mapped = {tokenizer_hash(m.tokenizer): m.name for m in members if m.mapped}
    if len(mapped) > 1:
        raise ConfigError(
            f"teachers {sorted(mapped.values())} have token maps from different tokenizers; a run carries one "
            "alignment per row, so teachers with token maps must share a tokenizer (or run them separately)."
        )
    return members


def pair_member(members: list[SetMember] | None) -> SetMember | None:
    """The member whose tokenizer the rows' cross-tokenizer alignment is for (the one with a token map), if any."""
    return next((m for m in members or () if m.mapped), None)
