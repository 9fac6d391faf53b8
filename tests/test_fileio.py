"""Tests for ddpm_cifar.runtime.fileio: atomic writes, and the removal of the temp files a killed
writer leaves."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ddpm_cifar.runtime.errors import UserError
from ddpm_cifar.runtime.fileio import (
    STALE_WITH_LIVE_PID_S,
    STALE_WITHOUT_PID_S,
    atomic_path,
    remove_stale_temp_files,
)
from ddpm_cifar.runtime.loaders import Array, Source, load_npz, load_tsv

# A writer that opens an atomic write, says so, and waits mid-write to be killed (or let go).
WRITER = """
import sys, time
from ddpm_cifar.runtime.fileio import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half a checkpoint")
    print(tmp.name, flush=True)
    time.sleep(120)
"""


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """Another process in the middle of an atomic write of tmp_path/checkpoint.pt, and its temp file."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "checkpoint.pt")],
                            stdout=subprocess.PIPE, text=True)
    try:
        name = proc.stdout.readline().strip()
        assert name, "the writer did not start its write"
        yield proc, tmp_path / name
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def _age(path: Path, seconds: float) -> Path:
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: the pid names no process now (until the system reuses it)
    return child.pid


def test_temp_names_carry_the_writers_pid(tmp_path: Path) -> None:
    target = tmp_path / "ema.pt"
    with atomic_path(target) as tmp:
        assert re.fullmatch(rf"\.ema\.pt\.{os.getpid()}\.[a-z0-9_]{{8}}\.tmp", tmp.name), tmp.name
        tmp.write_text("x")
        # This process is the live writer: its temp file is not a leftover, however the folder is swept.
        assert remove_stale_temp_files(tmp_path) == []
        assert tmp.exists()
    assert target.read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["ema.pt"]


def test_a_killed_writers_temp_file_is_removed(tmp_path: Path, writer: tuple[subprocess.Popen, Path]) -> None:
    proc, tmp = writer
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert tmp.exists()  # what a kill during a save leaves behind
    assert remove_stale_temp_files(tmp_path) == [tmp]
    assert not tmp.exists()
    assert remove_stale_temp_files(tmp_path) == []


def test_a_live_writers_temp_file_is_kept(tmp_path: Path, writer: tuple[subprocess.Popen, Path]) -> None:
    proc, tmp = writer
    _age(tmp, STALE_WITHOUT_PID_S * 2)  # an hour-long write: old, but its writer is still at it
    assert remove_stale_temp_files(tmp_path) == []
    assert tmp.exists() and proc.poll() is None


def test_a_live_pid_older_than_a_day_is_taken_for_a_reused_pid(tmp_path: Path) -> None:
    tmp = tmp_path / f".checkpoint.pt.{os.getpid()}.abcd_123.tmp"
    tmp.write_text("x")
    _age(tmp, STALE_WITH_LIVE_PID_S - 60)
    assert remove_stale_temp_files(tmp_path) == []
    _age(tmp, STALE_WITH_LIVE_PID_S + 60)
    assert remove_stale_temp_files(tmp_path) == [tmp]


def test_old_names_without_a_pid_go_after_an_hour(tmp_path: Path) -> None:
    fresh = tmp_path / ".checkpoint.pt.k2x_9qz0.tmp"
    old = tmp_path / ".ema.pt.0a1b2c3d.tmp"
    probe = tmp_path / ".write-check.zz9_aa00.tmp"  # outputs.check_writable's, killed mid-check
    for path in (fresh, old, probe):
        path.write_text("x")
    _age(fresh, STALE_WITHOUT_PID_S - 60)
    _age(old, STALE_WITHOUT_PID_S + 60)
    _age(probe, STALE_WITHOUT_PID_S + 60)
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted([old, probe])
    assert fresh.exists()


def test_only_our_temp_files_are_removed(tmp_path: Path) -> None:
    dead = _dead_pid()
    keep = [
        "notes.tmp", ".hidden", ".notes.tmp", "checkpoint.pt", ".train.lock",
        f"checkpoint.pt.{dead}.abcdefgh.tmp",  # no leading dot
        f".checkpoint.pt.{dead}.abcdefg.tmp",  # 7 random characters, not mkstemp's 8
        f".checkpoint.pt.{dead}.ABCDEFGH.tmp",  # mkstemp's are lower case
        f".checkpoint.pt.{dead}.abcdefgh.tmp.bak",
        ".abcdefgh.tmp",  # no target name
    ]
    for name in keep:
        (tmp_path / name).write_text("user data")
        _age(tmp_path / name, 2 * STALE_WITH_LIVE_PID_S)  # old enough for any rule
    stale = tmp_path / f".checkpoint.pt.{dead}.abcdefgh.tmp"
    stale.write_text("x")
    # Named like a stale temp file, but a folder, a link, or in a subfolder: not ours to remove.
    (tmp_path / f".samples.npz.{dead}.abcdefgh.tmp").mkdir()
    target = tmp_path / "linked.txt"
    target.write_text("keep me")
    (tmp_path / f".linked.txt.{dead}.abcdefgh.tmp").symlink_to(target)
    (tmp_path / "sub").mkdir()
    nested = tmp_path / "sub" / f".ema.pt.{dead}.abcdefgh.tmp"
    nested.write_text("x")

    assert remove_stale_temp_files(tmp_path) == [stale]
    for name in keep:
        assert (tmp_path / name).read_text() == "user data", name
    assert (tmp_path / f".samples.npz.{dead}.abcdefgh.tmp").is_dir()
    assert (tmp_path / f".linked.txt.{dead}.abcdefgh.tmp").is_symlink() and target.read_text() == "keep me"
    assert nested.exists()


def test_several_folders_and_a_missing_one(tmp_path: Path) -> None:
    dead = _dead_pid()
    a, b = tmp_path / "models", tmp_path / "metrics"
    a.mkdir()
    b.mkdir()
    ckpt, log = a / f".checkpoint.pt.{dead}.abcdefgh.tmp", b / f".train_loss.tsv.{dead}.q_1w2e3r.tmp"
    ckpt.write_text("x")
    log.write_text("x")
    assert sorted(remove_stale_temp_files(a, str(b), tmp_path / "not-made-yet")) == sorted([ckpt, log])


# --- the checked loaders (runtime/loaders.py); each file's own refusals: tests/test_damaged_files.py ------

SOURCE = Source("a test file", "make it again")


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def test_an_npz_loader_never_unpickles(tmp_path: Path) -> None:
    import pickle

    import numpy as np

    marker = tmp_path / "code-ran"
    (tmp_path / "a.npz").write_bytes(pickle.dumps({"x": _RunsCode(marker)}))
    np.savez(tmp_path / "b.npz", x=np.array([_RunsCode(marker)], dtype=object))
    for name in ("a.npz", "b.npz"):
        with pytest.raises(UserError, match=rf"{name} is not a test file \(.*\): make it again$"):
            load_npz(tmp_path / name, {"x": Array("int", ("n",))}, SOURCE)
    assert not marker.exists()


def test_named_lengths_are_shared_and_optional_members_may_be_absent(tmp_path: Path) -> None:
    import numpy as np

    members = {"a": Array("float", ("n", 2)), "b": Array("int", ("n",)), "c": Array("text", optional=True)}
    np.savez(tmp_path / "ok.npz", a=np.zeros((3, 2)), b=np.arange(3))
    assert set(load_npz(tmp_path / "ok.npz", members, SOURCE)) == {"a", "b"}
    np.savez(tmp_path / "bad.npz", a=np.zeros((3, 2)), b=np.arange(4))
    with pytest.raises(UserError, match=r"\(its 'b' has shape \(4,\): n is 3 in 'a'\)"):
        load_npz(tmp_path / "bad.npz", members, SOURCE)


def test_a_log_drops_its_torn_last_line_and_rows_past_max_step(tmp_path: Path) -> None:
    log = tmp_path / "loss.tsv"
    log.write_text("step\tloss\n1\t0.5\n2\t0.25\n3\t0.1")  # "3\t0.1": cut short by a crash mid-write
    assert load_tsv(log, SOURCE) == [["1", "0.5"], ["2", "0.25"]]
    assert load_tsv(log, SOURCE, max_step=1) == [["1", "0.5"]]
    log.write_text("step\tloss\n1\t0.5\n2\t0.2\t9\n3\t0.1\n")  # a bad row that is not the last line
    with pytest.raises(UserError, match=r"line 3 is '2\\t0.2\\t9', not a step and 1 finite number"):
        load_tsv(log, SOURCE)
