"""The real-teacher bench's ledger (bench/real_teacher_quality.py): the matrix of many CPU hours reads a run back
only when the same case ran with the same composed config on the same assets."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def quality():
    import sys

    spec = importlib.util.spec_from_file_location("real_teacher_quality", BENCH / "real_teacher_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))  # the bench imports its assets module as a sibling
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def _identity(quality, root: Path, out: Path, extra: list[str]) -> str:
    from distill.config import compose

    assets = {"teacher": str(root / "teacher"), "texts": {"docs": str(root / "texts" / "docs")}}
    folder = out / "docs/scratch/100/default/seed0"
    overrides = quality.run_overrides(assets, "docs", "scratch", 100, 0, 4, extra)
    return quality.run_identity(compose(overrides, run_dir=str(folder)), root, folder)


def test_a_run_is_the_same_run_anywhere_and_another_one_when_its_config_changes(quality, tmp_path):
    here = _identity(quality, tmp_path / "a" / "assets", tmp_path / "a" / "out", [])
    there = _identity(quality, tmp_path / "b" / "assets", tmp_path / "b" / "runs", [])
    assert here == there  # other machine, other folders: the same run
    assert (
        _identity(quality, tmp_path / "a" / "assets", tmp_path / "a" / "out", ["loss.temperature=2"]) != here
    )
    assert _identity(quality, tmp_path / "a" / "assets", tmp_path / "a" / "out", ["train.seed=1"]) != here


def test_the_ledger_reads_back_only_the_same_assets_and_keeps_what_others_wrote(quality, tmp_path):
    path = tmp_path / "ledger.json"
    mine, other = quality.Ledger(path, "assets-1"), quality.Ledger(path, "assets-1")
    mine.put("docs/scratch/100/default/seed0", "id-a", {"ce": 4.0}, 12.0)
    other.put("docs/scratch/100/CE-only/seed0", "id-b", {"ce": 5.0}, 3.0)  # a second matrix on the same file
    saved = json.loads(path.read_text())
    assert set(saved) == {"docs/scratch/100/default/seed0", "docs/scratch/100/CE-only/seed0"}
    again = quality.Ledger(path, "assets-1")
    assert again.get("docs/scratch/100/default/seed0", "id-a") == {"ce": 4.0}
    assert again.get("docs/scratch/100/default/seed0", "id-other-config") is None
    assert quality.Ledger(path, "assets-2").get("docs/scratch/100/default/seed0", "id-a") is None
