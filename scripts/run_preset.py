"""Run a preset, a YAML overlay of params.yaml such as configs/quick.yaml, as one DVC experiment.

    python scripts/run_preset.py configs/quick.yaml [--source official|PATH] [--name NAME]
                                 [-S section.key=value ...] [--dry-run]

Presets: configs/quick.yaml (the whole DAG at CPU size), configs/ddpm-paper.yaml (Ho et al.'s
CIFAR-10 recipe). `-S` values go on top of the preset's. The params are checked before DVC
starts (a bad value is one line naming the key); --dry-run stops there and prints the command.

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
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from ddpm_cifar import config
from ddpm_cifar.cifar_archive import CIFAR10_MD5, CIFAR10_URL
from ddpm_cifar.errors import ConfigError

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


def with_sets(overlay: dict[str, dict[str, Any]], sets: list[str]) -> dict[str, dict[str, Any]]:
    """``overlay`` with each ``section.key=value`` of ``sets`` on top (value read as YAML, as DVC's
    -S does), so that every key is passed to DVC once."""
    out = {section: dict(values or {}) for section, values in overlay.items()}
    for item in sets:
        dotted, eq, text = item.partition("=")
        section, dot, key = dotted.partition(".")
        if not eq or not dot or not section or not key:
            sys.exit(f"error: -S {item!r}: expected section.key=value, e.g. -S train.lr=1e-4")
        try:
            out.setdefault(section, {})[key] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            sys.exit(f"error: -S {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]})")
    return out


def check(params_path: Path, overlay: dict[str, dict[str, Any]]) -> None:
    """Refuse, in one line naming the key, an overlay that would make ``params_path`` invalid."""
    try:
        raw = config.read_yaml(params_path)
        for section, values in overlay.items():
            if not isinstance(values, dict):
                raise ConfigError(f"preset section {section!r} must be a mapping of keys")
            if not isinstance(raw.get(section), dict):
                raise ConfigError(f"unknown params section {section!r} (known: {', '.join(config.SECTIONS)})")
            raw[section] = {**raw[section], **values}
        params = config.Params(raw, tuple(config.SECTIONS), source=str(params_path))
        for section in config.SECTIONS:
            params.section(section)
    except ConfigError as exc:
        sys.exit(f"error: {exc}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", type=Path, help="YAML overlay of params.yaml, e.g. configs/quick.yaml")
    ap.add_argument("--source", help="CIFAR-10: 'official', or a local archive or image folder")
    ap.add_argument("--name", help="experiment name (default: the preset's name and the time)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="one more param on top of the preset, as for `dvc exp run -S` (repeatable)")
    ap.add_argument("--dry-run", action="store_true", help="check the params and print the command only")
    args = ap.parse_args()
    if not args.preset.is_file():
        sys.exit(f"error: preset {args.preset} not found (presets: {', '.join(_presets())})")
    try:
        overlay = yaml.safe_load(args.preset.read_text()) or {}
    except yaml.YAMLError as exc:
        sys.exit(f"error: {args.preset} is not valid YAML ({str(exc).splitlines()[0]})")
    if not isinstance(overlay, dict):
        sys.exit(f"error: {args.preset} must hold a mapping of params sections")
    source, md5, why = data_source(args.source)
    overlay["data"] = {**(overlay.get("data") or {}), "source": source, "md5": md5}
    overlay = with_sets(overlay, args.set)
    check(ROOT / "params.yaml", overlay)
    name = args.name or f"{args.preset.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"data: {overlay['data']['source']} ({why})", flush=True)
    cmd = ["dvc", "exp", "run", "--temp", "-n", name, *set_args(overlay)]
    print("$ " + shlex.join(cmd), flush=True)
    if args.dry_run:
        return
    if subprocess.run(cmd, cwd=ROOT).returncode:
        sys.exit(f"error: experiment {name} failed (see above); params.yaml is unchanged")
    print(f"\nExperiment {name} is saved in DVC's experiment refs; params.yaml is unchanged.\n"
          f"  dvc exp show --only-changed     compare it with other runs\n"
          f"  dvc exp apply {name}   bring its params, models and plots into the workspace\n")
    subprocess.run(["dvc", "exp", "show", "--no-pager", "--only-changed", "--drop", "Created"], cwd=ROOT)


def _presets() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.yaml"))


if __name__ == "__main__":
    main()
