"""`lego`: demo, up, generate, watch, status, workflows, and each service on its own."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from importlib import import_module
from pathlib import Path

from lego.builtin_workflows import LEGO_SHAPES_TXT2IMG, TINY_SD15_TXT2IMG
from lego.client import AsyncGatewayClient, GatewayClient, GeneratedImage, LegoError
from lego.errors import InvalidRequest, StoreUnavailable
from lego.log import configure_logging
from lego.store import parse_store_url
from lego.values import Scalar
from lego_coordinator.__main__ import add_policy_flags, config_from
from lego_gateway.__main__ import add_gateway_flags, gateway_options
from lego_gateway.auth import check_bind, load_api_keys
from lego_worker.__main__ import add_backend_flags
from lego_worker.agent import WorkerConfig

from lego_cli import chaos, profile, scaling, sim, workflows_cli
from lego_cli.cluster import EmbeddedCluster, ProcessCluster

DEFAULT_GATEWAY = "127.0.0.1:50051"
API_KEY_ENV = "LEGO_API_KEY"
# `lego bench NAME`: each module has configure(parser) and run(args) -> exit code, and prints JSON.
BENCHMARKS: dict[str, str] = {
    "worker": "lego_cli.bench_worker",
    "dataengine": "lego_cli.bench_dataengine",
    "overhead": "lego_cli.bench_overhead",
    "slo": "lego_cli.bench_slo",
    "sweep": "lego_cli.bench_slo",  # the same replay, named for a directory of traces x policies
}
DEMO_PROMPT = "a red circle on a blue background"


def _add_generation_flags(parser: argparse.ArgumentParser, prompt_required: bool) -> None:
    parser.add_argument("--prompt", required=prompt_required, default=DEMO_PROMPT)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--workflow", default=TINY_SD15_TXT2IMG)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--out", default="out.png", help="where to write the PNG (default: out.png)")


def _inputs(args: argparse.Namespace) -> dict[str, Scalar]:
    names = ["prompt", "negative_prompt", "steps", "guidance_scale", "seed", "height", "width"]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway", default=DEFAULT_GATEWAY, help="the gateway's gRPC HOST:PORT")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"default: ${API_KEY_ENV}")


def _client(args: argparse.Namespace) -> GatewayClient:
    return GatewayClient(args.gateway, api_key=args.api_key or None)


def _write_result(out: str, image: GeneratedImage) -> None:
    Path(out).write_bytes(image.png)
    summary = {
        "out": out,
        "request_id": image.request_id,
        "latency_s": round(image.latency_s, 4),
        "nodes_executed": image.nodes_executed,
        "unpatched_calls": image.unpatched_calls,
        "skipped_steps": image.skipped_steps,
        "size": [image.width, image.height],
    }
    print(json.dumps(summary), flush=True)


async def _demo(args: argparse.Namespace) -> int:
    cluster = EmbeddedCluster(
        workers=args.workers, worker=_worker_config(args), coordinator_config=config_from(args)
    )
    async with cluster, AsyncGatewayClient(cluster.gateway_address) as client:
        image = await client.generate(args.workflow, _inputs(args))
    _write_result(args.out, image)
    return 0


async def _up_embedded(args: argparse.Namespace) -> int:
    cluster = EmbeddedCluster(
        workers=args.workers,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        worker=_worker_config(args),
        coordinator_config=config_from(args),
        gateway=gateway_options(args, args.grpc_port, args.http_port),
    )
    async with cluster:
        _announce(cluster.gateway_address, cluster.http_address, args)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    return 0


def _worker_config(args: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig(
        backend=args.backend,
        profile_dir=args.profile,
        time_scale=args.time_scale,
        memory_bytes=int(args.memory_gb * 10**9),
        embedding_cache_bytes=int(args.embedding_cache_mb * 2**20),
        lora_fetch_s=args.lora_fetch_s,
        lora_capacity=args.lora_capacity,
    )


def _worker_flags(args: argparse.Namespace) -> tuple[str, ...]:
    flags = [
        "--backend",
        args.backend,
        "--time-scale",
        str(args.time_scale),
        "--memory-gb",
        str(args.memory_gb),
        "--embedding-cache-mb",
        str(args.embedding_cache_mb),
        "--lora-capacity",
        str(args.lora_capacity),
    ]
    if args.lora_fetch_s is not None:
        flags += ["--lora-fetch-s", str(args.lora_fetch_s)]
    if args.profile is not None:
        flags += ["--profile", str(args.profile)]
    return tuple(flags)


def _coordinator_flags(args: argparse.Namespace) -> tuple[str, ...]:
    flags = [
        "--policy",
        args.policy,
        "--slo-factor",
        str(args.slo_factor),
        "--time-scale",
        str(args.time_scale),
    ]
    if args.enforce_slo:
        flags.append("--enforce-slo")
    if args.profile is not None:
        flags += ["--profile", str(args.profile)]
    return tuple(flags)


def _gateway_flags(args: argparse.Namespace) -> tuple[str, ...]:
    flags = ["--host", args.host]
    if args.api_keys_file is not None:
        flags += ["--api-keys-file", str(args.api_keys_file)]
    if args.insecure_no_auth:
        flags.append("--insecure-no-auth")
    return tuple(flags)


def _announce(gateway: str, http: str, args: argparse.Namespace) -> None:
    print(
        json.dumps({"gateway": gateway, "http": http, "workers": args.workers, "store": args.store}),
        flush=True,
    )


def _up_processes(args: argparse.Namespace) -> int:
    cluster = ProcessCluster(
        args.store,
        args.workers,
        args.grpc_port,
        args.http_port,
        worker_args=_worker_flags(args),
        coordinator_args=_coordinator_flags(args),
        coordinators=args.coordinators,
        gateway_args=_gateway_flags(args),
    )
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    desired: scaling.DesiredWorkers | None = None
    try:
        cluster.start()
        desired = scaling.DesiredWorkers(args.store, args.workers)  # `lego scale-workers N` sets it
        http = f"127.0.0.1:{args.http_port}" if args.http_port is not None else ""
        _announce(cluster.gateway_address, http, args)
        while not stopping:
            failed = cluster.reap()
            exited = [p.name for p in cluster.processes if p.process.poll() is not None]
            exited = [name for name in exited if name not in {d.name for d in cluster.draining}]
            if exited:
                print(f"error: {', '.join(exited)} exited; stopping the cluster", file=sys.stderr)
                return 1
            if failed:
                print(f"warning: {', '.join(failed)} did not drain cleanly", file=sys.stderr)
            count = desired.get()
            if count is not None and count != len(cluster.worker_processes()):
                cluster.scale_workers(count)
            time.sleep(0.2)
    finally:
        if desired is not None:
            desired.close()
        cluster.stop()
    return 0


def _up(args: argparse.Namespace) -> int:
    try:
        kind, host, port = parse_store_url(args.store)
        check_bind(args.host, load_api_keys(args.api_keys_file), args.insecure_no_auth)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if kind == "memory":
        return asyncio.run(_up_embedded(args))
    try:
        from lego.etcd_store import EtcdStore

        async def probe() -> None:
            store = await EtcdStore.connect(host, port)
            await store.close()

        asyncio.run(probe())
    except StoreUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return _up_processes(args)


def _generate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if not args.progress:
            image = client.generate(args.workflow, _inputs(args))
        else:  # step events on stderr as they come; stdout keeps its one summary line
            request_id = client.submit(args.workflow, _inputs(args)).request_id
            for event in client.progress(request_id):
                if event.kind == "step":
                    print(json.dumps(event.as_dict()), file=sys.stderr, flush=True)
            image = client.result(request_id)
    _write_result(args.out, image)
    return 0


def _watch(args: argparse.Namespace) -> int:
    """One JSON line per progress event until the request ends: 0 when it is done, else 1."""
    final = ""
    with _client(args) as client:
        for event in client.progress(args.request_id, node_events=args.node_events):
            print(json.dumps(event.as_dict()), flush=True)
            final = event.kind
    return 0 if final == "done" else 1


def _status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(json.dumps(client.cluster().as_dict()), flush=True)
    return 0


def _serve(args: argparse.Namespace, rest: list[str]) -> int:
    module = import_module(f"lego_{args.service}.__main__")
    result: int = module.main(rest)
    return result


def build_parser(benchmarks: bool = True) -> argparse.ArgumentParser:
    """The CLI's flags; `benchmarks` false leaves out those of each `lego bench NAME`, whose modules
    import torch and the services (seconds that the other commands need not wait)."""
    parser = argparse.ArgumentParser(
        prog="lego", description="LegoDiffusion: micro-served diffusion workflows."
    )
    parser.add_argument("--log-level", default="warning", help="service log level (default: warning)")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="start an embedded cluster, generate one image, exit")
    _add_generation_flags(demo, prompt_required=False)
    demo.set_defaults(workflow=LEGO_SHAPES_TXT2IMG)  # the trained shapes model draws the prompt
    demo.add_argument("--workers", type=int, default=1)
    add_backend_flags(demo)
    add_policy_flags(demo)

    up = commands.add_parser("up", help="run a local cluster until interrupted")
    up.add_argument("--workers", type=int, default=1)
    up.add_argument("--store", default="memory", help="memory (one process) | etcd://HOST:PORT (processes)")
    up.add_argument("--grpc-port", type=int, default=50051)
    up.add_argument("--http-port", type=int, default=None)
    add_backend_flags(up)
    add_policy_flags(up)
    up.add_argument("--coordinators", type=int, default=1, help="with etcd: a leader and standbys")
    up.add_argument("--host", default="127.0.0.1", help="the gateway's address to bind (default: loopback)")
    add_gateway_flags(up)

    generate = commands.add_parser("generate", help="generate an image on a running cluster")
    _add_generation_flags(generate, prompt_required=True)
    _add_client_flags(generate)
    generate.add_argument("--progress", action="store_true", help="print step events (JSON) on stderr")

    watch = commands.add_parser("watch", help="print a request's progress events as JSON lines")
    watch.add_argument("request_id")
    watch.add_argument("--node-events", action="store_true", help="also node_started/node_finished")
    _add_client_flags(watch)

    status = commands.add_parser("status", help="the cluster: workers, loaded models, queues, SLO window")
    _add_client_flags(status)

    workflows_cli.configure(commands.add_parser("workflows", help="list, compile or register workflows"))
    sim.configure(commands.add_parser("sim", help="simulate a trace on N profiled GPUs under a policy"))
    profile.configure(
        commands.add_parser("profile", help="measure models on this machine into a profile dir")
    )
    chaos.configure(
        commands.add_parser("chaos", help="a process cluster under load with random faults; JSON outcomes")
    )
    scaling.configure(
        commands.add_parser("scale-workers", help="grow or shrink a running `lego up --store etcd://…`")
    )

    bench = commands.add_parser("bench", help="benchmarks that print JSON figures")
    names = bench.add_subparsers(dest="benchmark", required=True)
    for name, module_name in BENCHMARKS.items() if benchmarks else ():
        module = import_module(module_name)
        module.configure(names.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0]))

    serve = commands.add_parser("serve", help="run one service (flags: python -m lego_<service> --help)")
    serve.add_argument("service", choices=["gateway", "compiler", "coordinator", "worker", "dataengine"])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(benchmarks="bench" in (sys.argv[1:] if argv is None else argv))
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        return _serve(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    configure_logging(args.log_level)
    try:
        if args.command == "demo":
            return asyncio.run(_demo(args))
        if args.command == "up":
            return _up(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "watch":
            return _watch(args)
        if args.command == "status":
            return _status(args)
        if args.command == "scale-workers":
            return scaling.run(args)
        if args.command == "sim":
            return sim.run(args)
        if args.command == "profile":
            return profile.run(args)
        if args.command == "chaos":
            return chaos.run(args)
        if args.command == "bench":
            result: int = import_module(BENCHMARKS[args.benchmark]).run(args)
            return result
        return workflows_cli.run(args)
    except InvalidRequest as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    except LegoError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
