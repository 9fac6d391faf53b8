"""The interactive demo's engine, apart from its UI: models loaded once, requests checked, and
sampling reported as a stream of events (progress, then each model's result). No Gradio here.

Image i of a request with seed s is sampled from seed s + i, and the network always sees batches
of the same shape (:class:`~ddpm_cifar.diffusion.generate.FixedBatch`), so image i is the same pixels
whether 1 or 100 images are asked for. With two models, both sample from the same seeds.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from ..diffusion.generate import FixedBatch, frame_indices, to_uint8, use_bf16
from ..diffusion.process import GaussianDiffusion
from ..diffusion.samplers import run_sampler
from ..evaluation.plots import image_grid
from ..models import checkpoint
from ..models.networks import PUBLISHED, LoadedModel, load_pretrained
from ..runtime.config import USES_ETA, USES_VARIANCE, SamplerConfig
from ..runtime.errors import UserError

T = TypeVar("T")

MAX_IMAGES = 100
MAX_SEED = 2**31 - 1  # of any image's seed (seed + i); exact in a browser's float64 numbers
STRIP_FRAMES = 20
STRIP_ROW = 10  # frames per row of the strip: 20 frames of 32 px in one row are too small to see
PREVIEWS = 10  # about this many live previews of the grid while sampling
@dataclass(frozen=True)
class DemoModel:
    """A model loaded once at start-up, and the file or folder it came from."""

    path: Path
    loaded: LoadedModel

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.net

    @property
    def diffusion(self) -> GaussianDiffusion:
        return self.loaded.diffusion

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.loaded.shape

    @property
    def label(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        step = self.loaded.step
        origin = "published DDPM weights" if step == PUBLISHED else f"step {step:,}"
        return f"{self.path.name} · {origin} · {n / 1e6:.2f}M parameters"


def load_demo_model(path: str | Path, device: torch.device | str) -> DemoModel:
    """Load a checkpoint's EMA weights, or a diffusers-layout folder of the published DDPM CIFAR-10
    model (google/ddpm-cifar10-32); a missing, foreign or mismatched file is a one-line
    :class:`UserError`."""
    path = Path(path)
    if path.is_dir() or (not path.exists() and not path.suffix):  # a folder, or what names one
        loaded, _ = load_pretrained(path, device)
        return DemoModel(path, loaded)
    return DemoModel(path, checkpoint.load_model(path, device))


@dataclass(frozen=True)
class Request:
    n: int
    seed: int
    spec: SamplerConfig

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]


@dataclass(frozen=True)
class Progress:
    model: int  # index of the model sampling now
    step: int  # steps done by that model, 0..steps
    steps: int
    done: float  # fraction of the whole request done, 0..1
    elapsed: float  # seconds since the request started
    preview: np.ndarray | None  # uint8 grid of the current states, on some steps only

    @property
    def eta(self) -> float | None:
        return self.elapsed * (1 - self.done) / self.done if self.done > 0 else None


@dataclass(frozen=True)
class Result:
    model: int
    images: np.ndarray  # uint8 (N, H, W, C)
    strip: np.ndarray  # uint8 (F, H, W, C): image 0 from x_T (first) to x_0 (last)


def describe(spec: SamplerConfig) -> str:
    """The sampler settings in words, e.g. "ddpm with 1000 steps (uniform spacing, σ² = beta)".

    eta and the variance are named only for the sampler that reads them and only when not at their
    defaults: a setting the sampler ignores would suggest it changed the images."""
    details = [f"{spec.spacing} spacing"]
    if spec.name in USES_ETA and spec.eta != 0.0:
        details.append(f"η = {spec.eta:g}")
    if spec.name in USES_VARIANCE and spec.variance != "posterior":
        details.append(f"σ² = {spec.variance}")
    return f"{spec.name} with {spec.steps} steps ({', '.join(details)})"


def _whole(value: object, name: str, lo: int, hi: int) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"{name} is empty: give a whole number from {lo} to {hi}")
    if isinstance(value, bool):  # a JSON true through the API: a Real to Python, not a number to a user
        raise UserError(f"{name} must be a whole number from {lo} to {hi}, got {value!r}")
    try:
        number = float(value) if not isinstance(value, Real) else value
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a whole number from {lo} to {hi}, got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise UserError(f"{name} must be a whole number from {lo} to {hi}, got {value!r}")
    if not lo <= int(number) <= hi:
        raise UserError(f"{name} must be from {lo} to {hi}, got {int(number)}")
    return int(number)


class Demo:
    """Samples a request with every loaded model, from the same seeds."""

    def __init__(self, models: Sequence[DemoModel], *, device: torch.device | str, micro_batch: int,
                 precision: str = "auto"):
        if not models:
            raise ValueError("the demo needs at least one model")
        self.models = list(models)
        self.device = torch.device(device)
        self.micro_batch = micro_batch
        self.precision = precision  # for every request: ddpm_cifar.diffusion.generate.PRECISIONS

    @property
    def max_steps(self) -> int:
        """Steps are shared by all models, so at most the shortest chain."""
        return min(m.diffusion.num_timesteps for m in self.models)

    def check(self, n: object, sampler: object, steps: object, seed: object,
              spacing: object = "quadratic", eta: object = 0.0, variance: object = "posterior") -> Request:
        """Turn raw UI values into a :class:`Request`; bad values are a :class:`UserError`.

        The numbers arrive as floats or text: they are parsed here, then the sampler's settings
        (name, spacing, eta, DDPM's variance) are checked by :class:`SamplerConfig`."""
        n_images = _whole(n, "number of images", 1, MAX_IMAGES)
        if eta is None or (isinstance(eta, str) and not eta.strip()):
            raise UserError("DDIM eta is empty: give a number from 0 to 1")
        try:
            eta_value = float(eta)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise UserError(f"DDIM eta must be a number from 0 to 1, got {eta!r}") from None
        spec = SamplerConfig(sampler, _whole(steps, "steps", 1, self.max_steps), spacing,  # type: ignore[arg-type]
                             eta_value, variance)  # type: ignore[arg-type]
        first = _whole(seed, "seed", 0, MAX_SEED)
        if first + n_images - 1 > MAX_SEED:  # image i uses seed + i: the limit holds for each image
            raise UserError(f"seed {first} with {n_images} images uses seeds up to {first + n_images - 1}: "
                            f"seed + number of images - 1 must be at most {MAX_SEED}")
        return Request(n=n_images, seed=first, spec=spec)

    def _network(self, dm: DemoModel, bf16: bool) -> FixedBatch:
        def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # Grad mode and autocast are per thread, and a UI may resume this generator on another
            # thread between steps, so both are entered per call, not around the whole chain.
            with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16, enabled=bf16):
                return dm.model(x, t)

        return FixedBatch(call, self.micro_batch)

    def generate(self, req: Request) -> Iterator[Progress | Result]:
        """Sample ``req`` with each model in turn: a :class:`Progress` after every step, and a
        :class:`Result` when a model finishes. Stop iterating to cancel."""
        start = time.perf_counter()
        steps = req.spec.steps
        total = len(self.models) * steps
        preview_every = max(1, steps // PREVIEWS)
        frame_at = frame_indices(steps, STRIP_FRAMES)
        bf16 = use_bf16(self.precision, self.device)
        for m, dm in enumerate(self.models):
            frames: list[np.ndarray] = []
            x = None
            for s in run_sampler(self._network(dm, bf16), dm.diffusion, req.seeds, req.spec, shape=dm.shape,
                                 device=self.device):
                x = s.x
                if s.index in frame_at:
                    frames.append(to_uint8(s.x[:1])[0])
                if s.index == 0:
                    continue
                last = s.index == steps
                preview = image_grid(to_uint8(s.x)) if s.index % preview_every == 0 and not last else None
                yield Progress(m, s.index, steps, (m * steps + s.index) / total,
                               time.perf_counter() - start, preview)
            assert x is not None
            yield Result(m, to_uint8(x), np.stack(frames))

    def images(self, req: Request) -> list[np.ndarray]:
        """Every model's final images for ``req``, uint8 (N, H, W, C) each."""
        return [ev.images for ev in self.generate(req) if isinstance(ev, Result)]


def strip_image(result: Result) -> np.ndarray:
    """The denoising frames of image 0 in reading order, x_T first (top left)."""
    return image_grid(result.strip, nrow=min(STRIP_ROW, len(result.strip)))


class TorchWorker:
    """Runs all of a process's torch work on one long-lived thread.

    Every thread that calls torch's CPU kernels gets its own OpenMP thread team, and once two teams
    share the cores every parallel region pays to wake its threads: 4 images x 50 steps of the
    quick-run model took 2.1 s instead of 1.2 s on 2 cores after a second thread had used torch.
    A UI server calls its handlers on a pool of threads, so the app sends its torch work here.

    On shutdown (Ctrl-C, SIGTERM) nothing here may keep the process alive: a step of a real model on
    CPU takes seconds. So the thread is a daemon, which the interpreter does not wait for (a
    ThreadPoolExecutor's thread it does), and :meth:`close` releases at once whoever waits for items.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders submitting against closing
        self._closed = threading.Event()
        self._waiting: set[queue.Queue[tuple[str, Any]]] = set()  # the items of iterate() calls running
        self._thread = threading.Thread(target=self._run, name="torch", daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, raised there
                future.set_exception(exc)
            else:
                future.set_result(result)

    def _put(self, fn: Callable[[], T]) -> Future[T]:
        """Queue ``fn``; the caller holds the lock and has checked that the worker is open."""
        future: Future[T] = Future()
        self._jobs.put((future, fn))
        return future

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self._lock:
            if self._closed.is_set():
                raise RuntimeError("the torch worker is closed")
            future = self._put(lambda: fn(*args, **kwargs))
        return future.result()

    def close(self) -> None:
        """Stop whatever is iterating now (at its next item), drop the work not started, and end
        every :meth:`iterate` at once. The step in progress finishes on the thread unwaited for."""
        with self._lock:
            self._closed.set()
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job[0].cancel()
            self._jobs.put(None)  # the thread ends after the job it is in
            for items in self._waiting:
                items.put(("closed", None))

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end after :meth:`close`; whether it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def iterate(self, make: Callable[[], Iterator[T]]) -> Iterator[T]:
        """Run the iterator ``make()`` on the worker thread and yield its items here. Closing this
        generator stops the worker's iterator before its next item; closing the worker ends this
        generator at once, with no more items (:attr:`closed` tells why it ended)."""
        items: queue.Queue[tuple[str, Any]] = queue.Queue()  # unbounded: the worker never waits on the UI
        stop = threading.Event()

        def produce() -> None:
            it: Iterator[T] | None = None
            try:
                it = make()
                for item in it:
                    if stop.is_set() or self._closed.is_set():
                        break
                    items.put(("item", item))
                items.put(("end", None))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
                items.put(("error", exc))
            finally:
                if it is not None and hasattr(it, "close"):
                    it.close()

        with self._lock:
            if self._closed.is_set():
                return
            self._waiting.add(items)
            self._put(produce)
        try:
            while True:
                kind, value = items.get()
                if kind in ("end", "closed"):
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            stop.set()
            with self._lock:
                self._waiting.discard(items)
