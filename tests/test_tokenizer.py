"""The local demo tokenizer: trains offline, reloads with AutoTokenizer, hashes stably."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from distill.data.task import DOMAINS, LEVELS
from distill.errors import ConfigError
from distill.models.tokenizer import (
    CHAT_TEMPLATE,
    EOS_TOKEN,
    IM_END,
    IM_START,
    render_chat,
    task_corpus,
    tokenizer_hash,
    train_tokenizer,
)

MESSAGES = [
    {"role": "user", "content": "Tom has 3 apples. How many?"},
    {"role": "assistant", "content": "#### 3"},
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return task_corpus(seed=0, per_stream=50)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, corpus):
    """(in-memory tokenizer, its folder, the tokenizer reloaded offline from the folder)."""
    out_dir = tmp_path_factory.mktemp("tok")
    tokenizer = train_tokenizer(corpus, vocab_size=400, out_dir=out_dir)
    reloaded = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    return tokenizer, out_dir, reloaded


def test_corpus_covers_every_domain_and_level(corpus):
    assert len(corpus) == 2 * 50 * len(DOMAINS) * len(LEVELS)
    assert all(IM_START + "assistant\n" in text for text in corpus[::2])


def test_reload_has_special_tokens_and_template(saved):
    tokenizer, _, reloaded = saved
    assert len(reloaded) == len(tokenizer) == 400
    assert reloaded.eos_token == reloaded.pad_token == EOS_TOKEN
    assert reloaded.convert_tokens_to_ids([EOS_TOKEN, IM_START, IM_END]) == [0, 1, 2]
    assert reloaded.chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize("text", ["Tom has 3 apples.\n#### 12", "Ünïcode 日本語 😀 tabs\tand  spaces", ""])
def test_round_trip(saved, text):
    _, _, reloaded = saved
    ids = reloaded(text, add_special_tokens=False)["input_ids"]
    assert reloaded.decode(ids) == text


def test_digits_one_per_token(saved):
    _, _, reloaded = saved
    tokens = reloaded.tokenize("so 1234 + 56 = 1290")
    digit_tokens = [t for t in tokens if any(ch.isdigit() for ch in t)]
    assert digit_tokens == list("1234561290")


def test_chat_template_renders(saved):
    _, _, reloaded = saved
    rendered = reloaded.apply_chat_template(MESSAGES, tokenize=False)
    assert rendered == (
        "<|im_start|>user\nTom has 3 apples. How many?<|im_end|>\n<|im_start|>assistant\n#### 3<|im_end|>\n"
    )
    assert rendered == render_chat(MESSAGES)
    prompt = reloaded.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    # Special tokens in the rendered text are single tokens, not spelled out in bytes.
    assert reloaded(rendered, add_special_tokens=False)["input_ids"][0] == 1


def test_hash_stable_across_save_load_and_sensitive_to_vocab(saved, corpus):
    tokenizer, _, reloaded = saved
    assert tokenizer_hash(tokenizer) == tokenizer_hash(reloaded)
    assert tokenizer_hash(train_tokenizer(corpus, vocab_size=400)) == tokenizer_hash(tokenizer)
    assert tokenizer_hash(train_tokenizer(corpus, vocab_size=420)) != tokenizer_hash(tokenizer)


def test_hash_sees_the_chat_template(corpus):
    tokenizer = train_tokenizer(corpus, vocab_size=400)
    before = tokenizer_hash(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE.replace("assistant", "bot")
    assert tokenizer_hash(tokenizer) != before


def test_too_small_vocab_is_a_config_error(corpus):
    with pytest.raises(ConfigError, match="vocab_size=100"):
        train_tokenizer(corpus, vocab_size=100)
