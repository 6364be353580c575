"""A step's times: ``time/step``, ``time/data`` (waiting for the next batch) and
``time/compute``, measured without syncing the device.

``time/step`` is the host time between two ``step()`` calls. ``time/data`` must be the
time the *device* waited for data, which the host clock measures only where the device
runs in step with the host:

* CPU: the host time from the end of ``step()`` to the next training forward is exact;
* CUDA: the host runs ahead of the device, and host time after ``step()`` includes any
  wait for queued device work (an ``.item()`` on the loss), which is not waiting for
  data. Two CUDA events, one at the end of ``step()`` and one at the next forward's start,
  measure the device's idle gap between them: zero while the device is still busy with
  the previous step, the wait for the batch when it had to idle. The writer thread reads
  the gap once the events complete (``writer._device_times``);
* other devices (MPS, XPU...): host time, marked unreliable in run.json
  (``collector.data_time``), so the analyzer does not judge the input pipeline by it.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from runlens_collect import format as fmt
from runlens_collect.step import StepParts


def data_time_mode(device: torch.device) -> str:
    if device.type == "cpu":
        return fmt.DATA_TIME_HOST
    if device.type == "cuda":
        return fmt.DATA_TIME_DEVICE_EVENTS
    return fmt.DATA_TIME_UNRELIABLE


class StepTimer:
    """Timestamps of the current step (training thread)."""

    def __init__(self, device: torch.device, clock: Any = time.perf_counter) -> None:
        self._clock = clock
        self.mode = data_time_mode(device)
        self._events = self.mode == fmt.DATA_TIME_DEVICE_EVENTS
        self.prev_entry: float | None = None  # host time the previous step() began
        self.prev_exit = clock()  # ... and ended
        self.forward: float | None = None  # host time of this step's first training forward
        self._ev_end: Any = None  # device event at the previous step's end
        self._ev_forward: Any = None

    def forward_start(self) -> None:
        """The step's first training forward begins (later ones are ignored)."""
        if self.forward is not None:
            return
        self.forward = self._clock()
        if self._events and self._ev_end is not None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._ev_forward = ev

    def end(self, step: int, t_entry: float, parts: StepParts) -> tuple[Any, Any, float] | None:
        """Record the step's times into ``parts``; with device events, return what the
        writer needs to derive time/data and time/compute (``Package.timing``)."""
        if self.prev_entry is None:
            return None  # the first step has no previous end to measure from
        t_step = t_entry - self.prev_entry
        parts.host_scalar(step, fmt.TIME_STEP, t_step)
        if self._events:
            if self._ev_end is not None and self._ev_forward is not None:
                return self._ev_end, self._ev_forward, t_step
            t_data = math.nan  # no training forward this step
        else:
            t_data = self.forward - self.prev_exit if self.forward is not None else math.nan
        parts.host_scalar(step, fmt.TIME_DATA, t_data)
        parts.host_scalar(step, fmt.TIME_COMPUTE, t_step - t_data)
        return None

    def next_step(self, t_entry: float) -> None:
        """The step ended (``step()`` returns): start timing the next one."""
        self.prev_entry = t_entry
        self.forward = None
        self._ev_forward = None
        if self._events:
            try:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                self._ev_end = ev
            except Exception:
                self._ev_end = None
        self.prev_exit = self._clock()
