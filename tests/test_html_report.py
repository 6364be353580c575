"""The HTML report (and the Markdown PNG plots): built from a real recorded run, opened in
headless Chromium. Browser tests are skipped when chromium/chromedriver/selenium are absent
(CI installs them: see .ci/run)."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from runlens_collect import format as fmt

import runlens
from runlens import series as S
from runlens.cli import cli
from runlens.plotdata import build_plot_data, line_series
from runlens.report import html as H

HOSTILE = "</script><img src=x onerror=alert(1)>"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
BROWSER_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--window-size=1400,1800",
)


def _record(run_dir: Path) -> None:
    """300 steps of a tiny MLP: one layer named HOSTILE whose bias kills every ReLU unit
    after it (dead-relu), then the LR jumps to 1e4 at step 240 (divergence)."""
    torch = pytest.importorskip("torch")
    from runlens_collect import Collector
    from torch import nn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: extra threads only contend with other tests
    try:
        torch.manual_seed(0)
        model = nn.Sequential()
        model.add_module("fc1", nn.Linear(8, 16))
        model.add_module("act1", nn.ReLU())
        model.add_module(HOSTILE, nn.Linear(16, 16))
        model.add_module("act2", nn.ReLU())
        model.add_module("out", nn.Linear(16, 3))
        with torch.no_grad():
            model[2].bias.fill_(-30.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(512, 8, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        loss_fn = nn.CrossEntropyLoss()
        config = {"lr": 0.05, "num_classes": 3, "note": HOSTILE}
        with Collector(model, opt, run_dir=run_dir, config=config, hist_every=10) as col:
            for step in range(300):
                if step == 240:
                    for group in opt.param_groups:
                        group["lr"] = 1e4
                i = torch.randint(0, 512, (32,), generator=g)
                loss = loss_fn(model(x[i]), y[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
                col.step(loss=loss)
                if step % 10 == 0:
                    with torch.no_grad():
                        col.log({"val/loss": loss_fn(model(x[:128]), y[:128]).item()})
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("html") / "hostile_run"
    _record(run_dir)
    return run_dir


@pytest.fixture(scope="session")
def analyzed(recorded: Path) -> tuple[runlens.Run, runlens.Report, dict, str]:
    run = runlens.load_run(recorded)
    report = runlens.analyze(run)
    data = build_plot_data(run, report)
    return run, report, data, H.render(report, data)


@pytest.fixture(scope="session")
def long_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 100k-step run written in the run format directly (recording it would take minutes):
    a loss spike at 50_000, NaN losses from 90_000, and 12 layers every 10 steps."""
    root = tmp_path_factory.mktemp("long") / "long_run"
    root.mkdir()
    meta = fmt.new_run_json("long", "long_run", 0.0)
    meta["status"] = fmt.STATUS_FINISHED
    fmt.write_json_atomic(meta, root / fmt.RUN_JSON)
    n = 100_000
    rng = np.random.default_rng(0)
    steps = np.arange(n)
    loss = 2.0 * np.exp(-steps / 20_000) + 0.1 + 0.02 * rng.standard_normal(n)
    loss[50_000] = 40.0
    loss[90_000:] = np.nan
    cols: dict[str, list] = {"step": [], "wall_time": [], "name": [], "value": []}
    for name, values in (
        (fmt.TRAIN_LOSS, loss),
        (fmt.GRAD_NORM, 1 + rng.random(n)),
        (fmt.lr_name(0), np.full(n, 1e-3)),
        (fmt.TIME_DATA, np.full(n, 1e-3)),
        (fmt.TIME_COMPUTE, np.full(n, 1e-2)),
    ):
        cols["step"].append(steps)
        cols["wall_time"].append(steps * 0.01)
        cols["name"].append(np.full(n, name, dtype=object))
        cols["value"].append(values)
    table = pa.table({k: np.concatenate(v) for k, v in cols.items()})
    fmt.write_segment(table.cast(fmt.SCALARS_SCHEMA), fmt.segment_path(root, "scalars", 0, 0))
    ls = np.arange(0, n, 10)
    layers = [f"block{i}.weight" for i in range(12)]
    m = len(ls) * len(layers)
    rows = {c: pa.nulls(m, fmt.LAYERS_SCHEMA.field(c).type) for c in fmt.LAYERS_COLUMNS}
    rows["step"] = pa.array(np.repeat(ls, len(layers)))
    rows["layer"] = pa.array(np.tile(layers, len(ls))).dictionary_encode()
    rows["kind"] = pa.array(np.full(m, fmt.KIND_GRAD)).dictionary_encode()
    rows["numel"] = pa.array(np.full(m, 100))
    rows["missing"] = pa.array(np.zeros(m, dtype=bool))
    rows["norm"] = pa.array(rng.random(m).astype(np.float32) + 0.5)
    lt = pa.table(rows).cast(fmt.LAYERS_SCHEMA)
    fmt.write_segment(lt, fmt.segment_path(root, "layers", 0, 0))
    return root


# -- display data -------------------------------------------------------------------------


def test_plot_data_of_recorded_run(analyzed: tuple) -> None:
    _run, report, data, _ = analyzed
    assert {"train/loss", "val/loss", "grad_norm", "lr/0"} <= set(data["series"])
    assert data["series"]["train/loss"]["n"] == 300
    assert set(data["heatmaps"]) >= {"grad_norm", "update_ratio", "dead"}
    grad = data["heatmaps"]["grad_norm"]
    assert f"{HOSTILE}.weight" in grad["layers"]
    assert len(grad["z"]) == len(grad["layers"]) and len(grad["z"][0]) == len(grad["x"])
    assert data["hist"]["tensors"], "hist_every=10 recorded histograms"
    assert data["time"] is not None and len(data["time"]["data"]) == len(data["time"]["steps"])
    # One target per finding; dead-relu points at the ReLU after the hostile layer.
    assert len(data["findings"]) == len(report.findings)
    sigs = [f.signature for f in report.findings]
    assert "dead-relu" in sigs, sigs
    i = sigs.index("dead-relu")
    dead_rows = data["findings"][i]["rows"]["dead"]
    assert [data["heatmaps"]["dead"]["layers"][r] for r in dead_rows] == ["act2"]
    json.dumps(data, allow_nan=False)  # strict JSON: no NaN/Inf literals


def test_downsampling_keeps_spikes_and_nonfinite_points() -> None:
    n = 100_000
    x = np.linspace(1.0, 0.1, n)
    x[31_337] = 50.0
    x[77_000:77_010] = np.nan
    x[88_888] = np.inf
    s = line_series(np.arange(n), x, line_points=2000, ema_points=10_000)
    assert len(s["steps"]) <= 2002
    assert 31_337 in s["steps"] and max(v for v in s["values"] if v is not None) == 50.0
    nf = s["nonfinite"]
    assert nf["count"] == 11 and 77_000 in nf["steps"] and 88_888 in nf["steps"]
    assert nf["kinds"][nf["steps"].index(88_888)] == "inf"
    assert s["ema"]["bucket"] == 10 and len(s["ema"]["values"]) == 10_000
    # Bucket means never average a NaN away: the NaN buckets stay null.
    assert s["ema"]["values"][7_700] is None
    # Long runs of non-finite points are capped but keep the first point of each run.
    y = np.full(50_000, np.nan)
    y[:10] = 1.0
    capped = line_series(np.arange(50_000), y)["nonfinite"]
    assert capped["count"] == 49_990 and len(capped["steps"]) <= 500 and capped["steps"][0] == 10


def test_long_run_page_stays_light(long_run: Path) -> None:
    run = runlens.load_run(long_run)
    report = runlens.analyze(run)
    data = build_plot_data(run, report)
    page = H.render(report, data)
    assert len(page.encode()) < 4_000_000
    heat = data["heatmaps"]["grad_norm"]
    assert len(heat["x"]) <= 240 and heat["steps_per_bin"] == 42
    loss = data["series"]["train/loss"]
    assert 50_000 in loss["steps"]  # the spike survives downsampling
    assert loss["nonfinite"]["count"] == 10_000 and loss["nonfinite"]["steps"][0] == 90_000


# -- page source --------------------------------------------------------------------------


def test_json_for_script_escapes_everything_dangerous() -> None:
    obj = {"a": HOSTILE, "b": "<!-- & \u2028 \u2029 -->", HOSTILE: [1.5, None]}
    text = H.json_for_script(obj)
    assert not re.search("[<>&\u2028\u2029]", text)
    assert json.loads(text) == obj


def test_page_is_self_contained_and_escapes_run_strings(analyzed: tuple) -> None:
    _, _, _, page = analyzed
    lower = page.lower()
    # Exactly our three script elements; nothing loaded from anywhere.
    assert lower.count("<script") == 3
    assert re.findall(r"<script[^>]*>", lower) == [
        '<script type="application/json" id="runlens-data">',
        "<script>",
        "<script>",
    ]
    markup = re.sub(r"<script[^>]*>.*?</script>", "", lower, flags=re.S)
    assert not re.search(r"(src|href|url)\s*[=(]", markup)
    assert "<link" not in markup and "@import" not in markup
    assert "default-src 'none'" in page  # the CSP forbids any network access
    # The hostile name appears only JSON-escaped: no markup from the run reaches the page.
    assert HOSTILE not in page and "<img" not in lower
    assert "\\u003c/script\\u003e\\u003cimg src=x onerror=alert(1)\\u003e" in page
    assert H.asset(H.PLOTLY_ASSET)[:200] in page  # the vendored library is inlined


def test_vendored_library_ships_with_its_license() -> None:
    assets = Path(H.__file__).parents[1] / "assets"
    assert "MIT License" in (assets / H.PLOTLY_LICENSE).read_text()
    assert "plotly.js (cartesian - minified)" in H.asset(H.PLOTLY_ASSET)[:200]


# -- CLI ----------------------------------------------------------------------------------


def test_cli_html_and_markdown_plots(recorded: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "r.html"
    res = runner.invoke(cli, ["analyze", str(recorded), "--format", "html", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_text().startswith("<!DOCTYPE html>")
    md = tmp_path / "md" / "report.md"
    md.parent.mkdir()
    plots = tmp_path / "md" / "img"
    args = ["analyze", str(recorded), "--format", "markdown", "--plots", str(plots)]
    res = runner.invoke(cli, [*args, "-o", str(md)])
    assert res.exit_code == 0, res.output
    text = md.read_text()
    for name in ("loss.png", "grad_norm.png", "layers_grad_norm.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(<img/{name}>)" in text  # relative to the .md file
    res = runner.invoke(cli, ["analyze", str(recorded), "--format", "json", "--plots", "x"])
    assert res.exit_code == 2 and "runlens: error: --plots" in res.output


def test_cli_compare_html(recorded: Path, long_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.html"
    args = ["compare", str(recorded), str(long_run), "--format", "html", "-o", str(out)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    page = out.read_text()
    payload = json.loads(re.search(r'id="runlens-data">(.*?)</script>', page, re.S).group(1))
    assert payload["kind"] == "compare" and len(payload["runs"]) == 2
    assert {r["name"] for r in payload["runs"]} == {"hostile_run", "long_run"}


# -- in the browser -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(
            "chromium/chromedriver not installed (apt-get install chromium chromium-driver)"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in BROWSER_FLAGS:
        opts.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="runlens-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _open(driver, page: str, path: Path):
    from selenium.webdriver.support.ui import WebDriverWait

    path.write_text(page, encoding="utf-8")
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(path.as_uri())
    WebDriverWait(driver, 20).until(
        lambda d: d.execute_script("return document.body.dataset.ready") == "1"
    )
    return driver


def _errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _no_alert(driver) -> bool:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        driver.switch_to.alert  # noqa: B018 - raises when there is none
    except NoAlertPresentException:
        return True
    return False


def test_report_renders_in_browser(browser, analyzed: tuple, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    _, report, _data, page = analyzed
    d = _open(browser, page, tmp_path / "report.html")
    assert _errors(d) == []
    sizes = d.execute_script(
        "return [...document.querySelectorAll('.js-plotly-plot')]"
        ".map(p => [p.id, p.querySelectorAll('.main-svg').length, p.offsetWidth, p.offsetHeight])"
    )
    assert len(sizes) >= 6  # loss, lr, grad norm, step time, heatmap, histograms
    assert all(svgs > 0 and w > 100 and h > 100 for _, svgs, w, h in sizes), sizes
    assert d.execute_script("return document.querySelectorAll('.heatmaplayer image').length") > 0
    # Offline: the page fetched nothing.
    assert d.execute_script("return performance.getEntriesByType('resource').length") == 0
    # The hostile name is shown as text, never parsed as markup; no dialog fired.
    assert _no_alert(d)
    assert d.execute_script("return document.querySelectorAll('img').length") == 0
    options = [o.text for o in d.find_elements(By.CSS_SELECTOR, "#hist-tensor option")]
    assert any(HOSTILE in o for o in options), options
    ticks = d.execute_script(
        "return [...document.querySelectorAll('.ytick text')].map(t => t.textContent)"
    )
    assert f"{HOSTILE}.weight" in ticks
    cards = d.find_elements(By.CSS_SELECTOR, ".finding")
    assert len(cards) == len(report.findings)
    d.save_screenshot(str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_clicking_a_finding_highlights_steps_and_layers(browser, analyzed: tuple, tmp_path: Path):
    from selenium.webdriver.common.by import By

    _, report, data, page = analyzed
    d = _open(browser, page, tmp_path / "report.html")
    i = [f.signature for f in report.findings].index("dead-relu")
    f = report.findings[i]
    d.find_elements(By.CSS_SELECTOR, ".finding")[i].click()
    assert "selected" in d.find_elements(By.CSS_SELECTOR, ".finding")[i].get_attribute("class")
    bands = d.execute_script(
        "return [...document.querySelectorAll('.js-plotly-plot')].slice(0, 3)"
        ".map(p => (p.layout.shapes || []).map(s => [s.x0, s.x1]))"
    )
    for shapes in bands:  # loss, lr, grad norm: one band around the finding's steps
        assert len(shapes) == 1 and shapes[0][0] <= f.steps[0] and shapes[0][1] >= f.steps[1]
    # The heatmap switched to the dead fraction and outlines the finding's layer row.
    assert d.execute_script("return document.getElementById('heat-metric').value") == "dead"
    rows = d.execute_script(
        "const p = document.querySelectorAll('.js-plotly-plot')[4];"
        "return p.layout.shapes.filter(s => s.yref === 'y').map(s => (s.y0 + s.y1) / 2)"
    )
    assert rows == [data["heatmaps"]["dead"]["layers"].index("act2")]
    assert d.execute_script("return document.querySelectorAll('.shapelayer path').length") > 0
    d.save_screenshot(str(tmp_path / "selected.png"))
    # Clicking again clears the highlight.
    d.find_elements(By.CSS_SELECTOR, ".finding")[i].click()
    assert (
        d.execute_script(
            "return document.querySelectorAll('.js-plotly-plot')[0].layout.shapes.length"
        )
        == 0
    )
    assert _errors(d) == []


def test_smoothing_slider_matches_python_ema(browser, analyzed: tuple, tmp_path: Path) -> None:
    run, _, _data, page = analyzed
    d = _open(browser, page, tmp_path / "report.html")
    values = run.scalar("train/loss").values
    for w in (0.0, 0.6, 0.9, 0.999):
        js = d.execute_script(
            "return window.runlensEma(arguments[0], arguments[1])", list(values), w
        )
        np.testing.assert_allclose(js, S.ema_debiased(values, w), rtol=1e-12, atol=1e-12)
    # Moving the slider re-smooths the plotted curve with the same algorithm.
    d.execute_script(
        "const s = document.getElementById('smoothing'); s.value = '0.3';"
        "s.dispatchEvent(new Event('input'));"
    )
    plotted = d.execute_script(
        "const p = document.querySelectorAll('.js-plotly-plot')[0];"
        "return p.data.find(t => t.name === 'train/loss').y"
    )
    np.testing.assert_allclose(plotted, S.ema_debiased(values, 0.3), rtol=1e-12)
    assert _errors(d) == []


def test_long_run_renders_in_browser(browser, long_run: Path, tmp_path: Path) -> None:
    run = runlens.load_run(long_run)
    report = runlens.analyze(run)
    d = _open(browser, H.render(report, build_plot_data(run, report)), tmp_path / "long.html")
    assert _errors(d) == []
    markers = d.execute_script(
        "const p = document.querySelectorAll('.js-plotly-plot')[0];"
        "return p.data.filter(t => t.mode === 'markers').map(t => t.x.length)"
    )
    assert markers and markers[0] >= 1  # the NaN region is drawn as markers
