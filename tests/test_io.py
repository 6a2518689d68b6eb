"""Atomic writers: whole files or nothing, and the modes the user's umask gives (group-readable run folders)."""

from __future__ import annotations

import os
import stat

import pytest

from distill.io import atomic_dir, atomic_write_json, atomic_write_text, current_umask


@pytest.fixture
def umask():
    """Set a umask for one test and restore the caller's."""
    previous = os.umask(0o022)
    os.umask(previous)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(previous)


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_written_files_and_folders_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    assert current_umask() == mask
    atomic_write_json(tmp_path / "eval.json", {"ce": 1.0})
    assert stat.S_IMODE((tmp_path / "eval.json").stat().st_mode) == file_mode
    folder = atomic_dir(tmp_path / "student", lambda tmp: atomic_write_text(tmp / "config.json", "{}"))
    assert stat.S_IMODE(folder.stat().st_mode) == dir_mode
    assert stat.S_IMODE((folder / "config.json").stat().st_mode) == file_mode


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    atomic_write_text(tmp_path / "latest", "step-10")

    class Boom(Exception):
        pass

    def fill(tmp):
        (tmp / "half").write_text("x")
        raise Boom

    with pytest.raises(Boom):
        atomic_dir(tmp_path / "ckpt", fill)
    assert (tmp_path / "latest").read_text() == "step-10"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]  # no temp folder left behind


def test_two_jobs_that_share_a_cache_build_a_cached_folder_once(tmp_path, monkeypatch):
    """Two jobs of one sweep (here two threads, each with its own lock file handle) want the same cached student
    tokenizer: one trains it, the other waits and reads it back. Without `build_lock` both see no folder, both
    train, and the second replaces the folder the first may already be reading."""
    from concurrent.futures import ThreadPoolExecutor

    import launch.prepare_demo as prepare
    from distill.config import compose
    from distill.models.loading import load_tokenizer_folder

    cfg = compose(["experiment=xtok_demo", "prepare.student_vocab_size=320", f"prepare.cache_dir={tmp_path}"])
    trained = []

    def counted_train_tokenizer(*args, **kwargs):
        trained.append(1)
        return real_train_tokenizer(*args, **kwargs)

    real_train_tokenizer = prepare.train_tokenizer
    monkeypatch.setattr(prepare, "train_tokenizer", counted_train_tokenizer)
    with ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(lambda _: prepare.prepare_student_tokenizer(cfg), range(2)))
    assert folders[0] == folders[1] and len(trained) == 1
    assert len(load_tokenizer_folder(folders[0])) == 320
