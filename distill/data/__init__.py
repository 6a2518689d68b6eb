"""Data layer: the embedded reasoning task (and its R1-shaped `<think>` variant), final-answer extraction, dataset
loading, chat formatting with loss masks (`<think>` templates in chat_templates.py), batching."""

from distill.data.batching import BatchStream, pack_rows, pad_batch
from distill.data.dataset import (
    HELD_OUT_FRACTION,
    build_task_dataset,
    is_held_out,
    load_user_dataset,
    read_user_dataset,
)
from distill.data.formatting import encode_example, encode_prompt, encode_rows
from distill.data.task import (
    DOMAINS,
    LEVELS,
    answer_matches,
    extract_answer,
    generate_problems,
    iter_problems,
    iter_reasoning_problems,
    normalize_answer,
)

__all__ = [
    "DOMAINS",
    "HELD_OUT_FRACTION",
    "LEVELS",
    "BatchStream",
    "answer_matches",
    "build_task_dataset",
    "encode_example",
    "encode_prompt",
    "encode_rows",
    "extract_answer",
    "generate_problems",
    "is_held_out",
    "iter_problems",
    "iter_reasoning_problems",
    "load_user_dataset",
    "normalize_answer",
    "pack_rows",
    "pad_batch",
    "read_user_dataset",
]
