"""Shared fixtures: one tiny task-trained teacher per test session, built by the real prepare-demo code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# Small enough for seconds per run, big enough that the teacher has learned something worth distilling.
TEST_OVERRIDES = [
    "experiment=ci_tiny",
    "prepare.teacher_steps=150",
    "prepare.teacher_train_size=2000",
    "prepare.teacher_levels=[1]",
    "prepare.vocab_size=384",
    "prepare.eval_examples=16",
    "tracking.progress=false",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """DISTILL_TEST_CACHE keeps the trained test teacher between local sessions; CI starts empty."""
    keep = os.environ.get("DISTILL_TEST_CACHE")
    return Path(keep) if keep else tmp_path_factory.mktemp("distill-cache")


@pytest.fixture(scope="session")
def base_overrides(cache_dir) -> list[str]:
    return [*TEST_OVERRIDES, f"prepare.cache_dir={cache_dir}"]


@pytest.fixture(scope="session")
def tiny_teacher(base_overrides) -> Path:
    """The test teacher's folder (trained once per session by `prepare_demo`)."""
    from distill.config import compose
    from launch import builders
    from launch.prepare_demo import prepare_demo

    cfg = compose(base_overrides)
    prepare_demo(cfg)
    return builders.demo_teacher_dir(cfg)
