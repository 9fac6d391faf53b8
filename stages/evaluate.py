"""Stage evaluate: FID, Inception Score, KID and precision/recall of the samples, from one Inception pass
-> metrics/fid.json (the numbers) and reports/fid.json (the provenance: reference, Inception, sampler,
spreads, the weights' step, comparability).

Under torchrun (params distributed) each rank runs Inception on its share of the samples."""

import argparse
from pathlib import Path

from ddpm_cifar.diffusion.generate import load_samples
from ddpm_cifar.evaluation.fid import load_reference
from ddpm_cifar.evaluation.inception import load_inception
from ddpm_cifar.evaluation.reports import check_same_inception, fid_report, metrics_of, summary_line
from ddpm_cifar.evaluation.scoring import score_sharded
from ddpm_cifar.runtime.fileio import write_json
from ddpm_cifar.runtime.stage import stage

PARAMS = ("fid.inception_weights", "fid.batch_size", "fid.exact_inception", "distributed")


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
        reference = load_reference(args.ref)
        inception, info = load_inception(params.key("fid.inception_weights"), device,
                                         exact=params.key("fid.exact_inception"))
        check_same_inception(reference.meta, info)
        scores = score_sharded(samples.images, inception, reference, batch_size=params.key("fid.batch_size"),
                               device=device)
        if not run.main:
            return
        report = fid_report(scores, sample_cfg=samples.config, ref_meta=reference.meta, info=info)
        weights = samples.config.get("weights", "final")
        write_json(args.report, {**report, "weights": weights, "checkpoint_step": samples.checkpoint_step})
        write_json(args.out, metrics_of(report))
        print(summary_line(report) + f"; {weights} weights of step {samples.checkpoint_step}")


if __name__ == "__main__":
    main()
