import argparse
from pathlib import Path

from lego.service_main import base_parser, run_service
from lego.store import ClusterStore

from lego_coordinator.approx_cache import DEFAULT_CAPACITY_BYTES
from lego_coordinator.scheduler import POLICIES
from lego_coordinator.service import CoordinatorConfig, CoordinatorService, serve


async def _start(store: ClusterStore, args: argparse.Namespace) -> CoordinatorService:
    return await serve(store, args.host, args.port, config_from(args))


def config_from(args: argparse.Namespace) -> CoordinatorConfig:
    return CoordinatorConfig(
        policy=args.policy,
        enforce_slo=args.enforce_slo,
        slo_factor=args.slo_factor,
        profile_dir=args.profile,
        time_scale=getattr(args, "time_scale", 1.0),  # `lego up` shares the workers' flag
        approx_cache_mb=args.approx_cache_mb,
        ready_depth=args.ready_depth,
    )


def positive_mb(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 MiB, got {value:g}")
    return value


def ready_depth(text: str) -> int:
    value = int(text)
    if value not in (1, 2):
        raise argparse.ArgumentTypeError(f"must be 1 or 2, got {value}")
    return value


def add_ready_depth_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ready-depth",
        type=ready_depth,
        default=1,
        help="lego: a worker takes a batch from the ready queue only while it holds fewer than this "
        "many (1, the default: bound when it frees; 2: one queued behind its running batch)",
    )


def add_policy_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policy", choices=POLICIES, default="lego", help="scheduling policy (default: lego)"
    )
    parser.add_argument(
        "--enforce-slo",
        action="store_true",
        help="admission control (429 when an SLO cannot be met), deadline drops",
    )
    parser.add_argument(
        "--slo-factor", type=float, default=2.0, help="default SLO = factor x standalone latency"
    )
    parser.add_argument(
        "--approx-cache-mb",
        type=positive_mb,
        default=DEFAULT_CAPACITY_BYTES / 2**20,
        help="cached latents of approximate caching, in MiB, kept in the data engines "
        f"(default {DEFAULT_CAPACITY_BYTES // 2**20})",
    )
    add_ready_depth_flag(parser)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("coordinator")
    add_policy_flags(parser)
    parser.add_argument("--profile", type=Path, default=None, help="profile dir for cost estimates")
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="the emulated workers' time scale (cost estimates / K)"
    )
    return run_service("coordinator", _start, argv, parser)


if __name__ == "__main__":
    raise SystemExit(main())
