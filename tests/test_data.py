"""The data layer: task generator, held-out split, loss masks, padding/packing, batch stream, user data."""

from __future__ import annotations

import json
import re

import datasets
import pytest
import torch

from distill.data import (
    DOMAINS,
    LEVELS,
    BatchStream,
    build_task_dataset,
    encode_example,
    encode_prompt,
    encode_rows,
    extract_answer,
    generate_problems,
    load_user_dataset,
    pack_rows,
    pad_batch,
)
from distill.errors import ConfigError
from distill.models.tokenizer import IM_END, task_corpus, train_tokenizer

STEP_RE = re.compile(r"(\d+) ([+\-*]) (\d+) = (\d+)")
OPS = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(task_corpus(seed=0, per_stream=50), vocab_size=512)


@pytest.fixture(scope="module")
def task():
    return build_task_dataset(DOMAINS, LEVELS, num_train=240, num_eval=60, seed=3)


def trained_text(tokenizer, encoded: dict) -> str:
    """Decode the tokens whose prediction is trained (the token after each True mask position)."""
    ids, mask = encoded["input_ids"], encoded["loss_mask"]
    return tokenizer.decode([ids[t + 1] for t in range(len(ids) - 1) if mask[t]])


# --- task generator --------------------------------------------------------------------------------------


def test_generator_is_deterministic_and_seeded():
    assert generate_problems("baking", 2, 20, seed=1) == generate_problems("baking", 2, 20, seed=1)
    assert generate_problems("baking", 2, 20, seed=1) != generate_problems("baking", 2, 20, seed=2)
    # A stream depends only on its own (domain, level, seed): a prefix stays a prefix.
    assert generate_problems("baking", 2, 5, seed=1) == generate_problems("baking", 2, 20, seed=1)[:5]


def test_domains_have_distinct_vocabulary():
    questions = {d: " ".join(p["question"] for p in generate_problems(d, 1, 30, seed=0)) for d in DOMAINS}
    assert "passengers" in questions["travel"] and "passengers" not in questions["baking"]
    assert len({q[:40] for q in questions.values()}) == len(DOMAINS)


@pytest.mark.parametrize("level", LEVELS)
def test_every_written_step_is_correct_and_answer_extracts(level):
    for domain in DOMAINS:
        for problem in generate_problems(domain, level, 100, seed=0):
            steps = STEP_RE.findall(problem["reasoning"])
            assert steps, problem["reasoning"]
            for a, op, b, result in steps:
                assert OPS[op](int(a), int(b)) == int(result), problem["reasoning"]
            assert int(steps[-1][3]) == problem["answer"] >= 0
            assert problem["reasoning"].endswith(f"\n#### {problem['answer']}")
            assert extract_answer(problem["reasoning"]) == problem["answer"]
            assert extract_answer(problem["text"]) == problem["answer"]


def test_level_sizes():
    for domain in DOMAINS:
        level1 = generate_problems(domain, 1, 100, seed=0)
        assert all(len(STEP_RE.findall(p["reasoning"])) == 1 for p in level1)
        assert all(int(n) <= 9 for p in level1 for n in re.findall(r"\d+", p["question"]))
        assert all(len(STEP_RE.findall(p["reasoning"])) == 2 for p in generate_problems(domain, 2, 100, 0))
        assert {len(STEP_RE.findall(p["reasoning"])) for p in generate_problems(domain, 3, 100, 0)} == {2, 3}


def test_extract_answer_edge_cases():
    assert extract_answer("so 2 + 2 = 4.\n#### 4<|im_end|>") == 4
    assert extract_answer("#### 1,234") == 1234
    assert extract_answer("#### 7 then #### 9") == 7  # the first committed answer counts
    assert extract_answer("no marker 42") is None
    assert extract_answer("####") is None


def test_unknown_domain_lists_valid_ones():
    with pytest.raises(ConfigError, match="shopping"):
        generate_problems("cooking", 1, 1, seed=0)


# --- task dataset ----------------------------------------------------------------------------------------


def test_task_dataset_sizes_and_rows(task):
    assert task["train"].num_rows == 240 and task["eval"].num_rows == 60
    row = task["eval"][0]
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    assert extract_answer(row["messages"][1]["content"]) == row["answer"]
    assert {(r["domain"], r["level"]) for r in task["train"]} == {(d, lv) for d in DOMAINS for lv in LEVELS}


def test_held_out_never_overlaps_train(task):
    def questions(split):
        return {m[0]["content"] for m in split["messages"]}

    assert not questions(task["train"]) & questions(task["eval"])
    # The split is by question hash, so it holds across seeds and sizes as well.
    other = build_task_dataset(["travel"], [1], num_train=300, num_eval=10, seed=4)
    assert not questions(other["train"]) & questions(task["eval"])


# --- formatting ------------------------------------------------------------------------------------------


def test_prompt_tokens_never_carry_loss(tokenizer, task):
    for row in task["eval"].select(range(12)):
        messages = [{"role": "system", "content": "Answer briefly."}, *row["messages"]]
        encoded = encode_example(tokenizer, {"messages": messages}, max_length=512)
        assert trained_text(tokenizer, encoded) == row["messages"][1]["content"] + IM_END
        assert encoded["loss_mask"][-1] is False
        prompt = encode_prompt(tokenizer, {"messages": messages})
        assert encoded["input_ids"][: len(prompt)] == prompt
        assert not any(encoded["loss_mask"][: len(prompt) - 1])


def test_multi_turn_trains_every_assistant_reply(tokenizer):
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "two"},
    ]
    encoded = encode_example(tokenizer, {"messages": messages}, max_length=512)
    assert trained_text(tokenizer, encoded) == f"one{IM_END}two{IM_END}"
    prompt = tokenizer.decode(encode_prompt(tokenizer, {"messages": messages}))
    assert prompt.endswith("b<|im_end|>\n<|im_start|>assistant\n") and "two" not in prompt


def test_text_examples_train_every_token(tokenizer):
    encoded = encode_example(tokenizer, {"text": "Question: 2 + 3?\nAnswer: 5"}, max_length=512)
    assert encoded["input_ids"][-1] == tokenizer.eos_token_id
    assert encoded["loss_mask"] == [True] * (len(encoded["input_ids"]) - 1) + [False]


def test_truncation_keeps_the_head(tokenizer, task):
    full = encode_example(tokenizer, task["train"][0], max_length=512)
    cut = encode_example(tokenizer, task["train"][0], max_length=20)
    assert cut["input_ids"] == full["input_ids"][:20]
    assert cut["loss_mask"] == [*full["loss_mask"][:19], False]


def test_example_without_fields_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match="question"):
        encode_example(tokenizer, {"question": "hi"}, max_length=16)


# --- padding, packing, batch stream ----------------------------------------------------------------------

ROWS = [
    {"input_ids": [5, 6, 7], "loss_mask": [False, True, False]},
    {"input_ids": [8, 9], "loss_mask": [True, False]},
    {"input_ids": [10, 11, 12, 13], "loss_mask": [True, True, True, False]},
]


def test_pad_batch_masks_padding():
    batch = pad_batch(ROWS, pad_id=0)
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (3, 4)
    assert batch["input_ids"][1].tolist() == [8, 9, 0, 0]
    assert batch["attention_mask"].dtype == torch.bool and batch["loss_mask"].dtype == torch.bool
    assert batch["attention_mask"].sum(1).tolist() == [3, 2, 4]
    assert not (batch["loss_mask"] & ~batch["attention_mask"]).any()
    assert pad_batch(ROWS, pad_id=0, pad_to=6)["input_ids"].shape == (3, 6)
    with pytest.raises(ConfigError, match="pad_to=3"):
        pad_batch(ROWS, pad_id=0, pad_to=3)


def test_pack_rows_masks_boundaries_and_filler():
    packed = pack_rows(ROWS, seq_len=6, eos_id=0)
    # 3 + 2 tokens fit in one row, the 4-token example starts the next.
    assert [row["input_ids"] for row in packed] == [[5, 6, 7, 8, 9, 0], [10, 11, 12, 13, 0, 0]]
    assert packed[0]["loss_mask"] == [False, True, False, True, False, False]  # position 2 -> 8 untrained
    assert packed[1]["attention_mask"] == [True] * 4 + [False] * 2
    # Positions restart at every document and at the filler (tests/test_packing.py: the attention they give).
    assert [row["position_ids"] for row in packed] == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    batch = pad_batch(packed, pad_id=0)
    assert batch["input_ids"].shape == (2, 6) and batch["position_ids"].shape == (2, 6)
    assert not (batch["loss_mask"] & ~batch["attention_mask"]).any()


def test_pack_rows_truncates_long_examples():
    (row,) = pack_rows([ROWS[2]], seq_len=3, eos_id=0)
    assert row["input_ids"] == [10, 11, 12] and row["loss_mask"] == [True, True, False]


@pytest.mark.parametrize("packing", [False, True])
def test_batch_stream_is_deterministic_and_random_access(tokenizer, task, packing):
    rows = encode_rows(tokenizer, task["train"].select(range(40)), max_length=128)

    def make(seed: int) -> BatchStream:
        return BatchStream(rows, 4, seed=seed, pad_id=0, packing=packing, seq_len=128)

    stream = make(7)
    assert stream.num_batches == len(stream.rows) // 4
    first = list(stream.batches(epoch=0))
    assert [batch_id for batch_id, _ in first] == [(0, i) for i in range(stream.num_batches)]
    for (epoch, index), batch in first:
        assert batch["input_ids"].shape == (4, 128)
        for key, value in make(7).batch(epoch, index).items():
            assert torch.equal(value, batch[key])
    # Another epoch reshuffles; resuming from an index continues the same stream.
    assert not torch.equal(stream.batch(1, 0)["input_ids"], first[0][1]["input_ids"])
    (resumed_id, resumed), *_ = stream.batches(epoch=0, start=2)
    assert resumed_id == (0, 2) and torch.equal(resumed["input_ids"], first[2][1]["input_ids"])
    assert not torch.equal(make(8).batch(0, 0)["input_ids"], first[0][1]["input_ids"])


def test_batch_stream_drops_incomplete_batch_and_checks_size():
    assert BatchStream(ROWS, 2, seed=0, pad_id=0).num_batches == 1
    with pytest.raises(ConfigError, match="batch of 4"):
        BatchStream(ROWS, 4, seed=0, pad_id=0)
    with pytest.raises(IndexError):
        BatchStream(ROWS, 2, seed=0, pad_id=0).batch(0, 1)


# --- user datasets ---------------------------------------------------------------------------------------

TEXT_ROWS = [{"text": f"document {i}", "source": "web"} for i in range(20)]
CHAT_ROWS = [
    {"conversation": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
    for i in range(20)
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_load_jsonl_text(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "data.jsonl", TEXT_ROWS)
    loaded = load_user_dataset(path, eval_fraction=0.25, seed=0, cache_dir=tmp_path / "cache")
    assert (loaded["train"].num_rows, loaded["eval"].num_rows) == (15, 5)
    assert set(loaded["train"]["text"]) | set(loaded["eval"]["text"]) == {r["text"] for r in TEXT_ROWS}
    assert all(encode_example(tokenizer, loaded["eval"][0], 64)["loss_mask"][:-1])
    # A folder of jsonl files loads the same rows.
    (tmp_path / "shards").mkdir()
    write_jsonl(tmp_path / "shards" / "part-0.jsonl", TEXT_ROWS[:10])
    write_jsonl(tmp_path / "shards" / "part-1.jsonl", TEXT_ROWS[10:])
    folder = load_user_dataset(tmp_path / "shards", eval_fraction=0.25, seed=0, cache_dir=tmp_path / "cache")
    assert sorted(folder["eval"]["text"]) == sorted(loaded["eval"]["text"])


def test_load_parquet_messages_with_custom_field(tmp_path, tokenizer):
    path = tmp_path / "chat.parquet"
    datasets.Dataset.from_list(CHAT_ROWS).to_parquet(str(path))
    loaded = load_user_dataset(
        path, messages_field="conversation", eval_fraction=0.1, seed=1, cache_dir=tmp_path / "cache"
    )
    assert loaded["train"].num_rows == 18 and "messages" in loaded["train"].column_names
    row = loaded["eval"][0]
    encoded = encode_example(tokenizer, row, max_length=64)
    assert trained_text(tokenizer, encoded) == row["messages"][1]["content"] + IM_END


def test_load_save_to_disk_dataset_and_dict(tmp_path):
    datasets.Dataset.from_list(TEXT_ROWS).save_to_disk(str(tmp_path / "ds"))
    assert load_user_dataset(tmp_path / "ds", eval_fraction=0.5, seed=0)["eval"].num_rows == 10
    chat = datasets.Dataset.from_list(CHAT_ROWS)
    saved = datasets.DatasetDict({"train": chat.select(range(15)), "validation": chat.select(range(15, 20))})
    saved.save_to_disk(str(tmp_path / "dd"))
    loaded = load_user_dataset(tmp_path / "dd", messages_field="conversation", eval_fraction=0.5, seed=0)
    assert (loaded["train"].num_rows, loaded["eval"].num_rows) == (15, 5)  # its own split is kept


def test_user_dataset_errors(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"body": "x", "id": 1}])
    with pytest.raises(ConfigError, match=r"\['body', 'id'\]"):
        load_user_dataset(path, cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"nowhere\.jsonl"):
        load_user_dataset(tmp_path / "nowhere.jsonl")
    with pytest.raises(
        ConfigError, match=r"bad\.jsonl:1: field 'body' is 'x', not a list of \{role, content\}"
    ):
        load_user_dataset(path, messages_field="body", cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"eval_fraction=0\.9"):
        load_user_dataset(
            write_jsonl(tmp_path / "one.jsonl", TEXT_ROWS[:1]), eval_fraction=0.9, cache_dir=tmp_path / "c"
        )
    with pytest.raises(ConfigError, match=r"'\.csv'"):
        load_user_dataset(write_jsonl(tmp_path / "data.csv", TEXT_ROWS))


def test_bad_jsonl_files_are_refused_with_their_place(tmp_path):
    """An empty file, a malformed line, invalid UTF-8 and a non-object line each name the file and line."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError, match=rf"dataset file {empty} is empty"):
        load_user_dataset(empty, cache_dir=tmp_path / "cache")
    good = '{"text": "a"}\n'
    cases = {
        "malformed.jsonl": (
            (good * 2 + '{"text": "b"\n' + good).encode(),
            r":3: not valid JSON \(Expecting ',' delimiter at column 13\)",
        ),
        "latin1.jsonl": (
            good.encode() + b'{"text": "caf\xe9"}\n',
            r":2: not valid UTF-8 \(invalid continuation byte at byte 27\); re-encode",
        ),
        "array.jsonl": ((good + "[1, 2]\n").encode(), r":2: a JSON list, not an object with named fields"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ConfigError, match=rf"{path}{message}"):
            load_user_dataset(path, cache_dir=tmp_path / "cache")
