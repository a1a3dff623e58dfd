"""The group of processes `mlx.launch` started, and rank 0's requests sent to the others (the server's followers)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np


def distributed_group() -> mx.distributed.Group | None:
    """The group of ranks when launched by `mlx.launch` (more than one process), else None."""
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def broadcast_json(group: mx.distributed.Group, obj=None):
    """Rank 0's JSON-serialisable `obj` on every rank (the others pass None): two all-sums, which block the other
    ranks until rank 0 sends (a server's followers wait for the next request this way)."""
    data = json.dumps(obj).encode() if group.rank() == 0 else b""
    size = mx.distributed.all_sum(mx.array([len(data)], mx.int32), group=group).item()
    mine = mx.array(np.frombuffer(data, np.uint8)) if data else mx.zeros((size,), mx.uint8)
    return json.loads(bytes(np.array(mx.distributed.all_sum(mine, group=group))))

