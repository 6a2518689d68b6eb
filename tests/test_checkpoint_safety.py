"""Checkpoint writes that cannot corrupt (`CheckpointStore`), on a tmp folder with fake rank files: no Ray actors,
no DeepSpeed. A write that fails anywhere (a full disk part-way through any file, an fsync error, a kill) leaves
`latest` on the previous checkpoint and no half folder; a damaged checkpoint is refused naming the file, and the
newest older complete one is named (or used, with `fallback_to_previous`); pruning never deletes the checkpoint
to resume from. The real DeepSpeed files go through the store in tests/test_student_deepspeed.py.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import distill.io
from distill.cluster.driver import CheckpointStore
from distill.errors import CheckpointError

IDENTITY = {"student.arch": "tiny_qwen2", "cluster.student_world_size": 2}
TOPOLOGY = {"student_world_size": 2}
# What two ranks write, as DeepSpeed lays it out (a tag folder, its own `latest`), plus the RNG states.
RANK_FILES = {
    "global_step{step}/mp_rank_00_model_states.pt": 3000,
    "global_step{step}/zero_pp_rank_0_mp_rank_00_optim_states.pt": 5000,
    "global_step{step}/zero_pp_rank_1_mp_rank_00_optim_states.pt": 5000,
    "latest": 0,  # "global_step{step}"
    "rng-rank0.pt": 200,
    "rng-rank1.pt": 200,
}


class FullDisk:
    """A disk with `room` bytes left: files opened for writing through `open` take bytes until it is spent, then
    raise ENOSPC as the kernel does (the bytes that fit are written). Installed as distill.io's `open`, it covers
    state.json, the manifest and `latest`; the fake ranks write through it too."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.sizes: list[int] = []  # bytes written per file opened for writing, in the order they were opened

    def open(self, file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 (an `open`: the caller closes it)
        if not any(c in mode for c in "wax+"):
            return f
        self.sizes.append(0)
        return _FillingFile(f, self, len(self.sizes) - 1)


class _FillingFile:
    def __init__(self, f, disk: FullDisk, index: int) -> None:
        self.f, self.disk, self.index = f, disk, index

    def write(self, data) -> int:
        n = min(len(data), self.disk.room)
        self.f.write(data[:n])
        self.disk.room -= n
        self.disk.sizes[self.index] += n
        if n < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), getattr(self.f, "name", None))
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def rank_files(step: int) -> dict[str, bytes]:
    """The files of checkpoint `step`, by path in the folder: deterministic bytes that differ per step."""
    out = {}
    for pattern, size in RANK_FILES.items():
        name = pattern.format(step=step)
        out[name] = (
            f"global_step{step}".encode() if size == 0 else bytes((step * 7 + i) % 251 for i in range(size))
        )
    return out


def write_rank_files(folder: Path, step: int, opener=builtins.open) -> None:
    """What the ranks' `save` does into the folder the driver hands them."""
    for name, data in rank_files(step).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        with opener(folder / name, "wb") as f:
            f.write(data)


def store(root: Path, keep: int = 2, **kwargs) -> CheckpointStore:
    return CheckpointStore(root, keep=keep, identity=IDENTITY, topology=TOPOLOGY, **kwargs)


def checkpoint(s: CheckpointStore, step: int) -> Path:
    with s.write(step, (0, step * 2)) as folder:
        write_rank_files(folder, step)
    return s.path(step)


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def assert_resumes_from(s: CheckpointStore, step: int) -> None:
    """`latest` names step-`step`, which verifies file by file, and its files are the ones written for it."""
    path = s.resume_point()
    assert path == s.path(step)
    assert CheckpointStore.state(path)["step"] == step
    for name, data in rank_files(step).items():
        assert (path / name).read_bytes() == data, name


# ---------------------------------------------------------------------------------------------- a good write
def test_a_committed_checkpoint_lists_every_file_with_size_and_sha256(tmp_path):
    s = store(tmp_path)
    path = checkpoint(s, 2)
    assert entries(tmp_path) == ["latest", "step-2"]
    assert (tmp_path / "latest").read_text() == "step-2\n"
    manifest = json.loads((path / "manifest.json").read_text())
    written = {**rank_files(2), "state.json": (path / "state.json").read_bytes()}
    assert sorted(manifest["files"]) == sorted(written)
    for name, data in written.items():
        assert manifest["files"][name]["bytes"] == len(data)
        assert manifest["files"][name]["sha256"] == distill.io.sha256_file(path / name)
    assert CheckpointStore.state(path) == {
        "step": 2,
        "next_batch": [0, 4],
        "identity": IDENTITY,
        "topology": TOPOLOGY,
    }
    assert_resumes_from(s, 2)


# ----------------------------------------------------------------------------------------- a failed write
def _file_sizes_of_a_commit(tmp_path: Path) -> list[int]:
    """Bytes of each file a commit of step 4 writes, in write order (the rank files, state.json, the manifest,
    `latest`), measured on a copy."""
    disk = FullDisk(room=10**9)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distill.io, "open", disk.open, raising=False)
        s = store(tmp_path / "measure")
        with s.write(4, (0, 8)) as folder:
            write_rank_files(folder, 4, disk.open)
    return disk.sizes


def test_a_full_disk_anywhere_in_a_write_leaves_latest_on_the_previous_checkpoint(tmp_path, monkeypatch):
    """ENOSPC at the first, second, middle and last byte of every file a commit writes: a rank's file,
    state.json, manifest.json, the `latest` pointer. The previous checkpoint stays `latest` and intact; no
    temporary folder is left; a step-4 folder exists only complete (the disk filled up while `latest` was
    switched, after the rename)."""
    sizes = _file_sizes_of_a_commit(tmp_path)
    assert len(sizes) == len(RANK_FILES) + 3
    needed = sum(sizes)
    root = tmp_path / "run"
    checkpoint(store(root, keep=1), 2)  # keep=1: a failed write must not cost the only good checkpoint
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    rooms = sorted(
        {
            r
            for a, n in zip(starts, sizes, strict=True)
            for r in (a, a + 1, a + n // 2, a + n - 1)
            if r < needed
        }
    )
    for room in rooms:
        disk = FullDisk(room)
        monkeypatch.setattr(distill.io, "open", disk.open, raising=False)
        s = store(root, keep=1)
        with pytest.raises(OSError) as err, s.write(4, (0, 8)) as folder:
            write_rank_files(folder, 4, disk.open)
        assert err.value.errno == errno.ENOSPC, room
        monkeypatch.undo()
        assert (root / "latest").read_text() == "step-2\n", room
        assert_resumes_from(s, 2)
        assert set(entries(root)) <= {"latest", "step-2", "step-4"}, (room, entries(root))
        if (root / "step-4").exists():  # only when the pointer's write failed: complete, merely not named
            assert room >= needed - len("step-4\n") and s.damage(root / "step-4") == [], room
    s = store(root, keep=1)
    checkpoint(s, 4)  # with room again the same step commits, over a complete leftover if there is one
    assert entries(root) == ["latest", "step-4"]
    assert_resumes_from(s, 4)


def test_every_file_is_fsynced_before_the_manifest_and_latest_is_switched_last(tmp_path, monkeypatch):
    """The order that makes a commit durable: every file (the ranks' too) and folder fsynced, then the manifest
    written, the folder renamed and the root fsynced, then `latest` written, renamed and the root fsynced."""
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def record_rename(src, dst) -> None:
        events.append(("rename", str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_rename)
    s = store(tmp_path)
    checkpoint(s, 2)
    tmp = tmp_path / f"step-2.tmp-{os.getpid()}"
    manifest = events.index(("rename", str(tmp / "manifest.json")))
    folder = events.index(("rename", str(tmp_path / "step-2")))
    pointer = events.index(("rename", str(tmp_path / "latest")))
    assert manifest < folder < pointer
    synced = {path for kind, path in events[:manifest] if kind == "fsync"}
    files = [*rank_files(2), "state.json"]
    assert {str(tmp / name) for name in files} | {str(tmp), str(tmp / "global_step2")} <= synced
    # The folder's rename is durable before `latest` names it, and `latest`'s own rename last.
    assert ("fsync", str(tmp_path)) in events[folder:pointer]
    assert events[pointer + 1 :] == [("fsync", str(tmp_path))]


@pytest.mark.parametrize("failing", ["fsync", "rename"])
def test_an_io_error_while_committing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failing):
    """A write-back error that surfaces at fsync (EIO), or a failed rename: the same as a full disk."""
    s = store(tmp_path, keep=1)
    checkpoint(s, 2)

    def eio(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    if failing == "fsync":
        monkeypatch.setattr(os, "fsync", eio)
    else:  # the rename of the step's temporary folder only
        replace = os.replace
        monkeypatch.setattr(os, "replace", lambda a, b: eio() if ".tmp-" in Path(a).name else replace(a, b))
    with pytest.raises(OSError, match="Input/output error"):
        checkpoint(s, 4)
    monkeypatch.undo()
    assert entries(tmp_path) == ["latest", "step-2"]
    assert_resumes_from(s, 2)


def test_an_error_in_the_ranks_or_the_mode_removes_the_folder(tmp_path):
    """A rank that dies while saving (StudentFailure in the driver) or any other error inside the block."""
    s = store(tmp_path, keep=1)
    checkpoint(s, 2)

    class RankDied(RuntimeError):
        pass

    with pytest.raises(RankDied), s.write(4, (0, 8)) as folder:
        (folder / "global_step4").mkdir()
        (folder / "global_step4" / "mp_rank_00_model_states.pt").write_bytes(b"half")
        raise RankDied
    assert entries(tmp_path) == ["latest", "step-2"]
    assert_resumes_from(s, 2)


# --------------------------------------------------------------------------------------------------- a kill
def test_what_a_killed_write_leaves_is_ignored_then_removed_by_the_next_write(tmp_path):
    s = store(tmp_path)
    checkpoint(s, 2)
    partial = tmp_path / "step-4.tmp-4242"  # killed before its manifest
    write_rank_files(partial, 4)
    (tmp_path / "step-4.old-4242").mkdir()  # killed while a step was being replaced
    (tmp_path / ".latest.k2j3h4").write_text("step-")  # killed while the pointer was written
    assert_resumes_from(s, 2)
    checkpoint(s, 4)
    assert entries(tmp_path) == ["latest", "step-2", "step-4"]
    assert_resumes_from(s, 4)


_KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
import distill.cluster.driver as driver

root, point = Path(sys.argv[1]), sys.argv[2]
s = driver.CheckpointStore(root, keep=1, identity={"run": 1}, topology={})

def write(step):
    with s.write(step, (0, step)) as folder:
        (folder / "model.pt").write_bytes(bytes(range(256)) * 40 * step)

write(2)
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if point == "before the manifest":
    driver.describe_files = die
else:  # between the rename and the switch of `latest`
    real = driver.atomic_write_text
    driver.atomic_write_text = lambda path, *a, **k: die() if Path(path).name == "latest" else real(path, *a, **k)
write(4)
"""


@pytest.mark.parametrize("point", ["before the manifest", "before latest"])
def test_a_real_kill_during_a_commit_resumes_from_the_previous_checkpoint(tmp_path, point):
    """SIGKILL in a writer process (no cleanup runs): the next process resumes from step-2 and its first write
    removes the leftovers."""
    script = textwrap.dedent(_KILLED_WRITER)
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), point], capture_output=True, text=True
    )
    assert proc.returncode == -9, proc.stderr
    leftover = "step-4" if point == "before latest" else "step-4.tmp-*"
    assert list(tmp_path.glob(leftover)), entries(tmp_path)
    s = CheckpointStore(tmp_path, keep=1, identity={"run": 1}, topology={})
    assert s.resume_point() == tmp_path / "step-2"
    with s.write(6, (0, 6)) as folder:
        (folder / "model.pt").write_bytes(b"6")
    assert entries(tmp_path) == ["latest", "step-6"]


# ---------------------------------------------------------------------------------------------- damage
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (_truncate, r"is 4900 bytes, the manifest says 5000 \(truncated or rewritten\)"),
        (
            _flip_a_bit,
            r"has sha256 [0-9a-f]{16}\.\.\., the manifest says [0-9a-f]{16}\.\.\. \(its bytes changed",
        ),
        (Path.unlink, r"is missing"),
    ],
)
def test_a_damaged_file_is_refused_naming_it_and_the_previous_checkpoint(tmp_path, damage, problem):
    s = store(tmp_path)
    checkpoint(s, 2)
    checkpoint(s, 4)
    bad = tmp_path / "step-4" / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    damage(bad)
    with pytest.raises(CheckpointError) as err:
        s.resume_point()
    message = str(err.value)
    assert f"cannot resume from {tmp_path / 'step-4'} (named by {tmp_path / 'latest'}): {bad} " in message
    assert re.search(problem, message), message
    assert "The newest older complete checkpoint is step-2" in message
    assert "checkpoint.fallback_to_previous=true" in message
    assert f"writing 'step-2' into {tmp_path / 'latest'}" in message
    assert (tmp_path / "latest").read_text() == "step-4\n"  # refusing changes nothing


def test_without_an_older_complete_checkpoint_the_message_says_start_over(tmp_path):
    s = store(tmp_path)
    checkpoint(s, 2)
    checkpoint(s, 4)
    _flip_a_bit(tmp_path / "step-2" / "rng-rank0.pt")  # the older one is damaged too
    (tmp_path / "step-4" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"manifest\.json is missing: it is written last") as err:
        s.resume_point()
    assert "No older complete checkpoint exists: start a new run" in str(err.value)


def test_a_foreign_run_is_named_before_any_file_is_hashed(tmp_path):
    """A checkpoint of another run (copied without its DeepSpeed files) names the differing field, not the
    missing files: the identity is read from state.json, whose own bytes are checked first."""
    checkpoint(store(tmp_path), 2)
    for rank_file in (tmp_path / "step-2" / "global_step2").iterdir():
        rank_file.unlink()
    other = CheckpointStore(tmp_path, keep=2, identity={**IDENTITY, "student.arch": "tiny_phi3"}, topology={})
    with pytest.raises(
        CheckpointError, match=r"student\.arch: checkpoint 'tiny_qwen2', this run 'tiny_phi3'"
    ):
        other.resume_point()


def test_a_pointer_that_names_no_checkpoint_is_refused(tmp_path):
    s = store(tmp_path)
    checkpoint(s, 2)
    (tmp_path / "latest").write_text("../elsewhere\n")
    with pytest.raises(CheckpointError, match=r"holds '../elsewhere', not a checkpoint name.*\['step-2'\]"):
        s.resume_point()
    (tmp_path / "latest").write_text("step-8\n")
    with pytest.raises(CheckpointError, match=r"step-8 does not exist.*older complete checkpoint is step-2"):
        s.resume_point()


def test_fallback_to_previous_resumes_from_the_newest_complete_one_and_points_latest_back(tmp_path, caplog):
    s = store(tmp_path, keep=3)
    for step in (2, 4, 6):
        checkpoint(s, step)
    _truncate(tmp_path / "step-6" / "global_step6" / "mp_rank_00_model_states.pt")
    _flip_a_bit(tmp_path / "step-4" / "global_step4" / "mp_rank_00_model_states.pt")
    s = store(tmp_path, keep=3, fallback_to_previous=True)
    assert s.resume_point() == tmp_path / "step-2"
    assert (tmp_path / "latest").read_text() == "step-2\n"
    assert "step-6 is damaged" in caplog.text and "resuming from step-2 instead" in caplog.text
    checkpoint(s, 4)  # trained again: the damaged folders are replaced as the run passes them
    checkpoint(s, 6)
    assert entries(tmp_path) == ["latest", "step-2", "step-4", "step-6"]
    assert_resumes_from(s, 6)


# ---------------------------------------------------------------------------------------------- pruning
def test_keep_prunes_only_after_the_new_checkpoint_is_committed(tmp_path):
    s = store(tmp_path, keep=2)
    for step in (2, 4, 6):
        checkpoint(s, step)
    assert entries(tmp_path) == ["latest", "step-4", "step-6"]
    (tmp_path / "step-7").mkdir()  # no manifest: counts for nothing, and goes with the next prune
    replace = os.replace

    def no_rename_of_the_folder(src, dst) -> None:  # the last step before the pointer's switch
        if ".tmp-" in Path(src).name:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        replace(src, dst)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(OSError, match="Input/output error"):
        patch.setattr(os, "replace", no_rename_of_the_folder)
        checkpoint(s, 8)
    assert entries(tmp_path) == ["latest", "step-4", "step-6", "step-7"]  # a failed commit prunes nothing
    checkpoint(s, 8)
    assert entries(tmp_path) == ["latest", "step-6", "step-8"]


def test_keep_never_deletes_the_checkpoint_latest_names_nor_counts_damaged_ones(tmp_path):
    s = store(tmp_path, keep=1)
    checkpoint(s, 2)
    checkpoint(s, 4)
    assert entries(tmp_path) == ["latest", "step-4"]
    # The newest one loses a file: keep=1 must keep it anyway (`latest` names it) ...
    (tmp_path / "step-4" / "rng-rank1.pt").unlink()
    s._prune(4)
    assert entries(tmp_path) == ["latest", "step-4"]
    # ... and a later commit counts only complete checkpoints towards `keep`.
    s = store(tmp_path, keep=2)
    checkpoint(s, 6)
    checkpoint(s, 8)
    assert entries(tmp_path) == ["latest", "step-6", "step-8"]
