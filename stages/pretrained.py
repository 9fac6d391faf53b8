"""Stage pretrained: the published DDPM CIFAR-10 model, sampled and scored exactly like ours.

Same sampler settings, per-image seeds and sample count (params sample), reference statistics and
Inception weights -> metrics/pretrained_fid.json (the numbers) and reports/pretrained_fid.json (the
provenance and the weights' SHA-256), as "pretrained DDPM (measured)". Off unless
params pretrained.enabled; the weights are not in the repository (docs/pretrained.md)."""

import argparse
import shutil
from pathlib import Path

from ddpm_cifar.diffusion.generate import for_sampling, sample_cache_key
from ddpm_cifar.evaluation.fid import load_reference
from ddpm_cifar.evaluation.inception import load_inception
from ddpm_cifar.evaluation.reports import (
    PRETRAINED,
    check_same_inception,
    fid_report,
    metrics_of,
    summary_line,
)
from ddpm_cifar.evaluation.scoring import score_model
from ddpm_cifar.models.networks import load_pretrained
from ddpm_cifar.runtime.config import to_dict
from ddpm_cifar.runtime.fileio import file_digest, write_json
from ddpm_cifar.runtime.stage import stage

PARAMS = ("pretrained", "sample", "fid.inception_weights", "fid.batch_size",
          "fid.exact_inception", "distributed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--ref", type=Path, default=Path("data/fid_ref.npz"))
    ap.add_argument("--partial", type=Path, default=Path("samples/pretrained_partial"))
    ap.add_argument("--out", type=Path, default=Path("metrics/pretrained_fid.json"))
    ap.add_argument("--report", type=Path, default=Path("reports/pretrained_fid.json"))
    args = ap.parse_args()
    with stage("pretrained", args.params, PARAMS, [args.out.parent, args.report.parent, args.partial]) as run:
        params, device = run.params, run.device
        cfg, sample = params.section("pretrained"), params.section("sample")
        if not cfg.enabled:
            if run.main:
                write_json(args.report, {"name": PRETRAINED, "enabled": False})
                write_json(args.out, {"enabled": False})
                print("pretrained.enabled is false: nothing to score")
            return
        model, weights = load_pretrained(cfg.folder, device)
        weights_sha = file_digest(weights)  # DVC does not track the folder: the report names the files
        digest = weights_sha + file_digest(Path(cfg.folder) / "config.json")
        inception, info = load_inception(params.key("fid.inception_weights"), device,
                                         exact=params.key("fid.exact_inception"))
        reference = load_reference(args.ref)
        check_same_inception(reference.meta, info)
        net = for_sampling(model.net, device, compile=sample.compile)
        scores = score_model(net, model.diffusion, sample, inception, reference, shape=model.shape,
                           fid_batch_size=params.key("fid.batch_size"), device=device, cache_dir=args.partial,
                           cache_key=sample_cache_key(digest, sample, device),
                           desc="pretrained")
        if run.main:
            report = fid_report(scores, sample_cfg=to_dict(sample), ref_meta=reference.meta, info=info)
            write_json(args.report, {"name": PRETRAINED, "enabled": True, **report, "weights": str(weights),
                                     "weights_sha256": weights_sha})
            write_json(args.out, {"enabled": True, **metrics_of(report)})
            shutil.rmtree(args.partial, ignore_errors=True)
            print(f"{PRETRAINED}: {summary_line(report)}")


if __name__ == "__main__":
    main()
