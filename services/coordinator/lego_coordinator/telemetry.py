"""The coordinator's Prometheus metrics and request logs, kept out of the servicer's way."""

from __future__ import annotations

import structlog
from lego import metrics

from lego_coordinator import scheduler as core

log = structlog.get_logger("lego.coordinator")


class Telemetry:
    """SLO attainment (a request meets its SLO when it is done within `slo_s` of admission;
    rejections, failures and drops miss), admissions, queue depth per model, batch sizes."""

    def __init__(self) -> None:
        self._admitted: dict[str, tuple[float, float]] = {}  # request id → (admitted at, SLO seconds)

    def admitted(self, request_id: str, now: float, slo_s: float) -> None:
        metrics.ADMISSIONS.inc()
        self._admitted[request_id] = (now, slo_s)

    def rejected(self) -> None:
        metrics.ADMISSION_REJECTIONS.inc()
        metrics.record_slo(False)

    def events(self, events: list[core.Event], now: float) -> None:
        for event in events:
            if not isinstance(event, core.RequestDone | core.RequestFailed):
                continue
            admitted_at, slo_s = self._admitted.pop(event.request_id, (now, 0.0))
            latency = now - admitted_at
            met = isinstance(event, core.RequestDone) and latency <= slo_s
            metrics.record_slo(met)
            if isinstance(event, core.RequestDone) and event.skipped_steps:
                metrics.APPROX_HITS.inc()
                metrics.APPROX_SKIPPED.inc(event.skipped_steps)
            if isinstance(event, core.RequestDone):
                log.info(
                    "request_done", request_id=event.request_id, latency_s=round(latency, 4), slo_met=met
                )
            else:
                log.info("request_failed", request_id=event.request_id, code=event.code, error=event.message)

    def scheduled(self, scheduler: core.Scheduler, dispatches: list[core.Dispatch]) -> None:
        depth = scheduler.ready_by_model()
        for dispatch in dispatches:
            metrics.DISPATCHED_BATCH_SIZE.labels(model=dispatch.model).observe(len(dispatch.tasks))
            depth.setdefault(dispatch.model, 0)  # every model served has a series, 0 when idle
        metrics.set_queue_depth(depth)
        metrics.APPROX_BYTES.set(scheduler.approx.used_bytes)
        draining = scheduler.draining_workers()
        total = len(scheduler.workers())
        metrics.WORKERS.labels(state="active").set(total - len(draining))
        metrics.WORKERS.labels(state="draining").set(len(draining))
