"""Demo app latency: start-up, and time to the first grid of 4 images, as a person sees them.

Start-up is the wall time from spawning ``python -m ddpm_cifar.app`` to its page answering HTTP
200. Time-to-first-grid is measured in headless Chromium (Debian's ``/usr/bin/chromium``, driven by
Playwright) from the click on Generate to the finished grid image being loaded in the page, for
the first request a fresh app serves, then for a few more (warm).

Baselines measured in the same run, for the ratios:
- start-up: a bare Python process that imports the library and loads the same checkpoint;
- grid: ``generate_images`` in a fresh process on the same model, seeds, sampler and steps, timed
  the first time and once more warm.

    python benchmarks/app_latency.py --checkpoint models/ema.pt                # dpmpp_2m, 20 steps
    python benchmarks/app_latency.py --checkpoint models/ema.pt --sampler ddpm --steps 50
    python benchmarks/app_latency.py --checkpoint models/ema.pt --screenshot docs/figures/app.png
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
from playwright.sync_api import Page, sync_playwright

from ddpm_cifar.app.ui import DEFAULT_SAMPLER
from ddpm_cifar.diffusion.samplers import SAMPLERS

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOAD_ONLY = "import sys; from ddpm_cifar import checkpoint; checkpoint.load_model(sys.argv[1])"
# The library alone in a fresh process: load, then time the same request as the app's first and a
# second time warm (the app samples 8 images per network call on CPU, so batch_size=8).
DIRECT = """
import sys, time
from ddpm_cifar.models import checkpoint
from ddpm_cifar.runtime.config import SamplerConfig
from ddpm_cifar.diffusion.generate import generate_images
loaded = checkpoint.load_model(sys.argv[1])
model, diffusion = loaded.net, loaded.diffusion
seeds, sampler, steps = list(range(int(sys.argv[2]))), sys.argv[3], int(sys.argv[4])
# the app's default timestep spacing, quadratic
for _ in range(2):
    t0 = time.perf_counter()
    generate_images(model, diffusion, seeds, SamplerConfig(sampler, steps, "quadratic"), batch_size=8,
                    shape=loaded.shape, device="cpu", precision="fp32", progress=False)
    print(time.perf_counter() - t0)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(args: argparse.Namespace, port: int) -> tuple[subprocess.Popen, float]:
    """Spawn the app; return it and the seconds until its page answered."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ddpm_cifar.app", "--checkpoint", str(args.checkpoint),
                             "--port", str(port), "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    while True:
        if proc.poll() is not None:
            sys.exit(f"the app exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return proc, time.perf_counter() - t0
        except OSError:
            time.sleep(0.05)


def time_grid(page: Page, n: int, sampler: str, steps: int, seed: int) -> float:
    page.locator("#n-images input").fill(str(n))
    page.locator("#steps input").fill(str(steps))
    page.locator("#seed input").fill(str(seed))
    if sampler != DEFAULT_SAMPLER:  # the dropdown starts on the app's default
        page.locator("#sampler input").fill(sampler)
        page.keyboard.press("Enter")
    t0 = time.perf_counter()
    page.click("#generate")
    # This request's own "Done" line: the previous request's grid and status are still on the page.
    done = f"Done: {n} image(s) per model, seeds {seed}–"
    page.wait_for_function(
        f"document.querySelector('#status').innerText.startsWith('{done}')"
        " && document.querySelector('#grid0 img') && document.querySelector('#grid0 img').complete",
        timeout=600_000, polling=10)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("models/ema.pt"))
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--sampler", default="dpmpp_2m", choices=list(SAMPLERS), help="default: the fastest")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--starts", type=int, default=3, help="fresh app start-ups to time")
    ap.add_argument("--warm", type=int, default=3, help="requests timed after the first, per start-up")
    ap.add_argument("--screenshot", type=Path, help="also save a screenshot of a 36-image request here")
    args = ap.parse_args()

    load_s, start_s, first_s, warm_s, direct_first, direct_warm = [], [], [], [], [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        for i in range(args.starts):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", LOAD_ONLY, str(args.checkpoint)], check=True)
            load_s.append(time.perf_counter() - t0)
            proc, started = start_app(args, free_port())
            start_s.append(started)
            try:
                page = browser.new_page(viewport={"width": 1300, "height": 900})
                page.goto(f"http://127.0.0.1:{proc.args[proc.args.index('--port') + 1]}/")
                page.wait_for_selector("#generate")
                first_s.append(time_grid(page, args.n, args.sampler, args.steps, seed=0))
                for k in range(args.warm):
                    warm_s.append(time_grid(page, args.n, args.sampler, args.steps, seed=k + 1))
                if args.screenshot and i == args.starts - 1:
                    time_grid(page, 36, args.sampler, args.steps, seed=100)
                    page.wait_for_function("!document.querySelector('#download0').disabled")
                    page.screenshot(path=str(args.screenshot), full_page=True)
                    print(f"screenshot -> {args.screenshot}")
                page.close()
            finally:
                proc.terminate()
                proc.wait()
            cmd = [sys.executable, "-c", DIRECT, str(args.checkpoint), str(args.n), args.sampler,
                   str(args.steps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()
            direct_first.append(float(out[0]))
            direct_warm.append(float(out[1]))
        browser.close()

    med = statistics.median
    print(f"checkpoint {args.checkpoint}, {args.n} images, {args.sampler} with {args.steps} steps, CPU "
          f"({torch.get_num_threads()} threads); medians of {args.starts} start-ups")
    print(f"start-up (spawn -> page answers):       {med(start_s):6.2f} s   "
          f"[{', '.join(f'{v:.2f}' for v in start_s)}]")
    print(f"  baseline: process that loads the model {med(load_s):6.2f} s   "
          f"ratio {med(start_s) / med(load_s):.2f}")
    print(f"time to first grid (click -> image):    {med(first_s):6.2f} s   "
          f"[{', '.join(f'{v:.2f}' for v in first_s)}]")
    print(f"  later requests (warm):                {med(warm_s):6.2f} s")
    print(f"  baseline: generate_images, fresh process: first {med(direct_first):.2f} s, "
          f"warm {med(direct_warm):.2f} s")
    print(f"  ratio app/library: first {med(first_s) / med(direct_first):.2f}, "
          f"warm {med(warm_s) / med(direct_warm):.2f}")


if __name__ == "__main__":
    main()
