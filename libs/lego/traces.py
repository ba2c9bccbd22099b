"""Request traces: `TENANT INTERVAL` per line (the gap in seconds since the previous request), as in
traces/alibaba-katz-window. Parsing and rescaling are pure; arrival times start at 0."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TraceRequest:
    tenant: str
    time_s: float


def parse_trace(text: str, source: str = "trace") -> list[TraceRequest]:
    requests: list[TraceRequest] = []
    now = 0.0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{source}:{number}: expected 'TENANT INTERVAL', got {line!r}")
        try:
            interval = float(parts[1])
        except ValueError:
            raise ValueError(f"{source}:{number}: interval must be a number, got {parts[1]!r}") from None
        if not interval >= 0:
            raise ValueError(f"{source}:{number}: interval must be ≥ 0, got {interval}")
        now += interval
        requests.append(TraceRequest(parts[0], now))
    return requests


def load_trace(path: Path) -> list[TraceRequest]:
    return parse_trace(path.read_text(), str(path))


def rescale(requests: list[TraceRequest], rate_factor: float) -> list[TraceRequest]:
    """The same burst pattern at `rate_factor` times the request rate (intervals divided by it)."""
    if rate_factor <= 0:
        raise ValueError(f"rate factor must be > 0, got {rate_factor}")
    return [TraceRequest(r.tenant, r.time_s / rate_factor) for r in requests]


def duration_s(requests: list[TraceRequest]) -> float:
    return requests[-1].time_s if requests else 0.0
