"""Results shared through a real DVC remote, end to end, at the end-to-end test's toy size.

Clone A (the toy project in a temporary git repository, as tests/test_pipeline_e2e.py makes it) runs
``dvc repro``, ``dvc push`` to a DVC remote and ``git push`` to a bare repository. The remote is a
local directory, and S3 (moto's server on 127.0.0.1) where the test-s3 extra installed dvc-s3 and moto.
A fresh ``git clone`` B of that repository runs ``dvc pull`` and has the same metrics, model and
samples without retraining; the app samples the pulled model. An experiment goes from A to B with
``dvc exp push``/``dvc exp pull``, and ``dvc artifacts get`` fetches the model alone (the dvc.yaml
``artifacts:`` entry, versioned by a GTO git tag). docs/remote.md says the same for users.

The Inception weights are ``cache: false``: nothing pushes them, so B lacks them after ``dvc pull``
and ``dvc status`` says so; ``dvc repro`` then runs the inception stage alone, which remakes a
``inception-random-seedN.pth`` file byte for byte (the official file it downloads), and nothing else.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import yaml
from test_pipeline_e2e import (
    AFTER_SAMPLING,
    DVC_YAML,
    STAGE_NAMES,
    Runner,
    _env,
    _ran,
    _tiny_params,
    toy_repo,
)

from ddpm_cifar.app.engine import Demo, load_demo_model
from ddpm_cifar.models.checkpoint import load_model
from ddpm_cifar.runtime import params_file

if TYPE_CHECKING:  # fixtures hand these over; conftest is not imported at run time
    from conftest import TinyCifarArchive

ARTIFACT = "ddpm-cifar10-ema"
ARTIFACT_PATH = "models/ema.pt"
VERSION = "v1.0.0"  # GTO's tag for it: ddpm-cifar10-ema@v1.0.0
# Named so that the inception stage makes it when it is missing, the same bytes on any machine.
INCEPTION = "data/inception/inception-random-seed0.pth"
INCEPTION_PARAM = "${fid.inception_weights}"
EXP = "toy-exp"
EXP_SAMPLES = 5  # the toy params sample 6
BRANCH = "main"
UP_TO_DATE = "Data and pipelines are up to date."


@dataclass(frozen=True)
class Remote:
    """A DVC remote: its URL, its ``dvc remote modify`` options and what its clients' environment needs."""

    url: str
    options: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


# S3-compatible storage, served by moto on 127.0.0.1: only with the test-s3 extra (dvc-s3, moto[s3], flask).
S3_PACKAGES = ("dvc_s3", "moto", "boto3")
S3_BUCKET = "ddpm-results"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}  # moto takes any
S3_REGION = "us-east-1"
LOCALHOST = "127.0.0.1,localhost"  # never through a proxy
S3_ENV = {**S3_KEYS, "AWS_DEFAULT_REGION": S3_REGION, "NO_PROXY": LOCALHOST, "no_proxy": LOCALHOST}


@pytest.fixture(params=["local", "s3"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Remote]:
    if request.param == "local":
        yield Remote(str(tmp_path / "dvc-store"))
        return
    absent = [m for m in S3_PACKAGES if importlib.util.find_spec(m) is None]
    if absent:
        pytest.skip(f"no {', '.join(absent)}: the S3 remote case needs pip install -e '.[test-s3]'")
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name=S3_REGION,
                          aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"])
        s3.create_bucket(Bucket=S3_BUCKET)
        yield Remote(f"s3://{S3_BUCKET}/store", {"endpointurl": endpoint}, S3_ENV)
    finally:
        server.stop()


def _runner(cwd: Path, root: Path, repo: Path, remote: Remote) -> Runner:
    """Commands in ``cwd`` with the environment of the e2e test for ``repo``'s code and the remote's,
    and Studio off: ``dvc artifacts get`` asks Studio first, which must not reach the network."""
    env = _env(root, repo)
    env.update(remote.env, DVC_STUDIO_OFFLINE="1")
    return Runner(cwd, env)


def _metrics(run: Runner) -> dict[str, Any]:
    return json.loads(run.dvc("metrics", "show", "--json").stdout)


def _status(run: Runner) -> dict[str, Any]:
    return json.loads(run.dvc("status", "--json").stdout or "{}")


def _inception_missing_status() -> dict[str, Any]:
    """What ``dvc status --json`` says of a clone with everything pulled but the Inception weights:
    the inception stage's output is deleted, and so is a dep of every stage that reads it."""
    want: dict[str, Any] = {}
    for name, stage in DVC_YAML["stages"].items():
        outs = [e if isinstance(e, str) else next(iter(e)) for e in stage.get("outs") or []]
        if INCEPTION_PARAM in outs:
            want[name] = [{"changed outs": {INCEPTION: "deleted"}}]
        elif INCEPTION_PARAM in (stage.get("deps") or []):
            want[name] = [{"changed deps": {INCEPTION: "deleted"}}]
    return want


def test_model_artifact_is_a_cached_stage_output() -> None:
    """The registry entry names a file DVC caches (so pushes): a ``cache: false`` file could never be
    fetched by ``dvc artifacts get``."""
    from dvc.repo.artifacts import check_name_format

    artifact = DVC_YAML["artifacts"][ARTIFACT]
    check_name_format(ARTIFACT)
    assert artifact["path"] == ARTIFACT_PATH and artifact["type"] == "model", artifact
    assert {"ddpm", "cifar10", "ema"} <= set(artifact["labels"]), artifact
    for stage in DVC_YAML["stages"].values():
        for entry in stage.get("outs") or []:
            path, options = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
            if path == ARTIFACT_PATH:
                assert (options or {}).get("cache", True), f"{ARTIFACT_PATH} is cache: false"
                return
    pytest.fail(f"no stage outputs {ARTIFACT_PATH}")


@pytest.mark.slow
def test_results_shared_through_a_remote(tmp_path: Path, tiny_cifar_archive: TinyCifarArchive,
                                         e2e_random_inception: Path, remote: Remote) -> None:
    origin = tmp_path / "origin.git"

    # --- clone A: the toy run, pushed to the DVC remote and the git remote ----------------------
    repo_a, _ = toy_repo(tmp_path / "a")
    a = _runner(repo_a, tmp_path / "a", repo_a, remote)
    (repo_a / INCEPTION).parent.mkdir(parents=True)
    shutil.copy(e2e_random_inception, repo_a / INCEPTION)
    params = _tiny_params(params_file.read_yaml(repo_a / "params.yaml"), tiny_cifar_archive)
    params["fid"]["inception_weights"] = INCEPTION
    (repo_a / "params.yaml").write_text("# tests/test_remote.py's toy run\n"
                                        + yaml.safe_dump(params, sort_keys=False))
    a.dvc("remote", "add", "-d", "store", remote.url)
    for option, value in remote.options.items():
        a.dvc("remote", "modify", "store", option, value)
    a.git("symbolic-ref", "HEAD", f"refs/heads/{BRANCH}")  # whatever init.defaultBranch says
    a.commit("toy project")
    first = a.dvc("repro")
    assert _ran(first.stdout + first.stderr) == set(STAGE_NAMES), first.stdout
    a.commit("toy run")
    a.dvc("push")
    assert "Cache and remote 'store' are in sync." in a.dvc("status", "--cloud").stdout
    a(["gto", "register", ARTIFACT, "HEAD", "--version", VERSION, "-m", "the toy run's EMA weights"])
    # Its HEAD must name the pushed branch: `dvc artifacts get` clones it, and with a HEAD naming no
    # branch fails with "unknown Git revision 'refs/remotes/origin/HEAD'".
    a(["git", "init", "-q", "--bare", f"--initial-branch={BRANCH}", str(origin)])
    a.git("remote", "add", "origin", str(origin))
    a.git("push", "-q", "origin", BRANCH, "--tags")
    metrics_a = _metrics(a)

    # --- clone B: git clone + dvc pull, nothing retrained ---------------------------------------
    repo_b = tmp_path / "b" / "repo"
    _runner(tmp_path, tmp_path / "b", repo_b, remote).git("clone", "-q", "-b", BRANCH, str(origin),
                                                          str(repo_b))
    b = _runner(repo_b, tmp_path / "b", repo_b, remote)
    pull = b.dvc("pull")
    assert "fetched" in pull.stdout, pull.stdout + pull.stderr
    for rel in (ARTIFACT_PATH, "models/checkpoint.pt", "models/ema_best.pt", "samples/samples.npz",
                "data/fid_ref.npz", "data/cifar10/train.npz"):
        assert (repo_b / rel).read_bytes() == (repo_a / rel).read_bytes(), f"{rel} differs after dvc pull"
    assert _metrics(b) == metrics_a
    # Everything is there but the Inception weights (cache: false, never pushed); the app needs none.
    assert not (repo_b / INCEPTION).exists()
    assert _status(b) == _inception_missing_status()

    demo = Demo([load_demo_model(repo_b / ARTIFACT_PATH, "cpu")], device="cpu", micro_batch=2)
    (images,) = demo.images(demo.check(2, "ddim", 5, 0))
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8, images.shape

    # dvc repro remakes the weights (the same bytes) and skips every other stage.
    ckpt = repo_b / "models/checkpoint.pt"
    ckpt_mtime = ckpt.stat().st_mtime_ns
    repro = b.dvc("repro")
    out = repro.stdout + repro.stderr
    assert _ran(out) == {"inception"}, out
    assert (repo_b / INCEPTION).read_bytes() == e2e_random_inception.read_bytes()
    assert UP_TO_DATE in b.dvc("status").stdout
    assert ckpt.stat().st_mtime_ns == ckpt_mtime, "dvc repro in the clone touched the checkpoint"

    # --- an experiment: A runs and pushes it, B pulls and applies it ----------------------------
    exp = a.dvc("exp", "run", "-n", EXP, "-S", f"sample.n={EXP_SAMPLES}")
    assert _ran(exp.stdout + exp.stderr) == AFTER_SAMPLING, exp.stdout
    a.dvc("exp", "push", "origin", EXP)  # the git refs to origin, the outputs to the default remote
    metrics_exp = _metrics(a)  # exp run leaves the experiment in A's workspace
    assert metrics_exp != metrics_a and metrics_exp[""]["data"]["metrics/fid.json"]["data"]["n_samples"] == 5

    b.dvc("exp", "pull", "origin", EXP)
    b.dvc("exp", "apply", EXP)
    assert _metrics(b) == metrics_exp
    assert (repo_b / "samples/samples.npz").read_bytes() == (repo_a / "samples/samples.npz").read_bytes()
    assert params_file.read_yaml(repo_b / "params.yaml")["sample"]["n"] == EXP_SAMPLES
    assert UP_TO_DATE in b.dvc("status").stdout
    assert ckpt.stat().st_mtime_ns == ckpt_mtime, "applying the experiment touched the checkpoint"

    # --- the model alone, from the registry: git tag + DVC remote, no clone ----------------------
    get_dir = tmp_path / "get"
    get_dir.mkdir()
    fetched = get_dir / "ema.pt"
    getter = _runner(get_dir, tmp_path, repo_a, remote)
    got = getter.dvc("artifacts", "get", str(origin), ARTIFACT, "--rev", VERSION, "-o", str(fetched))
    assert "Downloaded 1 file(s)" in got.stdout, got.stdout + got.stderr
    assert fetched.read_bytes() == (repo_b / ARTIFACT_PATH).read_bytes()
    loaded = load_model(fetched, "cpu")
    n_params = sum(p.numel() for p in loaded.net.parameters())
    assert n_params == metrics_a[""]["data"]["dvclive/metrics.json"]["data"]["parameters"]
    assert loaded.step == 4

    print("\n".join(f"{seconds:6.1f}s  {cmd}" for run in (a, b) for cmd, seconds in run.timings))
