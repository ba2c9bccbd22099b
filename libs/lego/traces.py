"""Request traces: `TENANT INTERVAL` per line (the gap in seconds since the previous request), as in
traces/alibaba-katz-window. Parsing and rescaling are pure; arrival times start at 0."""

from __future__ import annotations

import random
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


def synthetic(
    rate: float, duration: float, cv: float = 1.0, tenants: str = "ABC", seed: int = 0
) -> list[TraceRequest]:
    """Arrivals at `rate` per second for `duration` seconds, gaps drawn from a Gamma distribution with
    coefficient of variation `cv` (1: Poisson; > 1: burstier, e.g. 2-4; < 1: more regular); each
    request's tenant drawn uniformly from `tenants`. Deterministic for a seed."""
    if not rate > 0 or not duration > 0:
        raise ValueError(f"rate and duration must be > 0, got rate {rate}, duration {duration}")
    if not cv > 0:
        raise ValueError(f"cv must be > 0, got {cv}")
    chooser = random.Random(seed)
    shape = 1.0 / (cv * cv)  # a Gamma(k, θ) gap has mean kθ and cv 1/√k
    scale = 1.0 / (rate * shape)
    requests: list[TraceRequest] = []
    now = chooser.gammavariate(shape, scale)
    while now <= duration:
        requests.append(TraceRequest(chooser.choice(tenants), now))
        now += chooser.gammavariate(shape, scale)
    return requests


def parse_synthetic(spec: str) -> list[TraceRequest]:
    """`poisson:rate=2,duration=120[,seed=1]` or `gamma:rate=2,cv=3,duration=120[,seed=1]`."""
    kind, _, rest = spec.partition(":")
    if kind not in ("poisson", "gamma"):
        raise ValueError(f"synthetic trace must start with 'poisson:' or 'gamma:', got {spec!r}")
    allowed = {"rate", "duration", "seed"} | ({"cv"} if kind == "gamma" else set())
    values: dict[str, float] = {}
    for item in filter(None, rest.split(",")):
        name, _, text = item.partition("=")
        if name not in allowed:
            raise ValueError(f"{kind}: unknown parameter {name!r} (choose from {', '.join(sorted(allowed))})")
        try:
            values[name] = float(text)
        except ValueError:
            raise ValueError(f"{kind}: {name} must be a number, got {text!r}") from None
    missing = {"rate", "duration"} - set(values)
    if missing:
        raise ValueError(f"{kind}: needs {', '.join(sorted(missing))}, e.g. {kind}:rate=2,duration=120")
    return synthetic(
        values["rate"], values["duration"], values.get("cv", 1.0), seed=int(values.get("seed", 0))
    )
