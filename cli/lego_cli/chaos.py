"""`lego chaos`: a real process cluster (its own etcd on loopback, two coordinators, emulated workers)
under a steady open-loop load, with seeded random faults injected meanwhile. Every request ends as
`completed` (an image), `failed_explicit` (an error status came back) or `lost` (no answer within
`--answer-within` seconds); `duplicated` counts requests answered more than once. Prints one JSON
object (and writes it to `--json OUT`); exits 1 when anything was lost, duplicated or leaked.

Faults (`--faults`, default all): worker_kill (SIGKILL a busy worker mid denoise loop, then start a
new one), leader_kill (SIGKILL the leading coordinator; a standby takes over; a new standby is
started), dataengine_kill (SIGKILL the data engine, then restart it on the same port), etcd_restart
(stop etcd, then start it again on the same data dir), worker_stop (SIGSTOP a worker past its
registration lease, then SIGCONT). Every process is started here and stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import signal
import statistics
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from lego import arena_layout
from lego.builtin_workflows import TINY_SD15_TXT2IMG
from lego.client import AsyncGatewayClient, LegoError
from lego.grpc_server import sync_channel
from lego.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, dataengine_pb2, dataengine_pb2_grpc
from lego_worker.agent import REGISTRATION_TTL_S

from lego_cli.cluster import ProcessCluster, ServiceProcess
from lego_cli.etcd_process import EtcdNotInstalled, EtcdProcess

FAULTS = ("worker_kill", "leader_kill", "dataengine_kill", "etcd_restart", "worker_stop")
STOP_PAST_LEASE_S = 2.0  # a stopped worker stays stopped this long after its lease has expired
ETCD_DOWN_S = 2.0
LEADER_WAIT_S = 20.0
RPC_TIMEOUT_S = 3.0
WARMUP_S = 3.0
TAIL_S = 5.0  # load after the last fault, to see the cluster recover from it
SHM = Path("/dev/shm")
SLOT = struct.Struct("<QQQQ")  # an arena index slot: seq, offset, nbytes, id length (lego.arena_layout)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default: 60)")
    parser.add_argument("--json", dest="json_out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--workers", type=int, default=2, help="emulated workers (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the arrivals and the faults (default: 0)")
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second, Poisson (default: 2)")
    parser.add_argument("--steps", type=int, default=20, help="denoise steps per request (default: 20)")
    parser.add_argument(
        "--faults", default=",".join(FAULTS), help=f"comma-separated, from {','.join(FAULTS)} (default: all)"
    )
    parser.add_argument(
        "--fault-interval",
        type=float,
        default=10.0,
        help="seconds between faults (default: 10; jittered by the seed)",
    )
    parser.add_argument(
        "--answer-within",
        type=float,
        default=120.0,
        help="a request with no answer this long after it was sent is lost (default: 120)",
    )
    parser.add_argument(
        "--time-scale", type=float, default=20.0, help="emulated workers' speed-up (default: 20)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="etcd data and the cluster's log (default: a temporary dir, kept only when a check fails)",
    )


# ---- what happened ----


@dataclass
class Outcome:
    request_id: str
    sent_at: float
    state: str = "pending"  # ok | error | lost
    code: str = ""
    message: str = ""
    answered_at: float | None = None
    answers: int = 0


@dataclass
class Fault:
    kind: str
    at_s: float
    target: str = ""
    restored_s: float | None = None  # the tool's own repair (a restart) was done after this long
    note: str = ""
    recovery_s: float | None = None
    in_flight: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "at_s": round(self.at_s, 3),
            "target": self.target,
            "recovery_s": None if self.recovery_s is None else round(self.recovery_s, 3),
            "restored_s": None if self.restored_s is None else round(self.restored_s, 3),
            "in_flight": self.in_flight,
            **({"note": self.note} if self.note else {}),
        }


# ---- faults on a ProcessCluster (the tests in tests/chaos use these too) ----


def alive(cluster: ProcessCluster, prefix: str) -> list[ServiceProcess]:
    return [p for p in cluster.processes if p.name.startswith(prefix) and p.process.poll() is None]


def sigkill(cluster: ProcessCluster, entry: ServiceProcess) -> None:
    """SIGKILL one service by its PID and forget it; a data engine's shared-memory segment (which it
    could not unlink) is removed, as whoever restarts it would."""
    entry.process.send_signal(signal.SIGKILL)
    entry.process.wait()
    with contextlib.suppress(ValueError):
        cluster.processes.remove(entry)
    if entry.name == "dataengine":
        for segment in SHM.glob(f"lego-dataengine-{entry.process.pid}-*"):
            segment.unlink(missing_ok=True)


def restart_dataengine(cluster: ProcessCluster, port: str) -> ServiceProcess:
    """A data engine on the port of the one that died: workers and tensor handles name that address,
    and nothing restarts it on its own (a supervisor, systemd or a kubelet would)."""
    engine = cluster._spawn("dataengine", "lego_dataengine", "--port", port)
    cluster.dataengine_address = engine.address
    return engine


def _status(address: str) -> coordinator_pb2.ClusterStatusReply | None:
    try:
        with sync_channel(address) as chan:
            reply: coordinator_pb2.ClusterStatusReply = coordinator_pb2_grpc.CoordinatorStub(
                chan
            ).ClusterStatus(common_pb2.Empty(), timeout=RPC_TIMEOUT_S)
            return reply
    except grpc.RpcError:
        return None


def leader(cluster: ProcessCluster) -> ServiceProcess | None:
    """The coordinator that leads now (its epoch is > 0), if one answers."""
    for entry in alive(cluster, "coordinator"):
        status = _status(entry.address)
        if status is not None and status.epoch > 0:
            return entry
    return None


def busy_workers(cluster: ProcessCluster) -> set[str]:
    """Workers running a batch now, as the leader sees them (empty when none answers)."""
    entry = leader(cluster)
    status = _status(entry.address) if entry is not None else None
    return {w.worker_id for w in status.workers if w.busy} if status is not None else set()


def engine_tensors(cluster: ProcessCluster, within_s: float = 15.0) -> int:
    """Tensors the data engine holds, waiting up to `within_s` for them to reach 0 (the gateway
    releases each request in the background after answering it)."""
    engine = next(p for p in cluster.processes if p.name == "dataengine")
    deadline = time.monotonic() + within_s
    with sync_channel(engine.address) as chan:
        stub = dataengine_pb2_grpc.DataEngineStub(chan)
        while True:
            stats: dataengine_pb2.DataEngineStats = stub.Stats(common_pb2.Empty(), timeout=RPC_TIMEOUT_S)
            if stats.tensors == 0 or time.monotonic() > deadline:
                return int(stats.tensors)
            time.sleep(0.2)


def held_tensor_ids(cluster: ProcessCluster, limit: int = 10) -> list[str]:
    """Some of the tensors the data engine holds, read from its arena's index (a diagnostic: a slot
    holds the newest tensor that hashed to it, so this may miss some)."""
    engine = next(p for p in cluster.processes if p.name == "dataengine")
    with sync_channel(engine.address) as chan:
        info = dataengine_pb2_grpc.DataEngineStub(chan).Arena(common_pb2.Empty(), timeout=RPC_TIMEOUT_S)
    arena = arena_layout.attach(info.path, info.token)
    if arena is None:
        return []
    found = []
    try:
        for slot in range(arena_layout.SLOTS):
            position = arena_layout.HEADER_BYTES + slot * arena_layout.SLOT_BYTES
            seq, _, _, length = SLOT.unpack_from(arena, position)
            if length and not seq % 2:
                name = arena[position + SLOT.size : position + SLOT.size + length]
                found.append(bytes(name).decode(errors="replace"))
                if len(found) >= limit:
                    break
    finally:
        arena.close()
    return sorted(found)


def answer_counts(log_path: Path) -> tuple[Counter[str], Counter[str]]:
    """From the services' JSON logs: how often the gateway answered each request with an image, and
    how often a coordinator finished it."""
    answered: Counter[str] = Counter()
    done: Counter[str] = Counter()
    with log_path.open("rb") as log:
        for raw in log:
            if not raw.startswith(b"{"):
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if line.get("event") == "request_answered":
                answered[str(line.get("request_id"))] += 1
            elif line.get("event") == "request_done":
                done[str(line.get("request_id"))] += 1
    return answered, done


class ChaosCluster:
    """etcd + a ProcessCluster, and the faults (blocking: the load runs on another thread's loop)."""

    def __init__(self, workdir: Path, workers: int, time_scale: float, log_path: Path) -> None:
        self.etcd = EtcdProcess(workdir / "etcd-data")
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.workers = workers
        self.cluster = ProcessCluster(
            self.etcd.url,
            workers,
            log_file=self._log,
            worker_args=("--backend", "emulated", "--time-scale", f"{time_scale:g}"),
            coordinators=2,
        )
        self._coordinators = 2

    def start(self) -> None:
        self.etcd.start()
        self.cluster.start()

    def stop(self) -> None:
        self.cluster.stop()
        self.etcd.stop()
        self._log.close()

    @property
    def gateway(self) -> str:
        return self.cluster.gateway_address

    def _pick_worker(self, rng: random.Random, busy_within_s: float = 3.0) -> ServiceProcess:
        """A worker in the middle of a batch when one is found within `busy_within_s`, else any."""
        deadline = time.monotonic() + busy_within_s
        while time.monotonic() < deadline:
            busy = busy_workers(self.cluster)
            candidates = [p for p in alive(self.cluster, "worker-") if p.name in busy]
            if candidates:
                return rng.choice(sorted(candidates, key=lambda p: p.name))
            time.sleep(0.1)
        return rng.choice(alive(self.cluster, "worker-"))

    def worker_kill(self, rng: random.Random, fault: Fault, clock: Clock) -> None:
        victim = self._pick_worker(rng)
        fault.target = victim.name
        fault.at_s = clock.now()
        sigkill(self.cluster, victim)
        self.cluster.scale_workers(self.workers)  # a fresh worker joins in its place
        fault.restored_s = clock.now() - fault.at_s

    def leader_kill(self, rng: random.Random, fault: Fault, clock: Clock) -> None:
        deadline = time.monotonic() + LEADER_WAIT_S  # after an etcd restart there may be none yet
        while (victim := leader(self.cluster)) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if victim is None:
            fault.note = f"no coordinator led within {LEADER_WAIT_S:g}s: nothing killed"
            return
        fault.target = victim.name
        fault.at_s = clock.now()
        sigkill(self.cluster, victim)
        name = f"coordinator-{self._coordinators}"
        self._coordinators += 1
        self.cluster._spawn(name, "lego_coordinator", *self.cluster.coordinator_args)  # the new standby
        fault.restored_s = clock.now() - fault.at_s

    def dataengine_kill(self, rng: random.Random, fault: Fault, clock: Clock) -> None:
        engine = next(p for p in self.cluster.processes if p.name == "dataengine")
        fault.target = engine.name
        fault.at_s = clock.now()
        sigkill(self.cluster, engine)
        restart_dataengine(self.cluster, engine.address.rsplit(":", 1)[1])
        fault.restored_s = clock.now() - fault.at_s

    def etcd_restart(self, rng: random.Random, fault: Fault, clock: Clock) -> None:
        fault.target = "etcd"
        fault.at_s = clock.now()
        self.etcd.stop()
        time.sleep(ETCD_DOWN_S)
        self.etcd.start()
        fault.restored_s = clock.now() - fault.at_s

    def worker_stop(self, rng: random.Random, fault: Fault, clock: Clock) -> None:
        victim = self._pick_worker(rng)
        fault.target = victim.name
        fault.at_s = clock.now()
        victim.process.send_signal(signal.SIGSTOP)
        try:
            time.sleep(REGISTRATION_TTL_S + STOP_PAST_LEASE_S)
        finally:
            victim.process.send_signal(signal.SIGCONT)
        fault.restored_s = clock.now() - fault.at_s

    def inject(self, kind: str, rng: random.Random, fault: Fault, clock: Clock) -> None:
        getattr(self, kind)(rng, fault, clock)

    def serves(self, steps: int, timeout_s: float = 60.0) -> bool:
        """The cluster answers a fresh request after everything."""

        async def one() -> bool:
            async with AsyncGatewayClient(self.gateway, timeout_s=timeout_s) as client:
                reply = await client.generate(TINY_SD15_TXT2IMG, {"prompt": "after chaos", "steps": steps})
                return bool(reply.png)

        try:
            return asyncio.run(one())
        except LegoError:
            return False


class Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.start


# ---- load ----


def fault_plan(
    kinds: list[str], duration_s: float, interval_s: float, rng: random.Random
) -> list[tuple[str, float]]:
    """Which fault is due when (seconds into the run), cycling through a seeded shuffle of `kinds`."""
    order = kinds[:]
    rng.shuffle(order)
    plan: list[tuple[str, float]] = []
    at = WARMUP_S
    while at < last_fault_s(duration_s) and order:
        plan.append((order[len(plan) % len(order)], at + rng.uniform(0, 0.3 * interval_s)))
        at += interval_s
    return plan


def last_fault_s(duration_s: float) -> float:
    """No fault starts later than this: the load goes on a while after the last one."""
    return duration_s - min(TAIL_S, duration_s / 4)


async def _request(
    client: AsyncGatewayClient, outcome: Outcome, steps: int, seed: int, bound_s: float, clock: Clock
) -> None:
    inputs: dict[str, str | int | float | bool] = {"prompt": f"chaos {seed}", "steps": steps, "seed": seed}
    try:
        reply = await asyncio.wait_for(
            client.generate(TINY_SD15_TXT2IMG, inputs, request_id=outcome.request_id), bound_s
        )
    except TimeoutError:
        outcome.state = "lost"
        return
    except LegoError as error:
        outcome.state, outcome.code, outcome.message = "error", error.code.name, error.message[:200]
    else:
        outcome.state = "ok" if reply.request_id == outcome.request_id and reply.png else "error"
        if outcome.state == "error":
            outcome.code, outcome.message = "MISMATCH", f"answered as {reply.request_id!r}"
    outcome.answers += 1
    outcome.answered_at = clock.now()


async def _drive(
    chaos: ChaosCluster, args: argparse.Namespace, plan: list[tuple[str, float]], clock: Clock
) -> tuple[list[Outcome], list[Fault]]:
    arrivals = random.Random(args.seed)
    fault_rng = random.Random(args.seed + 1)
    outcomes: list[Outcome] = []
    faults: list[Fault] = []
    pending: list[asyncio.Task[None]] = []

    async def inject() -> None:
        for kind, due in plan:
            await asyncio.sleep(max(0.0, due - clock.now()))
            if clock.now() >= last_fault_s(args.duration):
                return  # the faults before ran late
            fault = Fault(kind, clock.now())
            faults.append(fault)
            try:
                await asyncio.to_thread(chaos.inject, kind, fault_rng, fault, clock)
            except Exception as error:  # noqa: BLE001 - reported, and the run goes on
                fault.note = f"injection failed: {type(error).__name__}: {error}"
            print(json.dumps({"fault": fault.as_dict()}), file=sys.stderr, flush=True)

    injector = asyncio.create_task(inject())
    async with AsyncGatewayClient(chaos.gateway, timeout_s=args.answer_within + 30) as client:
        due = 0.0
        index = 0
        while True:
            due += arrivals.expovariate(args.rate)
            if due >= args.duration:
                break
            await asyncio.sleep(max(0.0, due - clock.now()))
            outcome = Outcome(f"chaos-{args.seed}-{index:05d}", clock.now())
            outcomes.append(outcome)
            pending.append(
                asyncio.create_task(_request(client, outcome, args.steps, index, args.answer_within, clock))
            )
            index += 1
        await injector
        await asyncio.gather(*pending)
    return outcomes, faults


# ---- the report ----


def _recovery(faults: list[Fault], outcomes: list[Outcome]) -> None:
    for fault in faults:
        after = [
            o.answered_at - fault.at_s
            for o in outcomes
            if o.state == "ok" and o.sent_at >= fault.at_s and o.answered_at is not None
        ]
        fault.recovery_s = min(after) if after else None
        caught = [
            o
            for o in outcomes
            if o.sent_at <= fault.at_s and (o.answered_at is None or o.answered_at > fault.at_s)
        ]
        fault.in_flight = dict(Counter(o.state for o in caught))


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def report(
    args: argparse.Namespace,
    outcomes: list[Outcome],
    faults: list[Fault],
    answered: Counter[str],
    done: Counter[str],
    leaked: int | None,
    serves_after: bool,
) -> dict[str, Any]:
    _recovery(faults, outcomes)
    ids = {o.request_id for o in outcomes}
    duplicated = {o.request_id for o in outcomes if o.answers > 1}
    duplicated |= {rid for rid, count in answered.items() if count > 1 and rid in ids}
    latencies = [o.answered_at - o.sent_at for o in outcomes if o.state == "ok" and o.answered_at]
    return {
        "command": "lego chaos",
        "duration_s": args.duration,
        "workers": args.workers,
        "seed": args.seed,
        "rate": args.rate,
        "steps": args.steps,
        "sent": len(outcomes),
        "completed": sum(o.state == "ok" for o in outcomes),
        "failed_explicit": sum(o.state == "error" for o in outcomes),
        "lost": sum(o.state in ("lost", "pending") for o in outcomes),
        "duplicated": len(duplicated),
        "leaked_tensors": leaked,
        "serves_after": serves_after,
        "errors": dict(Counter(o.code for o in outcomes if o.state == "error")),
        "error_messages": sorted({f"{o.code}: {o.message}" for o in outcomes if o.state == "error"})[:10],
        "latency_s": {
            "p50": round(statistics.median(latencies), 3) if latencies else None,
            "p95": _percentile(latencies, 0.95),
            "max": round(max(latencies), 3) if latencies else None,
        },
        "coordinator_reran": sum(1 for rid, count in done.items() if count > 1 and rid in ids),
        "faults": [f.as_dict() for f in faults],
    }


def run(args: argparse.Namespace) -> int:
    kinds = [k.strip() for k in args.faults.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in FAULTS]
    if unknown or args.duration <= 0 or args.rate <= 0 or args.workers < 1:
        print(
            f"error: unknown faults {unknown} (known: {', '.join(FAULTS)})"
            if unknown
            else "error: --duration, --rate and --workers must be positive",
            file=sys.stderr,
        )
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lego-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    chaos = ChaosCluster(workdir, args.workers, args.time_scale, workdir / "cluster.log")
    plan = fault_plan(kinds, args.duration, args.fault_interval, random.Random(args.seed))
    timing: dict[str, float] = {}
    started = time.monotonic()
    try:
        try:
            chaos.start()
        except EtcdNotInstalled as error:
            print(f"error: {error}", file=sys.stderr)
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
            return 2
        timing["cluster_start_s"] = time.monotonic() - started
        clock = Clock()
        outcomes, faults = asyncio.run(_drive(chaos, args, plan, clock))
        timing["load_and_answers_s"] = clock.now()
        serves_after = chaos.serves(args.steps)
        held: list[str] = []
        try:
            leaked: int | None = engine_tensors(chaos.cluster)
            if leaked:
                held = held_tensor_ids(chaos.cluster)
        except grpc.RpcError:
            leaked = None
    finally:
        stopping = time.monotonic()
        chaos.stop()
        timing["cluster_stop_s"] = time.monotonic() - stopping
    answered, done = answer_counts(chaos.log_path)
    result = report(args, outcomes, faults, answered, done, leaked, serves_after)
    if held:
        result["leaked_examples"] = held
    result["timing"] = {name: round(seconds, 2) for name, seconds in timing.items()}
    healthy = result["lost"] == 0 and result["duplicated"] == 0 and leaked == 0 and serves_after
    if healthy and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        result["workdir"] = str(workdir)
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    if args.json_out is not None:
        args.json_out.write_text(text + "\n")
    return 0 if healthy else 1
