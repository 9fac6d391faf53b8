"""Stage train: U-Net + Gaussian diffusion with EMA, gradient accumulation, AMP and exact resume."""

import argparse
from pathlib import Path

from ddpm_cifar.cli import default_device, run
from ddpm_cifar.config import load_params, to_dict
from ddpm_cifar.data import load_split
from ddpm_cifar.evaluation import check_same_inception, training_fid_fn, training_fid_id
from ddpm_cifar.fid import load_inception, load_stats
from ddpm_cifar.fileio import file_digest, write_json
from ddpm_cifar.tracking import make_tracker
from ddpm_cifar.train import TrainOutputs, train

PARAMS = ("model", "diffusion", "train", "wandb", "fid.inception_weights")


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
    device = default_device()
    images, _ = load_split(args.data, "train")

    fid_fn, fid_id, fid_meta = None, "", {}
    if cfg.fid_every:
        inception, info = load_inception(params.key("fid.inception_weights"), device)
        ref, ref_meta = load_stats(args.ref)
        check_same_inception(ref_meta, info)
        fid_id = training_fid_id(info.sha256, file_digest(args.ref), cfg)
        fid_meta = {"fid_inception_official": info.official, "fid_reference": ref_meta.get("reference"),
                    "fid_reference_n": ref_meta.get("reference_n"), "fid_samples": cfg.fid_samples}
        shape = (model_cfg.channels, model_cfg.image_size, model_cfg.image_size)
        fid_fn = training_fid_fn(inception, ref, n=cfg.fid_samples, sampler=cfg.fid_sampler,
                                 steps=cfg.fid_sample_steps, spacing=cfg.fid_spacing,
                                 batch_size=cfg.fid_batch_size, shape=shape, device=device)

    config = {"model": to_dict(model_cfg), "diffusion": to_dict(diffusion_cfg), "train": to_dict(cfg)}
    tracker = make_tracker(wandb_cfg, config, run_dir=args.models / "wandb")
    outputs = TrainOutputs(checkpoint=args.models / "checkpoint.pt", ema=args.models / "ema.pt",
                           loss_log=args.metrics / "train_loss.tsv", fid_log=args.metrics / "train_fid.tsv")
    try:
        result = train(model_cfg, diffusion_cfg, cfg, images=images, outputs=outputs, device=device,
                       data_id=file_digest(args.data / "train.npz"), tracker=tracker, fid_fn=fid_fn,
                       fid_id=fid_id)
    finally:
        tracker.finish()
    write_json(args.metrics / "train.json", {
        "steps": result.step, "resumed_from_step": result.resumed_from,
        "final_loss": round(result.final_loss, 6), "parameters": result.parameters,
        "images_per_second": round(result.images_per_second, 2), "precision": result.precision,
        "device": device.type, "last_fid": result.fids[-1][1] if result.fids else None, **fid_meta,
    })


if __name__ == "__main__":
    run(main)
