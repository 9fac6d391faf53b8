"""What killed `dvc exp run --temp` runs leave under .dvc/tmp/exps/, and removing it.

    python scripts/run_preset.py --clean     # or: make clean-exps

Used by scripts/run_preset.py (its --clean, and the note a run prints when there are leftovers).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

# DVC 3 (dvc/repo/experiments/: queue/tempdir.py, executor/local.py, executor/base.py) keeps, for a
# `dvc exp run --temp`, under .dvc/tmp/exps/:
#   standalone/tmpXXXXXXXX/     the copy of the checkout the run works in (TempDirExecutor's root_dir),
#                               removed by DVC when the run ends, never when it is killed;
#   standalone/run/REV/REV.run  its ExecutorInfo (JSON: name, root_dir, status), written when the stages
#                               start. `dvc exp show` lists the run as Running while that status is at
#                               most SUCCESS and root_dir exists: no process id is kept (no REV.json, as
#                               the workspace queue writes), so DVC cannot tell a killed run from a live one;
#   run/REV/REV.run             the same info at PREPARING, written while the copy is made (in the
#                               celery queue's folder); DVC leaves it after every run.
EXPS = Path(".dvc") / "tmp" / "exps"
SUCCESS = 3  # DVC's TaskStatus: PENDING 0, PREPARING 1, RUNNING 2, SUCCESS 3, FAILED 4, ... FINISHED 6
# A process's start time reads up to a second early (the boot time it counts from is in whole
# seconds), never late; DVC takes over a second to start before it writes a run's first file.
CLOCK_SLACK_S = 1.0


class TempRun:
    """One `--temp` run's leftovers. (Not a dataclass: the tests load this script without a module.)"""

    def __init__(self, copy: Path, name: str | None):
        self.copy = copy  # the run's copy of the checkout (it may be gone)
        self.name = name
        self.records: list[Path] = []  # its REV.run files
        self.running_row = False  # whether `dvc exp show` lists it as Running


def _read_info(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # being written, or not DVC's: not ours to judge
    return info if isinstance(info, dict) and isinstance(info.get("root_dir"), str) else None


def temp_runs(root: Path) -> list[TempRun]:
    """The `--temp` runs of ``root`` that did not finish: their copy is still there, or `dvc exp show`
    lists them as Running. Some are running; :func:`in_use` tells."""
    standalone = Path(os.path.realpath(root / EXPS / "standalone"))
    runs: dict[Path, TempRun] = {}
    for folder in (standalone / "run", standalone.parent / "run"):
        for record in sorted(folder.glob("*/*.run")):
            info = _read_info(record)
            if info is None:
                continue
            copy = Path(os.path.realpath(info["root_dir"]))
            if copy.parent != standalone:
                continue  # a queued run's copy lives elsewhere and the queue tidies it
            run = runs.setdefault(copy, TempRun(copy, info.get("name")))
            run.records.append(record)
            if folder.parent == standalone and info.get("status", SUCCESS + 1) <= SUCCESS:
                run.running_row = True
    for copy in sorted(standalone.glob("tmp*")):  # a run killed before DVC recorded it
        if copy.is_dir():
            runs.setdefault(copy, TempRun(copy, None))
    return [run for run in runs.values() if run.copy.is_dir() or run.running_row]


Process = tuple[Path | None, list[str], float]  # working folder (None: not readable), command line, start


def live_processes() -> list[Process]:
    import psutil  # DVC's own dependency: DVC checks its workspace runs' process ids with it

    out = []
    for proc in psutil.process_iter(["cwd", "cmdline", "create_time"]):
        cwd, cmdline, started = proc.info["cwd"], proc.info["cmdline"], proc.info["create_time"]
        if started is not None:  # gone while listed otherwise
            out.append((Path(cwd) if cwd else None, cmdline or [], started))
    return out


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None  # removed meanwhile


def in_use(run: TempRun, root: Path, processes: list[Process]) -> bool:
    """Whether a live process may still work on ``run``. DVC keeps no process id for a temp run, so
    this asks the processes: the stages, and DVC while it runs them, work in the copy; before and after
    (making the copy, collecting the result) `dvc exp run` works in the project, started before the
    run's files were last written. Erring on the side of keeping: another `dvc exp run` in the project
    that started earlier keeps the leftovers until it ends."""
    written = [t for t in map(_mtime, (run.copy, *run.records)) if t is not None]
    newest = max(written, default=time.time())
    for cwd, cmdline, started in processes:
        if cwd is not None and cwd.is_relative_to(run.copy):
            return True
        dvc_exp_run = "exp" in cmdline and "run" in cmdline and any(Path(a).name == "dvc" for a in cmdline)
        # another user's DVC, whose folder cannot be read, may be working in this checkout too
        in_project = cwd is None or cwd.is_relative_to(root)
        if dvc_exp_run and in_project and started <= newest + CLOCK_SLACK_S:
            return True
    return False


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [Path(d, f) for d, _, fs in os.walk(path) for f in fs]
    return sum(f.lstat().st_size for f in files if f.exists() or f.is_symlink()) / 1e6


def killed_runs(root: Path) -> tuple[list[TempRun], list[TempRun]]:
    """(killed, running): the unfinished temp runs that no live process uses, and the others."""
    root = Path(os.path.realpath(root))
    runs = temp_runs(root)
    processes = live_processes() if runs else []
    killed = [run for run in runs if not in_use(run, root, processes)]
    return killed, [run for run in runs if run not in killed]


def _names(runs: list[TempRun]) -> str:
    return ", ".join(run.name or run.copy.name for run in runs)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _items(run: TempRun) -> list[tuple[Path, str]]:
    """What ``run`` left, as (path, what it is); the copy first: the records make `dvc exp show` list the
    run, so a clean cut short finds it again."""
    items = [(run.copy, f"the copy experiment {run.name or '(unnamed)'} ran in")]
    for record in run.records:
        shown = record.parents[2].name == "standalone"  # standalone/run/REV/REV.run
        items.append((record.parent, "its record behind the Running row in `dvc exp show`" if shown
                      else "its record from making the copy"))
    return [(path, what) for path, what in items if path.exists()]


def clean_exps(root: Path) -> None:
    """Remove the copy and records of each killed temp run: one line per path, then a summary."""
    root = Path(os.path.realpath(root))  # as DVC records the copies' paths
    killed, running = killed_runs(root)
    removed, total_mb = 0, 0.0
    for run in killed:
        for path, what in _items(run):
            mb = _size_mb(path)
            try:
                shutil.rmtree(path)
            except FileNotFoundError:
                continue  # another clean took it meanwhile
            except OSError as exc:
                sys.exit(f"error: cannot remove {path}: {exc.strerror or exc}")
            removed, total_mb = removed + 1, total_mb + mb
            print(f"removed {os.path.relpath(path, root)} ({what}, {mb:.1f} MB)")
    summary = (f"removed {_plural(removed, 'leftover')} of {_plural(len(killed), 'killed experiment')} "
               f"({_names(killed)}), {total_mb:.1f} MB" if killed
               else "nothing removed: no leftovers of killed temp-copy experiments")
    if running:
        summary += f"; kept {len(running)} that a live process may still use ({_names(running)})"
    print(summary)


def leftover_note(root: Path) -> None:
    """One line when killed runs left copies behind: what `make clean-exps` would remove. Not removed
    here: a killed run's copy holds its logs and partial outputs, which may be wanted to see why it
    died, and it is not this run's to delete unasked."""
    killed, _ = killed_runs(root)
    if killed:
        mb = sum(_size_mb(run.copy) for run in killed if run.copy.is_dir())
        print(f"note: {_plural(len(killed), 'killed experiment')} ({_names(killed)}) left {mb:.0f} MB "
              "under .dvc/tmp/exps/: `make clean-exps` removes it", flush=True)


