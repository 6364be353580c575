"""Regenerate docs/img/report.png, the README's picture of the HTML report.

    python docs/make_screenshot.py                 # records a small demo run first
    python docs/make_screenshot.py sample_runs/X   # or shows a recorded run

Needs headless Chromium + chromedriver (apt: chromium chromium-driver) and selenium; the
demo run needs torch. Renders with runlens.report.html, clicks the first finding so its
highlight shows, and saves a 1400-px-wide screenshot.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import runlens
from runlens.plotdata import build_plot_data
from runlens.report import html

OUT = Path(__file__).parent / "img" / "report.png"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--window-size=1400,1300",
    "--hide-scrollbars",
)


def record_demo(run_dir: Path) -> None:
    """A small MLP trained well for 400 steps, then the LR is raised 100x: it diverges."""
    import torch
    from runlens_collect import Collector
    from torch import nn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 16, generator=g)
    y = (x[:, :2] > 0).long() @ torch.tensor([1, 2])
    loss_fn = nn.CrossEntropyLoss()
    config = {"lr": 0.05, "momentum": 0.9, "num_classes": 4, "batch_size": 64}
    with Collector(model, opt, run_dir=run_dir, config=config, hist_every=10) as col:
        for step in range(600):
            if step == 400:
                for group in opt.param_groups:
                    group["lr"] = 5.0
            i = torch.randint(0, 2048, (64,), generator=g)
            loss = loss_fn(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss)
            if step % 20 == 0:
                with torch.no_grad():
                    col.log({"val/loss": loss_fn(model(x[:512]), y[:512]).item()})


def main(argv: list[str]) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    tmp = Path(tempfile.mkdtemp(prefix="runlens-shot-"))
    try:
        run_dir = Path(argv[0]) if argv else tmp / "demo_run"
        if not argv:
            record_demo(run_dir)
        run = runlens.load_run(run_dir)
        report = runlens.analyze(run)
        page = tmp / "report.html"
        page.write_text(html.render(report, build_plot_data(run, report)), encoding="utf-8")
        opts = webdriver.ChromeOptions()
        opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        for flag in (*FLAGS, f"--user-data-dir={tmp / 'profile'}"):
            opts.add_argument(flag)
        driver = webdriver.Chrome(
            service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"),
            options=opts,
        )
        try:
            driver.get(page.as_uri())
            WebDriverWait(driver, 30).until(
                lambda d: d.execute_script("return document.body.dataset.ready") == "1"
            )
            cards = driver.find_elements(By.CSS_SELECTOR, ".finding")
            if cards:
                cards[0].click()
            OUT.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(OUT))
        finally:
            driver.quit()
        print(f"wrote {OUT} ({len(report.findings)} findings shown)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
