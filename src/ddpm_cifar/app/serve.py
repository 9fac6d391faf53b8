"""Gradio app over trained checkpoints: ``python -m ddpm_cifar.app --checkpoint models/ema.pt``.

Generates a grid of samples, the denoising progression of the first image, and a PNG download;
with ``--compare OTHER.pt`` a second model samples the same seeds beside the first. It binds
127.0.0.1 unless told otherwise and makes no public link unless ``--share`` is given.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from ..runtime.errors import UserError
from ..runtime.stage import default_device
from .engine import Demo, TorchWorker, load_demo_model
from .ui import CSS, THEME, build_app


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m ddpm_cifar.app", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint the pipeline wrote")
    ap.add_argument("--compare", type=Path,
                    help="a second checkpoint, or a folder with the published DDPM CIFAR-10 weights "
                         "(google/ddpm-cifar10-32, diffusers layout); it samples the same seeds")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    ap.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    ap.add_argument("--share", action="store_true", help="ask Gradio for a public share link")
    ap.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--micro-batch", type=int,
                    help="images per network call (default: 8 on CPU, 64 on CUDA); images are "
                         "reproducible for a fixed value on the same device")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        device = torch.device(args.device) if args.device else default_device()
    except RuntimeError:
        raise UserError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available")
    micro_batch = args.micro_batch or (64 if device.type == "cuda" else 8)
    if micro_batch < 1:
        raise UserError(f"--micro-batch must be at least 1, got {micro_batch}")
    paths = [args.checkpoint] + ([args.compare] if args.compare else [])
    worker = TorchWorker()  # loads and samples: torch on one thread only
    try:
        models = [worker.call(load_demo_model, p, device) for p in paths]
        demo = Demo(models, device=device, micro_batch=micro_batch)
        with tempfile.TemporaryDirectory(prefix="ddpm-cifar-app-") as out_dir:
            blocks = build_app(demo, Path(out_dir), worker=worker)
            blocks.queue().launch(server_name=args.host, server_port=args.port, share=args.share,
                                  css=CSS, theme=THEME, footer_links=[])
    except OSError as exc:
        raise UserError(f"cannot serve on {args.host}:{args.port}: {exc}") from exc
    finally:
        worker.close()  # Ctrl-C in the middle of a request: do not wait for it to finish
