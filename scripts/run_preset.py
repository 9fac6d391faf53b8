"""Run a preset, a YAML overlay of params.yaml such as configs/quick.yaml, as one DVC experiment.

    python scripts/run_preset.py configs/quick.yaml [--source official|PATH] [--name NAME]
                                 [-S section.key=value ...] [--workspace] [--dry-run]
    python scripts/run_preset.py --clean     (make clean-exps)

Presets: configs/quick.yaml (the whole DAG at CPU size), configs/ddpm-paper.yaml (Ho et al.'s
CIFAR-10 recipe). A preset's params are the study's as committed (HEAD's params.yaml) with the
preset's values and then the `-S` values on top, whatever experiment the workspace's params.yaml
holds. They are checked before DVC starts (a bad value is one line naming the key); --dry-run
stops there and prints the command.

The experiment runs in a temporary copy of the checkout (`dvc exp run --temp`): params.yaml,
dvc.lock and the workspace's outputs stay as committed, and the results live in DVC's experiment
refs (`dvc exp show`; `dvc exp apply NAME` brings one into the workspace). DVC runs through
scripts/exp_screens.py (why: there), and the run ends with a summary of it in 80 columns. A
temporary copy keeps nothing when the run is interrupted, so long runs (`make paper-recipe`) use
--workspace: the preset's values are written into params.yaml (comments kept), `dvc repro` runs in
the workspace, whose training checkpoint persists, and `dvc exp save` records the result; the same
command resumes an interrupted run.

A killed temporary run (kill -9, a closed terminal) leaves its copy under .dvc/tmp/exps/standalone/
and a Running row in `dvc exp show` that `dvc exp remove` and `dvc exp clean` do not remove: --clean
(make clean-exps) removes both for every such run that no live process uses. A run mentions them
when it starts; it leaves them, as they hold the killed run's logs and partial outputs.

CIFAR-10 comes from --source when given; otherwise from the official download when it can be
reached, else from the JPEG copy beside the checkout (../shared/data/cifar10-jpeg.tar.gz). The run
prints which one it used. The copy is not the official archive, so FIDs on it are flagged.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from exp_leftovers import clean_exps, leftover_note
from exp_screens import dvc_command, experiment_files, head_sha, summary

from ddpm_cifar.data.cifar_archive import CIFAR10_MD5, CIFAR10_URL
from ddpm_cifar.runtime import config, fileio, params_file
from ddpm_cifar.runtime.errors import ConfigError

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


# A preset, -S values and params as flat {"section.key": value} maps: a block inside a section
# (sample.sampler) is set key by key, so a preset that names sample.sampler.steps keeps the
# study's other sampler settings, as `dvc exp run -S sample.sampler.steps=20` does.
Flat = dict[str, Any]


def flatten(tree: dict[str, Any], prefix: str = "") -> Flat:
    out: Flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def set_in(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree``'s value at ``dotted``, making the mappings on the way."""
    *path, leaf = dotted.split(".")
    for key in path:
        if not isinstance(tree.get(key), dict):
            tree[key] = {}
        tree = tree[key]
    tree[leaf] = value


def set_args(changes: Flat) -> list[str]:
    """`-S section.key=value` for each value; JSON is valid YAML and keeps null, booleans and lists
    unambiguous for DVC's parser."""
    out = []
    for dotted, value in changes.items():
        out += ["-S", f"{dotted}={override_text(value)}"]
    return out


def override_text(value: Any) -> str:
    """A value as DVC's -S parser (Hydra's override grammar) reads it: JSON, except that a mapping's
    keys go unquoted (a list of sampler blocks, frontier.curves)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {override_text(v)}" for key, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(override_text(v) for v in value) + "]"
    return json.dumps(value)


def with_sets(overlay: Flat, sets: list[str]) -> Flat:
    """``overlay`` with each ``section.key=value`` of ``sets`` on top (the value read as params.yaml
    reads it: ``1e-4`` is a number), so that every key is passed to DVC once."""
    out = dict(overlay)
    for item in sets:
        dotted, eq, text = item.partition("=")
        section, dot, key = dotted.partition(".")
        if not eq or not dot or not section or not key:
            sys.exit(f"error: -S {item!r}: expected section.key=value, e.g. -S train.lr=1e-4")
        value = _or_exit(params_file.parse_yaml, text, f"-S {item!r}")
        out.update(flatten(value, dotted + ".") if isinstance(value, dict) and value else {dotted: value})
    return out


def _or_exit(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, a ConfigError ending the script in one line."""
    try:
        return fn(*args)
    except ConfigError as exc:
        sys.exit(f"error: {exc}")


def study_params() -> dict[str, Any]:
    """params.yaml as committed (HEAD), what every key a preset does not list keeps: the workspace's
    may hold another experiment (`dvc exp apply`, a --workspace run). The file itself outside git."""
    proc = subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:params.yaml"], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        return _or_exit(params_file.read_yaml, ROOT / "params.yaml")
    study = _or_exit(params_file.parse_yaml, proc.stdout, "HEAD:params.yaml")
    if not isinstance(study, dict):
        sys.exit("error: HEAD:params.yaml must hold a mapping of sections")
    return study


def plan(study: dict[str, Any], workspace: dict[str, Any], overlay: Flat) -> Flat:
    """The values to set so that the workspace's params become the study's with ``overlay`` on top:
    the overlay's, and the study's wherever the workspace holds something else."""
    unknown = [k for k in overlay if not isinstance(study.get(k.split(".")[0]), dict)]
    if unknown:
        sys.exit(f"error: unknown params section {unknown[0].split('.')[0]!r} "
                 f"(known: {', '.join(config.SECTIONS)})")
    missing = object()
    have = flatten(workspace)
    target = {**flatten(study), **overlay}
    return {k: v for k, v in target.items() if have.get(k, missing) != v}


def check(workspace: dict[str, Any], changes: Flat) -> None:
    """Refuse, in one line naming the key, params that the workspace's with ``changes`` would make."""
    raw = copy.deepcopy(workspace)
    for dotted, value in changes.items():
        set_in(raw, dotted, value)
    params = _or_exit(params_file.Params, raw, tuple(config.SECTIONS), "the preset's params")
    for section in config.SECTIONS:
        _or_exit(params.section, section)
    check_fid(raw)  # after the types are checked: a count is an int, a reference a string


# A DVC experiment name becomes a git ref (refs/exps/.../NAME): a plain name, which git's ref rules
# (git check-ref-format) and a file name both take, so that a bad one fails here and not after setup.
NAME_CHARS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_MAX = 100  # a ref is a file: well under the 255 bytes of a file name


def check_name(name: str) -> None:
    if (not NAME_CHARS.fullmatch(name) or ".." in name or name.endswith((".", ".lock"))
            or len(name) > NAME_MAX):
        sys.exit(f"error: --name {name!r} is not a plain experiment name (DVC makes it a git ref): use "
                 f"letters, digits, '.', '_' and '-', starting with a letter or digit, without '..', not "
                 f"ending in '.' or '.lock', at most {NAME_MAX} characters")


# The official CIFAR-10's sets (the fetch stage checks the download's MD5); a local archive's or
# image folder's size is known only once fetched, so the ref_stats stage checks those.
OFFICIAL_SIZES = {"train": 50_000, "test": 10_000}


def check_fid(params: dict[str, Any]) -> None:
    """What fid.reference and fid.reference_count need beyond their types, known before DVC starts."""
    fid, source = params["fid"], params["data"]["source"]
    reference, count = fid["reference"], fid["reference_count"]
    if reference not in OFFICIAL_SIZES:
        # a path: the ref_stats stage runs in the repository root, so a relative one is from there
        if not (ROOT / reference).is_file():
            where = "" if Path(reference).is_absolute() else f" (in {ROOT})"
            sys.exit(f"error: fid.reference {reference} is not a file{where}: give train, test, or the "
                     "path of a .npz of precomputed FID statistics (mu and sigma)")
    elif source == "official" and count > OFFICIAL_SIZES[reference]:
        size = OFFICIAL_SIZES[reference]
        sys.exit(f"error: fid.reference_count {count} exceeds the {size:,} images of CIFAR-10's "
                 f"{reference} set (fid.reference {reference}, data.source official): give at most "
                 f"{size:,}, or 0 for all")


def load_overlay(preset: Path) -> Flat:
    if not preset.is_file():
        sys.exit(f"error: preset {preset} not found (presets: {', '.join(_presets())})")
    overlay = _or_exit(params_file.read_yaml, preset)
    bad = [section for section, values in overlay.items() if not isinstance(values, dict)]
    if bad:
        sys.exit(f"error: {preset}: section {bad[0]!r} must be a mapping of keys")
    return flatten(overlay)


def write_params(path: Path, changes: Flat) -> None:
    """Set ``changes``' values in ``path`` in place, keeping its comments and layout (ruamel, as
    DVC's own -S does); lists stay in flow style, null stays null."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedSeq

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096  # never fold a long line
    rt.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(path.read_text())
    for dotted, value in changes.items():
        if isinstance(value, list):
            value = CommentedSeq(value)
            value.fa.set_flow_style()
        *path_keys, leaf = dotted.split(".")
        node = doc
        for key in path_keys:
            node = node.setdefault(key, {})
        node[leaf] = value
    with fileio.atomic_path(path) as tmp, open(tmp, "w") as f:
        rt.dump(doc, f)


def run_dvc(cmd: list[str], name: str, workspace: bool) -> None:
    """Run ``cmd`` (DVC); on failure or Ctrl-C, one line saying what is left."""
    # Ctrl-C reaches DVC and the running stage as well (one process group): wait for DVC to stop
    # the stage and tidy up rather than killing it at once, unless Ctrl-C is pressed again.
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        try:
            proc.wait(timeout=120)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        code = None
    if code == 0:
        return
    what = "interrupted" if code is None else "failed (see above)"
    if workspace:
        sys.exit(f"error: {name} {what}; the workspace keeps the preset's params and the last training "
                 "checkpoint: run the same command again to resume")
    sys.exit(f"error: experiment {name} {what}; params.yaml is unchanged, and a rerun starts over (a --temp "
             "run keeps nothing; for long runs use --workspace, which resumes)")


def run_in_workspace(changes: Flat, name: str, dry_run: bool) -> None:
    """The preset's values written into params.yaml, `dvc repro`, then `dvc exp save`. Not `dvc exp
    run`, which checks the workspace's outputs out afresh and so drops an unfinished training
    checkpoint: `dvc repro` keeps it (persist: true), and training resumes from it."""
    repro, save = ["dvc", "repro"], ["dvc", "exp", "save", "--force", "-n", name]
    print(f"params.yaml: {len(changes)} values set", flush=True)
    print("$ " + shlex.join(repro) + "\n$ " + shlex.join(save), flush=True)
    if dry_run:
        return
    write_params(ROOT / "params.yaml", changes)
    run_dvc(repro, name, workspace=True)
    run_dvc(save, name, workspace=True)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", type=Path, nargs="?",
                    help="YAML overlay of params.yaml, e.g. configs/quick.yaml")
    ap.add_argument("--source", help="CIFAR-10: 'official', or a local archive or image folder")
    ap.add_argument("--name", help="experiment name (default: the preset's name and the time)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="one more param on top of the preset, as for `dvc exp run -S` (repeatable)")
    ap.add_argument("--workspace", action="store_true",
                    help="run in the workspace, not a temporary copy: params.yaml takes the preset's values "
                         "and an interrupted run resumes when run again (for long runs)")
    ap.add_argument("--dry-run", action="store_true", help="check the params and print the command only")
    ap.add_argument("--clean", action="store_true",
                    help="instead of running a preset, remove what killed temp-copy experiments left under "
                         ".dvc/tmp/exps/ (their copy, and their Running row in `dvc exp show`), never "
                         "a running one's (make clean-exps)")
    args = ap.parse_args()
    if args.clean and (args.preset or args.source or args.name is not None or args.set or args.workspace
                       or args.dry_run):
        sys.exit("error: --clean takes no preset and no other option: run it on its own (make clean-exps)")
    if not args.clean and args.preset is None:
        sys.exit(f"error: give a preset ({', '.join(_presets())}), or --clean")
    return args


def main() -> None:
    args = parse_args()
    if args.clean:
        clean_exps(ROOT)
        return
    if args.name is not None:
        check_name(args.name)
    overlay = load_overlay(args.preset)
    source, md5, why = data_source(args.source)
    overlay.update({"data.source": source, "data.md5": md5})
    overlay = with_sets(overlay, args.set)
    workspace = _or_exit(params_file.read_yaml, ROOT / "params.yaml")
    changes = plan(study_params(), workspace, overlay)
    check(workspace, changes)
    name = args.name or f"{args.preset.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_name(name)  # a preset's file name may hold what a ref cannot
    if not args.dry_run:
        leftover_note(ROOT)
    print(f"data: {overlay['data.source']} ({why})", flush=True)
    baseline, started = head_sha(ROOT), time.monotonic()  # the experiment's ref is under its baseline
    if args.workspace:
        run_in_workspace(changes, name, args.dry_run)
    else:
        cmd = ["dvc", "exp", "run", "--temp", "-n", name, *set_args(changes)]
        print("$ " + shlex.join(cmd), flush=True)
        if args.dry_run:
            return
        # through exp_screens: DVC's warnings about outputs without a hash yet left out (see there)
        run_dvc(dvc_command(cmd), name, workspace=False)
    if args.dry_run:
        return
    # The last screen: a summary in 80 columns (`dvc exp show --only-changed` printed one of `…`)
    files = experiment_files(ROOT, baseline, name)
    print("\n" + "\n".join(summary(name, files, time.monotonic() - started, args.workspace)), flush=True)


def _presets() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.yaml"))


if __name__ == "__main__":
    main()
