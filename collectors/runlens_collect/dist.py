"""Distributed layouts: what this rank holds of each parameter, found locally.

Every rank records its own ``rank=R`` partition; nothing here calls a collective or
syncs with the device. This module answers, from the process's own objects:

* ``local(t)``: the tensor this rank holds of ``t``. A DTensor (FSDP2 ``fully_shard``,
  tensor parallel) is read through its local shard (``_local_tensor``, a view: never
  ``full_tensor()``, which would all-gather an unsharded copy on every rank); anything
  else is itself. Read at each use: FSDP2 re-points the local tensor at lazy init.
* ``shard_of(p)``: where this rank's shard sits in the global parameter (offset per
  dimension, local and global shapes), or None for a whole tensor. The analyzer combines
  the shards of a name (sums of squares, counts, extremes, histogram bins) and
  de-duplicates replicas (the same offset on several ranks: HSDP, replicated mesh dims).
* ``layout(model)``: run.json's ``distributed`` record (rank 0) and every rank's
  ``start`` event: world size, rank, wrapper, process-group facts, sharded parameters.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

try:  # torch >= 2.4; older builds have no public DTensor
    from torch.distributed.tensor import DTensor
except Exception:  # pragma: no cover - no distributed support in this build
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (a view, no copy, no communication)."""
    if is_dtensor(t):
        return t._local_tensor  # type: ignore[union-attr]
    return t


def shard_of(p: torch.Tensor) -> dict[str, Any] | None:
    """This rank's shard of a DTensor: {offset, shape, global_shape, placements}; None
    for a tensor every rank holds whole. Computed from the mesh coordinates (local)."""
    if not is_dtensor(p):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = p.device_mesh, p.placements  # type: ignore[union-attr]
    shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, placements)
    if all(pl.is_replicate() for pl in placements):
        return None  # every rank holds it whole: a replica
    return {
        "offset": [int(o) for o in offset],
        "shape": [int(s) for s in shape],
        "global_shape": [int(s) for s in p.shape],
        "placements": [str(pl) for pl in placements],
    }


def flat_shards(model: nn.Module) -> dict[int, dict[str, Any]]:
    """FSDP1 with ``use_orig_params=True``: id(original parameter) -> its part of this
    rank's flat-parameter shard ({offset, shape, global_shape} in the *flattened*
    parameter, from ``FlatParameter._shard_param_infos``). The original parameters are
    1-D views of that part (empty when it holds none). Empty for other layouts and for
    ``use_orig_params=False`` (one ``_flat_param`` per unit, recorded as it is)."""
    out: dict[int, dict[str, Any]] = {}
    for m in model.modules():
        handle = getattr(m, "_handle", None)
        flat = getattr(handle, "flat_param", None)
        params = getattr(flat, "_params", None)
        infos = getattr(flat, "_shard_param_infos", None)
        shapes = getattr(flat, "_shapes", None)
        if not params or infos is None or shapes is None:
            continue
        for p, info, shape in zip(params, infos, shapes, strict=False):
            numel = int(info.numel_in_shard or 0) if info.in_shard else 0
            start = int(info.intra_param_start_idx or 0) if info.in_shard else 0
            out[id(p)] = {
                "offset": [start],
                "shape": [numel],
                "global_shape": [int(s) for s in shape],
                "placements": ["FlatShard"],
            }
    return out


def wrapper_of(model: nn.Module) -> str | None:
    """The data-parallel wrapper around ``model``: 'DDP', 'FSDP1', 'FSDP2', 'DeepSpeed',
    'DTensor' (parameters are DTensors without FSDP2: tensor parallel), or None."""
    names = {type(m).__name__ for m in model.modules()}
    mro = {c.__name__ for c in type(model).__mro__}
    if "DistributedDataParallel" in mro:
        return "DDP"
    if "DeepSpeedEngine" in mro:
        return "DeepSpeed"
    if "FullyShardedDataParallel" in names:
        return "FSDP1"
    if any(n.startswith("FSDP") for n in names | mro):  # FSDPModule / FSDP<Class>
        return "FSDP2"
    if any(is_dtensor(p) for p in model.parameters()):
        return "DTensor"
    return None


def rank_env() -> dict[str, int]:
    """RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE set by a launcher (torchrun,
    deepspeed, SLURM via torchrun), as ints."""
    out = {}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        v = os.environ.get(key)
        if v is not None and v.strip().lstrip("-").isdigit():
            out[key.lower()] = int(v)
    return out


def layout(
    model: nn.Module, params: list[tuple[str, torch.Tensor]], rank: int, world_size: int
) -> dict[str, Any]:
    """What this rank holds (format.DISTRIBUTED_KEYS). ``params``: the collector's
    (name, parameter) pairs (names as its rows carry them)."""
    shards: dict[str, dict[str, Any]] = {}
    flat = flat_shards(model)
    for name, p in params:
        info = shard_of(p) or flat.get(id(p))
        if info is not None:
            shards[name] = info
    backend = None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            backend = str(torch.distributed.get_backend())
        except Exception:
            backend = None
    meshes = sorted(
        {
            f"{tuple(p.device_mesh.mesh_dim_names or ())}:{list(p.device_mesh.mesh.shape)}"  # type: ignore[union-attr]
            for _, p in params
            if is_dtensor(p)
        }
    )
    env = rank_env()
    return {
        "rank": rank,
        "world_size": world_size,
        "local_rank": env.get("local_rank"),
        "local_world_size": env.get("local_world_size"),
        "backend": backend,
        "wrapper": wrapper_of(model),
        "meshes": meshes,
        "n_params": len(params),
        "n_sharded": len(shards),
        "n_replicated": len(params) - len(shards),
        "shards": shards,
    }
