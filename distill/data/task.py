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

Also here: the one reading of a completion's final answer (`extract_answer`: `\\boxed{}` after `</think>`, or
`#### N`), used by exact-match and the generate filter alike; and the reasoning-trace variant
(`iter_reasoning_problems`, `data.name=gsm_synth_reasoning`): the same problems with DeepSeek-R1-shaped replies,
`<think>` + a long, checked, step-by-step trace + `</think>` + the short solution + `\\boxed{answer}`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
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


# ---- final answers --------------------------------------------------------------------------------------------
# One reading of a completion's final answer, shared by exact-match (distill/eval/metrics.py) and the generate
# filter (distill/data/filters.py), so what is scored and what is kept can never disagree.

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_BOXED = "\\boxed{"
_HASH_ANSWER_RE = re.compile(r"####\s*(?:\\?\$)?\s*(-?[\d,]*\d(?:\.\d+)?)")
# Commas are thousands separators wherever they stand, as they always were for GSM8K's `#### N`.
_NUMBER_RE = re.compile(r"-?[\d,]*\d(?:\.\d+)?")

Answer = int | str
"""A normalised final answer: an int for an integral number ("1,234", "3.0", "$5"), else a canonical string
("0.5", or LaTeX such as "\\frac{1}{2}" with its whitespace removed)."""


def normalize_answer(raw: str | int | float) -> Answer | None:
    """The canonical form of an answer (a reference or an extracted one), None when nothing is left.

    A dollar sign, surrounding whitespace and a final full stop are dropped; numbers compare by value
    ("3.0" == "3", "1,234" == "1234"); anything else compares as its text without whitespace.
    """
    text = str(raw).strip().removesuffix(".").strip()
    text = text.removeprefix("\\$").removeprefix("$").strip()
    if not text:
        return None
    if _NUMBER_RE.fullmatch(text):
        value = Decimal(text.replace(",", ""))
        return int(value) if value == value.to_integral_value() else format(value.normalize(), "f")
    return "".join(text.split())


def _answer_region(text: str) -> str | None:
    """The part of a completion that may hold its final answer: after the last `</think>`.

    A `<think>` that is never closed means the model never finished thinking: no answer. A completion may
    lack the opening tag (some templates put `<think>\\n` in the prompt), so only the closing one is required.
    """
    region = text.rsplit(THINK_CLOSE, 1)[-1]
    return None if THINK_OPEN in region else region


def _last_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` whose braces balance (nested braces allowed), else None."""
    start = text.rfind(_BOXED)
    while start != -1:
        depth, begin = 1, start + len(_BOXED)
        for i in range(begin, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[begin:i]
        start = text.rfind(_BOXED, 0, start)  # unbalanced (cut off): an earlier complete one counts
    return None


def extract_answer(text: str) -> Answer | None:
    """The normalised final answer of a completion (see `normalize_answer`), or None if it has none.

    Read from the text after the last `</think>` (None if a `<think>` is left open): the last `\\boxed{...}`,
    else the first `#### N`. The last box counts, as R1's answers restate intermediate results before boxing the
    final one; the first `####` counts, as it is GSM8K's end-of-solution line and a model that keeps generating
    past it must not get a second chance.
    """
    region = _answer_region(text)
    if region is None:
        return None
    boxed = _last_boxed(region)
    if boxed is not None:
        return normalize_answer(boxed)
    match = _HASH_ANSWER_RE.search(region)
    return normalize_answer(match.group(1)) if match else None


def answer_matches(text: str, reference: str | int | float | None) -> bool:
    """Whether the completion `text` ends in the answer `reference` (both normalised; no reference: False)."""
    if reference is None:
        return False
    predicted = extract_answer(text)
    return predicted is not None and predicted == normalize_answer(reference)


# ---- the reasoning-trace variant (data.name=gsm_synth_reasoning) -----------------------------------------------
# DeepSeek-R1 writes `<think>` + a long trace + `</think>` + a short solution ending in `\boxed{answer}`. This variant
# gives every problem such a reply, with a trace of a configured token length, so the long-sequence path (and the
# teacher) sees the real format. The trace only restates the problem and checks its facts in other ways (inverse
# operations, counting by ones, splitting an operand, the chain run backwards): every `a op b = c` in it is true.

_FACT_RE = re.compile(r"(\d+) ([+\-*]) (\d+) = (\d+)")
# The demo tokenizer's pre-tokenizer (distill/models/tokenizer.py) for ASCII text: each digit alone, words with
# their leading space, punctuation runs, whitespace. Each piece is at least one token.
_PIECE_RE = re.compile(r"\d|'(?:s|t|re|ve|m|ll|d)\b| ?[A-Za-z]+| ?[^\sA-Za-z\d]+|\s+(?!\S)|\s+")


def _task_words() -> frozenset[str]:
    """The words of the task's own text, which the demo tokenizer is trained on (task_corpus): mostly one token
    each. Other words (the trace's "Checking", "backwards", ...) it spells out in pieces of one or two letters."""
    texts = [str(value) for tpl in DOMAIN_TEMPLATES.values() for value in vars(tpl).values()]
    texts += [f"{name} {he} {he.capitalize()} Question Answer" for name, he in _PEOPLE]
    return frozenset(re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", " ", " ".join(texts))))


_TASK_WORDS = _task_words()
EXTRA_TOKENS_PER_LETTER = 0.75
"""Demo-tokenizer tokens per letter after the first of a word it was not trained on; fitted on traces against
`train_tokenizer(task_corpus(seed), 512)` (prepare.vocab_size's default; larger vocabularies tokenize the traces the
same), where `estimate_tokens` is within a few percent (tests/test_reasoning_traces.py). Smaller vocabularies split
the trace's own words further: at 384 tokens, traces come out up to 9% longer than estimated."""
ESTIMATE_MARGIN = 0.05
"""Relative error allowed for `estimate_tokens`: trace lengths are drawn this far inside data.trace_tokens."""
MIN_TRACE_TOKENS = 512
"""The shortest trace accepted: every trace restates the problem and checks every step once (up to ~400 tokens)."""


@dataclass(frozen=True)
class Fact:
    """One written arithmetic fact `left op right = result` of a solution."""

    left: int
    op: str
    right: int
    result: int

    def __str__(self) -> str:
        return f"{self.left} {self.op} {self.right} = {self.result}"


def _piece_tokens(piece: str) -> float:
    word = piece.strip()
    if word.isalpha() and word not in _TASK_WORDS:
        return 1 + EXTRA_TOKENS_PER_LETTER * (len(word) - 1)
    return 1.0


def _cost(text: str) -> float:
    return sum(map(_piece_tokens, _PIECE_RE.findall(text)))


def estimate_tokens(text: str) -> int:
    """The length of ASCII task text in demo-tokenizer tokens, estimated without a tokenizer (pure stdlib)."""
    return round(_cost(text))


def _undo(fact: Fact) -> str:
    """A check by the inverse operation (a product: by swapping its factors)."""
    if fact.op == "+":
        return f"Undoing it: {fact.result} - {fact.right} = {fact.left}."
    if fact.op == "-":
        return f"Undoing it: {fact.result} + {fact.right} = {fact.left}."
    return f"Swapping the factors: {fact.right} * {fact.left} = {fact.result}."


def _count_by_ones(fact: Fact) -> str:
    """A check one unit at a time (a product: one group at a time)."""
    if fact.op == "*":
        sums = [f"{fact.right * k} + {fact.right} = {fact.right * (k + 1)}" for k in range(1, fact.left)]
        return f"Adding {fact.left} groups of {fact.right} one group at a time: {', '.join(sums)}."
    step = 1 if fact.op == "+" else -1
    counts = [f"{v} {fact.op} 1 = {v + step}" for v in range(fact.left, fact.result, step)]
    return f"Counting from {fact.left} one at a time: {', '.join(counts)}."


def _split_right(fact: Fact, rng: random.Random) -> str:
    """A check with the right operand split in two parts."""
    if fact.right < 2:
        return _undo(fact)
    p = rng.randint(1, fact.right - 1)
    q = fact.right - p
    split = f"Splitting {fact.right} into {p} and {q}: {p} + {q} = {fact.right}"
    if fact.op == "*":
        lp, lq = fact.left * p, fact.left * q
        return f"{split}, then {fact.left} * {p} = {lp}, {fact.left} * {q} = {lq} and {lp} + {lq} = {fact.result}."
    middle = fact.left + p if fact.op == "+" else fact.left - p
    return f"{split}, then {fact.left} {fact.op} {p} = {middle} and {middle} {fact.op} {q} = {fact.result}."


def _backwards(facts: list[Fact]) -> str:
    """The whole chain undone from the answer back to where the problem starts."""
    undone = []
    for fact in reversed(facts):
        if fact.op == "*":
            undone.append(f"which is {fact.left} groups of {fact.right}: {fact}")
        else:
            inverse = "-" if fact.op == "+" else "+"
            undone.append(f"{fact.result} {inverse} {fact.right} = {fact.left}")
    return f"Going backwards from {facts[-1].result}: {', '.join(undone)}. That is where the problem starts."


def _forwards(facts: list[Fact]) -> str:
    return f"Once more from the start: {', then '.join(map(str, facts))}. The answer is {facts[-1].result}."


def _line_fact(line: str) -> Fact | None:
    match = _FACT_RE.search(line)
    return None if match is None else Fact(int(match[1]), match[2], int(match[3]), int(match[4]))


def _random_check(steps: list[tuple[int, str, Fact]], rng: random.Random) -> str:
    """One more check, of a random step in a random way, or of the whole chain."""
    number, line, fact = rng.choice(steps)
    facts = [f for _, _, f in steps]
    kind = rng.choice(("restate", "undo", "ones", "split", "forwards", "backwards"))
    if kind == "forwards":
        return _forwards(facts)
    if kind == "backwards":
        return _backwards(facts)
    intro = rng.choice(("Let me double-check step", "Wait, let me check step", "Checking once more, step"))
    check = {
        "restate": lambda: f"It said: {line}",
        "undo": lambda: _undo(fact),
        "ones": lambda: _count_by_ones(fact),
        "split": lambda: _split_right(fact, rng),
    }[kind]()
    return f"{intro} {number}. {check}"


def _base_trace(question: str, lines: list[str], answer: int) -> list[str]:
    """The trace every problem gets: the problem restated, each step written and undone once, the chain
    run backwards."""
    blocks = [
        "Let me read the problem carefully.",
        question,
        "I will solve it one step at a time and check each step.",
    ]
    for number, line in enumerate(lines, start=1):
        blocks.append(f"Step {number}: {line}")
        fact = _line_fact(line)
        if fact is not None:
            blocks.append(_undo(fact))
    facts = [f for f in map(_line_fact, lines) if f is not None]
    return [*blocks, f"So the answer should be {answer}. Let me make sure.", _backwards(facts)]


def _pad_to(blocks: list[str], steps: list[tuple[int, str, Fact]], budget: float, rng: random.Random) -> None:
    """Append random checks while the blocks (each followed by a newline) cost at most `budget` tokens; when a
    drawn check does not fit, the shortest kind (a restated step) may still close the gap."""
    used = sum(_cost(block) + 1 for block in blocks)
    while True:
        block = _random_check(steps, rng)
        if used + _cost(block) + 1 > budget:
            number, line, _ = rng.choice(steps)
            block = f"Let me double-check step {number}. It said: {line}"
            if used + _cost(block) + 1 > budget:
                return
        blocks.append(block)
        used += _cost(block) + 1


# The most a trace falls short of its drawn length: one restated step ("Let me double-check step 3. It said: ..."),
# which costs at most ~50 tokens (a level-3 travel step).
_LARGEST_GAP = 56


def check_trace_tokens(trace_tokens: Sequence[int]) -> tuple[int, int]:
    """The range trace lengths are drawn from, inside `data.trace_tokens` = [low, high] by the estimate's margin,
    or a ConfigError saying what is accepted."""
    if len(trace_tokens) != 2 or not MIN_TRACE_TOKENS <= trace_tokens[0] <= trace_tokens[1]:
        raise ConfigError(
            f"data.trace_tokens={list(trace_tokens)} must be [low, high] with {MIN_TRACE_TOKENS} <= low <= high "
            f"(a trace always restates the problem and checks every step); e.g. data.trace_tokens=[1024,4096]"
        )
    low, high = trace_tokens
    first, last = (
        math.ceil(low * (1 + ESTIMATE_MARGIN)) + _LARGEST_GAP,
        math.floor(high * (1 - ESTIMATE_MARGIN)),
    )
    if first > last:
        need = math.ceil(first / (1 - ESTIMATE_MARGIN))
        raise ConfigError(
            f"data.trace_tokens={list(trace_tokens)} is narrower than the trace length estimate can hit "
            f"(+-{ESTIMATE_MARGIN:.0%} and up to {_LARGEST_GAP} tokens short); use high >= {need} for low={low}"
        )
    return first, last


def _keyed_rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def reasoning_reply(question: str, solution: str, answer: int, trace_tokens: Sequence[int], key: str) -> str:
    """R1's reply shape for one problem: `<think>\\n{trace}\\n</think>\\n\\n{solution}\\nThe answer is \\boxed{N}.`

    `solution` is the problem's short reasoning (`iter_problems`). The `<think>...</think>` section is within
    `trace_tokens` = [low, high] demo-tokenizer tokens (its length drawn uniformly inside, see
    `check_trace_tokens`). Deterministic in `key` (the problem's id, which holds the seed).
    """
    first, last = check_trace_tokens(trace_tokens)
    rng = _keyed_rng("trace", key)
    lines = [line for line in solution.splitlines() if not line.startswith("####")]
    steps = [
        (n, line, fact) for n, line in enumerate(lines, start=1) if (fact := _line_fact(line)) is not None
    ]
    assert steps and steps[-1][2].result == answer, (
        f"solution of {key} does not end in its answer: {solution}"
    )
    closing = f"Every check agrees, so the answer is {answer}."
    blocks = _base_trace(question, lines, answer)
    target = rng.randint(first, last)
    _pad_to(blocks, steps, target - _cost(f"{THINK_OPEN}\n{THINK_CLOSE}") - _cost(closing), rng)
    trace = "\n".join([*blocks, closing])
    summary = "\n".join(lines)
    return f"{THINK_OPEN}\n{trace}\n{THINK_CLOSE}\n\n{summary}\nThe answer is \\boxed{{{answer}}}."


def iter_reasoning_problems(
    domain: str, level: int, seed: int, trace_tokens: Sequence[int]
) -> Iterator[dict]:
    """`iter_problems` with R1-shaped replies (`reasoning_reply`) in `reasoning` and `text`."""
    for problem in iter_problems(domain, level, seed):
        reply = reasoning_reply(
            problem["question"], problem["reasoning"], problem["answer"], trace_tokens, problem["id"]
        )
        yield problem | {"reasoning": reply, "text": f"Question: {problem['question']}\nAnswer: {reply}"}
