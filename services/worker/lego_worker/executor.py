"""Runs one batch of model calls: resolve the model, dispatch to the operator, time it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from lego_worker import ops
from lego_worker.models import ModelPool


@dataclass
class BatchStats:
    batches: int = 0
    busy_s: float = 0.0


class Executor:
    def __init__(self, device: str = "cpu") -> None:
        self.pool = ModelPool(device)
        self.states = ops.SchedulerStates()
        self.stats = BatchStats()

    def run(self, op: str, model_id: str, mode: str, items: list[dict[str, Any]]) -> list[ops.Outputs]:
        """`items[i]` maps input names to arrays/scalars (+ `state_key` for stateful ops)."""
        started = time.perf_counter()
        model = self.pool.get(model_id)
        key = (op, mode)
        if key in ops.BATCHED_OPS:
            outputs = ops.BATCHED_OPS[key](model, items, self.pool.device)
        elif key in ops.STATEFUL_OPS:
            outputs = [ops.STATEFUL_OPS[key](model, item, self.states) for item in items]
        else:
            raise ValueError(f"this worker cannot run {op}.{mode}")
        self.stats.batches += 1
        self.stats.busy_s += time.perf_counter() - started
        return outputs
