"""Stage train: U-Net + Gaussian diffusion with EMA, gradient accumulation, AMP and exact resume ->
models/, dvclive/ (DVCLive's histories and summary, written as the run goes) and reports/train.json
(how the run went).

Runs data-parallel under torchrun when params ask for more than one process (dvc.yaml's command)."""

import argparse
import os
from pathlib import Path

from ddpm_cifar.data.splits import load_meta, load_split
from ddpm_cifar.evaluation.scoring import training_evaluation
from ddpm_cifar.runtime.fileio import file_digest, write_json
from ddpm_cifar.runtime.stage import stage
from ddpm_cifar.training.loop import TrainingEval, TrainOutputs, train
from ddpm_cifar.training.tracking import Tracker, make_tracker

PARAMS = ("model", "diffusion", "train", "fid.inception_weights", "fid.exact_inception", "distributed")
# Read but deliberately not DVC params: they change how the stage runs, never what it computes.
RUN_PARAMS = ("wandb",)

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", type=Path, default=Path("data/cifar10"))
    ap.add_argument("--ref", type=Path, default=Path("data/fid_ref.npz"))
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--live", type=Path, default=Path("dvclive"))
    ap.add_argument("--reports", type=Path, default=Path("reports"))
    args = ap.parse_args()
    with stage("train", args.params, PARAMS + RUN_PARAMS, [args.models, args.live, args.reports]) as run:
        params, device = run.params, run.device
        model_cfg, diffusion_cfg = params.section("model"), params.section("diffusion")
        cfg = params.section("train")
        images, _ = load_split(args.data, "train")
        evaluation, eval_meta = None, {}
        if cfg.fid_every:
            shape = (model_cfg.channels, model_cfg.image_size, model_cfg.image_size)
            scorer = training_evaluation(params.key("fid.inception_weights"), args.ref, cfg, shape, device,
                                         exact_inception=params.key("fid.exact_inception"))
            evaluation = TrainingEval(scorer.fn, scorer.columns, scorer.id, cfg.fid_samples)
            eval_meta = scorer.meta
        config = {**params.as_dict(), "dataset": load_meta(args.data)}
        # `dvc exp run` names the experiment in DVC_EXP_NAME: the W&B run's name unless params give one.
        tracker = (make_tracker(params.section("wandb"), config, args.models / "wandb",
                                default_name=os.environ.get("DVC_EXP_NAME")) if run.main else Tracker())
        outputs = TrainOutputs(args.models / "checkpoint.pt", args.models / "ema.pt", args.live,
                               args.models / "ema_best.pt")
        try:
            result = train(model_cfg, diffusion_cfg, cfg, images=images, outputs=outputs, device=device,
                           data_id=file_digest(args.data / "train.npz"), tracker=tracker,
                           evaluation=evaluation)
        finally:
            tracker.finish()
        if run.main:
            write_json(args.reports / "train.json",
                       {**result.report(), "device": device.type, **eval_meta, **tracker.info()})


if __name__ == "__main__":
    main()
