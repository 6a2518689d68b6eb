"""The cross-tokenizer demo pair end to end: a student on its own, different tokenizer distils from the teacher.

Whether KD beats CE-only on this tiny pair (bits per character) is a measurement over several seeds at the demo's
300 steps, not a test: `python bench/xtok_quality.py` prints it.
"""

import json
import math

import pytest

from distill.config import compose
from launch.distill import run
from launch.prepare_demo import prepare_student_tokenizer

pytestmark = pytest.mark.slow


def test_xtok_demo_pair_trains_and_reports_bits_per_char(tiny_teacher, base_overrides, tmp_path):
    """Teacher: the 384-token demo tokenizer. Student: 320 tokens trained on another corpus sample (other
    merges). The run trains every cross-tokenizer term and exports a student on its own tokenizer."""
    common = [
        *base_overrides,
        "experiment=xtok_demo",
        "prepare.student_vocab_size=320",
        "train.steps=6",
        "data.num_train=128",
        "eval.generate_examples=0",
        "eval.max_batches=1",
    ]
    student_tok = prepare_student_tokenizer(compose(common))
    assert (
        json.loads((student_tok / "tokenizer.json").read_text())["model"]["merges"]
        != json.loads((tiny_teacher / "tokenizer.json").read_text())["model"]["merges"]
    )
    summary = run(compose(common, run_dir=str(tmp_path / "kd")))
    assert math.isfinite(summary["bits_per_char"]) and summary["bits_per_char"] > 0
    metrics = [json.loads(line) for line in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/forward_kl", "loss/uld", "loss/ce"} <= set(metrics[-1])
    assert all(metrics[-1][k] > 0 for k in ("loss/forward_kl", "loss/ce"))
    exported = json.loads((tmp_path / "kd" / "student" / "tokenizer.json").read_text())["model"]["vocab"]
    assert exported == json.loads((student_tok / "tokenizer.json").read_text())["model"]["vocab"]
