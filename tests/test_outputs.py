"""Claiming output folders: writable before any work, one writer at a time, no lock outliving its run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm_cifar.runtime.errors import UserError
from ddpm_cifar.runtime.outputs import claim_outputs

HOLD = """
import sys, time
from pathlib import Path
from ddpm_cifar.runtime.outputs import claim_outputs
with claim_outputs("train", [Path(sys.argv[1])]):
    print("holding", flush=True)
    time.sleep(600)
"""


def _holder(folder: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
    return proc


def test_a_second_writer_is_refused_in_one_line_naming_the_holder(tmp_path: Path) -> None:
    holder = _holder(tmp_path / "models")
    try:
        with pytest.raises(UserError) as exc, claim_outputs("train", [tmp_path / "models"]):
            pytest.fail("two writers at once")
        message = str(exc.value)
        assert "\n" not in message and "another run of the train stage" in message
        assert f"process {holder.pid}" in message
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_does_not_block_the_next_run(tmp_path: Path) -> None:
    holder = _holder(tmp_path / "models")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with claim_outputs("train", [tmp_path / "models"]):
        pass  # the kernel released the dead holder's lock


def test_other_stages_and_ranks_that_do_not_write_are_not_blocked(tmp_path: Path) -> None:
    with claim_outputs("train", [tmp_path]), claim_outputs("sample", [tmp_path]), \
            claim_outputs("train", [tmp_path], lock=False):
        pass


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_unwritable_folder_is_found_before_any_work() -> None:
    # /proc refuses new files even to root, who ignores permission bits.
    with pytest.raises(UserError) as exc, claim_outputs("train", [Path("/proc/self/models")]):
        pytest.fail("claimed an unwritable folder")
    assert "\n" not in str(exc.value) and str(exc.value).startswith("cannot write to /proc/self/models/")


def test_a_folder_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "metrics"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(UserError) as exc, claim_outputs("train", [tmp_path / "models", blocker]):
        pytest.fail("claimed a path that is a file")
    assert "\n" not in str(exc.value) and "cannot write to" in str(exc.value)
