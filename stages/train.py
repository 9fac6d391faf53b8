"""Stage train: U-Net + Gaussian diffusion with EMA, gradient accumulation, AMP and exact resume.

Runs data-parallel under torchrun when params ask for more than one process (dvc.yaml's command)."""

import argparse
import os
from pathlib import Path

from ddpm_cifar.cli import launched_ranks, run
from ddpm_cifar.config import load_params, to_dict
from ddpm_cifar.data import load_split
from ddpm_cifar.distributed import is_main, process_group
from ddpm_cifar.evaluation import training_fid
from ddpm_cifar.fileio import file_digest, write_json
from ddpm_cifar.tracking import Tracker, make_tracker
from ddpm_cifar.train import TrainOutputs, train

PARAMS = ("model", "diffusion", "train", "wandb", "fid.inception_weights", "distributed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", type=Path, default=Path("data/cifar10"))
    ap.add_argument("--ref", type=Path, default=Path("data/fid_ref.npz"))
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--metrics", type=Path, default=Path("metrics"))
    args = ap.parse_args()
    params = load_params(args.params, PARAMS)
    model_cfg, diffusion_cfg = params.section("model"), params.section("diffusion")
    cfg, wandb_cfg = params.section("train"), params.section("wandb")
    with process_group(*launched_ranks(params.section("distributed"), os.environ)) as device:
        images, _ = load_split(args.data, "train")
        fid_fn, fid_id, fid_meta = None, "", {}
        if cfg.fid_every:
            shape = (model_cfg.channels, model_cfg.image_size, model_cfg.image_size)
            fid_fn, fid_id, fid_meta = training_fid(params.key("fid.inception_weights"), args.ref, cfg, shape,
                                                    device)
        config = {"model": to_dict(model_cfg), "diffusion": to_dict(diffusion_cfg), "train": to_dict(cfg)}
        tracker = make_tracker(wandb_cfg, config, run_dir=args.models / "wandb") if is_main() else Tracker()
        outputs = TrainOutputs(args.models / "checkpoint.pt", args.models / "ema.pt",
                               args.metrics / "train_loss.tsv", args.metrics / "train_fid.tsv")
        try:
            result = train(model_cfg, diffusion_cfg, cfg, images=images, outputs=outputs, device=device,
                           data_id=file_digest(args.data / "train.npz"), tracker=tracker, fid_fn=fid_fn,
                           fid_id=fid_id)
        finally:
            tracker.finish()
        if is_main():
            write_json(args.metrics / "train.json", {
                "steps": result.step, "resumed_from_step": result.resumed_from,
                "final_loss": round(result.final_loss, 6), "parameters": result.parameters,
                "images_per_second": round(result.images_per_second, 2), "precision": result.precision,
                "device": device.type, "world_size": result.world_size, "world_history": result.world_history,
                "last_fid": result.fids[-1][1] if result.fids else None, **fid_meta,
            })


if __name__ == "__main__":
    run(main)
