"""Cross-tokenizer rollouts: what the student wrote, re-encoded for both tokenizers so the teacher can grade it.

The student completes each row's prompt in its own tokens (distill/training/onpolicy.py). Its reply is decoded to
text, put in place of the example's last assistant message, and the example is encoded again as any cross-
tokenizer row (`encode_pair`: each side renders the conversation with its own chat template, tokenizes it and
the two are aligned), so the teacher scores its own tokens of the student's text and its top-k is projected back
onto the student's positions like on the dataset's rows. The trained tokens are the student's tokenizer's
encoding of the text it wrote (for a byte-level BPE, the sampled ids themselves unless it sampled a
non-canonical split).
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from distill.errors import ConfigError
from distill.xtok.encode import encode_pair


def written_pairs(
    student: PreTrainedTokenizerBase,
    teacher: PreTrainedTokenizerBase,
    examples: Sequence[dict],
    completions: Sequence[Sequence[int]],
    *,
    stop_id: int,
    max_length: int,
) -> list[dict]:
    """One cross-tokenizer row per (example, completion): the example with the completion's text as its reply."""
    rows = []
    for example, completion in zip(examples, completions, strict=True):
        messages = example.get("messages")
        replies = [i for i, m in enumerate(messages or []) if m["role"] == "assistant"]
        if not replies:
            raise ConfigError(
                "cross-tokenizer on-policy stages need chat examples (`messages` with an assistant reply): the "
                "student's reply is what is re-encoded for the teacher. Plain `text` rows have no reply to replace."
            )
        text = student.decode([t for t in completion if t != stop_id], skip_special_tokens=True)
        written = [*messages[: replies[-1]], {"role": "assistant", "content": text}]
        rows.append(encode_pair(student, teacher, {"messages": written}, max_length))
    return rows
