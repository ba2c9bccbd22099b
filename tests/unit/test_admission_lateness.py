"""Admission scales its estimate by how late recent requests ended against theirs.

Beyond capacity, a cluster shared by many models loads them over and over, which the backlog model
does not see; without the scaling, admitted requests missed their deadlines in a cascade.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from lego.graph import RequestGraph, instantiate
from lego.profiles import ProfileSet, default_profile_dir, load_batch_sizes
from lego.request_inputs import resolve_inputs
from lego_cli import sim
from lego_cli.workloads import workload
from lego_coordinator import scheduler as core
from lego_coordinator.costs import CostModel

TRACE = Path(__file__).resolve().parents[2] / "traces/alibaba-katz-window"
RS1 = TRACE / "generated_trace_n3_rs1.0_st50000_t120_seed666.txt"


def _scheduler() -> tuple[core.Scheduler, RequestGraph]:
    directory = default_profile_dir()
    costs = CostModel(ProfileSet(directory), load_batch_sizes(directory))
    scheduler = core.Scheduler(costs, "lego", enforce_slo=True)
    for index in range(2):
        scheduler.add_worker(f"w{index}", host="h0")
    chosen = workload("flux-schnell")
    spec = chosen.workflows["A"]
    return scheduler, instantiate(spec, resolve_inputs(spec, chosen.inputs["A"]))


def test_requests_dropped_late_scale_the_estimate_and_early_ones_never_shrink_it() -> None:
    scheduler, graph = _scheduler()
    scheduler.admit("first", "A", graph, 0.0)  # alone: admitted whatever the estimate
    before = scheduler.admit("probe", "A", graph, 0.0)
    assert before.accepted
    scheduler.schedule(100.0)  # long past every deadline: both are dropped, far later than estimated
    assert scheduler._lateness > 1.0
    scheduler.release("first")
    scheduler.release("probe")
    scheduler.admit("again", "A", graph, 100.0)
    after = scheduler.admit("probe2", "A", graph, 100.0)
    assert after.estimate_s == pytest.approx(before.estimate_s * scheduler._lateness)

    early, _ = _scheduler()
    early.admit("quick", "A", graph, 0.0)
    early._observe_lateness(early._requests["quick"], 0.001)  # far sooner than estimated
    assert early._lateness < 1.0
    assert early.admit("next", "A", graph, 0.0).estimate_s == pytest.approx(before.estimate_s)


def _mix_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weight: float) -> dict[str, float]:
    monkeypatch.setattr(core, "LATENESS_WEIGHT", weight)
    parser = argparse.ArgumentParser()
    sim.configure(parser)
    out = tmp_path / f"mix-{weight}.json"
    families = "flux-schnell,flux-dev,sd3-medium,sd35-large"
    arguments = ["--trace", str(RS1), "--rs", "2", "--family", families, "--gpus", "8", "--json", str(out)]
    assert sim.run(parser.parse_args([*arguments, "--policy", "lego"])) == 0
    run = json.loads(out.read_text())["runs"][0]
    return {"attainment": run["slo_attainment"], "dropped": run["dropped"]}


def test_beyond_capacity_the_twelve_workflow_mix_degrades_instead_of_collapsing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weight = core.LATENESS_WEIGHT
    unscaled = _mix_all(tmp_path, monkeypatch, 0.0)  # lateness never moves from 1
    scaled = _mix_all(tmp_path, monkeypatch, weight)
    assert scaled["attainment"] >= unscaled["attainment"] + 0.2
    assert scaled["dropped"] < unscaled["dropped"] / 2
