"""Gradio app over trained checkpoints: ``python -m ddpm_cifar.app --checkpoint models/ema.pt``.

Generates a grid of samples, the denoising progression of the first image, and a PNG download;
with ``--compare OTHER.pt`` a second model samples the same seeds beside the first. It binds
127.0.0.1 unless told otherwise and makes no public link unless ``--share`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import gradio as gr
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


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM, a service manager's or ``docker stop``'s, stops the app as Ctrl-C does. By default it
    killed the process on the spot, its temporary folder left behind; with GRADIO_SSR_MODE set,
    Gradio's handler waited for the request in progress (6 s on the tiny test model)."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _serve(blocks: gr.Blocks, args: argparse.Namespace, worker: TorchWorker) -> None:
    """Serve until Ctrl-C or SIGTERM, then close promptly, also in the middle of a request."""
    # Without server-side rendering (GRADIO_SSR_MODE): its Node process installs its own SIGTERM
    # handler, and a demo on 32-pixel images gains nothing from it.
    try:
        blocks.queue().launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS,
                              theme=THEME, footer_links=[], ssr_mode=False, prevent_thread_lock=True)
        while blocks.is_running:
            time.sleep(0.1)  # where Ctrl-C and SIGTERM arrive: Python runs handlers in this thread
    except KeyboardInterrupt as exc:
        print(f"stopping ({str(exc) or 'SIGINT'}): closing the server", file=sys.stderr, flush=True)
    finally:
        worker.close()  # the request in progress ends now
        server = getattr(blocks, "server", None)  # there once launched
        if server is not None:
            # Without force_exit uvicorn waits for open connections, such as a request's event stream,
            # and Gradio for uvicorn: 5 s in one run out of two during a request. What it then cuts off
            # it logs with tracebacks, which say nothing here: the process is ending.
            server.force_exit = True
            logging.getLogger("uvicorn.error").disabled = True
        blocks.close(verbose=False)


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
        with _sigterm_interrupts():
            models = [worker.call(load_demo_model, p, device) for p in paths]
            demo = Demo(models, device=device, micro_batch=micro_batch)
            # A request stopped by the shutdown may still be writing its PNG in there.
            with tempfile.TemporaryDirectory(prefix="ddpm-cifar-app-", ignore_cleanup_errors=True) as out_dir:
                _serve(build_app(demo, Path(out_dir), worker=worker), args, worker)
    except KeyboardInterrupt as exc:  # before serving: not the stages' message about kept outputs
        print(f"stopped ({str(exc) or 'SIGINT'})", file=sys.stderr)
    except OSError as exc:
        raise UserError(f"cannot serve on {args.host}:{args.port}: {exc}") from exc
    finally:
        worker.close()  # the step in progress, if any, is left to the daemon thread (see __main__)
