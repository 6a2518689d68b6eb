"""Chat templates with `<think>` sections for the two families the product distils between, as Jinja strings.

    R1_TEMPLATE    DeepSeek-R1 (the teacher; R1-Distill models use it too):
                   <｜begin▁of▁sentence｜>{system}<｜User｜>{question}<｜Assistant｜><think>\\n{trace}\\n</think>\\n\\n{answer}<｜end▁of▁sentence｜>
    QWEN_TEMPLATE  Qwen2.5 (ChatML):
                   <|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n{trace}\\n</think>\\n\\n{answer}<|im_end|>\\n

Assign one to `tokenizer.chat_template`; `formatting.encode_example` then trains the whole assistant reply, `<think>`
section included, and never the prompt. An assistant message carries its trace either inline (its content starts
with `<think>...</think>`, as the embedded `gsm_synth_reasoning` task writes it; rendered as is) or in a
`reasoning_content` field (the shape of DeepSeek's API and vLLM's reasoning parsers; rendered as the section above).

Where these differ from the hub templates, and why:
  - R1's hub template deletes the `<think>` section of every assistant turn, i.e. the very trace being distilled.
    Here it is kept.
  - R1's hub template ends the generation prompt with `<think>\\n`. Here the prompt ends at the assistant header, so
    the student learns to open `<think>` itself and every prompt is a prefix of its training rendering (the loss
    mask in formatting.py locates the reply that way).
  - Qwen2.5's hub template invents a system prompt ("You are Qwen, ...") when there is none; here teacher and student
    see the same conversation, so neither invents one.
Tools and other roles are not supported: a message of another role is an error when rendered.
"""

from __future__ import annotations

from functools import cache

from jinja2.sandbox import ImmutableSandboxedEnvironment

from distill.errors import ConfigError

R1_BOS = "<｜begin▁of▁sentence｜>"
R1_EOS = "<｜end▁of▁sentence｜>"
R1_USER = "<｜User｜>"
R1_ASSISTANT = "<｜Assistant｜>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def _emit(literal: str) -> str:
    """A Jinja statement writing `literal`, which goes inside a single-quoted Jinja string (`\\n`: a newline)."""
    return "{{- '" + literal + "' -}}"


# An assistant message's text, shared by both templates: its `reasoning_content` (if any) as a <think> section,
# then its content. Jinja filters bind tighter than `+`.
_ASSISTANT_TEXT = (
    "{%- if message.reasoning_content -%}"
    "{{- '<think>\\n' + message.reasoning_content | trim + '\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{{- message.content -}}"
)
_UNKNOWN_ROLE = (
    "{{- raise_exception('unsupported chat role ' + message.role + '; use system, user or assistant') -}}"
)

R1_TEMPLATE = (
    _emit(R1_BOS)
    + "{%- for message in messages -%}"
    + "{%- if message.role == 'system' -%}{{- message.content -}}"
    + "{%- elif message.role == 'user' -%}"
    + _emit(R1_USER)
    + "{{- message.content -}}"
    + "{%- elif message.role == 'assistant' -%}"
    + _emit(R1_ASSISTANT)
    + _ASSISTANT_TEXT
    + _emit(R1_EOS)
    + "{%- else -%}"
    + _UNKNOWN_ROLE
    + "{%- endif -%}"
    + "{%- endfor -%}"
    + "{%- if add_generation_prompt -%}"
    + _emit(R1_ASSISTANT)
    + "{%- endif -%}"
)

# Renders exactly like distill/models/tokenizer.py's CHAT_TEMPLATE for messages without `reasoning_content`.
QWEN_TEMPLATE = (
    "{%- for message in messages -%}"
    + "{%- if message.role not in ('system', 'user', 'assistant') -%}"
    + _UNKNOWN_ROLE
    + "{%- endif -%}"
    + _emit(IM_START)
    + "{{- message.role + '\\n' -}}"
    + "{%- if message.role == 'assistant' -%}"
    + _ASSISTANT_TEXT
    + "{%- else -%}{{- message.content -}}{%- endif -%}"
    + _emit(IM_END + "\\n")
    + "{%- endfor -%}"
    + "{%- if add_generation_prompt -%}"
    + _emit(IM_START + "assistant\\n")
    + "{%- endif -%}"
)

THINK_TEMPLATES: dict[str, str] = {"deepseek_r1": R1_TEMPLATE, "qwen2_5": QWEN_TEMPLATE}
"""The templates by model family."""


def think_template(family: str) -> str:
    """The `<think>` chat template of a model family; ConfigError listing the families otherwise."""
    if family not in THINK_TEMPLATES:
        raise ConfigError(
            f"no <think> chat template for family {family!r}; valid families are {sorted(THINK_TEMPLATES)}"
        )
    return THINK_TEMPLATES[family]


def _raise_exception(message: str) -> None:
    raise ConfigError(message)


@cache
def _compiled(template: str):
    # The sandbox transformers renders chat templates in, so the text is identical to apply_chat_template's.
    env = ImmutableSandboxedEnvironment()
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def render(template: str, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Render `messages` with `template` without a tokenizer (what `apply_chat_template(tokenize=False)` gives)."""
    return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt)
