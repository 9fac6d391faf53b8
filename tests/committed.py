"""The project's files as committed, never as the workspace holds them now.

`dvc exp run` and `dvc exp apply` rewrite the workspace's params.yaml (and a run leaves dvc.lock,
metrics and models behind): tests that need the project's params start from ``HEAD`` instead, so
they pass whatever experiment the workspace holds, and never change it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def committed_text(rel: str) -> str:
    """``rel`` (repo-relative) at ``HEAD``; the file itself when the tree is not a git checkout
    (e.g. an unpacked source archive, which has no workspace state to avoid)."""
    proc = subprocess.run(["git", "-C", str(ROOT), "show", f"HEAD:{rel}"], capture_output=True, text=True)
    if proc.returncode == 0:
        return proc.stdout
    if (ROOT / ".git").exists():
        raise RuntimeError(f"`git show HEAD:{rel}` failed: {proc.stderr.strip()} (commit {rel} first)")
    return (ROOT / rel).read_text()


def committed_yaml(rel: str) -> Any:
    return yaml.safe_load(committed_text(rel))
