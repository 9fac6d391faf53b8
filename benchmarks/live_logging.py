"""The cost of logging one training step through DVCLive, as the train stage does it and as DVCLive's own
``next_step()`` would, at growing history lengths.

The train stage (training/runlog.py) logs loss and lr with ``log_metric`` and replaces the summary
atomically (``runlog.write_summary``). ``next_step()`` also calls ``sync()``, which re-reads every
history file to build the data it would post to DVC Studio, so its cost grows with the steps already
logged: a run of n steps then costs O(n²). This prints both per-step costs at each history length
and their ratio, measured in the same run, in a temporary folder outside any DVC repository.

    python benchmarks/live_logging.py                    # histories of 1k, 10k and 50k steps
    python benchmarks/live_logging.py --lengths 1000 100000 --steps 50
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def prefill(folder: Path, length: int) -> None:
    """Histories of ``length`` steps of loss and lr, as DVCLive writes them."""
    metrics = folder / "plots" / "metrics"
    metrics.mkdir(parents=True, exist_ok=True)
    for name in ("loss", "lr"):
        rows = "".join(f"{s}\t{1.0 / s!r}\n" for s in range(1, length + 1))
        (metrics / f"{name}.tsv").write_text(f"step\t{name}\n{rows}")
    (folder / "metrics.json").write_text(f'{{"step": {length}}}')


def per_step(folder: Path, length: int, steps: int, sync: bool) -> float:
    """Seconds per logged step after ``length`` steps of history."""
    from dvclive import Live

    from ddpm_cifar.training.runlog import write_summary

    prefill(folder, length)
    live = Live(str(folder), resume=True, save_dvc_exp=False, dvcyaml=None)
    start = time.perf_counter()
    for step in range(length + 1, length + steps + 1):
        live.step = step
        live.log_metric("loss", 1.0 / step)
        live.log_metric("lr", 1e-4)
        if sync:
            live.sync()  # what next_step() does before it counts the step
        else:
            write_summary(live)
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 10_000, 50_000])
    ap.add_argument("--steps", type=int, default=20, help="timed steps at each length")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # outside any git or DVC repository: DVCLive finds none and makes none
        print(f"{'history':>9}  {'ours (ms/step)':>15}  {'next_step (ms/step)':>20}  {'ratio':>7}")
        for length in args.lengths:
            ours = per_step(Path(tmp) / f"ours-{length}", length, args.steps, sync=False)
            theirs = per_step(Path(tmp) / f"sync-{length}", length, args.steps, sync=True)
            print(f"{length:>9}  {ours * 1e3:>15.3f}  {theirs * 1e3:>20.3f}  {theirs / ours:>6.0f}x")


if __name__ == "__main__":
    main()
