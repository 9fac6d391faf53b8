"""Export a model.arch ddpm checkpoint as a Hugging Face diffusers DDPMPipeline folder (docs/hf_export.md).

    python scripts/export_diffusers.py OUT_DIR [--checkpoint models/ema.pt] [--variance posterior|beta]
                                       [--no-clip-x0]

OUT_DIR must not exist or be empty. The folder loads with diffusers.DDPMPipeline.from_pretrained(OUT_DIR).
"""

from __future__ import annotations

import argparse

from ddpm_cifar.models.hf_export import export
from ddpm_cifar.runtime.config import VARIANCE_NAMES
from ddpm_cifar.runtime.stage import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="the folder to write (absent or empty)")
    parser.add_argument("--checkpoint", default="models/ema.pt", help="default: models/ema.pt")
    # The checkpoint holds no sampler settings: these mirror sample.sampler's ddpm keys (same defaults).
    parser.add_argument("--variance", choices=VARIANCE_NAMES, default="posterior",
                        help="DDPM's sigma^2: posterior (diffusers' fixed_small) or beta (fixed_large)")
    parser.add_argument("--no-clip-x0", dest="clip_x0", action="store_false",
                        help="do not clamp the network's x0 estimate to [-1, 1] (clip_sample false)")
    args = parser.parse_args()
    out = export(args.checkpoint, args.out_dir, variance=args.variance, clip_x0=args.clip_x0)
    print(f"wrote {out} (model_index.json, unet/, scheduler/) from {args.checkpoint}")
    print(f'load it with: DDPMPipeline.from_pretrained("{out}")')


if __name__ == "__main__":
    run(main)  # a UserError ends the process with one line on stderr, exit status 1
