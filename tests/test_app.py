"""Tests for the demo app without a browser: the engine (ddpm_cifar.app.engine), the handlers and
the Blocks layout (ddpm_cifar.app.ui), and the command line (ddpm_cifar.app.serve)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import numpy as np
import pytest
import torch
from factories import free_port, save_tiny_checkpoint, tiny_model
from PIL import Image

from ddpm_cifar.app import engine, serve, ui
from ddpm_cifar.app.engine import MAX_IMAGES, Demo, DemoModel, Progress, Result, TorchWorker, load_demo_model
from ddpm_cifar.diffusion.generate import generate_images
from ddpm_cifar.evaluation.plots import image_grid
from ddpm_cifar.models import checkpoint
from ddpm_cifar.runtime.config import SamplerConfig
from ddpm_cifar.runtime.errors import UserError

MICRO_BATCH = 8  # the app's default on CPU
MAX_SEED = engine.MAX_SEED


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return (save_tiny_checkpoint(root / "a.pt", seed=0, step=11),
            save_tiny_checkpoint(root / "b.pt", seed=1, step=22))


def _demo(*paths: Path) -> Demo:
    return Demo([load_demo_model(p, "cpu") for p in paths], device="cpu", micro_batch=MICRO_BATCH)


@pytest.fixture(scope="module")
def demo(ckpts: tuple[Path, Path]) -> Demo:
    return _demo(ckpts[0])


def _images(demo: Demo, n: int, seed: int, steps: int = 4, sampler: str = "ddpm") -> np.ndarray:
    (images,) = demo.images(demo.check(n, sampler, steps, seed))
    return images


# -- same seeds, same pictures --------------------------------------------------------------------

def test_same_seed_gives_the_same_images(demo: Demo) -> None:
    first = _images(demo, 5, seed=42)
    assert first.shape == (5, 8, 8, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(_images(demo, 5, seed=42), first)
    other = _images(demo, 5, seed=43)
    # Image i uses seed + i, so seed 43 shifts the images by one, and gives one new image.
    np.testing.assert_array_equal(other[:4], first[1:])
    assert np.abs(other[4].astype(int) - first[0]).mean() > 5


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_image_i_does_not_depend_on_the_number_of_images(demo: Demo, sampler: str) -> None:
    """The study's problem: its pictures changed with the batch size. Here image i with seed s is
    the same pixels whether 1, 7 or 64 images are asked for."""
    many = _images(demo, 64, seed=1000, sampler=sampler)
    np.testing.assert_array_equal(_images(demo, 1, seed=1000, sampler=sampler)[0], many[0])
    np.testing.assert_array_equal(_images(demo, 7, seed=1000, sampler=sampler), many[:7])
    for i in (13, 40, 63):
        np.testing.assert_array_equal(_images(demo, 1, seed=1000 + i, sampler=sampler)[0], many[i],
                                      err_msg=f"image {i}")


def test_the_network_only_ever_sees_one_batch_shape(ckpts: tuple[Path, Path]) -> None:
    demo = _demo(ckpts[0])
    shapes: set[tuple[int, ...]] = set()
    net = demo.models[0].model
    hook = net.register_forward_pre_hook(lambda _m, args: shapes.add(tuple(args[0].shape)))
    try:
        for n in (1, 3, 9):
            _images(demo, n, seed=0, steps=2)
    finally:
        hook.remove()
    assert shapes == {(MICRO_BATCH, 3, 8, 8)}


def test_two_models_sample_from_the_same_seeds(ckpts: tuple[Path, Path]) -> None:
    pair = _demo(*ckpts)
    req = pair.check(4, "ddpm", 5, 7)
    results = [ev for ev in pair.generate(req) if isinstance(ev, Result)]
    assert [r.model for r in results] == [0, 1]
    a, b = results
    # Same starting noise x_T (frame 0 of the strip), different weights, so different pictures.
    np.testing.assert_array_equal(a.strip[0], b.strip[0])
    assert np.abs(a.images.astype(int) - b.images).mean() > 5
    # Each model's images are the ones it gives on its own.
    np.testing.assert_array_equal(a.images, _images(_demo(ckpts[0]), 4, seed=7, steps=5))
    np.testing.assert_array_equal(b.images, _images(_demo(ckpts[1]), 4, seed=7, steps=5))


def test_progress_events_and_the_denoising_strip(demo: Demo) -> None:
    events = list(demo.generate(demo.check(3, "ddpm", 10, 0)))
    progress = [ev for ev in events if isinstance(ev, Progress)]
    assert [p.step for p in progress] == list(range(1, 11))
    dones = [p.done for p in progress]
    assert dones == sorted(dones) and dones[-1] == 1.0 and progress[-1].eta == 0
    assert any(p.preview is not None for p in progress)
    preview = next(p.preview for p in progress if p.preview is not None)
    assert preview.shape == image_grid(np.zeros((3, 8, 8, 3), np.uint8)).shape
    (result,) = [ev for ev in events if isinstance(ev, Result)]
    assert isinstance(events[-1], Result)
    assert result.strip.shape == (11, 8, 8, 3)  # x_T plus 10 steps, fewer than 20 frames
    np.testing.assert_array_equal(result.strip[-1], result.images[0])
    long = [ev for ev in demo.generate(demo.check(1, "ddpm", 20, 0)) if isinstance(ev, Result)][0]
    assert long.strip.shape[0] == 20


def test_closing_the_demo_generator_stops_the_sampling(ckpts: tuple[Path, Path]) -> None:
    demo = _demo(ckpts[0])
    calls = 0

    def count(_m: Any, _args: Any) -> None:
        nonlocal calls
        calls += 1

    hook = demo.models[0].model.register_forward_pre_hook(count)
    try:
        gen = demo.generate(demo.check(16, "ddpm", 20, 0))
        for _ in range(3):
            next(gen)
        gen.close()
    finally:
        hook.remove()
    assert calls == 3 * 2  # three steps of two network calls (16 images, 8 per call), then nothing


class Gate:
    """A forward pre-hook that records calls and their threads, and from call ``hold_at`` on
    waits until ``release()``: a sampler held mid-chain, so that tests of Stop are deterministic."""

    def __init__(self) -> None:
        self.calls = 0
        self.threads: set[int] = set()
        self.hold_at: int | None = None
        self._open = threading.Event()
        self._open.set()
        self.waiting = threading.Event()  # set once a call waits at the gate

    def hold(self, at: int) -> None:
        self.hold_at = at
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def __call__(self, _module: Any, _args: Any) -> None:
        self.calls += 1
        self.threads.add(threading.get_ident())
        if self.hold_at is not None and self.calls >= self.hold_at:
            self.waiting.set()
            assert self._open.wait(30), "the test never released the gate"


@pytest.fixture
def gated(ckpts: tuple[Path, Path], tmp_path: Path) -> Iterator[tuple[ui.Handlers, TorchWorker, Gate]]:
    worker = TorchWorker()
    dm = worker.call(load_demo_model, ckpts[0], "cpu")
    gate = Gate()
    hook = dm.model.register_forward_pre_hook(gate)
    demo = Demo([dm], device="cpu", micro_batch=MICRO_BATCH)
    try:
        yield ui.Handlers(demo, tmp_path, worker=worker, update_every=0), worker, gate
    finally:
        gate.release()
        hook.remove()
        worker.close()


def test_sampling_runs_on_the_worker_thread_only(gated: tuple[ui.Handlers, TorchWorker, Gate]) -> None:
    handlers, _, gate = gated
    # Gradio resumes a handler on whichever of its pool threads is free: do the same.
    with ThreadPoolExecutor(4) as pool:
        gen = handlers.generate(3, "ddpm", 5, 0)
        outs = []
        while (out := pool.submit(next, gen, None).result()) is not None:
            outs.append(out)
    assert outs[-1]["status"].startswith("Done")
    assert len(gate.threads) == 1 and threading.get_ident() not in gate.threads
    np.testing.assert_array_equal(outs[-2]["grid0"],
                                  image_grid(_images(handlers.demo, 3, seed=0, steps=5)))


def test_stop_ends_the_request_and_the_worker(gated: tuple[ui.Handlers, TorchWorker, Gate]) -> None:
    handlers, worker, gate = gated
    gate.hold(at=5)  # 16 images are 2 calls a step: the sampler waits in its 3rd step
    handlers.begin("alice")
    gen = handlers.generate(16, "ddpm", 20, 0, session="alice")
    assert next(gen) == {"status": "Sampling…", "png0": None}  # the old download goes away
    assert "step 1/20" in next(gen)["status"]
    handlers.stop("bob")  # another session's Stop
    assert "step 2/20" in next(gen)["status"]
    handlers.stop("alice")
    gate.release()
    assert list(gen) == [{"status": "Stopped."}]
    worker.call(lambda: None)  # queued behind the sampling: returns once that has ended
    assert gate.calls <= 8  # the 3rd step, and at most one more before the worker saw the stop


def test_closing_the_handler_ends_the_worker(gated: tuple[ui.Handlers, TorchWorker, Gate]) -> None:
    handlers, worker, gate = gated  # the page went away: Gradio closes the handler
    gate.hold(at=5)
    gen = handlers.generate(16, "ddpm", 20, 0)
    next(gen)
    next(gen)
    gen.close()
    gate.release()
    worker.call(lambda: None)
    assert gate.calls <= 8


def test_stop_before_the_request_starts(gated: tuple[ui.Handlers, TorchWorker, Gate]) -> None:
    handlers, worker, gate = gated
    handlers.begin("s")  # clicked Generate; the request waits behind another session's
    handlers.stop("s")
    assert list(handlers.generate(16, "ddpm", 20, 0, session="s"))[-1] == {"status": "Stopped."}
    worker.call(lambda: None)
    assert gate.calls <= 4
    # A Stop with no request of that session pending does nothing to the next one.
    handlers.stop("s")
    assert list(handlers.generate(2, "ddpm", 3, 0, session="s"))[-1]["status"].startswith("Done")


def test_closing_the_worker_ends_a_running_request(gated: tuple[ui.Handlers, TorchWorker, Gate]) -> None:
    handlers, worker, gate = gated  # Ctrl-C on the server in the middle of a request
    gate.hold(at=5)
    gen = handlers.generate(16, "ddpm", 20, 0)
    next(gen)
    next(gen)
    assert gate.waiting.wait(30)  # the worker is inside its 3rd step
    worker.close()
    gate.release()
    list(gen)
    assert worker.join(30)
    assert gate.calls == 6  # the worker finished the step it was in, and no more


def test_closing_the_worker_releases_a_request_mid_step(gated: tuple[ui.Handlers, TorchWorker, Gate]) -> None:
    """On shutdown the request in progress ends at once, not after the step the worker is in (a step
    of a real model on CPU takes seconds): its Gradio thread would keep the process alive."""
    handlers, worker, gate = gated
    gate.hold(at=5)
    gen = handlers.generate(16, "ddpm", 20, 0)
    next(gen)
    next(gen)
    assert gate.waiting.wait(30)
    rest: list[dict[str, Any]] = []
    consumer = threading.Thread(target=lambda: rest.extend(gen), daemon=True)
    worker.close()
    consumer.start()
    consumer.join(2)  # the gate still holds the worker inside its step
    assert not consumer.is_alive(), "the request waited for the worker's step to end"
    assert rest[-1] == {"status": "Stopped: the server is shutting down."}


def test_the_torch_worker_does_not_keep_the_process_alive() -> None:
    worker = TorchWorker()
    try:
        thread = worker.call(threading.current_thread)
        assert thread is not threading.main_thread() and thread.daemon
    finally:
        worker.close()
    assert worker.join(5)
    with pytest.raises(RuntimeError, match="the torch worker is closed"):
        worker.call(lambda: None)


def test_torch_worker_passes_errors_on() -> None:
    def failing() -> Iterator[int]:
        yield 1
        raise UserError("boom")

    it = TorchWorker().iterate(failing)
    assert next(it) == 1
    with pytest.raises(UserError, match="boom"):
        next(it)


# -- bad values are refused with a message ---------------------------------------------------------

@pytest.mark.parametrize(("n", "sampler", "steps", "seed", "match"), [
    (0, "ddpm", 5, 0, r"number of images must be from 1 to 100, got 0"),
    (MAX_IMAGES + 1, "ddpm", 5, 0, r"number of images must be from 1 to 100"),
    (2.5, "ddpm", 5, 0, r"number of images must be a whole number"),
    (None, "ddpm", 5, 0, r"number of images is empty"),
    (float("nan"), "ddpm", 5, 0, r"number of images must be a whole number"),
    (2, "ddpm", 5, True, r"seed must be a whole number from 0 to 2147483647, got True"),
    (2, "ddpm", 0, 0, r"steps must be from 1 to 20, got 0"),
    (2, "ddpm", 21, 0, r"steps must be from 1 to 20"),
    (2, "ddpm", 5, -1, r"seed must be from 0 to 2147483647, got -1"),
    (2, "ddpm", 5, 2**31, r"seed must be from 0"),
    (2, "euler", 5, 0, r"sampler\.name must be one of ddpm, ddim, dpmpp_2m; got 'euler'"),
    # Image i uses seed + i: the limit holds for the last image's seed too.
    (4, "ddpm", 5, MAX_SEED, r"^seed 2147483647 with 4 images uses seeds up to 2147483650: seed \+ number of "
                             r"images - 1 must be at most 2147483647$"),
    (2, "ddpm", 5, MAX_SEED, r"^seed 2147483647 with 2 images uses seeds up to 2147483648:"),
])
def test_out_of_range_values_are_refused(demo: Demo, n: object, sampler: object, steps: object,
                                         seed: object, match: str) -> None:
    with pytest.raises(UserError, match=match):
        demo.check(n, sampler, steps, seed)


@pytest.mark.parametrize(("eta", "match"), [(-0.1, r"sampler\.eta must be in \[0, 1\], got -0\.1"),
                                             (1.5, r"\[0, 1\], got 1\.5"), (float("nan"), "got nan"),
                                             ("x", "must be a number"),
                                             (None, r"^DDIM eta is empty: give a number from 0 to 1$")])
def test_ddim_eta_out_of_range_is_refused(demo: Demo, eta: object, match: str) -> None:
    with pytest.raises(UserError, match=match):
        demo.check(2, "ddim", 5, 0, "uniform", eta)


def test_the_largest_seeds_are_accepted(demo: Demo) -> None:
    assert demo.check(4, "ddpm", 5, MAX_SEED - 3).seeds == [MAX_SEED - i for i in (3, 2, 1, 0)]
    assert demo.check(1, "ddpm", 5, MAX_SEED).seeds == [MAX_SEED]


def test_ddim_eta_reaches_the_sampler(demo: Demo) -> None:
    deterministic = demo.images(demo.check(3, "ddim", 10, 0, "uniform", 0.0))[0]
    noisy = demo.images(demo.check(3, "ddim", 10, 0, "uniform", 1.0))[0]
    assert np.abs(deterministic.astype(int) - noisy).mean() > 1


def test_a_request_is_a_checked_sampler_config(ckpts: tuple[Path, Path]) -> None:
    req = _demo(ckpts[0]).check(3, "ddim", 7, 0, "trailing", 0.25)
    assert req.spec == SamplerConfig("ddim", 7, "trailing", 0.25, clip_x0=True)
    req = _demo(ckpts[0]).check(3, "ddpm", 7, 0, "trailing", 0.0, "beta")
    assert req.spec == SamplerConfig("ddpm", 7, "trailing", 0.0, variance="beta")
    with pytest.raises(UserError, match="sampler.spacing must be one of uniform, trailing, quadratic; got"):
        _demo(ckpts[0]).check(3, "ddim", 7, 0, "log")


# -- DDPM's variance ----------------------------------------------------------------------------

def test_ddpm_variance_reaches_the_sampler(demo: Demo) -> None:
    """The dropdown's value is DDPM's sigma^2: beta gives other pictures than beta tilde, and the
    same ones as the sampling module given that spec directly (as the pipeline's sample stage is)."""
    default = demo.images(demo.check(5, "ddpm", 10, 3, "uniform", 0.0))[0]
    posterior = demo.images(demo.check(5, "ddpm", 10, 3, "uniform", 0.0, "posterior"))[0]
    beta = demo.images(demo.check(5, "ddpm", 10, 3, "uniform", 0.0, "beta"))[0]
    np.testing.assert_array_equal(default, posterior)
    assert np.abs(beta.astype(int) - posterior).mean() > 1
    dm = demo.models[0]
    for variance, images in (("posterior", posterior), ("beta", beta)):
        spec = SamplerConfig("ddpm", 10, "uniform", variance=variance)
        direct = generate_images(dm.model, dm.diffusion, [3, 4, 5, 6, 7], spec, batch_size=MICRO_BATCH,
                                 shape=dm.shape, device="cpu", progress=False)
        np.testing.assert_array_equal(images, direct, err_msg=variance)


@pytest.mark.parametrize(("sampler", "variance"), [("ddpm", "fixedlarge"), ("ddpm", ""), ("ddpm", None),
                                                   ("ddim", "beta tilde")])
def test_unknown_ddpm_variance_is_one_line(demo: Demo, sampler: str, variance: object) -> None:
    # Refused for every sampler, like a bad spacing: a typo should not pass because ddim ignores it.
    with pytest.raises(UserError) as info:
        demo.check(2, sampler, 5, 0, "uniform", 0.0, variance)
    assert str(info.value) == f"sampler.variance must be one of posterior, beta; got {variance!r}"


@pytest.mark.parametrize(("sampler", "eta"), [("ddim", 0.0), ("ddim", 1.0), ("dpmpp_2m", 0.0)])
def test_variance_changes_nothing_for_the_other_samplers(demo: Demo, sampler: str, eta: float) -> None:
    # DDIM with eta 1 is as noisy as DDPM, but its sigma is its own, not the variance setting.
    posterior = demo.images(demo.check(3, sampler, 10, 0, "uniform", eta, "posterior"))[0]
    beta = demo.images(demo.check(3, sampler, 10, 0, "uniform", eta, "beta"))[0]
    np.testing.assert_array_equal(posterior, beta)


def test_the_variance_is_reported_where_it_matters(demo: Demo, tmp_path: Path) -> None:
    assert engine.describe(SamplerConfig("ddpm", 1000, "uniform", variance="beta")) == \
        "ddpm with 1000 steps (uniform spacing, σ² = beta)"
    # Not at its default, nor for a sampler that ignores it: either would suggest it changed the images.
    assert engine.describe(SamplerConfig("ddpm", 20, "quadratic")) == "ddpm with 20 steps (quadratic spacing)"
    assert engine.describe(SamplerConfig("ddim", 20, "trailing", 0.5, variance="beta")) == \
        "ddim with 20 steps (trailing spacing, η = 0.5)"
    outs = list(ui.Handlers(demo, tmp_path).generate(2, "ddpm", 3, 0, variance="beta"))
    assert outs[-1]["status"] == ("Done: 2 image(s) per model, seeds 0–1, "
                                  "ddpm with 3 steps (quadratic spacing, σ² = beta).")


def test_whole_floats_from_the_ui_are_accepted(demo: Demo) -> None:
    req = demo.check(4.0, "ddpm", 5.0, "12")
    assert (req.n, req.spec.steps, req.seed) == (4, 5, 12) and req.seeds == [12, 13, 14, 15]


def test_handler_refuses_bad_values_with_a_gradio_message(ckpts: tuple[Path, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    blocks = ui.build_app(_demo(ckpts[0]), tmp_path)
    fn = next(d for d in blocks.fns.values() if d.name == "on_generate").fn
    request = SimpleNamespace(session_hash="s1")  # what Gradio passes as gr.Request
    with pytest.raises(gr.Error, match="number of images must be from 1 to 100, got 500") as info:
        list(fn(500, "ddpm", 5, "uniform", 0.0, "posterior", 0, request))
    # One line on the console, and none from Gradio: it prints a gr.Error's traceback unless told not to.
    assert capsys.readouterr().err == "refused request: number of images must be from 1 to 100, got 500\n"
    assert info.value.print_exception is False
    # The app is still usable afterwards.
    assert list(fn(2, "ddpm", 2, "uniform", 0.0, "posterior", 0, request))
    with pytest.raises(gr.Error, match="sampler.variance must be one of posterior, beta; got 'fixedlarge'"):
        list(fn(2, "ddpm", 2, "uniform", 0.0, "fixedlarge", 0, request))
    assert capsys.readouterr().err == ("refused request: sampler.variance must be one of posterior, beta; "
                                       "got 'fixedlarge'\n")


def test_a_refused_request_is_one_console_line_when_served(ckpts: tuple[Path, Path], tmp_path: Path,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    """Through Gradio's server and queue (in this process, no browser): the caller gets the message,
    the console one line, not a traceback."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    blocks = ui.build_app(_demo(ckpts[0]), tmp_path)
    blocks.queue().launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                          quiet=True)
    try:
        client = Client(blocks.local_url, verbose=False)
        capfd.readouterr()  # whatever start-up printed
        for _ in range(2):
            with pytest.raises(AppError, match="number of images must be from 1 to 100, got 500"):
                client.predict(500, "ddpm", 5, "uniform", 0.0, "posterior", 0, api_name="/on_generate")
        console = capfd.readouterr()
    finally:
        blocks.close()
    line = "refused request: number of images must be from 1 to 100, got 500"
    assert console.err.splitlines() == [line, line]
    assert "Traceback" not in console.out


def _call_api(url: str, data: list[Any]) -> tuple[str, Any]:
    """POST ``data`` to on_generate through Gradio's HTTP API, as any client may, and read the reply's
    event stream to its end: the last event's name and data."""
    body = json.dumps({"data": data}).encode()
    post = urllib.request.Request(f"{url}gradio_api/call/on_generate", body,
                                  {"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=30) as resp:
        event_id = json.load(resp)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/on_generate/{event_id}", timeout=60) as resp:
        lines = resp.read().decode().splitlines()
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    payloads = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    return events[-1], payloads[-1]


@pytest.fixture
def served(ckpts: tuple[Path, Path], tmp_path: Path) -> Iterator[str]:
    """The app served by Gradio in this process (no browser): its URL."""
    blocks = ui.build_app(_demo(ckpts[0]), tmp_path)
    blocks.queue().launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                          quiet=True)
    try:
        yield blocks.local_url
    finally:
        blocks.close()


GOOD = [2, "ddpm", 2, "uniform", 0.0, "posterior", 0]  # on_generate's values, in order


@pytest.mark.parametrize(("data", "message"), [
    (GOOD[:2], "missing inputs steps, spacing, eta, variance, seed: on_generate takes 7 values "
               "(n, sampler, steps, spacing, eta, variance, seed), got 2"),
    ([], "missing inputs n, sampler, steps, spacing, eta, variance, seed: on_generate takes 7 values "
         "(n, sampler, steps, spacing, eta, variance, seed), got 0"),
    (GOOD[:6], "missing input seed: on_generate takes 7 values (n, sampler, steps, spacing, eta, variance, "
               "seed), got 6"),
    ([None] * 7, "number of images is empty: give a whole number from 1 to 100"),
    (GOOD[:4] + [None] + GOOD[5:], "DDIM eta is empty: give a number from 0 to 1"),
])
def test_missing_inputs_through_the_api_are_named(served: str, capfd: pytest.CaptureFixture[str],
                                                  data: list[Any], message: str) -> None:
    """Too few values through the HTTP API: Gradio refused them with ``{"error": null}`` and a
    traceback on the console; the caller is told which inputs are missing, the console one line."""
    capfd.readouterr()
    assert _call_api(served, data) == ("error", {"error": message, "duration": 10, "visible": True,
                                                 "title": "Error"})
    assert capfd.readouterr().err.splitlines() == [f"refused request: {message}"]
    assert _call_api(served, GOOD)[0] == "complete"  # and the app still serves


@pytest.mark.parametrize(("index", "value", "message"), [
    (1, "euler", "sampler.name must be one of ddpm, ddim, dpmpp_2m; got 'euler'"),
    (1, 5, "sampler.name must be one of ddpm, ddim, dpmpp_2m; got 5"),
    (3, "log", "sampler.spacing must be one of uniform, trailing, quadratic; got 'log'"),
    (5, "fixedlarge", "sampler.variance must be one of posterior, beta; got 'fixedlarge'"),
])
def test_a_value_not_among_a_dropdowns_choices_is_one_console_line(
        served: str, capfd: pytest.CaptureFixture[str], index: int, value: object, message: str) -> None:
    """Gradio's own check of a dropdown's value printed a traceback per request sent through the API."""
    capfd.readouterr()
    data = [*GOOD[:index], value, *GOOD[index + 1:]]
    assert _call_api(served, data) == ("error", {"error": message, "duration": 10, "visible": True,
                                                 "title": "Error"})
    console = capfd.readouterr()
    assert console.err.splitlines() == [f"refused request: {message}"]
    assert "Traceback" not in console.out + console.err


# -- the handlers as the UI calls them -------------------------------------------------------------

def test_generate_handler_outputs(ckpts: tuple[Path, Path], tmp_path: Path) -> None:
    handlers = ui.Handlers(_demo(*ckpts), tmp_path, update_every=0)
    outs = list(handlers.generate(6, "ddpm", 5, 3))
    assert outs[0] == {"status": "Sampling…", "png0": None, "png1": None}
    assert all("status" in o for o in outs[1:6]) and "step 5/5" in outs[5]["status"]
    assert "<progress" in outs[1]["status"]
    final: dict[str, Any] = {}
    for o in outs:
        final.update(o)
    assert final["status"].startswith("Done: 6 image(s) per model, seeds 3–8")
    for i in (0, 1):
        grid = final[f"grid{i}"]
        assert grid.shape == (2 * 10 + 2, 3 * 10 + 2, 3)  # 6 images of 8 px: 3 per row, 2 px gaps
        png = Path(final[f"png{i}"])
        assert png.suffix == ".png" and png.is_relative_to(tmp_path)
        np.testing.assert_array_equal(np.asarray(Image.open(png)), grid)
        assert final[f"strip{i}"].shape == (1 * 10 + 2, 6 * 10 + 2, 3)  # x_T + 5 steps: one row of 6
    # The grid's first cell is image 0, the same one a single-image request gives.
    single = dict(kv for o in handlers.generate(1, "ddpm", 5, 3) for kv in o.items())
    np.testing.assert_array_equal(single["grid0"][2:10, 2:10], final["grid0"][2:10, 2:10])


def test_progress_updates_are_rate_limited(demo: Demo, tmp_path: Path) -> None:
    outs = list(ui.Handlers(demo, tmp_path, update_every=3600).generate(2, "ddpm", 10, 0))
    # The first step (an hour is not yet up), the last step, the result, and "Done".
    assert ["step 1/10" in o["status"] for o in outs[1:3]] == [True, False]
    assert "step 10/10" in outs[2]["status"]
    assert set(outs[3]) == {"grid0", "strip0", "png0"} and outs[4]["status"].startswith("Done")
    assert len(outs) == 5


def test_blocks_build_without_launching(ckpts: tuple[Path, Path], tmp_path: Path) -> None:
    blocks = ui.build_app(_demo(*ckpts), tmp_path)
    assert isinstance(blocks, gr.Blocks) and not blocks.is_running
    ids = {b.elem_id for b in blocks.blocks.values() if getattr(b, "elem_id", None)}
    assert {"n-images", "sampler", "steps", "spacing", "eta", "variance", "seed", "generate", "stop",
            "status"} <= ids
    assert {"grid0", "grid1", "strip0", "strip1", "download0", "download1"} <= ids
    deps = blocks.config["dependencies"]
    gen = next(d for d in deps if d["api_name"] == "on_generate")
    assert len(gen["inputs"]) == 7 and len(gen["outputs"]) == 7  # status + 3 per model
    stop = next(d for d in deps if d["api_name"] == "on_stop")
    assert stop["queue"] is False  # runs at once, beside the request it stops
    sampler = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "sampler")
    assert [c[0] for c in sampler.choices] == ["ddpm", "ddim", "dpmpp_2m"]
    # The inputs reach on_generate by position: the variance dropdown sits between eta and seed.
    by_id = {b._id: b.elem_id for b in blocks.blocks.values()}
    assert [by_id[i] for i in gen["inputs"]] == ["n-images", "sampler", "steps", "spacing", "eta", "variance",
                                                  "seed"]
    variance = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "variance")
    assert [c[1] for c in variance.choices] == ["posterior", "beta"] and variance.value == "posterior"


# -- start-up --------------------------------------------------------------------------------------

@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record what main() would launch, without serving."""
    calls: list[dict[str, Any]] = []

    def fake_launch(self: gr.Blocks, **kwargs: Any) -> None:
        calls.append({"blocks": self, **kwargs})

    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    return calls


def test_binds_localhost_without_a_share_link_by_default(ckpts: tuple[Path, Path],
                                                         launched: list[dict[str, Any]]) -> None:
    serve.main(["--checkpoint", str(ckpts[0])])
    (call,) = launched
    assert call["server_name"] == "127.0.0.1" and call["server_port"] == 7860 and call["share"] is False
    serve.main(["--checkpoint", str(ckpts[0]), "--host", "0.0.0.0", "--port", "9001", "--share"])
    second = launched[1]
    assert (second["server_name"], second["server_port"], second["share"]) == ("0.0.0.0", 9001, True)


def test_models_load_once_from_their_own_config(ckpts: tuple[Path, Path], launched: list[dict[str, Any]],
                                                monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A params.yaml describing another network, in the working directory: it must be ignored.
    (tmp_path / "params.yaml").write_text("model:\n  dim: 128\n  dim_mults: [1, 2, 2, 2]\n")
    monkeypatch.chdir(tmp_path)
    loads = 0
    real_load = torch.load

    def counting_load(*args: Any, **kwargs: Any) -> Any:
        nonlocal loads
        loads += 1
        assert kwargs.get("weights_only") is True
        return real_load(*args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "load", counting_load)
    built: list[Demo] = []
    real_build = serve.build_app
    monkeypatch.setattr(serve, "build_app",
                        lambda demo, *a, **kw: built.append(demo) or real_build(demo, *a, **kw))
    serve.main(["--checkpoint", str(ckpts[0]), "--compare", str(ckpts[1])])
    assert loads == 2
    (demo,) = built
    assert [m.loaded.config for m in demo.models] == [tiny_model(), tiny_model()]
    assert [m.loaded.step for m in demo.models] == [11, 22]
    demo.images(demo.check(2, "ddpm", 2, 0))
    demo.images(demo.check(3, "ddpm", 2, 5))
    assert loads == 2  # sampling never reloads


def _start_app(ckpt: Path, tmp_path: Path, **env: str) -> tuple[subprocess.Popen[str], str]:
    """``python -m ddpm_cifar.app`` on ``ckpt``, its temporary files under ``tmp_path``: the process
    and its URL, once it serves."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ddpm_cifar.app", "--checkpoint", str(ckpt),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "TMPDIR": str(tmp_path), **env})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the app did not serve on {url}: {proc.communicate()[0]}")


def _terminate(proc: subprocess.Popen[str]) -> tuple[float, str]:
    """SIGTERM, as a service manager or ``docker stop`` sends: seconds until the process ended (at
    most 2, else the test fails), and what it printed."""
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running 2 s after SIGTERM: {proc.communicate()[0]}")
    return time.monotonic() - start, proc.communicate()[0]


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # T = 1000: a request of 100 images and 1000 DDPM steps lasts a minute, far longer than the test.
    return save_tiny_checkpoint(tmp_path_factory.mktemp("long") / "long.pt", diffusion={"timesteps": 1000})


def test_sigterm_ends_an_idle_app_cleanly(long_ckpt: Path, tmp_path: Path) -> None:
    proc, _ = _start_app(long_ckpt, tmp_path)
    _, output = _terminate(proc)
    # Ended by the app, not killed by the signal: its temporary folder of downloads is removed.
    assert proc.returncode == 0, output
    assert not list(tmp_path.glob("ddpm-cifar-app-*"))
    assert "Traceback" not in output


def test_sigterm_ends_the_app_within_2_s_while_it_generates(long_ckpt: Path, tmp_path: Path) -> None:
    """Also with GRADIO_SSR_MODE=true in the environment: Gradio's own SIGTERM handler then
    waited for the request in progress (6 s here)."""
    from gradio_client import Client

    proc, url = _start_app(long_ckpt, tmp_path, GRADIO_SSR_MODE="true")
    try:
        job = Client(url, verbose=False).submit(100, "ddpm", 1000, "uniform", 0.0, "posterior", 0,
                                                api_name="/on_generate")
        deadline = time.monotonic() + 60
        while not job.outputs() and time.monotonic() < deadline:  # until the first progress update
            time.sleep(0.05)
        assert job.outputs() and not job.done()
        _, output = _terminate(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert not list(tmp_path.glob("ddpm-cifar-app-*"))
    assert "Traceback" not in output


def _foreign_state_dict(path: Path) -> Path:
    torch.save({"model": {"w": torch.zeros(2)}, "step": 3}, path)  # e.g. another project's checkpoint
    return path


def _mismatched(path: Path, ckpts: tuple[Path, Path]) -> Path:
    ckpt = checkpoint.load(ckpts[0])
    ckpt["model_config"] = {**ckpt["model_config"], "dim": 32}  # config of another architecture
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize(("make", "match"), [
    (lambda p, c: p, r"not found"),
    (lambda p, c: (p.write_bytes(b"not a checkpoint at all"), p)[1], r"is not a readable checkpoint"),
    (lambda p, c: _foreign_state_dict(p), r"is not a ddpm_cifar\.checkpoint/2 checkpoint"),
    (_mismatched, r"weights do not fit the stored model config"),
])
def test_bad_checkpoints_are_one_message_at_start_up(ckpts: tuple[Path, Path], tmp_path: Path,
                                                      launched: list[dict[str, Any]], make: Any,
                                                      match: str) -> None:
    bad = make(tmp_path / "bad.pt", ckpts)
    with pytest.raises(UserError, match=match):
        serve.main(["--checkpoint", str(ckpts[0]), "--compare", str(bad)])
    assert not launched


def test_unknown_device_is_one_message(ckpts: tuple[Path, Path], launched: list[dict[str, Any]]) -> None:
    with pytest.raises(UserError, match="--device must be cpu, cuda or cuda:N, got 'gpu'"):
        serve.main(["--checkpoint", str(ckpts[0]), "--device", "gpu"])
    assert not launched


def test_command_line_error_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ddpm_cifar.app", "--checkpoint", str(tmp_path / "nope.pt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: checkpoint {tmp_path / 'nope.pt'} not found"
    assert "Traceback" not in proc.stderr + proc.stdout


def test_demo_model_label(ckpts: tuple[Path, Path]) -> None:
    dm = load_demo_model(ckpts[1], "cpu")
    assert isinstance(dm, DemoModel) and dm.shape == (3, 8, 8)
    assert dm.label.startswith("b.pt · step 22 · 0.")
