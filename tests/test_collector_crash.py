"""A training process killed with SIGKILL leaves a readable run behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow.parquet as pq
import pytest
from runlens_collect import format as fmt

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from runlens_collect import Collector

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    col = Collector(model, opt, run_dir=sys.argv[1], flush_steps=3, flush_seconds=0.05)
    while True:  # trains until killed
        loss = model(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        col.step(loss=loss)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_leaves_readable_segments(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(run_dir)])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if len(list((run_dir / fmt.LAYERS_DIR).glob(fmt.SEGMENT_GLOB))) >= 3:
                break
            assert proc.poll() is None, "training script died on its own"
            time.sleep(0.05)
        else:
            pytest.fail("no segments written in time")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    for table in (fmt.SCALARS_DIR, fmt.LAYERS_DIR):
        files = sorted((run_dir / table).glob(fmt.SEGMENT_GLOB))
        assert files
        for f in files:  # every completed segment is a valid Parquet file
            assert pq.read_table(f).num_rows > 0
    meta = json.loads((run_dir / fmt.RUN_JSON).read_text())
    assert meta["status"] == fmt.STATUS_RUNNING
    assert isinstance(meta["last_step"], int)
