"""`lego profile`: measure models on this machine into a profile directory for `--profile DIR`.

Writes one `<ProfileName>.json` per model (the format of profiles/h800/*.json, named through
lego.profiles.profile_name) and merges latency / throughput batch sizes into model_batch.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lego.profiles import profile_name

MAX_SIDE = 2048


def _positive_ints(flag: str, multiple_of: int = 1, maximum: int | None = None) -> Any:
    def parse(text: str) -> list[int]:
        values = []
        for part in text.split(","):
            try:
                value = int(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{flag}: {part!r} is not an integer") from None
            if value < 1 or value % multiple_of or (maximum is not None and value > maximum):
                rule = f"a positive multiple of {multiple_of}" if multiple_of > 1 else "an integer >= 1"
                limit = f" up to {maximum}" if maximum is not None else ""
                raise argparse.ArgumentTypeError(f"{flag}: {value} must be {rule}{limit}")
            values.append(value)
        return sorted(set(values))

    return parse


def _positive_int_for(flag: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag}: {text!r} must be an integer >= 1")
        return value

    return parse


def _models(text: str) -> list[str]:
    models = [part.strip() for part in text.split(",") if part.strip()]
    if not models:
        raise argparse.ArgumentTypeError("--models: give at least one model id, e.g. tiny-sd15:unet")
    for model in models:
        try:
            profile_name(model)
        except KeyError:
            raise argparse.ArgumentTypeError(
                f"--models: unknown model {model!r} (e.g. tiny-sd15:unet, realsize-sdxl:text_encoders)"
            ) from None
    return models


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models", type=_models, required=True, help="comma-separated model ids, e.g. tiny-sd15:unet"
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    parser.add_argument(
        "--sizes",
        type=_positive_ints("--sizes", multiple_of=16, maximum=MAX_SIDE),
        default=[512],
        help="square image sides in pixels, comma-separated (multiples of 16; default 512)",
    )
    parser.add_argument(
        "--batch",
        type=_positive_ints("--batch"),
        default=[1, 2, 4, 8],
        help="batch sizes, comma-separated (default 1,2,4,8)",
    )
    parser.add_argument(
        "--runs",
        type=_positive_int_for("--runs"),
        default=3,
        help="timed runs per point after a warm-up (median; default 3)",
    )
    parser.add_argument("--out", type=Path, required=True, help="the profile directory to write")
    parser.add_argument(
        "--threads",
        type=_positive_int_for("--threads"),
        default=None,
        help="CPU threads for torch (default: torch's; on a shared host 1 avoids OpenMP spin contention)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, disable=not enabled, unit="point", dynamic_ncols=True)


def _merge_batch_table(path: Path, rows: dict[str, tuple[int, int]]) -> None:
    table = json.loads(path.read_text()) if path.exists() else {}
    for name, (latency, throughput) in rows.items():
        table[name] = {"latency_mode": latency, "throughput_mode": throughput}
    path.write_text(json.dumps(table, indent=4) + "\n")


def run(args: argparse.Namespace) -> int:
    import torch
    from lego_worker import profiler

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        device = profiler.parse_device(args.device)
    except ValueError as error:
        print(f"error: --device: {error}", file=sys.stderr)
        return 2
    try:
        targets = [profiler.target(model) for model in args.models]
    except ValueError as error:
        print(f"error: --models: {error}", file=sys.stderr)
        return 2
    names = [t.profile for t in targets]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        print(f"error: --models: several models map to the profile(s) {duplicates}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    batch_rows: dict[str, tuple[int, int]] = {}
    summary = []
    with _progress(profiler.point_count(targets, args.sizes, args.batch), not args.no_progress) as bar:
        for t in targets:

            def point(label: str) -> None:
                bar.set_description(label)
                bar.update(1)

            measured = profiler.profile_model(t, device, args.sizes, args.batch, args.runs, on_point=point)
            for name, profile in profiler.split_stack(measured).items():
                path = args.out / f"{name}.json"
                path.write_text(json.dumps(profile, indent=4) + "\n")
                modes = profiler.batch_modes(profile)
                if modes is not None:
                    batch_rows[name] = modes
                summary.append(f"{t.model_id} -> {path}")
    _merge_batch_table(args.out / "model_batch.json", batch_rows)
    print("\n".join(summary))
    return 0
