"""The simulator drives the real scheduler core in simulated time with profiled workers."""

from lego.builtin_workflows import sd15_txt2img
from lego.profiles import ProfileSet, default_profile_dir, load_batch_sizes
from lego_coordinator.simulator import Arrival, Simulator, standalone_latencies

DIRECTORY = default_profile_dir()
WORKFLOWS = {name: sd15_txt2img(name, "tiny-sd15", default_size=512) for name in ("A", "B")}
INPUTS = {"prompt": "x", "steps": 20}


def steady(rate: float, seconds: float) -> list[Arrival]:
    count = int(rate * seconds)
    return [Arrival(i / rate, "AB"[i % 2], INPUTS) for i in range(count)]


WARMUP = steady(rate=1, seconds=20)  # every model loaded where each policy wants it


def simulate(policy: str, gpus: int, arrivals: list[Arrival], warmup: list[Arrival] = WARMUP) -> dict:  # type: ignore[type-arg]
    simulator = Simulator(WORKFLOWS, gpus, ProfileSet(DIRECTORY), policy, load_batch_sizes(DIRECTORY))
    return simulator.run(arrivals, warmup).summary()


def test_light_load_meets_every_slo_on_every_policy() -> None:
    for policy in ("lego", "static", "clockwork", "shepherd"):
        summary = simulate(policy, 4, steady(rate=0.5, seconds=20))
        assert summary["slo_attainment"] == 1.0, policy
        assert summary["rejected"] == summary["dropped"] == 0


def test_overload_is_rejected_up_front_by_lego_and_dropped_late_by_the_baselines() -> None:
    burst = [Arrival(0.0, "AB"[i % 2], INPUTS) for i in range(60)]
    lego = simulate("lego", 2, burst)
    static = simulate("static", 2, burst)
    assert lego["rejected"] > 0 and lego["dropped"] == 0 and lego["completed"] > 0
    assert static["rejected"] == 0 and static["dropped"] > 0 and static["completed"] > 0
    standalone = standalone_latencies({"A": WORKFLOWS["A"]}, {"A": INPUTS}, ProfileSet(DIRECTORY))["A"]
    assert lego["p99_s"] <= 2 * standalone  # what lego admits, it serves within the SLO


def test_a_lone_request_on_a_warm_worker_takes_its_standalone_latency() -> None:
    standalone = standalone_latencies(WORKFLOWS, {"A": INPUTS, "B": INPUTS}, ProfileSet(DIRECTORY))["A"]
    warmup = [Arrival(0.0, "A", INPUTS)]
    summary = simulate("lego", 1, [Arrival(0.0, "A", INPUTS), Arrival(100.0, "A", INPUTS)], warmup)
    assert summary["completed"] == 2 and summary["model_loads"] == 0
    assert abs(summary["p99_s"] - standalone) <= 0.01 * standalone


def test_a_cold_worker_pays_the_profiled_load_times() -> None:
    profiles = ProfileSet(DIRECTORY)
    cold = Simulator(WORKFLOWS, 1, profiles, "lego", load_batch_sizes(DIRECTORY))
    result = cold.run([Arrival(0.0, "A", INPUTS)]).summary()  # no warm-up
    standalone = standalone_latencies({"A": WORKFLOWS["A"]}, {"A": INPUTS}, profiles)["A"]
    # the models wait in host memory (the workers' start-up prefetch): each of the four (text
    # encoder, UNet, VAE, scheduler) is copied to the device once, on top of the execution
    assert result["model_loads"] == 4 and result["completed"] == 1
    unet = profiles.get("StableDiffusion15")
    assert result["p99_s"] >= standalone + unet.host_to_device_s
    assert result["p99_s"] < standalone + unet.disk_to_host_s  # nothing was read from disk


def test_the_simulation_is_deterministic() -> None:
    arrivals = steady(rate=3, seconds=10)
    assert simulate("lego", 2, arrivals) == simulate("lego", 2, arrivals)


def test_a_control_plane_overhead_lengthens_every_batch_and_the_slo_with_it() -> None:
    profiles = ProfileSet(DIRECTORY)
    inputs = {"A": INPUTS, "B": INPUTS}
    bare = standalone_latencies(WORKFLOWS, inputs, profiles)["A"]
    standalone = standalone_latencies(WORKFLOWS, inputs, profiles, overhead_s=0.005)["A"]
    batches = round((standalone - bare) / 0.005)
    assert batches >= 20  # a text encode, 20 steps, a decode: each its own round trip
    simulator = Simulator(WORKFLOWS, 1, profiles, "lego", load_batch_sizes(DIRECTORY), overhead_s=0.005)
    warmup = [Arrival(0.0, "A", INPUTS)]
    summary = simulator.run([Arrival(0.0, "A", INPUTS)], warmup).summary()
    assert summary["slo_attainment"] == 1.0
    assert abs(summary["p99_s"] - standalone) <= 0.01 * standalone
