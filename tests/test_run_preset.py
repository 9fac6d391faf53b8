"""scripts/run_preset.py: where the quick run's data comes from, and how a preset becomes `-S` args."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from committed import committed_text

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str = "run_preset") -> ModuleType:
    """A script of scripts/ as a module (it imports its neighbours, as when run from there)."""
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def preset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ModuleType:
    module = _script()
    monkeypatch.setattr(module, "LOCAL_COPY", tmp_path / "shared" / "cifar10-jpeg.tar.gz")
    return module


def test_official_when_the_download_can_be_reached(preset: ModuleType,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preset, "reachable", lambda url, timeout=5.0: True)
    assert preset.data_source(None)[:2] == ("official", preset.OFFICIAL_MD5)


def test_offline_the_copy_beside_the_checkout(preset: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preset, "reachable", lambda url, timeout=5.0: False)
    preset.LOCAL_COPY.parent.mkdir(parents=True)
    preset.LOCAL_COPY.write_bytes(b"x")
    source, md5, why = preset.data_source(None)
    assert source == str(preset.LOCAL_COPY) and md5 is None and "offline" in why


def test_offline_without_a_copy_is_one_line_naming_both_ways(preset: ModuleType,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preset, "reachable", lambda url, timeout=5.0: False)
    with pytest.raises(SystemExit) as exc:
        preset.data_source(None)
    message = str(exc.value)
    assert "\n" not in message and message.startswith("error: ")
    assert "SOURCE=" in message and str(preset.LOCAL_COPY) in message and "cannot be reached" in message


def test_a_given_source_is_made_absolute(preset: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    monkeypatch.setattr(preset, "reachable", lambda url, timeout=5.0: pytest.fail("must not probe"))
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    source, md5, _ = preset.data_source("cifar-10-python.tar.gz")
    assert source == str(archive) and Path(source).is_absolute() and md5 == preset.OFFICIAL_MD5
    folder = tmp_path / "images"
    folder.mkdir()
    assert preset.data_source("images")[:2] == (str(folder), None)
    with pytest.raises(SystemExit, match="no such file"):
        preset.data_source("missing.tar.gz")


def test_the_quick_preset_becomes_set_args_dvc_reads_back() -> None:
    overlay = _script().load_overlay(ROOT / "configs" / "quick.yaml")
    args = _script().set_args(overlay)
    pairs = dict(a.split("=", 1) for a in args[1::2])
    assert args[::2] == ["-S"] * len(pairs)
    assert yaml.safe_load(pairs["model.dim_mults"]) == [1, 2, 4]
    # a block is set key by key: the keys of the study's sampler the preset does not name stay
    assert yaml.safe_load(pairs["sample.sampler.name"]) == "dpmpp_2m"
    assert yaml.safe_load(pairs["sample.sampler.steps"]) == 20 and "sample.sampler.spacing" not in pairs
    sections = {key.split(".")[0] for key in overlay}
    assert sections <= {"model", "diffusion", "train", "sample", "fid", "frontier"}, (
        "the data source is the script's")


def test_help_runs() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_preset.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--source" in proc.stdout


def test_a_preset_starts_from_the_committed_study_whatever_the_workspace_holds() -> None:
    """After `dvc exp apply` or a --workspace run, params.yaml holds another experiment: the preset's
    unlisted keys must still get the study's values, or `make quick` after `make paper-recipe` would
    run the paper's network at the quick size."""
    from ddpm_cifar.runtime import params_file

    script = _script()
    study = params_file.parse_yaml(committed_text("params.yaml"), "HEAD:params.yaml")
    quick = params_file.read_yaml(ROOT / "configs" / "quick.yaml")
    paper = params_file.read_yaml(ROOT / "configs" / "ddpm-paper.yaml")
    workspace = copy.deepcopy(study)  # the paper recipe applied
    for dotted, value in script.flatten(paper).items():
        script.set_in(workspace, dotted, value)
    changes = script.plan(study, workspace, script.flatten(quick))
    assert changes["model.arch"] == "unet" and changes["model.dim"] == 16  # study's, then quick's
    assert changes["train.adam_betas"] == study["train"]["adam_betas"] == [0.9, 0.99]
    assert changes["sample.sampler.variance"] == "posterior" and "sample.n" in changes
    assert changes["sample.sampler.name"] == "dpmpp_2m" and changes["sample.sampler.spacing"] == "quadratic"
    script.check(workspace, changes)  # exits on invalid params
    # On the committed study itself only the preset's values that differ are set.
    flat_study = script.flatten(study)
    assert script.plan(study, study, script.flatten(quick)) == {
        k: v for k, v in script.flatten(quick).items() if flat_study[k] != v}


def test_set_values_read_like_params_yaml() -> None:
    sets = ["train.lr=5e-4", "sample.strip_seeds=[1, 2]", "sample.sampler.steps=50",
            "train.fid_sampler={steps: 5}"]
    overlay = _script().with_sets({"train.lr": 1.0}, sets)
    # 5e-4 is a number, as DVC reads it (plain YAML 1.1 would give the string "5e-4")
    assert overlay == {"train.lr": 5e-4, "sample.strip_seeds": [1, 2], "sample.sampler.steps": 50,
                       "train.fid_sampler.steps": 5}


# --- Late failures the dry run catches (issue 19, item 3) -------------------------------------------

def _dry_run(*args: str, source: str = "official") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "run_preset.py"), "configs/quick.yaml",
                           "--source", source, "--dry-run", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, f"accepted:\n{proc.stdout}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_a_fid_reference_that_is_not_a_file_is_refused(tmp_path: Path) -> None:
    for reference in ("/nonexistent.npz", str(tmp_path)):  # missing, and a folder
        message = _one_line_error(_dry_run("-S", f"fid.reference={reference}"))
        assert "fid.reference" in message and reference in message and "train, test" in message
    stats = tmp_path / "stats.npz"
    stats.write_bytes(b"x")  # its contents are the ref_stats stage's to judge
    for reference in (str(stats), "train", "test"):
        ok = _dry_run("-S", f"fid.reference={reference}")
        assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("name", ["../../evil", "a/b", "-x", ".x", "x..y", "x.lock", "x.", "a b", "a~1",
                                  "a:b", "a^b", "a?", "a*", "a[b", "a\\b", "a@{b", "", "é", "x" * 101])
def test_an_experiment_name_that_is_not_plain_is_refused(name: str) -> None:
    with pytest.raises(SystemExit) as exc:
        _script().check_name(name)
    message = str(exc.value)
    assert message.startswith("error: ") and "\n" not in message and repr(name) in message
    assert "letters, digits" in message


def test_plain_experiment_names_pass() -> None:
    for name in ("quick-20260101-120000", "run_1.2", "A", "paper.v2", "x" * 100):
        _script().check_name(name)


def test_the_dry_run_refuses_a_name_that_is_not_plain() -> None:
    message = _one_line_error(_dry_run("--name", "../../evil"))
    assert "'../../evil'" in message and "--name" in message


@pytest.mark.parametrize("reference, count, size", [("train", 100000, "50,000"), ("test", 10001, "10,000")])
def test_a_reference_count_beyond_the_official_set_is_refused(reference: str, count: int, size: str) -> None:
    message = _one_line_error(_dry_run("-S", f"fid.reference={reference}", "-S",
                                       f"fid.reference_count={count}"))
    assert f"fid.reference_count {count}" in message and size in message and reference in message


def test_a_reference_count_within_the_set_or_of_an_unknown_set_passes(tmp_path: Path) -> None:
    ok = _dry_run("-S", "fid.reference=test", "-S", "fid.reference_count=10000")
    assert ok.returncode == 0, ok.stderr
    folder = tmp_path / "images"  # an image folder's size is known only once fetched
    folder.mkdir()
    ok = _dry_run("-S", "fid.reference_count=100000", source=str(folder))
    assert ok.returncode == 0, ok.stderr


def test_the_default_source_resolving_to_official_bounds_the_reference_count(
        monkeypatch: pytest.MonkeyPatch) -> None:
    script = _script()
    monkeypatch.setattr(script, "reachable", lambda url, timeout=5.0: True)
    monkeypatch.setattr(sys, "argv", ["run_preset.py", str(ROOT / "configs" / "quick.yaml"), "--dry-run",
                                      "-S", "fid.reference_count=50001"])
    with pytest.raises(SystemExit) as exc:
        script.main()
    assert str(exc.value).startswith("error: fid.reference_count 50001") and "50,000" in str(exc.value)


# --- Leftovers of a killed `dvc exp run --temp` (issue 19, item 6) ------------------------------------

def _dvc_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "DVC_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", DVC_NO_ANALYTICS="1",
               DVC_SITE_CACHE_DIR=str(tmp / "dvc-site-cache"))
    return env


def _git_dvc_init(repo: Path, env: dict[str, str]) -> None:
    """A new folder ``repo`` with git (a committer set, no signing) and DVC initialised."""
    repo.mkdir()
    for argv in (["git", "init", "-q"], ["git", "config", "user.email", "toy@example.invalid"],
                 ["git", "config", "user.name", "toy"], ["git", "config", "commit.gpgsign", "false"],
                 ["dvc", "init", "-q"]):
        subprocess.run(argv, cwd=repo, env=env, check=True, capture_output=True, timeout=120)


def _toy_project(repo: Path, env: dict[str, str]) -> None:
    """git + DVC with one stage that says it started, then sleeps a minute."""
    _git_dvc_init(repo, env)
    (repo / "params.yaml").write_text("nap: 60\n")
    (repo / "dvc.yaml").write_text(
        "stages:\n  nap:\n"
        "    cmd: python -c \"import time; open('started', 'w').close(); time.sleep(60)\"\n"
        "    params: [nap]\n")
    for argv in (["git", "add", "-A"], ["git", "commit", "-q", "-m", "toy"]):
        subprocess.run(argv, cwd=repo, env=env, check=True, capture_output=True, timeout=120)


def _running(repo: Path, env: dict[str, str]) -> list[str]:
    """The experiments `dvc exp show` lists as running."""
    proc = subprocess.run(["dvc", "exp", "show", "--json"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    return [exp["name"] for row in json.loads(proc.stdout) for exp in row.get("experiments") or []
            if (exp.get("executor") or {}).get("state") == "running"]


def _clean(script: ModuleType, repo: Path, monkeypatch: pytest.MonkeyPatch,
           capsys: pytest.CaptureFixture[str]) -> list[str]:
    monkeypatch.setattr(script, "ROOT", repo)
    monkeypatch.setattr(sys, "argv", ["run_preset.py", "--clean"])
    script.main()
    out, err = capsys.readouterr()
    assert err == ""
    return out.splitlines()


def test_a_leftover_is_in_use_while_a_process_may_still_work_on_it(tmp_path: Path) -> None:
    """DVC records no process for a temp run: its stages work in the copy, and `dvc exp run` itself,
    started before the run's files were last written, in the project."""
    script = _script("exp_leftovers")
    root = tmp_path / "project"
    copy = root / ".dvc" / "tmp" / "exps" / "standalone" / "tmpabc"
    copy.mkdir(parents=True)
    written = copy.stat().st_mtime
    run = script.TempRun(copy, "napper")
    dvc = ["/venv/bin/python", "/venv/bin/dvc", "exp", "run", "--temp", "-n", "x"]
    assert script.in_use(run, root, [(copy / "sub", ["python", "-c", "..."], written + 100)])  # a stage
    assert script.in_use(run, root, [(root, dvc, written - 2)])  # DVC making the copy or collecting
    assert script.in_use(run, root, [(root / "src", ["python", "-m", "dvc", "exp", "run"], written - 2)])
    assert script.in_use(run, root, [(None, dvc, written - 2)])  # another user's, whose folder is hidden
    assert not script.in_use(run, root, [(root, dvc, written + 2)])  # a later run cannot be its owner
    assert not script.in_use(run, root, [(tmp_path / "other", dvc, written - 2)])  # another project's
    assert not script.in_use(run, root, [(root, ["dvc", "exp", "show"], written - 2)])
    assert not script.in_use(run, root, [(root, ["bash"], written - 100)])  # a shell in the project


@pytest.mark.slow
def test_clean_removes_what_a_killed_temp_experiment_left_and_never_a_running_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    env, repo, script = _dvc_env(tmp_path), tmp_path / "repo", _script()
    _toy_project(repo, env)
    standalone = repo / ".dvc" / "tmp" / "exps" / "standalone"
    with open(tmp_path / "exp.log", "w") as log:
        # its own process group, as a terminal's job is: the kill below takes DVC and the stage at once
        proc = subprocess.Popen(["dvc", "exp", "run", "--temp", "-n", "napper", "-S", "nap=61"], cwd=repo,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(standalone.glob("tmp*/started")):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "exp.log").read_text()
            time.sleep(0.2)
        (copy,) = [p.parent for p in standalone.glob("tmp*/started")]
        kept = _clean(script, repo, monkeypatch, capsys)  # while the stage runs: nothing goes
        assert len(kept) == 1 and kept[0].startswith("nothing removed") and "napper" in kept[0], kept
        assert (copy / "started").is_file()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _running(repo, env) == ["napper"] and copy.is_dir()  # the stale row and the copy, as reported
    _script("exp_leftovers").leftover_note(repo)  # what a run says when it starts
    note = capsys.readouterr().out.splitlines()
    assert len(note) == 1 and "1 killed experiment (napper)" in note[0] and "make clean-exps" in note[0]
    lines = _clean(script, repo, monkeypatch, capsys)
    assert lines and all(line.startswith("removed .dvc/tmp/exps/") for line in lines[:-1]), lines
    assert f"removed {copy.relative_to(repo)} " in "\n".join(lines) + " "
    assert lines[-1].startswith(f"removed {len(lines) - 1} leftovers of 1 killed experiment (napper)"), lines
    assert _running(repo, env) == [] and not copy.exists()
    assert _clean(script, repo, monkeypatch, capsys)[0].startswith("nothing removed")


def test_the_clean_target_runs_the_cleaner() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    proc = subprocess.run(["make", "-n", "-o", ".venv/.installed", "clean-exps"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "python scripts/run_preset.py --clean" in proc.stdout


def test_help_names_clean() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_preset.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--clean" in proc.stdout and "make clean-exps" in proc.stdout


# --- What a newcomer sees first and last ---------------------------------------------------------------

# An experiment's files as the quick run wrote them (experiment quick-20261206-211132), cut to what the
# summary reads.
QUICK_FID = {"fid": 6.5576, "is": 1.0004, "kid": 0.0123219, "precision": 0.899, "recall": 0.635,
             "n_samples": 1000, "reference_n": 1000, "comparable": False}
QUICK_REPORT = {**QUICK_FID, "reference": "cifar10-train",
                "not_comparable_because": ["Inception weights are not the official pt_inception file",
                                           "only 1000 samples (published FIDs use 10k-50k)"],
                "kid_detail": {"mean": 0.0123219, "std": 0.00139203, "subsets": 100, "subset_size": 500}}
QUICK_TRAIN = {"step": 1500, "final_loss": 0.059869, "images_per_second": 118.76, "fid": 6.19246697257563}


def _quick_files(**fid: object) -> dict[str, dict]:
    return {"metrics/fid.json": {**QUICK_FID, **fid}, "reports/fid.json": {**QUICK_REPORT, **fid},
            "dvclive/metrics.json": QUICK_TRAIN}


@pytest.mark.parametrize("workspace", [False, True])
@pytest.mark.parametrize("name", ["quick-20261206-211132", "x" * 40])
def test_the_last_screen_is_a_summary_in_80_columns(name: str, workspace: bool) -> None:
    lines = _script("exp_screens").summary(name, _quick_files(), 901.4, workspace)
    text = "\n".join(lines)
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert "…" not in text and len(lines) <= 12
    assert lines[0] == f"Experiment {name} finished in 15 min 1 s."
    assert "  FID    6.56 on 1000 samples vs 1000 reference images, comparable: no" in lines
    assert "  KID    0.01232 ± 0.0014 (std over 100 subsets of 500)" in lines
    assert "  train  1500 steps, final loss 0.05987" in lines
    assert "reports/fid.json says why the FID is not comparable" in text
    assert f"make compare A={name} B=NAME" in text
    assert (f"dvc exp apply {name}" in text) is not workspace and "plots/*.png" in text


def test_the_summary_says_when_the_fid_is_comparable_and_when_there_is_none() -> None:
    script = _script("exp_screens")
    comparable = script.summary("q", _quick_files(comparable=True, not_comparable_because=[]), 59.6, False)
    assert "comparable: yes" in "\n".join(comparable) and "not comparable" not in "\n".join(comparable)
    assert comparable[0] == "Experiment q finished in 1 min 0 s."
    nothing = script.summary("q", {}, None, False)
    assert nothing[:2] == ["Experiment q finished.", "  FID    none: the experiment has no metrics/fid.json"]


def test_only_the_pre_run_checkouts_no_hash_warning_is_dropped() -> None:
    """The filter drops exactly DVC's "No file hash info found for '<path>'. It won't be created." from
    the logger of the checkout `dvc exp run` makes before any stage, and nothing else."""
    import logging

    script = _script("exp_screens")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(f"{record.name} {record.levelname}: {record.getMessage()}")
    dvc_data, checkout = logging.getLogger("dvc_data"), logging.getLogger("dvc_data.index.checkout")
    dvc_data.addHandler(handler)  # as DVC's logger.setup does: the checkout's records propagate to it
    no_hash = script.drop_no_hash_warnings()
    path = "/repo/.dvc/tmp/exps/standalone/tmpab12/models/ema.pt"
    try:
        checkout.warning("No file hash info found for '%s'. It won't be created.", path)
        checkout.warning("No file hash info found for '%s'. It will be created.", path)
        checkout.warning("No file hash info found for '/x'. It won't be created.")  # not DVC's call
        checkout.error("No file hash info found for '%s'. It won't be created.", path)
        checkout.warning("Some other warning about '%s'", path)
        logging.getLogger("dvc_data.hashfile.checkout").warning(
            "No file hash info found for '%s'. It won't be created.", path)  # `dvc checkout`'s: kept
    finally:
        checkout.removeFilter(no_hash)
        dvc_data.removeHandler(handler)
    assert seen == [
        f"dvc_data.index.checkout WARNING: No file hash info found for '{path}'. It will be created.",
        "dvc_data.index.checkout WARNING: No file hash info found for '/x'. It won't be created.",
        f"dvc_data.index.checkout ERROR: No file hash info found for '{path}'. It won't be created.",
        f"dvc_data.index.checkout WARNING: Some other warning about '{path}'",
        f"dvc_data.hashfile.checkout WARNING: No file hash info found for '{path}'. It won't be created.",
    ]


def test_the_filtered_dvc_is_still_found_by_the_leftover_check(tmp_path: Path) -> None:
    """`dvc exp run` runs through exp_screens.py; `make clean-exps` must still see it as running."""
    cmd = _script("exp_screens").dvc_command(["dvc", "exp", "run", "--temp", "-n", "x"])
    assert cmd[:2] == [sys.executable, str(ROOT / "scripts" / "exp_screens.py")]
    assert cmd[2:] == ["dvc", "exp", "run", "--temp", "-n", "x"]
    leftovers = _script("exp_leftovers")
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "standalone" / "tmpabc"
    copy.mkdir(parents=True)
    started = copy.stat().st_mtime - 2  # DVC starts before it makes the copy
    assert leftovers.in_use(leftovers.TempRun(copy, "x"), tmp_path, [(tmp_path, cmd, started)])


@pytest.mark.slow
def test_a_temp_experiment_through_the_filter_shows_no_no_hash_warning(tmp_path: Path) -> None:
    """On a project without dvc.lock, plain `dvc exp run --temp` warns once per output before the stage
    runs; through exp_screens.py it does not, and DVC's other output stays."""
    env, repo = _dvc_env(tmp_path), tmp_path / "repo"
    _git_dvc_init(repo, env)
    (repo / "params.yaml").write_text("n: 1\n")
    (repo / "dvc.yaml").write_text(
        "stages:\n  make:\n    cmd: python -c \"open('out.txt', 'w').write('x')\"\n"
        "    params: [n]\n    outs: [out.txt]\n")
    (repo / ".gitignore").write_text("/out.txt\n")
    for argv in (["git", "add", "-A"], ["git", "commit", "-q", "-m", "toy"]):
        subprocess.run(argv, cwd=repo, env=env, check=True, capture_output=True, timeout=120)
    outputs = {}
    for label, argv in (("plain", ["dvc", "exp", "run", "--temp", "-n", "plain", "-S", "n=2"]),
                        ("filtered", _script("exp_screens").dvc_command(
                            ["dvc", "exp", "run", "--temp", "-n", "filtered", "-S", "n=3"]))):
        proc = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outputs[label] = proc.stdout + proc.stderr
    assert "No file hash info found for" in outputs["plain"] and "out.txt" in outputs["plain"]
    assert "No file hash info found" not in outputs["filtered"] and "WARNING" not in outputs["filtered"]
    assert "Running stage 'make'" in outputs["filtered"]
    assert "Ran experiment(s): filtered" in outputs["filtered"]


def test_the_compare_target_diffs_two_experiments() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    proc = subprocess.run(["make", "-n", "-o", ".venv/.installed", "compare", "A=quick-a", "B=quick-b"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "dvc exp diff 'quick-a' 'quick-b'" in proc.stdout
    proc = subprocess.run(["make", "-s", "-o", ".venv/.installed", "compare", "A=quick-a"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.splitlines()[0] == ("error: name two experiments: make compare A=NAME B=NAME "
                                           "(their names: dvc exp list)")
