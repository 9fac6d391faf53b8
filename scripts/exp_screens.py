"""What scripts/run_preset.py shows first and last around a DVC experiment.

    python scripts/exp_screens.py dvc exp run --temp -n NAME ...   # as run_preset.py runs DVC

First: `dvc exp run`, run through this script, without the warnings of the checkout DVC makes before
the first stage about outputs that have no hash yet (see NO_HASH below). Last: a summary of the
finished experiment that fits 80 columns (:func:`summary`), read from its git ref, where `dvc exp
show --only-changed` printed a table of elided columns.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

# Why a filter, and why this one message only. Before it runs any stage, DVC 3's experiment executor
# checks the workspace out into the experiment's copy (dvc/repo/experiments/executor/base.py,
# BaseExecutor.reproduce: dvc.repo.checkout with allow_missing=True), and dvc_data's index checkout
# (dvc_data/index/checkout.py, _create_files) warns for each output that has no hash, that is each one
# dvc.lock does not list yet: on a fresh clone, where dvc.lock is not committed, every cached output,
# a screen of warnings before any stage. No option of `dvc exp run` skips that checkout or
# its warning. In the copy the warning needs no action, as the stages make those outputs; so this
# message, from that logger alone (the one the pre-run checkout uses), is dropped. Every other warning
# is kept, and so is this message from any other logger, e.g. dvc_data.hashfile.checkout's when
# `dvc repro` or `dvc checkout` cannot restore an output that should exist.
NO_HASH_LOGGER = "dvc_data.index.checkout"
NO_HASH = "No file hash info found for '%s'. It won't be created."


class NoHashWarnings(logging.Filter):
    """Drops the pre-run checkout's warning about an output without a hash (NO_HASH), nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not is_no_hash_warning(record)


def is_no_hash_warning(record: logging.LogRecord) -> bool:
    return (record.name == NO_HASH_LOGGER and record.levelno == logging.WARNING and record.msg == NO_HASH
            and len(record.args or ()) == 1)


def dvc_command(argv: list[str]) -> list[str]:
    """The command that runs ``argv`` (``["dvc", ...]``) through this script: the same DVC, in its own
    process, with its arguments after a literal ``dvc`` (exp_leftovers.in_use finds a running
    `dvc exp run` by those)."""
    if argv[:1] != ["dvc"]:
        raise ValueError(f"not a dvc command: {argv}")
    return [sys.executable, str(Path(__file__).resolve()), *argv]


def drop_no_hash_warnings() -> NoHashWarnings:
    """Leave the NO_HASH warnings of DVC's pre-run checkout out of this process's log; the filter."""
    no_hash = NoHashWarnings()
    logging.getLogger(NO_HASH_LOGGER).addFilter(no_hash)
    return no_hash


def run_dvc_main(args: list[str]) -> int:
    """`dvc ARGS` in this process, its pre-run checkout's NO_HASH warnings left out."""
    from dvc.cli import main as dvc_main

    drop_no_hash_warnings()
    return dvc_main(args)


# --- The last screen ---------------------------------------------------------------------------------

FID_METRICS, FID_REPORT, TRAIN_METRICS = "metrics/fid.json", "reports/fid.json", "dvclive/metrics.json"


def head_sha(root: Path) -> str | None:
    """HEAD's commit, the baseline DVC files the experiment under (None outside git)."""
    proc = subprocess.run(["git", "-C", str(root), "rev-parse", "--verify", "--quiet", "HEAD"],
                          capture_output=True, text=True)
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def experiment_files(root: Path, baseline: str | None, name: str) -> dict[str, dict[str, Any]]:
    """The metrics and report files (cache: false, so in git) of experiment ``name`` on ``baseline``,
    by path; a file the experiment does not hold, or not as a JSON mapping, is left out."""
    if baseline is None:
        return {}
    from dvc.repo.experiments.refs import ExpRefInfo  # DVC's own layout of refs/exps/

    ref = str(ExpRefInfo(baseline_sha=baseline, name=name))
    out = {}
    for path in (FID_METRICS, FID_REPORT, TRAIN_METRICS):
        proc = subprocess.run(["git", "-C", str(root), "show", f"{ref}:{path}"], capture_output=True,
                              text=True)
        try:
            data = json.loads(proc.stdout) if proc.returncode == 0 else None
        except ValueError:
            data = None
        if isinstance(data, dict):
            out[path] = data
    return out


def duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def score_lines(files: dict[str, dict[str, Any]]) -> list[str]:
    """FID with its sample count and comparable flag, KID ± std, the steps and the final loss."""
    fid, report, train = (files.get(p) or {} for p in (FID_METRICS, FID_REPORT, TRAIN_METRICS))
    lines = []
    if _number(fid.get("fid")):
        reference = f" vs {fid['reference_n']} reference images" if "reference_n" in fid else ""
        lines.append(f"  FID    {fid['fid']:.2f} on {fid.get('n_samples', '?')} samples{reference}, "
                     f"comparable: {'yes' if fid.get('comparable') else 'no'}")
    else:
        lines.append(f"  FID    none: the experiment has no {FID_METRICS}")
    kid = (report.get("kid_detail") or {}) if _number(fid.get("kid")) else {}
    if kid and _number(kid.get("std")):
        lines.append(f"  KID    {fid['kid']:.4g} ± {kid['std']:.2g} (std over {kid.get('subsets', '?')} "
                     f"subsets of {kid.get('subset_size', '?')})")
    elif _number(fid.get("kid")):
        lines.append(f"  KID    {fid['kid']:.4g}")
    if _number(train.get("final_loss")):
        lines.append(f"  train  {train.get('step', '?')} steps, final loss {train['final_loss']:.4g}")
    if report.get("not_comparable_because"):
        lines.append(f"  {FID_REPORT} says why the FID is not comparable with published ones.")
    return lines


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def summary(name: str, files: dict[str, dict[str, Any]], wall_s: float | None, workspace: bool) -> list[str]:
    """The last screen of a run, ``files`` as :func:`experiment_files` reads them. Every line fits 80
    columns for a name of up to 40 characters (the default names, preset and time, have 21 to 26);
    past that, the lines that hold it whole may not."""
    took = f" in {duration(wall_s)}" if wall_s is not None else ""
    lines = [f"Experiment {name} finished{took}.", *score_lines(files)]
    if workspace:
        lines += ["Its params, models and plots are in the workspace (`git checkout params.yaml`",
                  "brings back the study's params). Its figures: plots/*.png, or dvc plots show"]
    else:
        lines += ["params.yaml is unchanged. The run's figures, in one page:",
                  f"  dvc plots diff {name}",
                  "Its params, models and plots (plots/*.png) into the workspace:",
                  f"  dvc exp apply {name}"]
    return [*lines, "Beside another run, the params and metrics that differ (names: dvc exp list):",
            f"  make compare A={name} B=NAME"]


if __name__ == "__main__":
    if sys.argv[1:2] != ["dvc"]:
        sys.exit("error: usage: python scripts/exp_screens.py dvc ARGS... (as run_preset.py runs DVC)")
    sys.exit(run_dvc_main(sys.argv[2:]))
