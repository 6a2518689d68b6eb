"""The embedded reasoning task: GSM8K-shaped word problems a tiny model can learn in minutes.

A problem is a running quantity changed by a few operations (buy, give away, bake trays of, ...). Each
operation is one small arithmetic fact, written out as one line of reasoning, and the reasoning ends with
GSM8K's final line `#### <answer>`:

    Question:  Tom has 3 apples. He buys 4 more apples. How many apples does Tom have now?
    Reasoning: Tom starts with 3 apples.
               He buys 4 more, so 3 + 4 = 7.
               #### 7

Why it is shaped like this: a 1-3M parameter teacher trained for a few CPU minutes can only learn templated
language and small-number facts, so every domain has a fixed set of templates, every step shows its own
arithmetic, and numbers stay small (digits are tokenized one per token by the demo tokenizer).

Domains use their own vocabulary, so each is a distinct increment for continual learning. Levels:
  1  one operation on single-digit operands;
  2  two operations (two written facts), single-digit operands;
  3  two or three operations with operands up to 20.

Generation is pure stdlib and deterministic: the stream of a (domain, level, seed) triple depends on
nothing else, so streams of different domains or levels are independent and `generate_problems(n=5)`
is a prefix of `generate_problems(n=10)`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from distill.errors import ConfigError

LEVELS: tuple[int, ...] = (1, 2, 3)

# (name, subject pronoun); pronouns keep the templates grammatical.
_PEOPLE = (
    ("Tom", "he"),
    ("Anna", "she"),
    ("Ben", "he"),
    ("Mia", "she"),
    ("Sam", "he"),
    ("Lucy", "she"),
)


@dataclass(frozen=True)
class DomainTemplates:
    """The vocabulary and sentence templates of one domain.

    Placeholders: {name}, {He} / {he} (pronoun), {item}, {holder} (a container word such as "bus"),
    {a}, {b} (operands), {c} (the running total before a step), {d} (the result of a step).
    Question templates describe the story; reasoning templates restate it with the arithmetic fact.
    """

    items: tuple[str, ...]
    holders: tuple[str, ...]  # vehicles, shops, ...; used by templates that mention a place
    start_q: str  # the starting quantity {a}
    start_r: str
    product_q: str  # the starting quantity is {a} groups of {b}
    product_r: str
    add_q: str  # {b} more
    add_r: str
    sub_q: str  # {b} fewer
    sub_r: str
    ask: str  # the final question


# The templates are data, one entry per domain (DomainTemplates' fields), kept beside this module; a new domain is
# a new entry there.
TEMPLATES_FILE = Path(__file__).with_name("task_templates.json")
DOMAIN_TEMPLATES: dict[str, DomainTemplates] = {
    name: DomainTemplates(**fields | {"items": tuple(fields["items"]), "holders": tuple(fields["holders"])})
    for name, fields in json.loads(TEMPLATES_FILE.read_text()).items()
}

DOMAINS: tuple[str, ...] = tuple(DOMAIN_TEMPLATES)


@dataclass(frozen=True)
class _LevelSpec:
    """How large and how long problems of one level are."""

    max_operand: int  # operands of + and - are drawn from 1..max_operand
    max_factor: int  # the group count of a product start is drawn from 2..max_factor
    num_ops: tuple[int, ...]  # allowed numbers of written arithmetic facts


_LEVEL_SPECS = {
    1: _LevelSpec(max_operand=9, max_factor=9, num_ops=(1,)),
    2: _LevelSpec(max_operand=9, max_factor=5, num_ops=(2,)),
    # Products stay at most 5 * 20 so totals remain two or three digits.
    3: _LevelSpec(max_operand=20, max_factor=5, num_ops=(2, 3)),
}

_ANSWER_RE = re.compile(r"####\s*(-?[\d,]*\d)")


def _stream_rng(domain: str, level: int, seed: int) -> random.Random:
    """An RNG owned by one (domain, level, seed) stream.

    Seeded from sha256, not `hash()`, which is salted per process for strings.
    """
    digest = hashlib.sha256(f"{seed}/{domain}/{level}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _validate(domain: str, level: int) -> None:
    if domain not in DOMAIN_TEMPLATES:
        raise ConfigError(f"unknown task domain {domain!r}; valid domains are {list(DOMAINS)}")
    if level not in _LEVEL_SPECS:
        raise ConfigError(f"unknown task level {level!r}; valid levels are {list(LEVELS)}")


def _make_problem(rng: random.Random, domain: str, level: int) -> tuple[str, str, int]:
    """Draw one problem: returns (question, reasoning, answer)."""
    tpl, spec = DOMAIN_TEMPLATES[domain], _LEVEL_SPECS[level]
    name, he = rng.choice(_PEOPLE)
    slots = {"name": name, "he": he, "He": he.capitalize()}
    slots |= {"item": rng.choice(tpl.items), "holder": rng.choice(tpl.holders)}
    num_ops = rng.choice(spec.num_ops)

    # A product start is itself one written fact; a plain start is not.
    if rng.random() < 0.4:
        a, b = rng.randint(2, spec.max_factor), rng.randint(2, spec.max_operand)
        total = a * b
        question = [tpl.product_q.format(a=a, b=b, **slots)]
        reasoning = [tpl.product_r.format(a=a, b=b, d=total, **slots)]
        num_ops -= 1
    else:
        total = rng.randint(1, spec.max_operand)
        question = [tpl.start_q.format(a=total, **slots)]
        reasoning = [tpl.start_r.format(a=total, **slots)]

    for _ in range(num_ops):
        # Subtract only what is there, so every intermediate and the answer stay non-negative.
        if total >= 1 and rng.random() < 0.5:
            b = rng.randint(1, min(total, spec.max_operand))
            q, r, result = tpl.sub_q, tpl.sub_r, total - b
        else:
            b = rng.randint(1, spec.max_operand)
            q, r, result = tpl.add_q, tpl.add_r, total + b
        question.append(q.format(b=b, **slots))
        reasoning.append(r.format(b=b, c=total, d=result, **slots))
        total = result

    question.append(tpl.ask.format(**slots))
    reasoning.append(f"#### {total}")
    return " ".join(question), "\n".join(reasoning), total


def iter_problems(domain: str, level: int, seed: int) -> Iterator[dict]:
    """The endless, deterministic problem stream of one (domain, level, seed). See `generate_problems`."""
    _validate(domain, level)
    rng = _stream_rng(domain, level, seed)
    index = 0
    while True:
        question, reasoning, answer = _make_problem(rng, domain, level)
        yield {
            "id": f"{domain}-L{level}-s{seed}-{index}",
            "domain": domain,
            "level": level,
            "question": question,
            "reasoning": reasoning,
            "answer": answer,
            # The plain-text form, for `text`-field training (pretraining-style, no chat template).
            "text": f"Question: {question}\nAnswer: {reasoning}",
        }
        index += 1


def generate_problems(domain: str, level: int, n: int, seed: int) -> list[dict]:
    """The first `n` problems of the (domain, level, seed) stream.

    Each problem is a dict with keys `id, domain, level, question, reasoning, answer (int >= 0), text`.
    Questions may repeat within a stream (level 1 has a few thousand distinct questions per domain).
    """
    if n < 0:
        raise ConfigError(f"number of problems must be >= 0, got n={n}")
    return list(islice(iter_problems(domain, level, seed), n))


def extract_answer(text: str) -> int | None:
    """The integer after the first `####` in `text` (commas allowed), or None if there is none.

    The first marker counts, not the last: it is the answer the model committed to, and a model that keeps
    generating past its end marker must not get a second chance.
    """
    match = _ANSWER_RE.search(text)
    return int(match.group(1).replace(",", "")) if match else None
