"""A local byte-level BPE tokenizer with a ChatML chat template, trained in seconds, never downloaded.

Byte-level means any text encodes (no unknown token); digits are split one per token so the tiny teacher
sees numbers as digit sequences, which is what makes small-number arithmetic learnable. Special tokens:

    <|endoftext|>  eos and pad (id 0)
    <|im_start|>   opens a chat turn (id 1)
    <|im_end|>     closes a chat turn (id 2); generation of an assistant reply stops here
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from distill.data.task import DOMAINS, LEVELS, generate_problems
from distill.errors import ConfigError

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)

DEMO_VOCAB_SIZE = 512  # the task's words fit as whole tokens well below this (see test_tokenizer)

# ChatML, as Qwen uses it. The newline after <|im_end|> separates turns; it is not part of the reply.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Runtime state of a backend tokenizer, not part of what it computes: left out of the hash.
_RUNTIME_KEYS = ("truncation", "padding")


def _bpe_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE whose pre-tokenizer isolates every digit."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # Each digit becomes its own pre-token, so BPE can never merge digits.
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it for transformers.

    `vocab_size` counts the 256 byte tokens and the 3 special tokens, so it must exceed 259.
    With `out_dir`, the tokenizer is saved there with `save_pretrained`; `AutoTokenizer.from_pretrained`
    loads it back offline.
    """
    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size <= min_size:
        raise ConfigError(f"tokenizer vocab_size={vocab_size} is too small; use more than {min_size}")
    backend = _bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes are in the vocabulary whatever the corpus, so any text encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        extra_special_tokens=[IM_START, IM_END],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def tokenizer_hash(tokenizer: PreTrainedTokenizerFast) -> str:
    """sha256 hex digest of what the tokenizer computes: its canonical JSON, special tokens, chat template.

    Stable across `save_pretrained` / `from_pretrained`; recorded in cache manifests and checkpoints so a
    teacher cache is never read with a different tokenizer.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    for key in _RUNTIME_KEYS:
        spec.pop(key, None)
    payload = {
        "tokenizer": spec,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "chat_template": tokenizer.chat_template,
    }
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@cache
def _compiled_chat_template():
    # Compiling costs ~0.5 ms; the corpus renders thousands of conversations.
    return ImmutableSandboxedEnvironment().from_string(CHAT_TEMPLATE)


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Render `messages` with `CHAT_TEMPLATE` without a tokenizer (to build the corpus that trains one).

    Uses the same sandboxed jinja environment transformers uses, so the text is identical to
    `tokenizer.apply_chat_template(messages, tokenize=False)`.
    """
    return _compiled_chat_template().render(messages=messages, add_generation_prompt=add_generation_prompt)


def task_corpus(seed: int, per_stream: int = 200) -> list[str]:
    """The demo tokenizer's training texts: `per_stream` problems of every (domain, level), each rendered
    through the chat format and also in its plain `text` form (so both training modes tokenize well)."""
    corpus = []
    for domain in DOMAINS:
        for level in LEVELS:
            for problem in generate_problems(domain, level, per_stream, seed):
                messages = [
                    {"role": "user", "content": problem["question"]},
                    {"role": "assistant", "content": problem["reasoning"]},
                ]
                corpus.append(render_chat(messages))
                corpus.append(problem["text"])
    return corpus
