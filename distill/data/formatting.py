"""Turn one example into token ids and a loss mask.

Mask convention, shared with the loss code and TeacherBatch: `loss_mask[t]` is True iff token `t + 1` is a
trained token, i.e. the next-token prediction made at position t is trained. The last position predicts
nothing inside the example, so it is always False; this is also what stops loss across packed documents.

Which tokens are trained:
  - `messages` examples: the tokens of every assistant reply, including the template's closing marker
    (`<|im_end|>` for ChatML), so the model learns to stop. System and user turns, the assistant header
    (`<|im_start|>assistant\\n`) and the newline between turns are not trained. A reply's `<think>...</think>`
    reasoning trace is part of the reply and trained (it is what is distilled); templates that drop it or move
    its opening into the prompt (DeepSeek-R1's hub template does both) are refused: use
    `distill.data.chat_templates`.
  - `text` examples: every token (plus the eos token appended at the end).

Examples longer than `max_length` tokens are truncated, unless a `long_rows` block (data.on_long_row) says to drop
or refuse them: then `encode_example` raises `LongRowError` for the caller, who knows the row's place.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from distill.errors import ConfigError

CHAT_ROLES = ("system", "user", "assistant")
"""The roles a conversation may use: the ones every chat template here renders (chat_templates.py refuses others;
tool turns are not supported)."""

LONG_ROW_POLICIES = ("truncate", "drop", "error")
"""data.on_long_row: what becomes of an example longer than data.max_length tokens."""


class LongRowError(ConfigError):
    """An example longer than max_length inside a `long_rows("drop" | "error")` block; the caller drops it or
    names its place."""

    def __init__(self, length: int, max_length: int) -> None:
        super().__init__(f"the row has {length} tokens, more than data.max_length={max_length}")
        self.length, self.max_length = length, max_length

    def __reduce__(self):  # pickles with its numbers (the default would pass the message as `length`)
        return LongRowError, (self.length, self.max_length)


@dataclass
class LongRowTally:
    """The policy of a `long_rows` block and how many examples it truncated."""

    policy: str
    truncated: int = 0


# The policy of the innermost `long_rows` block. A context variable rather than a parameter: every row encoder
# (this module's, and distill.xtok's cross-tokenizer one, which calls encode_example) then follows it unchanged.
_LONG_ROWS: ContextVar[LongRowTally | None] = ContextVar("long_rows", default=None)


@contextmanager
def long_rows(policy: str) -> Iterator[LongRowTally]:
    """Within the block, `encode_example` truncates long examples and counts them (`truncate`), or raises
    LongRowError (`drop`, `error`). Outside any block it truncates without counting."""
    if policy not in LONG_ROW_POLICIES:
        raise ConfigError(f"data.on_long_row={policy!r}; valid values are {list(LONG_ROW_POLICIES)}")
    tally = LongRowTally(policy)
    token = _LONG_ROWS.set(tally)
    try:
        yield tally
    finally:
        _LONG_ROWS.reset(token)


def _fit(ids: list[int], trained: list[bool], max_length: int) -> tuple[list[int], list[bool]]:
    """The example cut to its first max_length tokens, or LongRowError under a drop / error policy."""
    if len(ids) <= max_length:
        return ids, trained
    tally = _LONG_ROWS.get()
    if tally is not None and tally.policy != "truncate":
        raise LongRowError(len(ids), max_length)
    if tally is not None:
        tally.truncated += 1
    return ids[:max_length], trained[:max_length]


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"tokenizer {type(tokenizer).__name__} has no chat_template, so `messages` examples cannot be "
            "rendered; use a tokenizer with a chat template or a dataset with a `text` field"
        )
    if not messages:
        return ""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[str, list[range]]:
    """The rendered conversation and the character spans of its assistant replies (with end marker).

    Works for any template whose renderings of prefixes are prefixes of the full rendering: the reply of
    message i starts where `messages[:i]` + generation prompt ends, and ends where `messages[:i+1]` ends,
    minus trailing whitespace (the newline between turns is not part of the reply).
    """
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        turn = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not full.startswith(turn) or not turn.startswith(prompt):
            raise ConfigError(
                f"the chat template of {type(tokenizer).__name__} renders turn {i} differently inside the "
                "full conversation or after its generation prompt (a prompt ending in `<think>\\n`?), so the "
                "assistant tokens cannot be located; use a prefix-stable template (ChatML, or "
                "distill.data.chat_templates) or a dataset with a `text` field"
            )
        span = range(len(prompt), len(turn.rstrip()))
        _check_reply_kept(tokenizer, message, full[span.start : span.stop], i)
        spans.append(span)
    return full, spans


def _check_reply_kept(tokenizer: PreTrainedTokenizerBase, message: dict, reply: str, turn: int) -> None:
    """The rendered reply must hold the message's text, else part of it would silently go untrained: DeepSeek-R1's
    hub template deletes the `<think>` section of every assistant turn and writes `<think>\\n` into the prompt."""
    for field in ("reasoning_content", "content"):
        text = (message.get(field) or "").strip()
        if text not in reply:
            raise ConfigError(
                f"the chat template of {type(tokenizer).__name__} renders assistant turn {turn} without part of its "
                f"{field}: it drops it (a <think> section?) or writes it into the generation prompt (`<think>\\n`?), "
                "so it would not be trained; use a template that keeps the whole reply after the prompt, e.g. "
                "distill.data.chat_templates.R1_TEMPLATE or QWEN_TEMPLATE"
            )


def _mask_from_trained(trained: list[bool]) -> list[bool]:
    """Shift 'token t is trained' into 'the prediction at t is trained' (see the module docstring)."""
    return [*trained[1:], False] if trained else []


def _encode_messages(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict]
) -> tuple[list[int], list[bool]]:
    if not tokenizer.is_fast:
        raise ConfigError(
            f"tokenizer {type(tokenizer).__name__} is not a fast (Rust) tokenizer; character offsets are "
            "needed to find the assistant tokens. Load it with use_fast=True"
        )
    text, spans = _assistant_spans(tokenizer, messages)
    # The template already wrote every special token (BOS included, where a model has one).
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    trained = [any(start in span for span in spans) for start, _ in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), trained


def _encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[bool]]:
    # The tokenizer's own special tokens (a BOS where it has one), then eos so the model learns to stop
    # and packed documents stay separated.
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids, [True] * len(ids)


def encode_example(tokenizer: PreTrainedTokenizerBase, example: dict, max_length: int) -> dict:
    """Encode one example: `{"input_ids": list[int], "loss_mask": list[bool]}`, both of length <= max_length.

    `example` has `messages` (a list of {role, content}; rendered with the tokenizer's chat template) or
    `text`; `messages` wins when both are present. Truncation: an example longer than `max_length` tokens
    keeps its first `max_length` tokens; the tail is dropped and not trained (a cut chat example may lose
    the end of its reply and its end marker), and the last kept position is masked like any last position.
    Inside a `long_rows("drop" | "error")` block such an example raises LongRowError instead.
    """
    if max_length < 2:
        raise ConfigError(f"max_length={max_length} leaves nothing to predict; use at least 2")
    if example.get("messages") is not None:
        ids, trained = _encode_messages(tokenizer, example["messages"])
    elif example.get("text") is not None:
        ids, trained = _encode_text(tokenizer, example["text"])
    else:
        raise ConfigError(
            f"example has neither `messages` nor `text`; found fields {sorted(example)}. "
            "Rename the field, or set the text/messages field names when loading the dataset"
        )
    ids, trained = _fit(ids, trained, max_length)
    return {"input_ids": ids, "loss_mask": _mask_from_trained(trained)}


def encode_prompt(tokenizer: PreTrainedTokenizerBase, example: dict) -> list[int]:
    """Token ids of the conversation up to and including the assistant generation prompt.

    The final assistant reply (the one to be generated) and anything after it are dropped; greedy decoding
    continues from here. The ids are a prefix of `encode_example(...)["input_ids"]` for the same example.
    """
    messages = example.get("messages")
    if messages is None:
        raise ConfigError(
            f"encode_prompt needs a `messages` example (found fields {sorted(example)}); plain `text` has no "
            "prompt/answer boundary"
        )
    last_reply = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    text = _render(tokenizer, messages[:last_reply], add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_rows(tokenizer: PreTrainedTokenizerBase, rows, max_length: int) -> list[dict]:
    """`encode_example` over an iterable of examples (a `datasets.Dataset` split or a list of dicts)."""
    return [encode_example(tokenizer, row, max_length) for row in rows]
