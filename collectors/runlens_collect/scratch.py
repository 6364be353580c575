"""One reusable device buffer for the statistics' temporaries (signs, histogram codes)."""

from __future__ import annotations

import torch

SCRATCH_MAX_BYTES = 64 << 20
"""Largest activation/output whose statistics use the collector's reusable scratch."""


class Scratch:
    """A device buffer grown to the largest temporary asked for, up to SCRATCH_MAX_BYTES.

    On CPU a fresh multi-MB temporary per activation costs page faults; a caching GPU
    allocator would not, but the same buffer serves both. Users are sequential (one
    statistic at a time on the training thread), so one buffer is enough.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buf: torch.Tensor | None = None

    def like(self, like: torch.Tensor) -> torch.Tensor | None:
        """A buffer shaped like ``like`` (None beyond SCRATCH_MAX_BYTES: then the stats
        allocate their own temporary)."""
        nbytes = like.numel() * like.element_size()
        if nbytes > SCRATCH_MAX_BYTES or like.device != self.device:
            return None
        buf = self._buf
        if buf is None or buf.numel() < nbytes:
            buf = self._buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return buf[:nbytes].view(like.dtype).view(like.shape)

    def int32_like(self, like: torch.Tensor) -> torch.Tensor | None:
        """The scratch as int32 shaped like ``like`` (histogram codes), when it fits."""
        if like.dtype != torch.float32:
            return None  # converted first: a temporary anyway
        buf = self.like(like)
        return buf.view(torch.int32) if buf is not None else None
