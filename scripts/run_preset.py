"""Run a preset, a YAML overlay of params.yaml such as configs/quick.yaml, as one DVC experiment.

    python scripts/run_preset.py configs/quick.yaml [--source official|PATH] [--name NAME]
                                 [-S section.key=value ...]

The experiment runs in a temporary copy of the checkout (`dvc exp run --temp`): params.yaml,
dvc.lock and the workspace's outputs stay as committed, and the results live in DVC's experiment
refs (`dvc exp show`; `dvc exp apply NAME` brings one into the workspace).

CIFAR-10 comes from --source when given; otherwise from the official download when it can be
reached, else from the JPEG copy beside the checkout (../shared/data/cifar10-jpeg.tar.gz). The run
prints which one it used. The copy is not the official archive, so FIDs on it are flagged.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from ddpm_cifar.cifar_archive import CIFAR10_MD5, CIFAR10_URL

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_URL, OFFICIAL_MD5 = CIFAR10_URL, CIFAR10_MD5
LOCAL_COPY = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def reachable(url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except OSError:
        return False


def data_source(given: str | None) -> tuple[str, str | None, str]:
    """(data.source, data.md5, why) for the experiment."""
    if given == "official":
        return "official", OFFICIAL_MD5, "--source official"
    if given:
        # absolute (the experiment runs in another folder), symlinks kept: the param names what was given
        path = Path(os.path.abspath(Path(given).expanduser()))
        if not path.exists():
            sys.exit(f"error: --source {given}: no such file or folder")
        md5 = OFFICIAL_MD5 if path.name == "cifar-10-python.tar.gz" else None
        return str(path), md5, "--source"
    if reachable(OFFICIAL_URL):
        return "official", OFFICIAL_MD5, f"{OFFICIAL_URL} is reachable"
    if LOCAL_COPY.is_file():
        return str(LOCAL_COPY), None, "offline; the JPEG copy beside the checkout (not the official archive)"
    sys.exit(f"error: no CIFAR-10 source: {OFFICIAL_URL} cannot be reached and {LOCAL_COPY} does not exist; "
             "give a local copy with SOURCE=path/to/cifar-10-python.tar.gz (make) or --source PATH "
             "(an official archive, or an image folder as a directory or .tar.gz)")


def set_args(overlay: dict[str, dict[str, Any]]) -> list[str]:
    """`-S section.key=value` for each value; JSON is valid YAML and keeps null, booleans and lists
    unambiguous for DVC's parser."""
    out = []
    for section, values in overlay.items():
        for key, value in values.items():
            out += ["-S", f"{section}.{key}={json.dumps(value)}"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", type=Path, help="YAML overlay of params.yaml, e.g. configs/quick.yaml")
    ap.add_argument("--source", help="CIFAR-10: 'official', or a local archive or image folder")
    ap.add_argument("--name", help="experiment name (default: the preset's name and the time)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="one more param on top of the preset, as for `dvc exp run -S` (repeatable)")
    args = ap.parse_args()
    overlay = yaml.safe_load(args.preset.read_text()) or {}
    source, md5, why = data_source(args.source)
    overlay["data"] = {**overlay.get("data", {}), "source": source, "md5": md5}
    name = args.name or f"{args.preset.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"data: {source} ({why})", flush=True)
    extra = [a for kv in args.set for a in ("-S", kv)]
    cmd = ["dvc", "exp", "run", "--temp", "-n", name, *set_args(overlay), *extra]
    print("$ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode:
        sys.exit(f"error: experiment {name} failed (see above); params.yaml is unchanged")
    print(f"\nExperiment {name} is saved in DVC's experiment refs; params.yaml is unchanged.\n"
          f"  dvc exp show --only-changed     compare it with other runs\n"
          f"  dvc exp apply {name}   bring its params, models and plots into the workspace\n")
    subprocess.run(["dvc", "exp", "show", "--no-pager", "--only-changed", "--drop", "Created"], cwd=ROOT)


if __name__ == "__main__":
    main()
