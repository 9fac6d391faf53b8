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

from ddpm_cifar.runtime.fileio import (
    STALE_WITH_LIVE_PID_S,
    STALE_WITHOUT_PID_S,
    atomic_path,
    remove_stale_temp_files,
)

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
