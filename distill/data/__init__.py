"""Data layer: the embedded reasoning task, dataset loading, chat formatting with loss masks, batching."""

from distill.data.batching import BatchStream, pack_rows, pad_batch
from distill.data.dataset import HELD_OUT_FRACTION, build_task_dataset, is_held_out, load_user_dataset
from distill.data.formatting import encode_example, encode_prompt, encode_rows
from distill.data.task import DOMAINS, LEVELS, extract_answer, generate_problems, iter_problems

__all__ = [
    "DOMAINS",
    "HELD_OUT_FRACTION",
    "LEVELS",
    "BatchStream",
    "build_task_dataset",
    "encode_example",
    "encode_prompt",
    "encode_rows",
    "extract_answer",
    "generate_problems",
    "is_held_out",
    "iter_problems",
    "load_user_dataset",
    "pack_rows",
    "pad_batch",
]
