"""The app's Gradio page: its layout, and handlers that turn the page's values into engine requests.

A grid of samples, the denoising progression of the first image, and a PNG download, per model;
with two models, both sample the same seeds side by side. Served by :mod:`.serve`.
"""

from __future__ import annotations

import inspect
import sys
import threading
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from ..evaluation.plots import image_grid, save_png
from ..runtime.config import SAMPLER_NAMES, SPACING_NAMES, VARIANCE_NAMES
from ..runtime.errors import UserError
from .engine import MAX_IMAGES, MAX_SEED, Demo, Progress, Request, Result, TorchWorker, describe, strip_image

# 32x32 samples are shown enlarged to fill their box, as blocky pixels rather than the browser's blur.
CSS = ".pixelated img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }"
# System fonts: the default theme would fetch web fonts, which fails offline.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])
DEFAULT_SAMPLER = "dpmpp_2m"  # the fastest: 20 network evaluations match DDPM's 1000 (docs/samplers.md)
DEFAULT_STEPS = 20


def _status(ev: Progress, n_models: int) -> str:
    which = f"model {ev.model + 1} of {n_models}, " if n_models > 1 else ""
    eta = f", about {ev.eta:.0f} s left" if ev.eta is not None else ""
    return (f'<progress value="{ev.done:.4f}" max="1" style="width: 100%"></progress><br>'
            f"Sampling: {which}step {ev.step}/{ev.steps} · {ev.elapsed:.1f} s{eta}")


class Handlers:
    """The app's event handlers, plain functions of the UI's values (testable without a browser)."""

    def __init__(self, demo: Demo, out_dir: Path, *, worker: TorchWorker | None = None,
                 update_every: float = 0.25):
        self.demo = demo
        self.out_dir = out_dir
        self.worker = worker
        # Seconds between progress updates: each one is a round trip through Gradio's queue
        # (about 20 ms), which per step would double the time of a small request. Stop is still
        # checked after every step.
        self.update_every = update_every
        self._stop: dict[str, threading.Event] = {}  # per browser session, while a request is on

    def begin(self, session: str = "") -> str:
        """Register a request of ``session`` before it waits in the queue, so that a Stop pressed
        while it waits counts too. Returns the status to show meanwhile."""
        self._stop[session] = threading.Event()
        return "Waiting for the model…"

    def stop(self, session: str = "") -> None:
        """Stop the session's request after its current step, or before it starts. Cooperative
        rather than Gradio's task cancellation, which can leave the page showing an error."""
        if session in self._stop:
            self._stop[session].set()

    def generate(self, n: object, sampler: object, steps: object, seed: object,
                 session: str = "", spacing: object = "quadratic", eta: object = 0.0,
                 variance: object = "posterior") -> Iterator[dict[str, Any]]:
        """Yields dicts keyed by output name: 'status' (HTML with a progress bar while sampling),
        and per model i 'grid{i}', 'strip{i}' and 'png{i}' (the grid saved as a PNG file, None
        while there is none). Bad values raise :class:`UserError`."""
        stop = self._stop.setdefault(session, threading.Event())
        try:
            req = self.demo.check(n, sampler, steps, seed, spacing, eta, variance)
            # The previous request's downloads would not match what is sampled now.
            yield {"status": "Sampling…", **{f"png{i}": None for i in range(len(self.demo.models))}}
            yield from self._sample(req, stop)
        finally:
            if self._stop.get(session) is stop:
                del self._stop[session]

    def _sample(self, req: Request, stop: threading.Event) -> Iterator[dict[str, Any]]:
        n_models = len(self.demo.models)
        last_update = -float("inf")
        preview: dict[str, Any] = {}
        events = (self.worker.iterate(lambda: self.demo.generate(req)) if self.worker is not None
                  else self.demo.generate(req))
        try:
            for ev in events:
                if stop.is_set():
                    yield {"status": "Stopped."}
                    return
                if isinstance(ev, Progress):
                    if ev.preview is not None:
                        preview = {f"grid{ev.model}": ev.preview}  # the newest one is shown
                    if ev.elapsed - last_update >= self.update_every or ev.step == ev.steps:
                        last_update = ev.elapsed
                        yield {"status": _status(ev, n_models), **preview}
                        preview = {}
                else:
                    yield self._result(ev, req.seed)
        finally:
            events.close()  # stops the sampling, on the worker thread too
        if self.worker is not None and self.worker.closed:  # the events ended early: Ctrl-C or SIGTERM
            yield {"status": "Stopped: the server is shutting down."}
            return
        yield {"status": f"Done: {req.n} image(s) per model, seeds {req.seed}–{req.seed + req.n - 1}, "
                         f"{describe(req.spec)}."}

    def _result(self, ev: Result, seed: int) -> dict[str, Any]:
        grid = image_grid(ev.images)
        name = f"samples-model{ev.model + 1}-seed{seed}-n{len(ev.images)}.png"
        png = self.out_dir / uuid.uuid4().hex / name  # a folder per request: names may repeat
        save_png(grid, png)
        return {f"grid{ev.model}": grid, f"strip{ev.model}": strip_image(ev), f"png{ev.model}": png}


def _refused(exc: UserError) -> None:
    """One console line per refused request: bad input from a visitor is not a fault of the server,
    and a traceback each time would bury the lines that are."""
    print("refused request:", " ".join(str(exc).split()), file=sys.stderr, flush=True)


class _Blocks(gr.Blocks):
    """gr.Blocks that refuses a request with too few values (sent through the HTTP API, not the page)
    by naming the missing inputs. Gradio's own refusal reached the caller as ``{"error": null}`` and
    the console as a traceback."""

    def validate_inputs(self, block_fn: Any, inputs: list[Any]) -> None:
        wanted = len(block_fn.inputs)
        if len(inputs) < wanted:
            # The handler's parameters are the API's names for the values, in order.
            names = list(inspect.signature(block_fn.fn).parameters)[:wanted]
            missing = names[len(inputs):]
            exc = UserError(f"missing input{'s' if len(missing) > 1 else ''} {', '.join(missing)}: "
                            f"{block_fn.name} takes {wanted} values ({', '.join(names)}), got {len(inputs)}")
            _refused(exc)
            raise gr.Error(str(exc), print_exception=False)
        super().validate_inputs(block_fn, inputs)


def _ui_value(name: str, value: Any) -> Any:
    # The download buttons are disabled, with nothing to download, until there is a grid.
    if name.startswith("png"):
        return gr.DownloadButton(value=value, interactive=value is not None)
    return value


def _controls(demo: Demo, outputs: dict[str, Any]) -> tuple[list[Any], Any, Any]:
    """The left column: the request's inputs (in ``on_generate``'s order), Generate and Stop; the
    status line goes into ``outputs``."""
    with gr.Column(scale=1, min_width=280):
        # Number boxes, not sliders: a slider silently clamps a typed value, while an
        # out-of-range value should be refused with a message (Handlers.generate does).
        n = gr.Number(16, label=f"Number of images (1 to {MAX_IMAGES})", elem_id="n-images")
        sampler = gr.Dropdown(list(SAMPLER_NAMES), value=DEFAULT_SAMPLER, label="Sampler", elem_id="sampler")
        steps = gr.Number(min(DEFAULT_STEPS, demo.max_steps), elem_id="steps",
                          label=f"Sampling steps (1 to {demo.max_steps})")
        spacing = gr.Dropdown(list(SPACING_NAMES), value="quadratic", label="Timestep spacing",
                              elem_id="spacing")
        eta = gr.Number(0.0, label="DDIM η (0 to 1): 0 deterministic, 1 as noisy as DDPM", elem_id="eta")
        variance = gr.Dropdown(list(VARIANCE_NAMES), value="posterior", elem_id="variance",
                               label="DDPM variance σ²: posterior (β̃) or beta (Ho et al.'s FID)",
                               info="Only the ddpm sampler uses it.")
        seed = gr.Number(0, label=f"Seed (0 to {MAX_SEED}); image i uses seed + i", elem_id="seed")
        with gr.Row():
            go = gr.Button("Generate", variant="primary", elem_id="generate")
            stop = gr.Button("Stop", variant="stop", elem_id="stop")
        outputs["status"] = gr.HTML("Ready.", elem_id="status")
    return [n, sampler, steps, spacing, eta, variance, seed], go, stop


def _model_columns(demo: Demo, outputs: dict[str, Any]) -> None:
    """One column per model: its grid, denoising strip and PNG download, into ``outputs``."""
    for i, dm in enumerate(demo.models):
        with gr.Column(scale=2):
            gr.Markdown(f"**{dm.label}**")
            outputs[f"grid{i}"] = gr.Image(label="Samples", format="png", interactive=False, height=460,
                                           elem_id=f"grid{i}", elem_classes=["pixelated"])
            outputs[f"strip{i}"] = gr.Image(label="Denoising of the first image: x_T → x_0", format="png",
                                            interactive=False, height=200, elem_id=f"strip{i}",
                                            elem_classes=["pixelated"])
            outputs[f"png{i}"] = gr.DownloadButton("Download grid (PNG)", elem_id=f"download{i}",
                                                   interactive=False)


def build_app(demo: Demo, out_dir: Path, worker: TorchWorker | None = None) -> gr.Blocks:
    """The app's layout and wiring; ``launch`` it with :data:`CSS` and :data:`THEME`. Grid PNGs
    for download go under ``out_dir``. With a ``worker``, sampling runs on its thread (the one
    the models were loaded on)."""
    handlers = Handlers(demo, out_dir, worker=worker)
    outputs: dict[str, Any] = {}
    # Gradio keeps a copy of every image it sends; drop those older than an hour, hourly.
    with _Blocks(title="DDPM on CIFAR-10", analytics_enabled=False, delete_cache=(3600, 3600)) as blocks:
        gr.Markdown("## DDPM on CIFAR-10\nImage *i* is sampled from seed + *i*: the same seed gives the "
                    "same pictures whatever the number of images.")
        with gr.Row():
            inputs, go, stop = _controls(demo, outputs)
            _model_columns(demo, outputs)

        def on_click(request: gr.Request) -> str:
            return handlers.begin(request.session_hash or "")

        # The parameters' names are the values' names in the HTTP API, and in its messages.
        def on_generate(n: object, sampler: object, steps: object, spacing: object, eta: object,
                        variance: object, seed: object, request: gr.Request) -> Iterator[dict[Any, Any]]:
            try:
                for out in handlers.generate(n, sampler, steps, seed, request.session_hash or "",
                                             spacing, eta, variance):
                    yield {outputs[name]: _ui_value(name, value) for name, value in out.items()}
            except UserError as exc:
                _refused(exc)
                yield {outputs["status"]: "Ready."}
                # Gradio prints the traceback of whatever a handler raises unless told not to.
                raise gr.Error(str(exc), print_exception=False) from None
            except Exception as exc:
                traceback.print_exc()  # the whole story for the server's console
                yield {outputs["status"]: f"Failed: {type(exc).__name__}"}
                raise gr.Error(f"sampling failed: {exc}", print_exception=False) from None  # printed above

        def on_stop(request: gr.Request) -> None:
            handlers.stop(request.session_hash or "")

        # The first step runs at once (not queued), so that a Stop pressed while the request
        # waits for another session's to finish is not lost.
        # preprocess=False: the values reach Handlers.generate as sent, to be checked there. Gradio's
        # check of a dropdown's value printed a traceback per value not among the choices.
        go.click(on_click, outputs=outputs["status"], queue=False).then(
            on_generate, inputs=inputs, outputs=list(outputs.values()),
            concurrency_limit=1, show_progress="hidden", preprocess=False)
        stop.click(on_stop, queue=False)
    return blocks
