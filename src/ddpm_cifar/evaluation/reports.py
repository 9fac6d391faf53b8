"""What an FID was measured against, whether it compares with published numbers, and the two files
that say so: a metrics file of numbers that differ between experiments (``dvc metrics show``), and
a report with the provenance (reference, Inception digest, sampler, reasons), which is not a metric.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..runtime.errors import UserError
from ..runtime.loaders import Source, check_fields, load_json, load_yaml

if TYPE_CHECKING:  # a type only: the plots stage reads reports without loading torch and Inception
    from .fid import InceptionInfo

# The measured pretrained model's name in reports and plots, beside the quoted baselines.
PRETRAINED = "pretrained DDPM (measured)"
# Keys of a report that go to the metrics file: numbers and booleans that change with the experiment.
METRIC_KEYS = ("fid", "n_samples", "reference_n", "comparable")


def reference_meta(name: str, n: int, data_meta: dict[str, Any], info: InceptionInfo) -> dict[str, Any]:
    """What a set of reference statistics was computed from."""
    official_data = bool(data_meta.get("official", False))
    return {
        "reference": name,
        "reference_n": n,
        "reference_official": official_data and name == "cifar10-train" and n == 50000,
        "data_official": official_data,
        "data_source": data_meta.get("source"),
        "inception_sha256": info.sha256,
        "inception_official": info.official,
    }


def comparability(ref_meta: dict[str, Any], info: InceptionInfo, n_samples: int) -> list[str]:
    """Reasons an FID cannot be compared with published CIFAR-10 numbers (empty if it can)."""
    reasons = []
    if not info.official:
        reasons.append("Inception weights are not the official pt_inception-2015-12-05 file")
    if not ref_meta.get("reference_official", False):
        name, n = ref_meta.get("reference"), ref_meta.get("reference_n")
        if not ref_meta.get("data_official", False):
            reasons.append(f"reference {name} is not from the official CIFAR-10 archive "
                           f"(source: {ref_meta.get('data_source')})")
        if name != "cifar10-train" or n != 50000:
            reasons.append(f"reference is {name} with {n} images, not the 50,000-image train set")
    if n_samples < 10000:
        reasons.append(f"only {n_samples} samples (published FIDs use 10k-50k)")
    return reasons


def check_same_inception(ref_meta: dict[str, Any], info: InceptionInfo) -> None:
    want = ref_meta.get("inception_sha256")
    if want and want != info.sha256:
        raise UserError(
            f"the reference statistics were computed with Inception weights {want[:12]}, but "
            f"{info.path} is {info.sha256[:12]}: rerun the ref_stats stage with `dvc repro ref_stats`"
        )


def fid_report(value: float, *, n_samples: int, sample_cfg: dict[str, Any], ref_meta: dict[str, Any],
               info: InceptionInfo) -> dict[str, Any]:
    """Everything about one FID: the number, its sample count and reference, and why it is or is not
    comparable with published FIDs. ``sample_cfg`` is the sample section that made the images."""
    reasons = comparability(ref_meta, info, n_samples)
    return {
        "fid": round(float(value), 4),
        "n_samples": n_samples,
        "reference": ref_meta.get("reference"),
        "reference_n": ref_meta.get("reference_n"),
        "reference_official": bool(ref_meta.get("reference_official")),
        "data_source": ref_meta.get("data_source"),
        "inception_sha256": info.sha256,
        "inception_official": info.official,
        "comparable": not reasons,
        "not_comparable_because": reasons,
        "sampler": sample_cfg.get("sampler"),  # the sample.sampler block: name, steps, spacing, ...
        "sample": sample_cfg,
    }


def metrics_of(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a report that belong in a DVC metrics file."""
    return {key: report[key] for key in METRIC_KEYS if key in report}


def fid_tables(ours: dict[str, Any], baselines: list[dict[str, Any]],
               measured: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of the two FID bar charts that ``dvc plots`` draws (and overlays across experiments).

    ``published``: the quoted baselines, plus those of our measured FIDs (``ours`` and the reports in
    ``measured``, each with a ``name``) that compare with them. ``measured``: every FID measured here,
    whether it is comparable and why not. A non-comparable FID is therefore never on the same chart
    as a published one.
    """
    mine = [{**ours, "name": "ours"}, *measured]
    published = [{"model": f"{b['name']} (quoted)", "fid": float(b["fid"]), "samples": str(b["samples"])}
                 for b in baselines]
    published += [{"model": f"{m['name']} (measured)", "fid": m["fid"], "samples": str(m["n_samples"])}
                  for m in mine if m["comparable"]]
    here = [{"model": m["name"], "fid": m["fid"], "samples": m["n_samples"], "comparable": m["comparable"],
             "not_comparable_because": "; ".join(m["not_comparable_because"])} for m in mine]
    return published, here


# What the plots stage needs of a report (fid_report's keys), and of a baseline (baselines.yaml).
REPORT_FIELDS = {"fid": "number", "n_samples": "int", "comparable": "bool", "not_comparable_because": "list"}
BASELINE_FIELDS = {"name": "str", "fid": "number", "samples": "any"}


def load_report(path: str | Path, stage: str) -> dict[str, Any]:
    """An FID report the ``stage`` stage wrote (reports/fid.json: evaluate; reports/pretrained_fid.json:
    pretrained, which writes only ``enabled: false`` when switched off), checked for what plots draw."""
    source = Source("an FID report", f"remove it and rerun `dvc repro`, whose {stage} stage writes it again",
                    missing=f"run `dvc repro`, whose {stage} stage writes it")
    report = load_json(path, source)
    if report.get("enabled", True) is False:
        return report
    fields = {**REPORT_FIELDS, "name": "str"} if "enabled" in report else REPORT_FIELDS
    if why := check_fields(report, fields):
        raise source.refuse(path, why)
    if not all(isinstance(reason, str) for reason in report["not_comparable_because"]):
        raise source.refuse(path, "its 'not_comparable_because' is not a list of text")
    return report


def load_baselines(path: str | Path) -> list[dict[str, Any]]:
    """The quoted FIDs of baselines.yaml (a file of the repository, not an output: git restores it)."""
    source = Source("a list of baselines", f"restore it with `git checkout {path}`")
    doc = load_yaml(path, source)
    baselines = doc.get("baselines") if isinstance(doc, dict) else None
    if not isinstance(baselines, list):
        raise source.refuse(path, "it has no 'baselines' list")
    for number, baseline in enumerate(baselines, start=1):
        if not isinstance(baseline, dict):
            raise source.refuse(path, f"its baseline {number} is not a mapping")
        if why := check_fields(baseline, BASELINE_FIELDS, owner=f"baseline {number}"):
            raise source.refuse(path, why)
    return baselines
