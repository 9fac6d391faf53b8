"""`dvc plots show` draws the training curves with no network: the page DVC writes, with the repo's
.dvc/config and plots_template/, is opened in headless Chromium with every request but file://
blocked, and each vega chart must have drawn.

The DVC project is a tiny one made here, with the linear plots of the real dvc.yaml over small
TSVs written here, so nothing of the pipeline needs to have run.
"""

from __future__ import annotations

import configparser
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from browser import CHROMIUM_ARGS, chromium_executable, sync_playwright_api

playwright = sync_playwright_api()

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
TEMPLATE_DIR = "plots_template"

# Per vega chart, by the id of the div that DVC embeds it in (vega-embed replaces the div's
# content): its size and how many of its canvas pixels are inked (neither transparent nor
# near-white). An empty frame inks a few hundred pixels, axes, labels and the curve thousands.
CHARTS_JS = """ids => ids.map(id => {
    const div = document.getElementById(id);
    const el = div && div.querySelector('canvas, svg');
    if (!el) return {id, kind: null, width: 0, height: 0, inked: 0};
    const box = el.getBoundingClientRect();
    let inked = 0;
    if (el.tagName.toLowerCase() === 'canvas' && el.width > 0 && el.height > 0) {
        const px = el.getContext('2d').getImageData(0, 0, el.width, el.height).data;
        for (let i = 0; i < px.length; i += 4) {
            if (px[i + 3] > 0 && (px[i] < 230 || px[i + 1] < 230 || px[i + 2] < 230)) inked++;
        }
    } else if (el.tagName.toLowerCase() === 'svg') {
        inked = el.querySelectorAll('path, line, text').length;  // marks, not pixels
    }
    return {id, kind: el.tagName.toLowerCase(), width: box.width, height: box.height, inked};
})"""
MIN_INKED = 1000


def _linear_plots() -> list[dict]:
    """The real dvc.yaml's data plots ({title: {template, x, y: {file: field}}}): the loss and FID
    curves, and the FID bar charts."""
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    data = [p for p in plots if isinstance(p, dict) and next(iter(p.values())).get("template")]
    templates = [next(iter(p.values()))["template"] for p in data]
    assert templates.count("linear") >= 2 and "bar_horizontal" in templates, (
        f"expected the loss and FID curves and the FID bars in dvc.yaml's plots, got {plots}")
    return data


def _write_tsv(path: Path, x: str, ys: list[str], n: int = 12) -> None:
    """A data file with column ``x`` and every field in ``ys`` (several charts may read one file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name == "frontier.csv":  # the frontier template: a line per sampler curve
        rows = [f"{s},{s} (quadratic),{nfe},{30 / nfe + 5:.3f},{0.3 / nfe:.5f}"
                for s in ("ddim", "dpmpp_2m") for nfe in (5, 10, 20, 50)]
        path.write_text("\n".join(["sampler,curve,nfe,fid,kid", *rows]) + "\n")
        return
    if path.suffix == ".csv":  # a bar chart: y names the bars, x is the FID
        path.write_text(f"{ys[0]},{x}\nBigGAN (quoted),14.73\nours,48.2\nCTM (quoted),1.73\n")
        return
    value = [f"{2.0 * math.exp(-i / 4) + 0.05 * (i % 3):.4f}" for i in range(n)]
    rows = ["\t".join([x, *ys])] + ["\t".join([str(500 * (i + 1)), *[value[i]] * len(ys)]) for i in range(n)]
    path.write_text("\n".join(rows) + "\n")


def _run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _template_path(repo: Path) -> Path | None:
    config = configparser.ConfigParser()
    config.read(repo / ".dvc" / "config")
    if not config.has_option("plots", "html_template"):
        return None
    return (repo / ".dvc" / config.get("plots", "html_template")).resolve()


def test_repo_points_dvc_at_the_offline_template() -> None:
    # DVC takes a relative html_template relative to .dvc/ (dvc/commands/plots.py).
    assert _template_path(ROOT) == (ROOT / TEMPLATE_DIR / "index.html").resolve()
    page = (ROOT / TEMPLATE_DIR / "index.html").read_text(encoding="utf-8")
    # DVC fills the placeholders with str.replace; {scripts} would bring back DVC's CDN <script>s.
    assert page.count("{plot_divs}") == 1 and "{scripts}" not in page
    for name, version in (("vega", "5.20.2"), ("vega-lite", "5.2.0"), ("vega-embed", "6.18.2")):
        assert f"/*! {name} {version} (npm)" in page  # with its BSD-3-Clause license text
    assert page.count("Redistribution and use in source and binary forms") == 3


@pytest.fixture(scope="module")
def plots_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """index.html as `dvc plots show -o out` writes it in a tiny project with this repo's DVC setup."""
    repo = tmp_path_factory.mktemp("dvc-plots").resolve()
    _run(["git", "init", "-q"], repo)
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    template = _template_path(repo)
    if template is not None and template.is_relative_to(repo):
        # The template the config names, at the same place relative to the project.
        rel = template.relative_to(repo)
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, repo / rel)
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")  # the project's own templates
    linear = _linear_plots()
    fields: dict[str, tuple[str, list[str]]] = {}
    for plot in linear:
        props = next(iter(plot.values()))
        for path, field in props["y"].items():
            fields.setdefault(path, (props["x"], []))[1].append(field)
    for path, (x, ys) in fields.items():
        _write_tsv(repo / path, x, ys)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": linear}, sort_keys=False))
    _run([sys.executable, "-m", "dvc", "plots", "show", "-o", "out"], repo)
    return repo / "out" / "index.html"


def test_page_loads_no_script_from_the_network(plots_page: Path) -> None:
    html = plots_page.read_text(encoding="utf-8")
    remote = re.findall(r"<script[^>]*\bsrc\s*=\s*[\"']?(?:https?:)?//[^\"'\s>]*", html, flags=re.I)
    assert remote == [], f"the page loads scripts from the network: {remote}"


def test_every_chart_draws_offline(plots_page: Path) -> None:
    ids = re.findall(r"vegaEmbed\('#([^']+)'", plots_page.read_text(encoding="utf-8"))
    assert len(ids) == len(_linear_plots()), f"expected one vega chart per data plot, got {ids}"
    requests: list[str] = []
    blocked: list[str] = []
    errors: list[str] = []

    def route(r) -> None:
        if r.request.url.startswith("file:"):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort("internetdisconnected")

    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_executable(), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1300, "height": 900})
            context.set_offline(True)
            context.route("**/*", route)
            page = context.new_page()
            page.on("request", lambda req: requests.append(req.url))
            page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
            page.on("console",
                    lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
            page.goto(plots_page.as_uri())
            try:
                page.wait_for_function(
                    f"ids => ({CHARTS_JS})(ids)"
                    f".every(c => c.width > 0 && c.height > 0 && c.inked >= {MIN_INKED})",
                    arg=ids, timeout=30_000)
            except playwright.TimeoutError:
                pass  # the assertions below say what is missing
            charts = page.evaluate(CHARTS_JS, ids)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "plots-offline.png"), full_page=True)
        finally:
            browser.close()

    network = [u for u in requests if not u.startswith("file:")]
    drawn = [c for c in charts if c["width"] > 0 and c["height"] > 0 and c["inked"] >= MIN_INKED]
    summary = (f"{len(drawn)} of {len(ids)} vega chart(s) drawn; charts: {charts}; "
               f"network requests: {network}; blocked: {blocked}; errors: {errors}")
    print(summary)
    assert len(drawn) == len(ids), summary
    assert network == [] and blocked == [], summary
    assert errors == [], summary
