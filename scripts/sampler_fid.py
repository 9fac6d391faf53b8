"""FID and wall time of one checkpoint under several samplers, on the same seeds.

Each spec is SAMPLER:STEPS[:SPACING[:ETA]], e.g. ddpm:50:uniform dpmpp_2m:20:quadratic. The
FID is against the pipeline's reference statistics, with the pipeline's Inception weights; it
says when those make it not comparable to published numbers.

    python scripts/sampler_fid.py --checkpoint models/ema.pt --n 1000 \\
        ddpm:50:uniform ddim:50:quadratic dpmpp_2m:20:quadratic
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ddpm_cifar.diffusion.generate import for_sampling, generate_images
from ddpm_cifar.evaluation.fid import load_inception, load_stats
from ddpm_cifar.evaluation.reports import check_same_inception, comparability
from ddpm_cifar.evaluation.scoring import fid_sharded
from ddpm_cifar.models import checkpoint
from ddpm_cifar.runtime.config import SamplerConfig
from ddpm_cifar.runtime.stage import default_device, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("specs", nargs="+", help="SAMPLER:STEPS[:SPACING[:ETA]]")
    ap.add_argument("--checkpoint", type=Path, default=Path("models/ema.pt"))
    ap.add_argument("--ref", type=Path, default=Path("data/fid_ref.npz"))
    ap.add_argument("--inception", type=Path, required=True,
                    help="the Inception weights the reference statistics were made with")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=250)
    args = ap.parse_args()
    device = default_device()
    model = checkpoint.load_model(args.checkpoint, device)
    net, diffusion, shape = for_sampling(model.net, device), model.diffusion, model.shape
    inception, info = load_inception(args.inception, device)
    ref, ref_meta = load_stats(args.ref)
    check_same_inception(ref_meta, info)
    reasons = comparability(ref_meta, info, args.n)
    print(f"| sampler | steps | spacing | eta | FID@{args.n} | sampling time |")
    print("|---|---:|---|---:|---:|---:|")
    for text in args.specs:
        parts = text.split(":")
        spec = SamplerConfig(parts[0], int(parts[1]), parts[2] if len(parts) > 2 else "quadratic",
                             float(parts[3]) if len(parts) > 3 else 0.0)
        t0 = time.perf_counter()
        images = generate_images(net, diffusion, list(range(args.n)), spec, batch_size=args.batch,
                                 shape=shape, device=device, progress=False)
        seconds = time.perf_counter() - t0
        fid = fid_sharded(images, inception, ref, batch_size=args.batch, device=device, progress=False)
        print(f"| {spec.name} | {spec.steps} | {spec.spacing} | {spec.eta} | {fid:.2f} | {seconds:.1f} s |",
              flush=True)
    if reasons:
        print(f"\nNOT comparable to published FIDs: {'; '.join(reasons)}")


if __name__ == "__main__":
    run(main)
