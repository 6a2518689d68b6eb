"""Bad input is an error with a place, or a counted skip: every kind of bad row under data.on_bad_row=error|skip,
rows longer than data.max_length under data.on_long_row=truncate|drop|error, and the CLI's exit code 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import pytest

from distill.config import compose
from distill.data import encode_example, read_user_dataset
from distill.data.build import build_data
from distill.errors import ConfigError
from distill.models.tokenizer import task_corpus, train_tokenizer

GOOD_ROWS = 19
"""Good rows around the one bad row of each case."""
BAD_AT = 7
"""The bad row's line (JSON lines) or row number (parquet, .json array), from 1."""


def _text(i: int) -> dict:
    return {"text": f"Tom buys {i} apples and {i + 1} pears."}


def _chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}


def _lines(bad: bytes, row: Callable[[int], dict] = _text) -> bytes:
    """A JSON-lines file: good rows with `bad` as line BAD_AT."""
    good = [json.dumps(row(i)).encode() for i in range(GOOD_ROWS)]
    return b"\n".join([*good[: BAD_AT - 1], bad, *good[BAD_AT - 1 :]]) + b"\n"


def _chat_lines(bad_messages: object) -> bytes:
    return _lines(json.dumps({"messages": bad_messages}).encode(), _chat)


@dataclass
class Case:
    """A file with one bad row: its name, how to write it, the reason it is skipped for, what the error says."""

    name: str
    write: Callable[[Path], None]
    reason: str
    problem: str
    """A regex of the problem, after `<place>: `."""
    by_line: bool = True

    def place(self, path: Path) -> str:
        return f"{path}:{BAD_AT}" if self.by_line else f"{path} row {BAD_AT}"


def _bytes(content: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(content)


def _parquet_with_null_text(path: Path) -> None:
    rows = [_text(i) for i in range(GOOD_ROWS)]
    rows.insert(BAD_AT - 1, {"text": None})
    datasets.Dataset.from_list(rows).to_parquet(str(path))


def _json_array_with_a_number(path: Path) -> None:
    rows: list = [_text(i) for i in range(GOOD_ROWS)]
    rows.insert(BAD_AT - 1, 42)
    path.write_text(json.dumps(rows, indent=1))


CASES = [
    Case(
        "malformed.jsonl",
        _bytes(_lines(b'{"text": "no closing brace"')),
        "malformed_json",
        r"not valid JSON \(Expecting ',' delimiter at column 28\)",
    ),
    Case("list.jsonl", _bytes(_lines(b"[1, 2]")), "malformed_json", "a JSON list, not an object"),
    Case("missing.jsonl", _bytes(_lines(b'{"body": "x"}')), "missing_field", "no 'text' field"),
    Case(
        "number.jsonl",
        _bytes(_lines(b'{"text": 5}')),
        "not_a_string",
        "field 'text' is not a string but int 5",
    ),
    Case(
        "latin1.jsonl",
        _bytes(_lines(b'{"text": "caf\xe9"}')),
        "invalid_utf8",
        r"not valid UTF-8 \(invalid continuation byte at byte \d+\); re-encode the file as UTF-8",
    ),
    Case("blank.jsonl", _bytes(_lines(b'{"text": "  \\n "}')), "empty_text", "field 'text' is empty"),
    Case(
        "role.jsonl",
        _bytes(_chat_lines([{"role": "tool", "content": "42"}, {"role": "assistant", "content": "ok"}])),
        "unknown_role",
        "message 0 has role 'tool'; valid roles are system, user, assistant",
    ),
    Case(
        "string_messages.jsonl",
        _bytes(_chat_lines("hello")),
        "bad_messages",
        r"field 'messages' is 'hello', not a list of \{role, content\} messages",
    ),
    Case(
        "no_content.jsonl",
        _bytes(_chat_lines([{"role": "user"}])),
        "bad_messages",
        r"message 0 of field 'messages' is \{'role': 'user'\}, not \{role, content\}",
    ),
    Case(
        "empty_chat.jsonl",
        _bytes(_chat_lines([])),
        "empty_text",
        "field 'messages' has no message with any text",
    ),
    Case(
        "null.parquet",
        _parquet_with_null_text,
        "missing_field",
        r"no 'text' field \(or it is null\)",
        by_line=False,
    ),
    Case(
        "array.json", _json_array_with_a_number, "malformed_json", "a JSON int, not an object", by_line=False
    ),
]


def _read(path: Path, tmp_path: Path, on_bad_row: str):
    return read_user_dataset(path, eval_fraction=0.25, cache_dir=tmp_path / "cache", on_bad_row=on_bad_row)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_a_bad_row_is_an_error_naming_file_line_problem_and_fix(case, tmp_path):
    path = tmp_path / case.name
    case.write(path)
    with pytest.raises(ConfigError) as err:
        _read(path, tmp_path, "error")
    message = str(err.value)
    assert re.match(rf"{re.escape(case.place(path))}: {case.problem}", message), message
    assert "fix or remove that" in message or "re-encode" in message
    assert message.endswith("or set data.on_bad_row=skip to skip such rows (they are counted)")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_a_bad_row_is_skipped_and_counted(case, tmp_path):
    path = tmp_path / case.name
    case.write(path)
    data = _read(path, tmp_path, "skip")
    assert data.skipped == {case.reason: 1}
    splits = data.splits
    assert splits["train"].num_rows + splits["eval"].num_rows == GOOD_ROWS
    # The rows' places skip the bad one: the file's other lines keep their own numbers.
    places = {data.places[split][i] for split in splits for i in range(splits[split].num_rows)}
    assert case.place(path) not in places and len(places) == GOOD_ROWS


def test_an_empty_file_is_an_error_under_either_policy(tmp_path):
    for name, content in (("empty.jsonl", b""), ("blank.jsonl", b"\n \n")):
        path = tmp_path / name
        path.write_bytes(content)
        for policy in ("error", "skip"):
            with pytest.raises(
                ConfigError, match=rf"dataset file {re.escape(str(path))} is empty; point data.path"
            ):
                _read(path, tmp_path, policy)


def test_a_file_of_bad_rows_only_is_an_error_when_skipping(tmp_path):
    path = tmp_path / "all_bad.jsonl"
    path.write_text('{"text": 1}\n{"text": ""}\nnot json\n')
    with pytest.raises(
        ConfigError, match=r"every row of .*all_bad\.jsonl is bad \(skipped: \{'empty_text': 1, "
    ):
        _read(path, tmp_path, "skip")


def test_a_field_of_mixed_types_names_the_field(tmp_path):
    path = tmp_path / "ids.jsonl"
    path.write_text('{"text": "a", "id": 1}\n{"text": "b", "id": "two"}\n')
    with pytest.raises(ConfigError, match=r"field 'id' of .*ids\.jsonl holds values of different types"):
        _read(path, tmp_path, "skip")


def test_an_unknown_policy_lists_the_valid_ones(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text('{"text": "a"}\n')
    with pytest.raises(ConfigError, match=r"data.on_bad_row='ignore'; valid values are \['error', 'skip'\]"):
        _read(path, tmp_path, "ignore")


# ---- rows longer than data.max_length, through build_data ---------------------------------------------------
MAX_LENGTH = 24
LONG_AT = (3, 11)
"""The lines of the two long rows."""


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(task_corpus(seed=0, per_stream=50), vocab_size=512)


def _long_rows_file(tmp_path: Path) -> Path:
    rows = [_text(i) for i in range(GOOD_ROWS)]
    for line in LONG_AT:
        rows.insert(line - 1, {"text": " ".join(f"Tom buys {i} apples." for i in range(20))})
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _build(path: Path, tokenizer, *overrides: str):
    cfg = compose(
        [f"data.path={path}", f"data.max_length={MAX_LENGTH}", "data.eval_fraction=0.25", *overrides]
    )
    data = build_data(
        cfg, lambda examples: [encode_example(tokenizer, ex, cfg.data.max_length) for ex in examples]
    )
    return cfg, data


def _counts(skipped: int = 0, dropped: int = 0, truncated: int = 0) -> dict[str, int]:
    return {"data/skipped_rows": skipped, "data/dropped_long_rows": dropped, "data/truncated_rows": truncated}


def test_long_rows_are_truncated_and_counted_by_default(tmp_path, tokenizer):
    _, data = _build(_long_rows_file(tmp_path), tokenizer)
    assert data.counts == _counts(truncated=len(LONG_AT))
    rows = data.train_rows + data.eval_rows
    assert len(rows) == GOOD_ROWS + len(LONG_AT)
    assert max(len(row["input_ids"]) for row in rows) == MAX_LENGTH


def test_long_rows_are_dropped_and_counted(tmp_path, tokenizer):
    _, data = _build(_long_rows_file(tmp_path), tokenizer, "data.on_long_row=drop")
    assert data.counts == _counts(dropped=len(LONG_AT))
    assert len(data.train_rows) + len(data.eval_rows) == GOOD_ROWS
    # Raw held-out examples stay aligned with the encoded rows (exact-match generation pairs them by index).
    assert len(data.eval_examples) == len(data.eval_rows)
    for example, row in zip(data.eval_examples, data.eval_rows, strict=True):
        assert encode_example(tokenizer, example, MAX_LENGTH) == row


def test_a_long_row_is_an_error_naming_its_line_and_length(tmp_path, tokenizer):
    path = _long_rows_file(tmp_path)
    with pytest.raises(ConfigError) as err:
        _build(path, tokenizer, "data.on_long_row=error")
    message = str(err.value)
    assert re.match(
        rf"{re.escape(str(path))}:({LONG_AT[0]}|{LONG_AT[1]}): the row has \d+ tokens, more than data.max_length=24; "
        "raise data.max_length, or set data.on_long_row=truncate",
        message,
    ), message


def test_a_long_row_of_the_embedded_task_is_named_by_split_and_row(tokenizer):
    cfg = compose(["data.num_train=16", "data.num_eval=4", "data.max_length=8", "data.on_long_row=error"])
    with pytest.raises(
        ConfigError, match=r"embedded task data.name=gsm_synth \(train split\) row 1: the row has"
    ):
        build_data(cfg, lambda examples: [encode_example(tokenizer, ex, 8) for ex in examples])


def test_skipped_rows_reach_the_run_data_counts(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    CASES[0].write(path)
    _, data = _build(path, tokenizer, "data.on_bad_row=skip", "data.max_length=128")
    assert data.counts == {**_counts(skipped=1), "data/skipped/malformed_json": 1}


def test_unknown_long_row_policy_lists_the_valid_ones(tokenizer):
    cfg = compose(["data.num_train=16", "data.num_eval=4", "data.on_long_row=cut"])
    with pytest.raises(
        ConfigError, match=r"data.on_long_row='cut'; valid values are \['truncate', 'drop', 'error'\]"
    ):
        build_data(cfg, lambda examples: [encode_example(tokenizer, ex, 128) for ex in examples])


# ---- the command line ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_bad_data_exits_2_with_one_line_and_keeps_what_was_written(
    tiny_teacher, base_overrides, tmp_path
):
    bad = tmp_path / "bad.jsonl"
    CASES[0].write(bad)
    before = bad.read_bytes()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n')  # an earlier run's output
    cmd = [
        sys.executable,
        "-m",
        "launch.cli",
        *base_overrides,
        f"data.path={bad}",
        f"hydra.run.dir={run_dir}",
    ]
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("distill: ")]
    assert line.startswith(f"distill: ConfigError: {bad}:{BAD_AT}: not valid JSON"), line
    assert line.endswith("or set data.on_bad_row=skip to skip such rows (they are counted)")
    assert bad.read_bytes() == before
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 0, "loss": 1.0}\n'


# ---- the report ------------------------------------------------------------------------------------------------
def test_the_report_has_a_data_table_when_eval_json_has_counts(tmp_path):
    from distill.eval.report import write_report

    counts = {**_counts(skipped=3, dropped=1, truncated=2), "data/skipped/unknown_role": 2}
    counts["data/skipped/malformed_json"] = 1
    summary = dict(sorted({"ce": 1.5, **counts}.items()))  # as eval.json holds them: sorted
    text = write_report(tmp_path, metrics=[], eval_summary=summary).read_text()
    data = text[text.index("## Data") :].split("\n\n")[1].splitlines()
    assert data[2:] == [
        "| bad rows skipped (data.on_bad_row=skip) | 3 |",
        "| skipped as malformed_json | 1 |",
        "| skipped as unknown_role | 2 |",
        "| rows over data.max_length dropped (data.on_long_row=drop) | 1 |",
        "| rows cut to data.max_length (data.on_long_row=truncate) | 2 |",
    ]
    heldout = text[text.index("## Held-out evaluation") : text.index("## Data")]
    assert "ce" in heldout and "data/" not in heldout
    assert "## Data" not in write_report(tmp_path / "b", metrics=[], eval_summary={"ce": 1.5}).read_text()
