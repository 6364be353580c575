"""The device-to-host path: a step's parts packed into one tensor laid out as its
``layout.StepLayout`` says, one non_blocking copy into a reused host buffer, one event the
writer waits on.

The host buffers form a ring of at most ``max_queue`` buffers and ``max_queue_bytes``
bytes; ``FreeSlots`` hands out the free ones (the writer gives each back once it has
copied the step out). When no buffer is free, or a larger one would exceed the byte
budget, the step's device statistics are dropped rather than training waiting.
"""

from __future__ import annotations

import queue
from collections.abc import Sequence
from typing import Any

import torch

from runlens_collect.layout import LayoutCache, LayoutError
from runlens_collect.stats import wire_dtype
from runlens_collect.step import DevScalars, Part
from runlens_collect.writer import FreeSlots, Package


class _NoEvent:
    """CPU stand-in for torch.cuda.Event: the copy was synchronous, nothing to wait for."""

    def synchronize(self) -> None:
        pass


class Transfer:
    """Host ring buffers (pinned when the device is CUDA) and the copies into them.

    A step's data travel in the device's wire dtype (float64, float32 where the device has
    none: ``stats.wire_dtype``). Sections computed on another device (a model split
    across devices) are moved to the collector's device first, without blocking: a few
    values per tensor, so the copy costs nothing next to the step."""

    def __init__(self, device: torch.device, max_queue: int, max_queue_bytes: int) -> None:
        self.device = device
        self.dtype = wire_dtype(device)
        self.itemsize = torch.empty((), dtype=self.dtype).element_size()
        self.max_queue_bytes = max_queue_bytes
        self.pin = torch.cuda.is_available() and device.type == "cuda"
        self.ring: list[torch.Tensor | None] = [None] * max_queue
        self.ring_bytes = 0  # allocated host buffer bytes (bounded by max_queue_bytes)
        self.free = FreeSlots(max_queue)  # shared with the writer, which frees slots
        self.layouts = LayoutCache()

    def send_step(self, pkg: Package, sections: list[Part], dev: DevScalars) -> bool:
        """Ship a step's sections and device scalars into ``pkg`` (layout, missing masks,
        scalar steps, host buffer, event, slot); False when it had to be dropped (no free
        host buffer within the budget). Raises LayoutError when the data disagree with
        their layout (a collector bug: the caller reports it and drops the step)."""
        data = [self._here(d) for _, d, _ in sections]
        # Floating scalars on this device are promoted exactly by the cat into a float64
        # wire (one op less per scalar); integers (a token count past 2**24) and other
        # devices go through _here.
        wide = self.dtype == torch.float64
        data += [
            t if wide and t.device == self.device and t.is_floating_point() else self._here(t)
            for _, _, t in dev
        ]
        if not data:
            return True  # host scalars only
        layout = self.layouts.get(
            tuple(sec for sec, _, _ in sections), tuple(name for _, name, _ in dev)
        )
        n = sum(int(d.numel()) for d in data)
        if n != layout.size:
            raise LayoutError(
                f"internal error: step {pkg.step} packs {n} values, its layout {layout.size}"
            )
        sent = self.send(data, n)
        if sent is None:
            return False
        pkg.host, pkg.event, pkg.slot = sent
        pkg.size, pkg.layout = n, layout
        pkg.missing = tuple(m for _, _, m in sections)
        pkg.scalar_steps = tuple(s for s, _, _ in dev)
        return True

    def _here(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the collector's device in the wire dtype (non_blocking when it moves)."""
        if t.device != self.device:
            return t.to(self.device, dtype=self.dtype, non_blocking=True)
        return t if t.dtype == self.dtype else t.to(self.dtype)

    def send(self, parts: Sequence[torch.Tensor], n: int) -> tuple[torch.Tensor, Any, int] | None:
        """Copy ``parts`` (device tensors of the wire dtype, ``n`` values) into a free host
        buffer without blocking: (buffer, event, slot), or None when no buffer is free
        within the byte budget (the caller drops the step)."""
        try:
            slot = self.free.get_nowait()
        except queue.Empty:
            return None
        buf = self.ring[slot]
        size = self.itemsize
        if buf is None or buf.numel() < n:
            old = 0 if buf is None else buf.numel() * size
            new = (int(n * 1.25) + 16) * size
            others = self.ring_bytes - old
            if others > 0 and others + new > self.max_queue_bytes:
                # Over the memory budget (one buffer is always allowed).
                self.free.put(slot)
                return None
        try:
            flat = torch.cat(parts) if len(parts) > 1 else parts[0]
            if buf is None or buf.numel() < n:
                old = 0 if buf is None else buf.numel() * size
                buf = torch.empty(int(n * 1.25) + 16, dtype=self.dtype, pin_memory=self.pin)
                self.ring[slot] = buf
                self.ring_bytes += buf.numel() * size - old
            buf[:n].copy_(flat, non_blocking=True)
            event = copy_event(self.device)
        except BaseException:
            self.free.put(slot)
            raise
        return buf, event, slot

    def release(self, slot: int) -> None:
        """Give back a buffer whose package never reached the writer."""
        self.free.put(slot)


def copy_event(device: torch.device) -> Any:
    """An event recorded after the copies queued so far on ``device`` (the writer waits
    on it before reading the host buffer): CUDA and MPS copy asynchronously; on CPU the
    copy is done."""
    if device.type == "cuda":
        event = torch.cuda.Event()
        event.record()
        return event
    if device.type == "mps":
        event = torch.mps.event.Event()
        event.record()
        return event
    return _NoEvent()
