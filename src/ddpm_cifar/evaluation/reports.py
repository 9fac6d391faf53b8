"""What an FID was measured against, whether it compares with published numbers, and the two files
that say so: a metrics file of numbers that differ between experiments (``dvc metrics show``), and
a report with the provenance (reference, Inception digest, sampler, reasons), which is not a metric.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..runtime.errors import UserError
from ..runtime.loaders import Source, check_fields, load_json, load_yaml

if TYPE_CHECKING:  # types only: the plots stage reads reports without loading torch and Inception
    from .inception import InceptionInfo
    from .scoring import Scores

# The measured pretrained model's name in reports and plots, beside the quoted baselines.
PRETRAINED = "pretrained DDPM (measured)"
# Keys of a report that go to the metrics file: numbers and booleans that change with the experiment.
METRIC_KEYS = ("fid", "is", "kid", "precision", "recall", "n_samples", "reference_n", "comparable")
# The features precision/recall (and KID) compare, said in every report.
PR_FEATURES = ("pool3 features (2,048-d) of the FID Inception, as the ADM evaluator uses; torch-fidelity's "
               "default is VGG16's")


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
        "inception_exact": info.exact,
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


def fid_report(scores: Scores, *, sample_cfg: dict[str, Any], ref_meta: dict[str, Any],
               info: InceptionInfo) -> dict[str, Any]:
    """Everything about one image set's metrics: the numbers, each with its sample count and reference,
    and why they are or are not comparable with published numbers (one verdict for all: they share the
    Inception network, the samples and the reference). ``sample_cfg`` is the sample section that made
    the images."""
    reasons = comparability(ref_meta, info, scores.n)
    values = scores.values()
    report: dict[str, Any] = {
        "fid": round(float(scores.fid), 4),
        **{key: _rounded(values[key]) for key in ("is", "kid", "precision", "recall") if key in values},
        "n_samples": scores.n,
        "reference": ref_meta.get("reference"),
        "reference_n": ref_meta.get("reference_n"),
        "reference_official": bool(ref_meta.get("reference_official")),
        "data_source": ref_meta.get("data_source"),
        "inception_sha256": info.sha256,
        "inception_official": info.official,
        "inception_exact": info.exact,
        "comparable": not reasons,
        "not_comparable_because": reasons,
        "sampler": sample_cfg.get("sampler"),  # the sample.sampler block: name, steps, spacing, ...
        "sample": sample_cfg,
    }
    return {**report, **_details(scores)}


def _rounded(value: float) -> float:
    return float(f"{value:.6g}")


def _details(scores: Scores) -> dict[str, Any]:
    """Each metric beyond FID with its spread, sizes and how it was measured."""
    out: dict[str, Any] = {}
    if (isc := scores.inception_score) is not None:
        out["inception_score"] = {"mean": _rounded(isc.mean), "std": _rounded(isc.std), "splits": isc.splits,
                                  "n": isc.n, "logits": "the FID Inception's 1008 logits without bias"}
    if (k := scores.kid) is not None:
        out["kid_detail"] = {"mean": _rounded(k.mean), "std": _rounded(k.std), "subsets": k.subsets,
                             "subset_size": k.subset_size, "n": k.n, "reference_n": k.reference_n,
                             "error_bar": k.error_bar, "features": PR_FEATURES}
    if (pr := scores.precision_recall) is not None:
        out["precision_recall"] = {"precision": _rounded(pr.precision), "recall": _rounded(pr.recall),
                                   "k": pr.k, "n": pr.n, "reference_n": pr.reference_n,
                                   "features": PR_FEATURES}
    if scores.missing:
        out["not_measured"] = {"kid, precision, recall": scores.missing}
    return out


def metrics_of(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a report that belong in a DVC metrics file."""
    return {key: report[key] for key in METRIC_KEYS if key in report}


def fid_tables(ours: dict[str, Any], baselines: list[dict[str, Any]],
               measured: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of the two FID bar charts that ``dvc plots`` draws (and overlays across experiments).

    ``published``: the quoted baselines, plus those of our measured FIDs (``ours`` and the reports in
    ``measured``, each with a ``name``) that compare with them. ``measured``: every FID this pipeline
    measured, whether it is comparable and why not. A non-comparable FID is therefore never on the same chart
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


def summary_line(report: dict[str, Any]) -> str:
    """One line of a report's numbers: what a stage prints when it is done."""
    parts = [f"FID {report['fid']:.2f}"]
    if "inception_score" in report:
        parts.append(f"IS {report['inception_score']['mean']:.2f} ± {report['inception_score']['std']:.2f}")
    if "kid_detail" in report:
        kid = report["kid_detail"]
        parts.append(f"KID {kid['mean']:.4g} ± {kid['std']:.2g} (subsets of {kid['subset_size']})")
    if "precision_recall" in report:
        parts.append(f"precision {report['precision']:.3f}, recall {report['recall']:.3f}")
    reasons = report["not_comparable_because"]
    flag = f" (NOT comparable: {'; '.join(reasons)})" if reasons else ""
    return f"{', '.join(parts)} on {report['n_samples']} samples vs {report['reference']}{flag}"
