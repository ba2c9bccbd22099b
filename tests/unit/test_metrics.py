"""The shared metrics module: its HTTP endpoint, SLO attainment and per-model queue depth."""

from __future__ import annotations

import urllib.request

from lego import metrics


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def test_metrics_are_served_over_http_on_a_free_port() -> None:
    server = metrics.serve_metrics("unit-test")
    try:
        text = scrape(server.address)
        assert 'lego_service_info{service="unit-test"} 1.0' in text
        assert "# TYPE lego_queue_depth_total gauge" in text
    finally:
        server.stop()


def test_slo_attainment_is_hits_over_all() -> None:
    before = dict(metrics._slo_counts)
    metrics.record_slo(True)
    metrics.record_slo(True)
    metrics.record_slo(False)
    hits, misses = before[True] + 2, before[False] + 1
    assert metrics.SLO_ATTAINMENT._value.get() == hits / (hits + misses)


def test_queue_depth_resets_models_with_nothing_queued() -> None:
    metrics.set_queue_depth({"m:a": 3, "m:b": 1})
    assert metrics.QUEUE_DEPTH.labels(model="m:a")._value.get() == 3
    assert metrics.QUEUE_DEPTH_TOTAL._value.get() == 4
    metrics.set_queue_depth({"m:b": 2})
    assert metrics.QUEUE_DEPTH.labels(model="m:a")._value.get() == 0
    assert metrics.QUEUE_DEPTH_TOTAL._value.get() == 2
