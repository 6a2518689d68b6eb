"""Cross-tokenizer distillation on the online distributed path: the teacher actor scores its own tokens and
ships its top-k already projected into the student's positions and vocabulary; two ZeRO-2 student ranks on the
other simulated node train on their own tokenizer. The teacher is TP 1, as the reference's (see TP1_TEACHER). The loss curve equals the single-process cross-tokenizer reference."""

from __future__ import annotations

import json

import pytest

from distill.config import compose
from launch.prepare_demo import prepare_student_tokenizer
from launch.teacher_cache import build_cache
from tests.test_online_distributed import (
    RUN,
    STEPS,
    TP1_TEACHER,
    _run,
    assert_exactly_once,
    assert_same_curve,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

XTOK = ["experiment=xtok_demo", "prepare.student_vocab_size=320", "curriculum=single_stage"]


def test_xtok_online_matches_the_reference_and_exports_the_student_tokenizer(
    ray_cluster, tiny_teacher, base_overrides, tmp_path
):
    common = [*base_overrides, *RUN, *XTOK]
    student_tok = prepare_student_tokenizer(compose(common))
    want = _run(
        [*common, "cluster=local_single", "cluster.micro_batch_size=8", "cluster.grad_accum_steps=2"],
        tmp_path / "ref",
    )
    got = _run([*common, "cluster=sim_2node", TP1_TEACHER, "student.zero_stage=2"], tmp_path / "online")
    assert {"loss/forward_kl", "loss/uld", "loss/ce"} <= set(got[-1])
    assert got[-1]["loss/forward_kl"] > 0
    assert_same_curve(got, want)
    assert_exactly_once(tmp_path / "online")
    exported = json.loads((tmp_path / "online" / "student" / "tokenizer.json").read_text())["model"]["vocab"]
    assert exported == json.loads((student_tok / "tokenizer.json").read_text())["model"]["vocab"]
    summary = json.loads((tmp_path / "online" / "eval.json").read_text())
    reference = json.loads((tmp_path / "ref" / "eval.json").read_text())
    assert summary["bits_per_char"] == pytest.approx(reference["bits_per_char"], rel=1e-3)

    # Score once, train many across tokenizers: the same teacher actors write a cache of the projected top-k
    # (student positions and ids, -1 for unmapped), and ranks trained from it follow the online curve.
    online = [*common, "cluster=sim_2node", TP1_TEACHER, "student.zero_stage=2"]
    cache = tmp_path / "xtok_cache"
    build_cache(
        compose(
            [
                *online,
                f"teacher_cache.dir={cache}",
                "teacher_cache.logits_encoding=fp32",
                f"teacher_cache.epochs={STEPS * 2 // 10}",
            ]
        )
    )
    cached = _run([*online, f"teacher.cache={cache}"], tmp_path / "cached")
    assert_same_curve(cached, got, rel=1e-5)
    assert_exactly_once(tmp_path / "cached")
