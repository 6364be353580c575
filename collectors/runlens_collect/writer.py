"""The writer thread: waits on each step's copy event, decodes it, writes Parquet segments.

Everything that touches the host copy of the statistics, derives the published columns
from raw sums, or does I/O runs here, never on the training thread. A failure here is
reported once and the thread keeps going: segments already written stay valid.
"""

from __future__ import annotations

import collections
import io
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

# Imported now, not lazily by the first flush: an import during interpreter shutdown (e.g.
# after Ctrl-C) fails and turns the exit code 130 into 1.
import pyarrow.compute
import pyarrow.parquet

from runlens_collect import format as fmt
from runlens_collect.layout import LayoutError, Section, StepLayout
from runlens_collect.rolling import Roller, RollStats
from runlens_collect.stats import NBINS, NRAW, NSINGLE, single_to_raw

_HIST_TYPE = pa.list_(pa.int64())
_FLOAT_COLS = (
    *fmt.BASE_STATS,
    "update_ratio",
    "frac_dead_units",
    "frac_saturated",
    "min",
    "max",
    "row_sum_mean",
)
_NONFINITE_EXEMPT = (fmt.LR_PREFIX, "time/")
BATCH = 64
"""Packages decoded together (one set of numpy ops per kind for all of them): the writer
copies each package out of its host buffer as it wakes, but decodes only once this many
wait, or at a flush. Decoding step by step costs ~50x the Python time, and Python time
here holds the GIL the training thread needs between its ops."""
WAKE_QUEUED = 16
"""Packages queued before the training thread wakes the writer (else it polls; at most a
quarter of the ring): the ring of host buffers is freed in bursts rather than with a
thread switch every step."""
POLL_SECONDS = 0.5
"""The writer's polling interval when fewer than WAKE_QUEUED packages arrive."""
MAX_PENDING_ROWS = 100_000
"""Also flush when this many layer rows wait (bounds host memory: with histograms a row
is ~600 bytes, so ~60 MB), whatever flush_steps says."""


@dataclass
class Package:
    """One step's worth of statistics on its way to disk.

    The host buffer holds ``size`` float64 values laid out as ``layout`` says (None: no
    device data this step); ``missing`` (one mask or None per section) and
    ``scalar_steps`` (the step of each device scalar) are what varies beside it.
    """

    step: int
    wall_time: float
    layout: StepLayout | None = None
    missing: tuple[np.ndarray | None, ...] = ()
    scalar_steps: tuple[int, ...] = ()
    host_scalars: list[tuple[int, str, float]] = field(default_factory=list)
    extern: list[tuple[int, Any, Any]] = field(default_factory=list)  # step.ExternScalars
    host: Any = None  # host buffer (torch tensor) holding `size` values (wire dtype)
    size: int = 0
    event: Any = None
    slot: int | None = None
    timing: tuple[Any, Any, float] | None = None
    """(event at the previous step's end, event at this step's first forward, host step
    time): time/data is the device's idle gap between them (timing.StepTimer)."""


class FreeSlots:
    """Indices of free host buffers, handed out most recently freed first.

    LIFO keeps the ring's working set to the few buffers actually in flight: a FIFO cycles
    through every buffer, so each one in turn grows to the largest package (a histogram
    step's), and the ring hits ``max_queue_bytes`` and drops steps it had no need to drop.
    ``deque.append``/``pop`` are atomic, so the two threads need no lock (and a Ctrl-C
    cannot leave one held).
    """

    def __init__(self, slots: int) -> None:
        self._d: collections.deque[int] = collections.deque(range(slots - 1, -1, -1))

    def put(self, slot: int) -> None:
        self._d.append(slot)

    def get_nowait(self) -> int:
        try:
            return self._d.pop()
        except IndexError:
            raise queue.Empty from None


class BoundedQueue:
    """The FIFO from the training thread to the writer, bounded by a count.

    Built on the C ``queue.SimpleQueue``, whose ``put`` is reentrant: a KeyboardInterrupt
    landing inside it cannot leave a lock held or a waiter lost. ``queue.Queue`` is built on
    Python Conditions, where it can (CPython gh-92530): under load, a Ctrl-C arriving in
    ``put_nowait`` left the writer asleep and the interrupted script never flushed.
    """

    def __init__(self, maxsize: int, wake_at: int = WAKE_QUEUED) -> None:
        self.maxsize = maxsize
        self.wake_at = max(1, wake_at)
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Only a hint: the consumer also polls, so a lost wake-up costs latency, never data.
        self.wake = threading.Event()

    def qsize(self) -> int:
        return self._q.qsize()

    def full(self) -> bool:
        return self._q.qsize() >= self.maxsize

    def put_nowait(self, item: Any) -> None:
        # Only the training thread puts, so the check and the put cannot race each other.
        if self.full():
            raise queue.Full
        self._q.put(item)
        if self._q.qsize() >= self.wake_at:
            self.wake.set()

    def put(self, item: Any, timeout: float | None = None) -> None:
        """Unbounded put, for the shutdown sentinel (it must always get through)."""
        self._q.put(item)
        self.wake.set()

    def wait(self, timeout: float) -> None:
        """Sleep until woken or ``timeout`` seconds have passed."""
        if self.wake.wait(timeout):
            self.wake.clear()

    def get(self, timeout: float | None = None) -> Any:
        return self._q.get(timeout=timeout)

    def get_nowait(self) -> Any:
        return self._q.get_nowait()


class Writer(threading.Thread):
    """Consumes Packages from a bounded queue; flushes by steps, by seconds and on close."""

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        layer_names: list[str],
        *,
        flush_steps: int,
        flush_seconds: float,
        max_queue: int,
        free_slots: FreeSlots,
        on_flush: Callable[[int], None],
        report: Callable[[str, str, BaseException | None], None],
        write_events: bool,
        rolling: bool = True,
    ) -> None:
        super().__init__(name="runlens-writer", daemon=True)
        self.run_dir = run_dir
        self.rank = rank
        self.layer_names = layer_names  # grows on the training thread; append-only
        self.flush_steps = max(1, int(flush_steps))
        self.flush_seconds = float(flush_seconds)
        # Woken early while most of the ring of max_queue host buffers is still free.
        wake_at = max(1, min(WAKE_QUEUED, max_queue // 4))
        self.queue = BoundedQueue(maxsize=max(1, 2 * max_queue), wake_at=wake_at)
        # Steps copied out of the host ring but not yet decoded: at most this many.
        self.batch_cap = max(1, min(BATCH, max_queue))
        self.free_slots = free_slots
        self.on_flush = on_flush
        self.report = report
        self.write_events = write_events
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)
        self.skipped: collections.deque[int] = collections.deque(maxlen=100_000)
        self.skipped_total = 0
        # Continue after segments already there (another collector on the same run_dir):
        # never overwrite recorded data.
        self._seq = {t: _next_seq(run_dir, t, rank) for t in (fmt.SCALARS_DIR, fmt.LAYERS_DIR)}
        self.first_seq = dict(self._seq)
        """This writer's first segment number per table (it compacts from there on)."""
        self._batch: list[tuple[Package, np.ndarray | None]] = []
        self._scalar_ids: dict[str, int] = {}
        self._scalar_names: list[str] = []
        self._kind_ids = {k: i for i, k in enumerate(fmt.KINDS)}
        self._seen_nonfinite: set[str] = set()
        self._reset_pending()
        self.last_step: int | None = None
        self.flush_requested = threading.Event()
        self._last_flush = time.monotonic()
        self.roll_stats = RollStats()
        self._stopping = False
        self.done_step: int | None = None
        """The last step written, its segments' merges done (last_step: written)."""
        # Merges this writer's segments after each flush (rolling.Roller, its own thread):
        # a run that is still recording, or crashed, has few segments however often it
        # flushed.
        self._roller = (
            Roller(run_dir, rank, self.first_seq, self.roll_stats, report, self._done)
            if rolling
            else None
        )

    @property
    def rolling(self) -> bool:
        """Whether segments are merged as the run records (off after a failed merge)."""
        return self._roller is not None and self._roller.enabled

    def _done(self, step: int) -> None:
        self.done_step = step

    def first_segments(self) -> dict[str, int]:
        """The number of the next segment of each table (before the first flush: the first
        this writer writes)."""
        return dict(self._seq)

    # -- pending rows -------------------------------------------------------------------

    def _reset_pending(self) -> None:
        self._sc: dict[str, list[np.ndarray]] = {"step": [], "wall": [], "name": [], "value": []}
        self._ly: dict[str, list[np.ndarray]] = collections.defaultdict(list)
        self._ly_hist: list[tuple[int, np.ndarray | None]] = []
        self._pending_steps = 0
        self._pending_rows = 0
        self._pending_max_step: int | None = None

    def _add_scalars(self, steps: Any, walls: Any, names: list[str], values: Any) -> None:
        """Append scalar rows; steps/walls/values are sequences (or arrays) like names."""
        if not names:
            return
        ids = []
        for n in names:
            i = self._scalar_ids.get(n)
            if i is None:
                i = self._scalar_ids[n] = len(self._scalar_names)
                self._scalar_names.append(n)
            ids.append(i)
        vals = np.asarray(values, dtype=np.float64)
        self._sc["step"].append(np.asarray(steps, dtype=np.int64))
        self._sc["wall"].append(np.asarray(walls, dtype=np.float64))
        self._sc["name"].append(np.asarray(ids, dtype=np.int32))
        self._sc["value"].append(vals)
        if "scalar" not in self._seen_nonfinite and not np.isfinite(vals).all():
            for s, n, v in zip(steps, names, vals, strict=True):
                if not np.isfinite(v) and not n.startswith(_NONFINITE_EXEMPT):
                    self._seen_nonfinite.add("scalar")
                    self.event("nonfinite", step=int(s), where="scalar", name=n)
                    break

    def _decode_batch(self, batch: list[tuple[Package, np.ndarray | None]]) -> None:
        """Decode packages: scalars in one append; consecutive packages with the same
        layout (the usual case: every step records the same layers) are stacked and
        derived with one set of numpy ops. A package that disagrees with its layout is
        reported (through the collector's one warning) and its device data dropped."""
        steps: list[int] = []
        walls: list[float] = []
        names: list[str] = []
        values: list[float] = []
        group: list[tuple[Package, np.ndarray]] = []
        key: tuple[Section, ...] | None = None
        for pkg, arr in batch:
            try:
                for step, name, value in pkg.host_scalars:
                    steps.append(step)
                    names.append(name)
                    values.append(value)
                    walls.append(pkg.wall_time)
                for step, name, t in pkg.extern:
                    if isinstance(name, tuple):  # one value per name (own_scalars)
                        steps.extend([step] * len(name))
                        names.extend(name)
                        values.extend(t.reshape(-1).tolist())
                        walls.extend([pkg.wall_time] * len(name))
                        continue
                    steps.append(step)
                    names.append(name)
                    values.append(float(t))
                    walls.append(pkg.wall_time)
                if arr is not None:
                    layout = pkg.layout
                    if layout is None:
                        raise LayoutError("internal error: device data without a layout")
                    layout.check(pkg.size, pkg.missing, pkg.scalar_steps)
                    if len(arr) < layout.size:
                        raise LayoutError(
                            f"internal error: {len(arr)} values copied, layout {layout.size}"
                        )
                    scalars = arr[layout.scalar_offset : layout.size]
                    for s, name, v in zip(pkg.scalar_steps, layout.scalars, scalars, strict=True):
                        steps.append(s)
                        names.append(name)
                        values.append(float(v))
                        walls.append(pkg.wall_time)
                    # Steps with the same sections (the usual case: every step records
                    # the same layers; sections are built once, so this compares identities)
                    # are decoded together, whatever their device scalars.
                    if layout.sections != key and group:
                        self._decode_group(group)
                        group = []
                    key = layout.sections
                    group.append((pkg, arr))
            except Exception as exc:
                self.report("writer", f"decoding step {pkg.step} failed; it is dropped", exc)
            self._pending_steps += 1
            if self._pending_max_step is None or pkg.step > self._pending_max_step:
                self._pending_max_step = pkg.step
        if group:
            self._decode_group(group)
        try:
            self._add_scalars(steps, walls, names, values)
        except Exception as exc:
            self.report("writer", "decoding scalars failed; they are dropped", exc)

    def _decode_group(self, group: list[tuple[Package, np.ndarray]]) -> None:
        try:
            self._decode_stacked(group)
        except Exception as exc:
            self.report("writer", f"decoding step {group[0][0].step} failed; it is dropped", exc)

    def _decode_stacked(self, group: list[tuple[Package, np.ndarray]]) -> None:
        layout = group[0][0].layout
        assert layout is not None
        k = len(group)
        pkg_steps = np.array([p.step for p, _ in group], np.int64)
        walls = np.array([p.wall_time for p, _ in group], np.float64)
        # (k, size of the sections): the same sections in every package of the group
        data = np.stack([arr[: layout.scalar_offset] for _, arr in group])
        raws: list[np.ndarray] = []
        # grad_norm over every gradient section (one per device of a split model)
        gn_sq: np.ndarray | None = None
        gn_any: np.ndarray | None = None
        for i, (b, off) in enumerate(zip(layout.sections, layout.offsets, strict=True)):
            n = b.rows
            raw = data[:, off : off + n * b.width].reshape(k, n, b.width)
            off += n * b.width
            if b.single is not None:
                raw, b = _finish_single(raw, b)
            hist = data[:, off : off + n * NBINS].reshape(k * n, NBINS) if b.hist else None
            raws.append(raw)
            if b.has_missing:
                missing = np.stack([p.missing[i] for p, _ in group])  # (k, n)
            else:
                missing = np.zeros((k, n), bool)
            if b.grad_norm:
                ok = ~missing
                sq = np.where(ok, raw[:, :, 1], 0.0).sum(1)
                gn_sq = sq if gn_sq is None else gn_sq + sq
                gn_any = ok.any(1) if gn_any is None else gn_any | ok.any(1)
            if b.write:
                ref_i = layout.ratio_index[i]
                ref = raws[ref_i] if ref_i is not None else None
                self._add_block(pkg_steps, b, raw, hist, ref, missing)
        if gn_sq is not None and gn_any is not None:
            # A step on which no parameter had a gradient has no grad_norm: it is missing,
            # not NaN (a NaN would read as a numerical failure).
            with np.errstate(invalid="ignore"):
                gn = np.sqrt(gn_sq)
            n = int(gn_any.sum())
            self._add_scalars(pkg_steps[gn_any], walls[gn_any], [fmt.GRAD_NORM] * n, gn[gn_any])

    def _add_block(self, steps, b: Section, raw, hist, ref, missing) -> None:
        """Rows of one block for k steps: raw (k, n, width), hist (k*n, NBINS) or None,
        ref (k, n, width) or None, missing (k, n)."""
        k, n = raw.shape[0], b.rows
        rows = k * n
        raw = raw.reshape(rows, b.width)
        missing = missing.reshape(rows)
        numels = np.tile(b.numels, k)
        numel = numels.astype(np.float64)
        s1, s2, nonzero, nonfinite, absmax = (raw[:, i] for i in range(NRAW))
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = s1 / numel
            var = (s2 - s1 * s1 / numel) / (numel - 1)
            std = np.where(numel > 1, np.sqrt(np.maximum(var, 0.0)), np.nan)
            std = np.where(np.isfinite(var), std, np.nan)
            cols = {
                "mean": -mean if b.negate else mean,
                "std": std,
                "norm": np.sqrt(s2),
                "absmax": absmax,
                "frac_zero": (numel - nonzero) / numel,
                "frac_nonfinite": nonfinite / numel,
            }
            if ref is not None:
                cols["update_ratio"] = np.sqrt(s2) / np.sqrt(ref.reshape(rows, -1)[:, 1])
        for i, name in enumerate(b.extra):
            cols[name] = raw[:, NRAW + i]
        any_missing = missing.any()
        for name in _FLOAT_COLS:
            v = cols.get(name)
            v = np.full(rows, np.nan, np.float32) if v is None else v.astype(np.float32)
            if any_missing:
                v[missing] = np.nan
            self._ly[name].append(v)
        self._ly["step"].append(np.repeat(steps, n))
        self._ly["layer"].append(np.tile(b.layers, k))
        self._ly["kind"].append(np.full(rows, self._kind_ids[b.kind], np.int32))
        self._ly["numel"].append(numels)
        self._ly["missing"].append(missing)
        self._pending_rows += rows
        if hist is not None:
            counts = np.rint(hist).astype(np.int64)
            if b.pads is not None:
                counts[:, fmt.HIST_ZERO_BIN] -= np.tile(b.pads, k)
            if b.negate:
                counts = counts[:, ::-1]
            self._ly_hist.append((rows, np.where(missing[:, None], -1, counts)))
        else:
            self._ly_hist.append((rows, None))
        if "layer" not in self._seen_nonfinite:
            bad = ~missing & ((nonfinite > 0) | ~np.isfinite(s2))
            if bad.any():
                i = int(np.argmax(bad))
                self._seen_nonfinite.add("layer")
                name = self.layer_names[int(b.layers[i % n])]
                step = int(steps[i // n])
                self.event("nonfinite", step=step, where="layer", name=name, layer_kind=b.kind)

    # -- segments -----------------------------------------------------------------------

    def _scalars_table(self) -> pa.Table:
        c = self._sc
        return _scalars_table(
            np.concatenate(c["step"]),
            np.concatenate(c["wall"]),
            np.concatenate(c["name"]),
            self._scalar_names,
            np.concatenate(c["value"]),
        )

    def _layers_table(self) -> pa.Table:
        c = self._ly
        layer_dict = pa.array(list(self.layer_names), pa.string())
        kind_dict = pa.array(list(fmt.KINDS), pa.string())
        cols: dict[str, pa.Array] = {
            "step": pa.array(np.concatenate(c["step"])),
            "layer": pa.DictionaryArray.from_arrays(
                pa.array(np.concatenate(c["layer"]).astype(np.int32)), layer_dict
            ),
            "kind": pa.DictionaryArray.from_arrays(pa.array(np.concatenate(c["kind"])), kind_dict),
            "numel": pa.array(np.concatenate(c["numel"]).astype(np.int64)),
            "missing": pa.array(np.concatenate(c["missing"])),
        }
        for name in _FLOAT_COLS:
            cols[name] = pa.array(np.concatenate(c[name]), pa.float32())
        cols["hist"] = self._hist_array()
        return pa.Table.from_arrays([cols[n] for n in fmt.LAYERS_COLUMNS], schema=fmt.LAYERS_SCHEMA)

    def _hist_array(self) -> pa.Array:
        lengths, values, mask = [], [], []
        for n, counts in self._ly_hist:
            if counts is None:
                lengths.append(np.zeros(n, np.int32))
                mask.append(np.ones(n, bool))
                continue
            null = counts[:, 0] < 0
            lengths.append(np.where(null, 0, NBINS).astype(np.int32))
            mask.append(null)
            values.append(counts[~null].reshape(-1))
        offsets = np.zeros(sum(len(x) for x in lengths) + 1, np.int32)
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
        vals = np.concatenate(values) if values else np.zeros(0, np.int64)
        return pa.ListArray.from_arrays(
            pa.array(offsets),
            pa.array(vals, pa.int64()),
            type=_HIST_TYPE,
            mask=pa.array(np.concatenate(mask)),
        )

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if self._pending_steps == 0 and not self._sc["step"]:
            return
        last = self._pending_max_step
        written: list[str] = []
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            if self._sc["step"]:
                written.append(fmt.SCALARS_DIR)
                self._write(fmt.SCALARS_DIR, self._scalars_table())
            if self._ly["step"]:
                written.append(fmt.LAYERS_DIR)
                self._write(fmt.LAYERS_DIR, self._layers_table())
        except Exception as exc:  # e.g. ENOSPC: drop these rows, keep going
            self.report("writer", "writing a segment failed; those rows are lost", exc)
        finally:
            self._reset_pending()
        self.roll_stats.write_seconds += time.perf_counter() - t0
        self.roll_stats.write_cpu += time.thread_time() - c0
        if last is not None:
            self.last_step = last
            try:
                self.on_flush(last)
            except Exception as exc:
                self.report("writer", "updating run.json failed", exc)
        if self._roller is not None and not self._stopping:
            self._roller.request(written, last)  # done_step once merged
        elif last is not None:
            self.done_step = last

    def _write(self, table_dir: str, table: pa.Table) -> None:
        seq = self._seq[table_dir]
        # Consume the sequence number even on failure so no segment is ever overwritten.
        self._seq[table_dir] = seq + 1
        fmt.write_segment(table, fmt.segment_path(self.run_dir, table_dir, self.rank, seq))

    # -- events -------------------------------------------------------------------------

    def event(self, kind: str, **fields: Any) -> None:
        self.events.append({"kind": kind, "time": time.time(), "rank": self.rank, **fields})

    def drain_events(self) -> None:
        if self.skipped:
            steps = []
            while self.skipped:
                steps.append(self.skipped.popleft())
            self.event("skipped", steps=steps, total=self.skipped_total)
        batch = []
        while self.events:
            batch.append(self.events.popleft())
        if not batch or not self.write_events:
            return
        try:
            # Each rank its own file (format.events_path), appended and fsynced per batch.
            fmt.append_events(self.run_dir, batch, self.rank)
        except Exception as exc:
            self.report("writer", "appending to events.jsonl failed", exc, event=False)

    # -- the thread ---------------------------------------------------------------------

    def run(self) -> None:
        self._last_flush = time.monotonic()
        if self._roller is not None:
            self._roller.start()
        try:
            self._loop()
        finally:
            self._stop_rolling()

    def _loop(self) -> None:
        _warm_up()
        stop = False
        while not stop:
            since = time.monotonic() - self._last_flush
            self.queue.wait(max(0.01, min(POLL_SECONDS, self.flush_seconds - since)))
            stop = self._drain()
            if stop:
                self._stop_rolling()
            flush_now = (
                stop
                or time.monotonic() - self._last_flush >= self.flush_seconds
                or self.flush_requested.is_set()
            )
            if flush_now:  # (_decode_pending itself flushes when flush_steps/rows are due)
                self._decode_pending()
                self.flush_requested.clear()
                self.flush()
            self.drain_events()
        self.flush()
        self.drain_events()

    def _stop_rolling(self) -> None:
        """Closing: no merge starts (close() compacts anyway), and the one running ends
        before this thread does, so close()'s compaction finds the lock free."""
        self._stopping = True
        if self._roller is not None:
            self._roller.close()

    def request_flush(self) -> None:
        """Write what is pending at the next wake-up, which this brings forward."""
        self.flush_requested.set()
        self.queue.wake.set()

    def _flush_due(self) -> bool:
        return self._pending_steps >= self.flush_steps or self._pending_rows >= MAX_PENDING_ROWS

    def _drain(self) -> bool:
        """Copy out every queued package (freeing its host buffer), decoding whenever
        batch_cap wait, so at most that many copied-out steps are held; True at the
        sentinel."""
        while True:
            if len(self._batch) >= self.batch_cap:
                self._decode_pending()
            try:
                pkg = self.queue.get_nowait()
            except queue.Empty:
                return False
            if pkg is None:
                return True
            self._consume(pkg)

    def _consume(self, pkg: Package) -> None:
        """Copy a package's statistics out of its host buffer (freeing the slot at once);
        decoding waits for _decode_pending."""
        try:
            arr = None
            if pkg.host is not None:
                try:
                    pkg.event.synchronize()
                    # float64 whatever the wire dtype (float32 from devices without float64)
                    arr = np.array(pkg.host[: pkg.size].numpy(), dtype=np.float64)
                finally:
                    self.free_slots.put(pkg.slot)
            if pkg.timing is not None:
                pkg.host_scalars.extend(_device_times(pkg.step, *pkg.timing))
            self._batch.append((pkg, arr))
        except Exception as exc:
            self.report("writer", f"decoding step {pkg.step} failed; it is dropped", exc)

    def _decode_pending(self) -> None:
        batch, self._batch = self._batch, []
        i = 0
        while i < len(batch):
            # A segment holds at most flush_steps steps (the batch is at most batch_cap).
            chunk = batch[i : i + max(1, self.flush_steps - self._pending_steps)]
            i += len(chunk)
            self._decode_batch(chunk)
            if self._flush_due():
                self.flush()


def _scalars_table(
    steps: np.ndarray, walls: np.ndarray, name_ids: np.ndarray, names: list[str], values: np.ndarray
) -> pa.Table:
    """A scalars segment: ``name_ids`` index ``names`` (a dictionary column)."""
    return pa.Table.from_arrays(
        [
            pa.array(steps),
            pa.array(walls),
            pa.DictionaryArray.from_arrays(pa.array(name_ids), pa.array(list(names), pa.string())),
            pa.array(values),
        ],
        schema=fmt.SCALARS_SCHEMA,
    )


def _warm_up() -> None:
    """Build and encode a one-row scalars segment in memory at the writer's start:
    pyarrow's one-time set-up (dictionary arrays, the Parquet writer, zstd) costs tens of
    milliseconds, paid here while training runs rather than at the first flush or inside
    ``close()``, where a short run would wait for it."""
    try:
        one = np.zeros(1)
        table = _scalars_table(one.astype(np.int64), one, np.zeros(1, np.int32), ["x"], one)
        pyarrow.parquet.write_table(table, io.BytesIO(), compression="zstd")
    except Exception:  # only a warm-up: the real writes report their own failures
        pass


def _device_times(step: int, end: Any, forward: Any, t_step: float) -> list[tuple[int, str, float]]:
    """time/data and time/compute of a step from two device events: the device's idle gap
    between the previous step's end and this step's first forward (a wait for data the
    host could not hide), and the rest of the host-measured step."""
    try:
        forward.synchronize()
        data = max(0.0, end.elapsed_time(forward) / 1e3)
    except Exception:  # an event never recorded (e.g. another stream's): unknown
        data = float("nan")
    return [(step, fmt.TIME_DATA, data), (step, fmt.TIME_COMPUTE, t_step - data)]


def _finish_single(raw: np.ndarray, b: Section) -> tuple[np.ndarray, Section]:
    """RAW (+ derived + extra) columns from a single-tensor block's SINGLE columns."""
    single = raw[..., :NSINGLE]
    derived = {
        "min": single[..., 6],
        "max": single[..., 7],
        "row_sum_mean": single[..., 0] / max(1, b.single[0]),  # sum over the rows' count
    }
    cols = [single_to_raw(single, b.single), *(derived[n][..., None] for n in b.derived)]
    cols.append(raw[..., NSINGLE:])
    finished = replace(b, single=None, derived=(), extra=b.derived + b.extra)
    return np.concatenate(cols, axis=-1), finished


def _next_seq(run_dir: Path, table: str, rank: int) -> int:
    """One past the highest segment number of this rank already in run_dir (0 if none),
    compacted segments included (format.next_segment_number)."""
    d = Path(run_dir) / table / f"rank={rank}"
    return fmt.next_segment_number(d.glob("part-*.parquet") if d.is_dir() else ())
