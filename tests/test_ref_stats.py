"""The ref_stats stage: the reference set it is asked for, or one line saying why not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from factories import random_images

from ddpm_cifar.data.splits import save_split
from ddpm_cifar.evaluation.inception import save_random_inception

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, reference_count: int) -> subprocess.CompletedProcess[str]:
    data = tmp_path / "data"
    save_split(data / "train.npz", random_images(12, 32), np.zeros(12, dtype=np.int64))
    save_random_inception(tmp_path / "inception.pth")
    params = {"fid": {"inception_weights": str(tmp_path / "inception.pth"), "reference": "train",
                      "reference_count": reference_count, "reference_features": 8, "batch_size": 4,
                      "exact_inception": False},
              "distributed": {"nnodes": 1, "nproc_per_node": 1, "rdzv_endpoint": "localhost:0"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, str(ROOT / "stages" / "ref_stats.py"), "--data", str(data),
                           "--out", str(tmp_path / "out" / "fid_ref.npz")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("count", [13, 100_000])
def test_more_reference_images_than_the_set_holds_is_one_line(tmp_path: Path, count: int) -> None:
    """Not silently the 12 that exist: an FID's reference must be what the params say."""
    proc = _run(tmp_path, count)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: fid.reference_count {count} exceeds the 12 images of the train split in "
        f"{tmp_path / 'data'}: lower it, or 0 for all"]
    assert not (tmp_path / "out" / "fid_ref.npz").exists()
