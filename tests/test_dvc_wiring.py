"""dvc.yaml against the code: params, deps, commands, outputs, metrics and plots (no dvc run).

Every stage script declares a module-level ``PARAMS`` (what :func:`ddpm_cifar.runtime.params_file.load_params`
lets it read); DVC only reruns a stage for the params its ``params:`` list names, so the two must
be the same set or a changed hyperparameter silently fails to invalidate the stage.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from committed import committed_yaml

from ddpm_cifar.runtime import config, params_file

ROOT = Path(__file__).resolve().parents[1]
DVC_YAML = ROOT / "dvc.yaml"
PACKAGE = "ddpm_cifar"
LAUNCHED_STAGES = {"ref_stats", "train", "sample", "frontier", "evaluate", "pretrained"}
PACKAGE_DIR = ROOT / "src" / PACKAGE
_INTERPOLATION = re.compile(r"\$\{\s*([^}]+?)\s*\}")


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


DVC = _load_yaml(DVC_YAML)
STAGES: dict[str, dict[str, Any]] = DVC["stages"]
# As committed: an experiment in the workspace may have rewritten params.yaml (tests/committed.py).
PARAMS_FILE: dict[str, Any] = committed_yaml("params.yaml")


def _stage_module(name: str) -> ModuleType:
    path = ROOT / "stages" / f"{name}.py"
    assert path.is_file(), f"stage {name!r} has no script {path.relative_to(ROOT)}"
    spec = importlib.util.spec_from_file_location(f"_dvc_wiring_stage_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and typing look a module up by name
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


def _declared_params(stage: dict[str, Any]) -> set[str]:
    """A stage's ``params:`` entries (plain keys, or ``{file: [keys]}`` for params.yaml)."""
    out: set[str] = set()
    for entry in stage.get("params") or []:
        if isinstance(entry, str):
            out.add(entry)
        elif isinstance(entry, dict):
            for file, keys in entry.items():
                assert file == "params.yaml", f"params from {file!r}: the stages read params.yaml only"
                out.update(keys or [])
        else:  # pragma: no cover - malformed dvc.yaml
            raise AssertionError(f"unexpected params entry {entry!r}")
    return out


def _paths(entries: list[Any] | None) -> list[str]:
    """Paths of ``deps``/``outs``/``metrics`` entries, which are strings or ``{path: options}``."""
    out = []
    for entry in entries or []:
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, dict):
            assert len(entry) == 1, f"one path per entry, got {entry!r}"
            out.extend(entry)
        else:  # pragma: no cover - malformed dvc.yaml
            raise AssertionError(f"unexpected entry {entry!r}")
    return out


def _outs_with_options(stage: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for entry in stage.get("outs") or []:
        if isinstance(entry, str):
            out.append((entry, {}))
        else:
            ((path, options),) = entry.items()
            out.append((path, options or {}))
    return out


def _all_outs() -> dict[str, str]:
    """Every declared output path -> the stage producing it."""
    return {path: name for name, stage in STAGES.items() for path in _paths(stage.get("outs"))}


def _produced(path: str, outs: dict[str, str]) -> bool:
    """An output, or a file inside an output folder (dvclive/metrics.json in train's dvclive)."""
    return any(path == out or path.startswith(out.rstrip("/") + "/") for out in outs)


def _lookup(dotted: str) -> tuple[bool, Any]:
    node: Any = PARAMS_FILE
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _covers(declared: set[str], dotted: str) -> bool:
    """Whether a stage declaring ``declared`` is rerun when param ``dotted`` changes."""
    return any(dotted == d or dotted.startswith(d + ".") for d in declared)


# Params a stage reads that change how it runs, never what it writes: declared by the script as
# RUN_PARAMS and deliberately not DVC params, so that turning them on or off reruns nothing.
RUN_PARAMS_ALLOWED = {"train": {"wandb"}}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_params_match_script_params(name: str) -> None:
    module = _stage_module(name)
    assert hasattr(module, "PARAMS"), f"stages/{name}.py defines no module-level PARAMS"
    assert isinstance(module.PARAMS, tuple), f"stages/{name}.py: PARAMS must be a tuple"
    code = set(module.PARAMS)
    assert len(code) == len(module.PARAMS), f"stages/{name}.py: duplicate PARAMS entries"
    declared = _declared_params(STAGES[name])
    assert code == declared, (
        f"stage {name}: dvc.yaml params {sorted(declared)} != stages/{name}.py PARAMS {sorted(code)} "
        f"(only in dvc.yaml: {sorted(declared - code)}; only in the script: {sorted(code - declared)})"
    )
    run_params = set(getattr(module, "RUN_PARAMS", ()))
    assert run_params <= RUN_PARAMS_ALLOWED.get(name, set()), (
        f"stages/{name}.py: RUN_PARAMS {sorted(run_params)} are not known to leave its outputs unchanged")
    assert not run_params & declared, f"stage {name}: {sorted(run_params & declared)} declared twice"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_params_exist_in_params_yaml_and_config(name: str) -> None:
    module = _stage_module(name)
    for dotted in (*module.PARAMS, *getattr(module, "RUN_PARAMS", ())):
        found, _ = _lookup(dotted)
        assert found, f"stage {name} reads {dotted!r}, which params.yaml does not have"
        section, _, key = dotted.partition(".")
        assert section in config.SECTIONS, f"stage {name}: {section!r} is not a config section"
        if key:
            fields = {f.name for f in dataclasses.fields(config.SECTIONS[section])}
            assert key in fields, f"stage {name}: {dotted!r} is not a field of {section!r}"


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node Python executes at import or call time: ``if TYPE_CHECKING:`` blocks are skipped
    (their imports are for type checkers only and cannot change what a stage computes)."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node):
            children = list(node.orelse)
        todo.extend(children)
    return out


def _module_file(dotted: str) -> Path | None:
    """The file of a module of the package (``ddpm_cifar.app.engine`` -> src/ddpm_cifar/app/engine.py,
    a subpackage -> its ``__init__.py``); None for anything else."""
    base = ROOT / "src" / Path(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_imports(path: Path, module: str | None) -> set[str]:
    """Dotted names of the package's modules that the file imports anywhere in it, function-level
    imports included. ``module`` is the file's own dotted name (None for a stage script), against
    which relative imports resolve."""
    if module is None:
        package: list[str] = []
    else:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = package[: len(package) - node.level + 1]
                parts = up + (node.module.split(".") if node.module else [])
            else:
                parts = (node.module or "").split(".")
            base = ".".join(parts)
            if parts[0] != PACKAGE:
                continue
            names.add(base)
            # ``from ddpm_cifar import checkpoint``: the name may be a module of its own
            names.update(f"{base}.{a.name}" for a in node.names if _module_file(f"{base}.{a.name}"))
    # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
    return {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 2)}


def import_closure(script: Path) -> set[str]:
    """Repo-relative paths of the package files a stage script runs: what it imports, what those
    import, and so on, with every package's ``__init__.py`` on the way."""
    seen: set[str] = set()
    todo = list(_package_imports(script, None))
    while todo:
        module = todo.pop()
        path = _module_file(module)
        if module not in seen and path is not None:
            seen.add(module)
            todo.extend(_package_imports(path, module))
    return {_module_file(m).relative_to(ROOT).as_posix() for m in seen}  # type: ignore[union-attr]


def stage_closure(name: str) -> set[str]:
    """The package files stage ``name`` runs: its script's import closure, and the launcher's."""
    want = import_closure(ROOT / "stages" / f"{name}.py")
    if name in LAUNCHED_STAGES:  # the command runs the launcher module too
        want |= {f"src/{PACKAGE}/runtime/launch.py"} | import_closure(PACKAGE_DIR / "runtime" / "launch.py")
    return want


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_are_its_script_and_import_closure(name: str) -> None:
    """DVC cannot see imports: a stage lists the package modules it runs, exactly. One too few and a
    change to it does not rerun the stage; one too many (or the whole package) and an edit to, say,
    the app reruns training and 10,000 samples."""
    deps = _paths(STAGES[name].get("deps"))
    script = f"stages/{name}.py"
    assert script in deps, f"stage {name} does not depend on its own script {script}"
    listed = {d for d in deps if d.startswith("src/")}
    want = stage_closure(name)
    assert listed == want, (
        f"stage {name}: dvc.yaml lists {sorted(listed)}; the script imports {sorted(want)} "
        f"(missing: {sorted(want - listed)}; not imported: {sorted(listed - want)}); "
        "`python scripts/update_stage_deps.py` rewrites them"
    )


def test_import_closure_follows_imports_transitively(tmp_path: Path) -> None:
    """The closure itself: the sample stage runs the samplers through a module it imports, and a
    stage that imported the app would pull in the subpackage's files."""
    closure = import_closure(ROOT / "stages/sample.py")
    assert {f"src/{PACKAGE}/{m}.py" for m in ("__init__", "diffusion/generate", "diffusion/samplers",
                                                    "diffusion/process")} <= closure
    fetch = import_closure(ROOT / "stages/fetch.py")
    assert f"src/{PACKAGE}/diffusion/generate.py" not in fetch and f"src/{PACKAGE}/data/splits.py" in fetch
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ddpm_cifar.app.engine import Demo\n")
    app = import_closure(probe)
    assert {f"src/{PACKAGE}/{m}.py" for m in ("app/__init__", "app/engine", "models/checkpoint")} <= app


@pytest.mark.parametrize("name", sorted(STAGES))
def test_no_stage_imports_the_app_and_only_train_imports_training(name: str) -> None:
    """The app changes often and computes nothing the pipeline records; training code changes must
    not rerun sampling or scoring."""
    closure = import_closure(ROOT / "stages" / f"{name}.py")
    assert not any(p.startswith(f"src/{PACKAGE}/app/") for p in closure), f"stage {name} imports the app"
    if name != "train":
        training = {f"src/{PACKAGE}/{m}.py" for m in ("training/loop", "training/state", "training/runlog",
                                                             "training/ema", "training/tracking")}
        assert not closure & training, f"stage {name} imports training code: {sorted(closure & training)}"


# The data-parallel stages start through the launcher with the process counts from params (plain python
# for one process, torchrun for more: DDP, sharded sampling/FID).
LAUNCH = ["python", "-m", "ddpm_cifar.runtime.launch", "--nnodes", "${distributed.nnodes}",
          "--nproc-per-node", "${distributed.nproc_per_node}",
          "--rdzv-endpoint", "${distributed.rdzv_endpoint}"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_cmd_runs_own_script(name: str) -> None:
    cmd = STAGES[name]["cmd"]
    assert isinstance(cmd, str), f"stage {name}: expected one command, got {cmd!r}"
    argv = shlex.split(cmd)
    script = f"stages/{name}.py"
    if name in LAUNCHED_STAGES:
        want = [*LAUNCH, script]
        assert argv[: len(want)] == want, f"stage {name} runs {cmd!r}, not `{' '.join(want)}`"
    else:
        assert argv[:2] == ["python", script], f"stage {name} runs {cmd!r}, not `python {script}`"
    others = [a for a in argv if a.startswith("stages/") and a != script]
    assert not others, f"stage {name} also runs {others}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_interpolated_cmd_params_are_declared(name: str) -> None:
    """The stage declares (and so its script reads and checks) every param its command uses."""
    declared = _declared_params(STAGES[name])
    for dotted in _INTERPOLATION.findall(STAGES[name]["cmd"]):
        found, _ = _lookup(dotted)
        assert found, f"stage {name}: command interpolates {dotted!r}, missing from params.yaml"
        assert _covers(declared, dotted), f"stage {name}: command uses {dotted!r} undeclared"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_interpolated_deps_are_declared_params(name: str) -> None:
    """A ``${fid.inception_weights}`` dep exists in params.yaml and the stage declares that param."""
    declared = _declared_params(STAGES[name])
    for dep in _paths(STAGES[name].get("deps")):
        for dotted in _INTERPOLATION.findall(dep):
            found, value = _lookup(dotted)
            assert found, f"stage {name}: dep {dep!r} interpolates {dotted!r}, missing from params.yaml"
            assert isinstance(value, str), f"stage {name}: {dotted!r} is {value!r}, not a path"
            assert _covers(declared, dotted), f"stage {name}: dep {dep!r} uses {dotted!r} undeclared"


def test_deps_on_generated_files_come_from_an_upstream_stage() -> None:
    outs = _all_outs()
    order = list(STAGES)
    for name, stage in STAGES.items():
        for dep in _paths(stage.get("deps")):
            if dep in outs:
                assert order.index(outs[dep]) < order.index(name), (
                    f"stage {name} depends on {dep}, made by the later stage {outs[dep]}"
                )


def test_outputs_are_unique() -> None:
    paths = [p for stage in STAGES.values() for p in _paths(stage.get("outs"))]
    assert len(paths) == len(set(paths)), f"outputs declared twice: {paths}"


def test_top_level_metrics_are_stage_outputs() -> None:
    outs = _all_outs()
    metrics = _paths(DVC.get("metrics"))
    assert metrics, "dvc.yaml declares no metrics"
    for path in metrics:
        assert _produced(path, outs), f"metrics entry {path} is not an output of any stage"


def _plot_files(entry: Any) -> list[str]:
    """Files a top-level plots entry reads: a path, or ``{title: {x: ..., y: {file: col}}}``."""
    if isinstance(entry, str):
        return [entry]
    ((title, spec),) = entry.items()
    if not spec:  # ``- path:`` with no options
        return [title]
    files: list[str] = []
    for axis in ("x", "y"):
        value = spec.get(axis)
        if isinstance(value, dict):
            files.extend(value)
    return files or [title]


def test_top_level_plots_are_stage_outputs() -> None:
    outs = _all_outs()
    plots = DVC.get("plots") or []
    assert plots, "dvc.yaml declares no plots"
    for entry in plots:
        files = _plot_files(entry)
        assert files, f"plots entry {entry!r} names no file"
        for path in files:
            assert _produced(path, outs), f"plots entry {entry!r} reads {path}, which no stage outputs"


# ``persist: true`` keeps an output when its stage reruns, so a stale file can survive a change. Allowed:
# train's outputs (resume after an interruption) and the Inception weights, a file the user may put
# there that the inception stage only checks (or downloads when missing).
PERSIST_ALLOWED = {"train": None, "inception": {"${fid.inception_weights}"}}


def test_only_resumable_outputs_persist() -> None:
    for name, stage in STAGES.items():
        for path, options in _outs_with_options(stage):
            if options.get("persist"):
                assert name in PERSIST_ALLOWED, f"{path} of stage {name} is persist: true; only train resumes"
                allowed = PERSIST_ALLOWED[name]
                assert allowed is None or path in allowed, f"{path} of stage {name} is persist: true"


def test_params_yaml_sections_are_config_sections() -> None:
    assert set(PARAMS_FILE) == set(config.SECTIONS), (
        f"params.yaml sections {sorted(PARAMS_FILE)} != config.SECTIONS {sorted(config.SECTIONS)}"
    )


@pytest.mark.parametrize("section", sorted(config.SECTIONS))
def test_params_yaml_sections_have_exactly_the_config_keys(section: str) -> None:
    cls = config.SECTIONS[section]
    fields = {f.name for f in dataclasses.fields(cls)}
    keys = set(PARAMS_FILE.get(section) or {})
    assert keys == fields, (
        f"params.yaml [{section}]: missing {sorted(fields - keys)}, unknown {sorted(keys - fields)}"
    )
    params_file.parse_section(section, PARAMS_FILE[section], cls)  # values have the right types too
