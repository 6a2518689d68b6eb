"""Domain-expert teachers (`prepare.teacher_domains`): their cache key, their data, and the error for a wrong name.
No teacher is trained here."""

from __future__ import annotations

import hashlib
import json

import pytest
from omegaconf import OmegaConf

from distill.config import compose
from distill.data import DOMAINS
from distill.errors import ConfigError
from distill.models.resolve import DEMO_RECIPE_VERSION, demo_teacher_dir
from launch.prepare_demo import prepare_demo, teacher_domains, teacher_task_dataset

SMALL = ["prepare.teacher_train_size=48", "prepare.eval_examples=16", "prepare.teacher_levels=[1]"]


def _key_without_the_field(cfg) -> str:
    """The key as `demo_teacher_dir` computed it before `teacher_domains` existed."""
    prep = OmegaConf.to_container(cfg.prepare, resolve=True)
    for gone in ("cache_dir", "force", "eval_examples", "student_vocab_size", "teacher_domains"):
        prep.pop(gone)
    src = json.dumps({"arch": cfg.teacher.arch, "prepare": prep, "v": DEMO_RECIPE_VERSION}, sort_keys=True)
    return f"{cfg.teacher.arch}-{hashlib.sha256(src.encode()).hexdigest()[:12]}"


@pytest.mark.parametrize("extra", [[], ["experiment=ci_tiny", "prepare.vocab_size=384"]])
def test_all_domains_keep_the_old_key(extra):
    cfg = compose(extra)
    assert cfg.prepare.teacher_domains is None
    assert demo_teacher_dir(cfg).name == _key_without_the_field(cfg)


def test_each_domain_set_has_its_own_key():
    def folder(domains: str):
        return demo_teacher_dir(compose([f"prepare.teacher_domains={domains}"]))

    every = demo_teacher_dir(compose([]))
    ab, cd = folder("[shopping,travel]"), folder("[baking,garden]")
    assert len({every, ab, cd}) == 3
    # A set, not a sequence: the same domains in another order are the same teacher.
    assert folder("[travel,shopping]") == ab
    # Naming all four is a different key from None, but trains on the same domains.
    assert folder(f"[{','.join(DOMAINS)}]") != every


def test_unknown_domain_fails_naming_the_known_ones(tmp_path):
    cfg = compose([f"prepare.cache_dir={tmp_path}", "prepare.teacher_domains=[shopping,space]"])
    with pytest.raises(ConfigError) as err:
        prepare_demo(cfg)  # before any tokenizer or teacher is trained
    message = str(err.value)
    assert "space" in message and all(d in message for d in DOMAINS)
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="empty"):
        teacher_domains(compose(["prepare.teacher_domains=[]"]).prepare)


def test_teacher_data_holds_only_its_domains():
    cfg = compose([*SMALL, "prepare.teacher_domains=[travel,shopping]"])
    assert teacher_domains(cfg.prepare) == ["shopping", "travel"]  # DOMAINS order
    data = teacher_task_dataset(cfg.prepare)
    for split in ("train", "eval"):
        assert set(data[split]["domain"]) == {"shopping", "travel"}, split
    assert len(data["train"]) == 48


def test_no_domains_given_means_all_of_them():
    cfg = compose(SMALL)
    data = teacher_task_dataset(cfg.prepare)
    assert teacher_domains(cfg.prepare) == list(DOMAINS)
    assert set(data["train"]["domain"]) == set(DOMAINS) == set(data["eval"]["domain"])
