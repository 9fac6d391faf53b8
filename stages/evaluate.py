"""Stage evaluate: FID of the samples against the reference statistics -> metrics/fid.json (the
numbers) and reports/fid.json (the provenance: reference, Inception, sampler, comparability).

Under torchrun (params distributed) each rank runs Inception on its share of the samples."""

import argparse
from pathlib import Path

from ddpm_cifar.diffusion.generate import load_samples
from ddpm_cifar.evaluation.fid import load_inception, load_stats
from ddpm_cifar.evaluation.reports import check_same_inception, fid_report, metrics_of
from ddpm_cifar.evaluation.scoring import fid_sharded
from ddpm_cifar.runtime.fileio import write_json
from ddpm_cifar.runtime.stage import stage

PARAMS = ("fid.inception_weights", "fid.batch_size", "distributed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--samples", type=Path, default=Path("samples/samples.npz"))
    ap.add_argument("--ref", type=Path, default=Path("data/fid_ref.npz"))
    ap.add_argument("--out", type=Path, default=Path("metrics/fid.json"))
    ap.add_argument("--report", type=Path, default=Path("reports/fid.json"))
    args = ap.parse_args()
    with stage("evaluate", args.params, PARAMS, [args.out.parent, args.report.parent]) as run:
        params, device = run.params, run.device
        # The files first, Inception (seconds to load) last: a damaged file stops the stage at once.
        samples = load_samples(args.samples)
        images = samples.images
        ref, ref_meta = load_stats(args.ref)
        inception, info = load_inception(params.key("fid.inception_weights"), device)
        check_same_inception(ref_meta, info)
        fid = fid_sharded(images, inception, ref, batch_size=params.key("fid.batch_size"), device=device)
        if not run.main:
            return
        report = fid_report(fid, n_samples=len(images), sample_cfg=samples.config, ref_meta=ref_meta,
                            info=info)
        write_json(args.report, {**report, "checkpoint_step": samples.checkpoint_step})
        write_json(args.out, metrics_of(report))
        reasons = report["not_comparable_because"]
        flag = f"  (NOT comparable: {'; '.join(reasons)})" if reasons else ""
        print(f"FID {fid:.2f} on {len(images)} samples vs {ref_meta.get('reference')}{flag}")


if __name__ == "__main__":
    main()
