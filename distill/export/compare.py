"""What an export costs against the fp32 student: the evaluation's own greedy outputs compared token by token, and
the report table (format, size, CE, exact-match, agreement, tokens/s)."""

from __future__ import annotations

from collections.abc import Sequence


class RecordingGenerate:
    """Wraps a model for the evaluation: every call passes through, and the new tokens of each `generate` row
    (cut at eos, as exact-match reads them) are kept, so greedy outputs come from the evaluation's own decoding."""

    def __init__(self, model, eos_id: int):
        self._model = model
        self._eos_id = eos_id
        self.outputs: list[list[int]] = []

    def __call__(self, *args, **kwargs):
        return self._model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate(self, input_ids, **kwargs):
        out = self._model.generate(input_ids=input_ids, **kwargs)
        for seq in out[:, input_ids.shape[1] :].tolist():
            self.outputs.append(seq[: seq.index(self._eos_id)] if self._eos_id in seq else seq)
        return out


def greedy_agreement(reference: Sequence[list[int]], other: Sequence[list[int]]) -> dict[str, float]:
    """greedy_identical: share of prompts whose whole output equals the reference's; greedy_token_match: share of
    the reference's output tokens reproduced before the first difference (a divergence ends the match)."""
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference outputs, {len(other)} to compare")
    same = matched = total = 0
    for ref, out in zip(reference, other, strict=True):
        same += ref == out
        prefix = 0
        while prefix < min(len(ref), len(out)) and ref[prefix] == out[prefix]:
            prefix += 1
        matched += prefix
        total += len(ref)
    n = max(len(reference), 1)
    return {
        "greedy_identical": same / n,
        "greedy_token_match": matched / max(total, 1),
        "greedy_prompts": n,
        "greedy_reference_tokens": total,
    }


COLUMNS = (
    ("format", "format"),
    ("size_mib", "size (MiB)"),
    ("ce", "held-out CE"),
    ("bits_per_char", "bits/char"),
    ("kl_to_teacher", "KL to teacher"),
    ("accuracy", "token acc."),
    ("agreement", "teacher agreement"),
    ("exact_match", "exact-match"),
    ("greedy_identical", "greedy = fp32"),
    ("greedy_token_match", "greedy tokens = fp32"),
    ("tokens_per_s", "tokens/s (scoring)"),
    ("generate_tokens_per_s", "tokens/s (greedy)"),
    ("peak_rss_growth_mib", "peak memory (MiB)"),
    ("runtime", "runtime"),
)
_PERCENT = {"accuracy", "agreement", "exact_match", "greedy_identical", "greedy_token_match"}


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key in _PERCENT:
        return f"{value:.1%}"
    if key == "size_mib":
        return f"{value:.3f}"
    if key in ("tokens_per_s", "generate_tokens_per_s"):
        return f"{value:,.0f}"
    if key == "peak_rss_growth_mib":
        return f"{value:.1f}"
    return f"{value:.5f}" if isinstance(value, float) else str(value)  # f16 moves CE in the 5th decimal


def report_table(rows: Sequence[dict]) -> str:
    """A markdown table, one row per format (the fp32 student first); columns no row has are left out."""
    columns = [(k, t) for k, t in COLUMNS if any(r.get(k) is not None for r in rows)]
    lines = ["| " + " | ".join(t for _, t in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(k, r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
