"""What the Ray benches share: the offline CPU environment every process they start inherits, and the tests' tiny
teacher recipe (tests/conftest.py TEST_OVERRIDES, so a bench reuses the teacher a test session trained)."""

from __future__ import annotations

import os

TINY = [
    "experiment=ci_tiny",
    "prepare.teacher_steps=150",
    "prepare.teacher_batch_size=16",
    "prepare.teacher_train_size=2000",
    "prepare.teacher_levels=[1]",
    "prepare.vocab_size=384",
    "prepare.eval_examples=16",
    "tracking.progress=false",
]


def offline_cpu_environment(**extra: str) -> None:
    """Set (unless already set) what the Makefile exports for tests, plus `extra`: before Ray, DeepSpeed or
    transformers are imported, so the actors and DeepSpeed's op builds see it too."""
    defaults = {
        "HF_HUB_OFFLINE": "1",
        "DS_ACCELERATOR": "cpu",
        "RAY_AUTH_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_WAIT_POLICY": "PASSIVE",
        "TORCH_EXTENSIONS_DIR": os.path.expanduser("~/.cache/distill/torch_extensions"),
    }
    for name, value in {**defaults, **extra}.items():
        os.environ.setdefault(name, value)
