import itertools
from pathlib import Path

import pytest
from lego.traces import TraceRequest, duration_s, load_trace, parse_synthetic, parse_trace, rescale

ROOT = Path(__file__).resolve().parents[2]


def test_intervals_accumulate_into_arrival_times() -> None:
    requests = parse_trace("A 1.5\nB 0.0\n\nC 2\n")
    assert requests == [TraceRequest("A", 1.5), TraceRequest("B", 1.5), TraceRequest("C", 3.5)]
    assert duration_s(requests) == 3.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("A", "expected 'TENANT INTERVAL'"),
        ("A x", "interval must be a number, got 'x'"),
        ("A -1", "≥ 0, got -1"),
    ],
)
def test_bad_lines_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"t:1: .*{message}"):
        parse_trace(text, "t")


def test_rescaling_keeps_the_burst_pattern() -> None:
    requests = parse_trace("A 1\nB 1\nA 2\n")
    faster = rescale(requests, 2.0)
    assert [r.time_s for r in faster] == [0.5, 1.0, 2.0]
    assert [r.tenant for r in faster] == ["A", "B", "A"]
    with pytest.raises(ValueError, match="rate factor must be > 0"):
        rescale(requests, 0)


def test_the_shipped_traces_match_their_readme() -> None:
    directory = ROOT / "traces" / "alibaba-katz-window"
    counts = {path.name.split("_")[3]: len(load_trace(path)) for path in directory.glob("*.txt")}
    assert counts == {
        "rs0.5": 44,
        "rs1.0": 89,
        "rs2.0": 178,
        "rs3.0": 267,
        "rs4.0": 356,
        "rs6.0": 534,
        "rs8.0": 712,
    }
    assert {
        r.tenant for r in load_trace(directory / "generated_trace_n3_rs1.0_st50000_t120_seed666.txt")
    } == {"A", "B", "C"}


def test_synthetic_arrivals_have_the_asked_rate_and_burstiness() -> None:
    poisson = parse_synthetic("poisson:rate=4,duration=2000,seed=3")
    bursty = parse_synthetic("gamma:rate=4,cv=3,duration=2000,seed=3")
    for requests, cv in ((poisson, 1.0), (bursty, 3.0)):
        gaps = [b.time_s - a.time_s for a, b in itertools.pairwise(requests)]
        mean = sum(gaps) / len(gaps)
        std = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5
        assert abs(len(requests) / 2000 - 4) < 0.3
        assert abs(std / mean - cv) < 0.15 * cv
        assert {r.tenant for r in requests} == {"A", "B", "C"}
    assert parse_synthetic("poisson:rate=4,duration=50,seed=3") == parse_synthetic(
        "poisson:rate=4,duration=50,seed=3"
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("uniform:rate=1", "must start with 'poisson:' or 'gamma:'"),
        ("poisson:rate=1", "needs duration"),
        ("poisson:rate=1,duration=5,cv=2", "unknown parameter 'cv'"),
        ("gamma:rate=x,duration=5", "rate must be a number, got 'x'"),
        ("gamma:rate=1,duration=5,cv=0", "cv must be > 0"),
    ],
)
def test_bad_synthetic_specs_name_the_parameter(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_synthetic(spec)
