"""Hostile params: every out-of-range value is one ConfigError line naming its key, before any work.

One row per (dotted key, bad value): the committed params.yaml with that one value changed must
fail to load, with a one-line message that names the key (what a stage prints as ``error: ...``).
The bounds themselves, and where each comes from, are in ddpm_cifar/runtime/bounds.py.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from committed import committed_text

from ddpm_cifar.runtime import config, params_file
from ddpm_cifar.runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")
BASE: dict[str, Any] = yaml.safe_load(committed_text("params.yaml"))  # as committed (tests/committed.py)

# (dotted key, bad value). The committed values these rows rely on: sample.n 10000, model.dim 64
# with dim_mults [1, 2, 4, 8], attn_dim_head 32, model.arch unet.
BAD: list[tuple[str, Any]] = [
    # data
    ("data.source", ""), ("data.md5", "abc"), ("data.md5", "c58f30108f718f92721af3b95e74349"),
    # model
    ("model.image_size", 0), ("model.image_size", 2048), ("model.image_size", 30),
    ("model.channels", 0), ("model.channels", 5),
    ("model.dim", 0), ("model.dim", 5000), ("model.dim", 1024), ("model.dim", 63), ("model.dim", 2),
    ("model.dim_mults", [1, 0, 2]), ("model.dim_mults", []), ("model.dim_mults", [1, 2, 4, 5000]),
    ("model.num_res_blocks", 0), ("model.num_res_blocks", 65),
    ("model.full_attn", [True]),
    ("model.attn_heads", 0), ("model.attn_heads", 4096),
    ("model.attn_dim_head", 0), ("model.attn_dim_head", 5000),
    ("model.dropout", 1.0), ("model.dropout", -0.1), ("model.dropout", NAN),
    # diffusion
    ("diffusion.timesteps", 1), ("diffusion.timesteps", 100_001),
    ("diffusion.min_snr_gamma", 0), ("diffusion.min_snr_gamma", -1), ("diffusion.min_snr_gamma", NAN),
    ("diffusion.min_snr_gamma", INF),
    # train
    ("train.steps", 0), ("train.steps", 10**9 + 1),
    ("train.batch_size", 0), ("train.batch_size", 65_537),
    ("train.grad_accum", 0), ("train.grad_accum", 65_537),
    ("train.lr", 0), ("train.lr", -1), ("train.lr", NAN), ("train.lr", INF), ("train.lr", 2.0),
    ("train.lr", 10**400),  # an integer beyond float's range
    ("train.adam_betas", [1.0, 0.99]), ("train.adam_betas", [-0.1, 0.9]), ("train.adam_betas", [0.9, NAN]),
    ("train.max_grad_norm", 0), ("train.max_grad_norm", -1), ("train.max_grad_norm", NAN),
    ("train.max_grad_norm", INF),
    ("train.ema_decay", 1.0), ("train.ema_decay", -0.1), ("train.ema_decay", NAN),
    ("train.ema_update_every", 0), ("train.ema_update_every", 10**9 + 1),
    ("train.ema_start_step", -1), ("train.ema_start_step", 10**9 + 1),
    ("train.ema_inv_gamma", 0), ("train.ema_inv_gamma", INF), ("train.ema_inv_gamma", NAN),
    ("train.ema_power", 0), ("train.ema_power", NAN), ("train.ema_power", INF),
    ("train.seed", -1), ("train.seed", 2**32),
    ("train.checkpoint_every", 0), ("train.checkpoint_every", 10**9 + 1),
    ("train.fid_every", -1), ("train.fid_every", 10**9 + 1),
    ("train.fid_samples", 1), ("train.fid_samples", 100_001),
    ("train.fid_sampler.steps", 0), ("train.fid_sampler.steps", 100_001),
    ("train.fid_sampler.name", "euler"), ("train.fid_sampler.eta", 1.5), ("train.fid_sampler", "ddpm"),
    ("train.fid_batch_size", 0), ("train.fid_batch_size", 65_537),
    ("train.sample_grid_every", -1), ("train.sample_grid_every", 10**9 + 1),
    ("train.warmup_steps", -1), ("train.warmup_steps", 10**9 + 1), ("train.warmup_steps", 1.5),
    ("train.fid_sampler.variance", "fixedlarge"),
    # sample
    ("sample.n", 0), ("sample.n", 100_000_000_000),
    ("sample.sampler.steps", 0), ("sample.sampler.steps", 100_001), ("sample.sampler.steps", 2.0),
    ("sample.sampler.eta", -0.1), ("sample.sampler.eta", 1.5), ("sample.sampler.eta", NAN),
    ("sample.sampler.name", "euler"), ("sample.sampler.spacing", "log"), ("sample.sampler.clip_x0", 1),
    ("sample.sampler", "ddpm"), ("sample.sampler", {"name": "ddpm", "steps": 10}),
    ("sample.batch_size", 0), ("sample.batch_size", 65_537),
    ("sample.seed", -1), ("sample.seed", 2**63), ("sample.seed", 2**63 - 10),  # the last: seed + n - 1
    ("sample.grid_images", 0), ("sample.grid_images", 5_000),
    ("sample.n", 10),  # below the committed sample.grid_images 64: the grid shows the first 64 of n
    ("sample.strip_seeds", []), ("sample.strip_seeds", [0, -1]), ("sample.strip_seeds", [2**63]),
    ("sample.strip_seeds", list(range(65))),
    ("sample.strip_frames", 0), ("sample.strip_frames", 101),
    ("sample.sampler.variance", "large"), ("sample.sampler.variance", None),
    # fid
    ("fid.inception_weights", ""), ("fid.reference", " "),
    ("fid.reference_count", -1), ("fid.reference_count", 1), ("fid.reference_count", 1_000_001),
    ("fid.batch_size", 0), ("fid.batch_size", 65_537), ("fid.exact_inception", "yes"),
    # wandb, pretrained
    ("wandb.project", ""), ("pretrained.folder", ""),
    # distributed
    ("distributed.nnodes", 0), ("distributed.nnodes", 65_537),
    ("distributed.nproc_per_node", 0), ("distributed.nproc_per_node", 257),
    ("distributed.rdzv_endpoint", "localhost:70000"),
]


def _row_id(row: tuple[str, Any]) -> str:
    text = repr(row[1])
    return f"{row[0]}={text if len(text) <= 24 else text[:20] + '...'}"


def write_params(folder: Path, key: str, value: Any, base: dict[str, Any] | None = None) -> Path:
    """The committed params (or ``base``) with ``key`` set to ``value``, as ``folder``/params.yaml."""
    raw = copy.deepcopy(BASE if base is None else base)
    *path, name = key.split(".")
    node = raw
    for part in path:
        node = node[part]
    node[name] = value
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))  # NaN and inf as YAML's .nan and .inf
    return path


def load_error(path: Path) -> str:
    """The one-line message of the ConfigError that loading every section of ``path`` raises."""
    with pytest.raises(ConfigError) as info:
        params = params_file.load_params(path, tuple(config.SECTIONS))
        for name in config.SECTIONS:
            params.section(name)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_every_row_changes_a_committed_key() -> None:
    for key, _ in BAD:
        *path, name = key.split(".")
        node = BASE
        for part in path:
            node = node[part]
        assert name in node, f"{key} is not in params.yaml"


@pytest.mark.parametrize(("key", "value"), BAD, ids=[_row_id(r) for r in BAD])
def test_bad_value_is_one_line_naming_the_key(tmp_path: Path, key: str, value: Any) -> None:
    assert key in load_error(write_params(tmp_path, key, value))


@pytest.mark.parametrize(("key", "value"), [("fid.batch_size", 0), ("fid.batch_size", 65_537),
                                            ("fid.inception_weights", "")])
def test_a_single_key_is_range_checked_too(tmp_path: Path, key: str, value: Any) -> None:
    """Stages that declare one key (evaluate reads fid.batch_size alone) get the same checks: the
    whole file is checked when it is read."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        params_file.load_params(write_params(tmp_path, key, value), (key,))


def test_committed_params_and_the_quick_preset_pass(tmp_path: Path) -> None:
    quick = yaml.safe_load(committed_text("configs/quick.yaml"))
    merged = copy.deepcopy(BASE)
    for section, values in quick.items():
        for key, value in values.items():
            if isinstance(value, dict):
                merged[section][key].update(value)
            else:
                merged[section][key] = value
    for name, raw in (("committed", BASE), ("quick", merged)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        params = params_file.load_params(path, tuple(config.SECTIONS))
        for section in config.SECTIONS:
            params.section(section)


def test_at_the_bounds_values_load(tmp_path: Path) -> None:
    """The largest allowed values pass: the bounds are inclusive where the message says "at most"."""
    raw = copy.deepcopy(BASE)
    raw["sample"].update(n=1_000_000, seed=2**63 - 1_000_000, batch_size=65_536, grid_images=4_096,
                         strip_seeds=[2**63 - 1] * 64, strip_frames=100)
    raw["sample"]["sampler"].update(steps=100_000, eta=1.0)
    raw["train"].update(steps=10**9, seed=2**32 - 1, fid_samples=100_000, lr=1, adam_betas=[0.0, 0.999])
    raw["model"].update(dim=512, dim_mults=[1, 2, 4, 8], dropout=0.0)
    raw["diffusion"]["timesteps"] = 100_000
    raw["fid"]["reference_count"] = 1_000_000
    raw["distributed"].update(nnodes=65_536, nproc_per_node=256, rdzv_endpoint="node0:65535")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    params = params_file.load_params(path, tuple(config.SECTIONS))
    assert params.section("sample").n == 1_000_000 and params.section("model").dim == 512


def test_stage_prints_one_line_and_does_no_work(tmp_path: Path) -> None:
    """stages/sample.py with a huge sample.n: exit 1, one stderr line, no traceback, nothing written
    (it runs in ``tmp_path``, where its default outputs samples/ and plots/ would appear)."""
    write_params(tmp_path, "sample.n", 100_000_000_000)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "sample.py"), "--params", "params.yaml"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "sample.n" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
