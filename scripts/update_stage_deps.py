"""Rewrite the package modules each stage lists in dvc.yaml's deps from the stage's import closure.

    python scripts/update_stage_deps.py          # rewrites dvc.yaml in place; prints what changed

tests/test_dvc_wiring.py computes the same closures and fails when dvc.yaml drifts from them; this
writes what the test wants. Only the `- src/ddpm_cifar/...` lines change; comments and order stay.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _wiring():  # the test module holds the one definition of a stage's closure
    sys.path.insert(0, str(ROOT / "tests"))
    spec = importlib.util.spec_from_file_location("dvc_wiring", ROOT / "tests" / "test_dvc_wiring.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    wiring = _wiring()
    text = (ROOT / "dvc.yaml").read_text()
    out, stage, in_src = [], None, False
    for line in text.splitlines(keepends=True):
        match = re.match(r"^  (\w+):\s*(#.*)?$", line)
        if match:
            stage = match.group(1)
        if line.startswith(f"      - src/{wiring.PACKAGE}/"):
            if not in_src:
                out.extend(f"      - {p}\n" for p in sorted(wiring.stage_closure(stage)))
                in_src = True
            continue
        in_src = False
        out.append(line)
    new = "".join(out)
    if new != text:
        (ROOT / "dvc.yaml").write_text(new)
        print("dvc.yaml: stage deps rewritten from the import closures")
    else:
        print("dvc.yaml: stage deps already match the import closures")


if __name__ == "__main__":
    main()
