"""Measures a model the way the H800 profiles (profiles/h800/*.json) were measured, on this machine:
disk → host and host → device load times, resident bytes, and per execution mode, batch size and
resolution the median time of the worker's own operator (TorchBackend.run) and the peak memory.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` over the timed calls (weights included);
on the CPU the model's parameter + buffer bytes plus the largest tensor any torch op produced during
one extra, untimed call (a lower bound on the true peak; RSS deltas are too noisy on a shared host).
Disk → host is the worker's prefetch (`SourceLoader.load`): for `tiny-*` / `realsize-*` presets that
is building the weights from a seed, for a diffusers directory reading it.
"""

from __future__ import annotations

import copy
import gc
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil
import torch
from lego.profiles import FAMILY_PROFILES, PROFILE_MODES, SOURCE_FAMILIES, parse_profile, profile_name
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lego_worker.backend import Item
from lego_worker.flux import FluxTextEncoders
from lego_worker.sd3 import SD3TextEncoders
from lego_worker.sources import TextEncoderStack, split_model_id
from lego_worker.torch_backend import TorchBackend

PROMPT = "a photograph of an astronaut riding a horse on the moon"
CLIP_TOKENS = 77
STEPS = 20  # the builtin workflows' default
GUIDANCE = 7.5
VAE_SCALE = 8

# family → its kind of operators (SD 3.5 Large runs SD3's)
_KINDS = {
    "sd15": "sd15",
    "sdxl": "sdxl",
    "sd3-medium": "sd3",
    "sd35-large": "sd3",
    "flux-dev": "flux",
    "flux-schnell": "flux",
}
_SCHEDULER_STEPS = [("noise_scheduler", "step"), ("noise_scheduler", "cfg_step")]
# kind → component → the (op, mode)s to time: one per profile mode the component's profile has
_OPS: dict[str, dict[str, list[tuple[str, str]]]] = {
    "sd15": {
        "text_encoder": [("text_encoder", "encode")],
        "unet": [("unet", "denoise")],
        "vae": [("vae", "encode"), ("vae", "decode")],
        "scheduler": [("noise_scheduler", "init"), *_SCHEDULER_STEPS],
        "controlnet": [("controlnet", "residuals")],
    },
    "sdxl": {
        "text_encoders": [("text_encoder", "encode_pooled")],
        "unet": [("unet", "denoise_pooled")],
        "vae": [("vae", "encode"), ("vae", "decode")],
        "scheduler": [("noise_scheduler", "init"), *_SCHEDULER_STEPS],
        "controlnet": [("controlnet", "residuals_pooled")],
    },
    "sd3": {
        "text_encoders": [("text_encoder", "encode_pooled")],
        "transformer": [("transformer", "denoise_sd3")],
        "vae": [("vae", "encode"), ("vae", "decode")],
        "scheduler": [("noise_scheduler", "init"), *_SCHEDULER_STEPS],
        "controlnet": [("controlnet", "residuals_sd3")],
    },
    "flux": {
        "text_encoders": [("text_encoder", "encode_pooled")],
        "transformer": [("transformer", "denoise_flux")],
        "vae": [("vae", "encode_control"), ("vae", "decode_packed")],
        "scheduler": [("noise_scheduler", "init_flow"), *_SCHEDULER_STEPS],
        "controlnet": [("controlnet", "residuals_flux")],
    },
}


@dataclass(frozen=True)
class Target:
    """A model id to profile: its family's operator kind, component and profile name."""

    model_id: str
    source: str
    kind: str
    component: str
    profile: str
    ops: list[tuple[str, str]]


def target(model_id: str) -> Target:
    """What `model_id` is profiled as; ValueError naming the known ones when it is not profilable."""
    try:
        source, component = split_model_id(model_id)
        name = profile_name(model_id)
    except (KeyError, ValueError) as error:
        raise ValueError(f"unknown model {model_id!r}: {error.args[0]}") from None
    base = source.partition("#")[0]
    kind = _KINDS.get(SOURCE_FAMILIES.get(base, ""))
    key = "controlnet" if component.startswith("controlnet") else component
    if kind is None or key not in _OPS[kind]:
        raise ValueError(
            f"unknown model {model_id!r}: profile a component of a known source "
            f"({sorted(SOURCE_FAMILIES)}), e.g. tiny-sd15:unet"
        )
    return Target(model_id, base, kind, component, name, _OPS[kind][key])


def has_resolution(op: str) -> bool:
    return op != "text_encoder"  # text encoders' cost does not depend on the image size


def point_count(targets: list[Target], sizes: list[int], batches: list[int]) -> int:
    return sum(len(batches) * (len(sizes) if has_resolution(op) else 1) for t in targets for op, _ in t.ops)


def _t5_length(source: str, kind: str) -> int:
    from lego_worker import realsize
    from lego_worker.presets_flux import T5_MAX_LENGTH

    if source.startswith("tiny-"):
        return T5_MAX_LENGTH
    return realsize.t5_length(source) or (512 if kind == "flux" else 256)


def latent_channels(source: str, kind: str) -> int:
    """The latents a family's scheduler makes: 16 for real SD3 / FLUX.1, 4 for SD 1.5, SDXL and
    every tiny preset (the builtin workflows' default; see lego.builtin_workflows)."""
    return 16 if kind in ("sd3", "flux") and not source.startswith("tiny-") else 4


def _randn(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def _denoiser_inputs(model: Any, t: Target, op: str, mode: str, height: int, width: int) -> Item:
    rng = np.random.default_rng(0)
    config = model.config
    if t.kind == "flux":
        sequence = (height // (2 * VAE_SCALE)) * (width // (2 * VAE_SCALE))
        item: Item = {
            "sample": _randn(rng, 1, sequence, config.in_channels),
            "timestep": np.array(500.0, dtype=np.float32),
            "guidance_scale": 3.5,
            "encoder_hidden_states": _randn(rng, 1, _t5_length(t.source, t.kind), config.joint_attention_dim),
            "pooled_embeds": _randn(rng, 1, config.pooled_projection_dim),
            "height": height,
            "width": width,
        }
        if op == "controlnet":
            item |= {
                "control_latents": _randn(rng, 1, sequence, config.in_channels),
                "conditioning_scale": 1.0,
            }
        return item
    latent = (config.in_channels, height // VAE_SCALE, width // VAE_SCALE)
    if t.kind == "sd3":
        tokens = CLIP_TOKENS + _t5_length(t.source, t.kind)
        item = {
            "sample": _randn(rng, 1, *latent),
            "timestep": np.array(500.0, dtype=np.float32),
            "encoder_hidden_states": _randn(rng, 1, tokens, config.joint_attention_dim or 1),
            "pooled_embeds": _randn(rng, 1, config.pooled_projection_dim),
        }
        if op == "controlnet":
            item |= {
                "control_samples": _randn(rng, 1, *latent),
                "control_row": 0,
                "control_scaling": np.array([[1.5305, 0.0609, 1.0]]),
                "conditioning_scale": 1.0,
            }
        return item
    item = {
        "sample": _randn(rng, 1, *latent),
        "timestep": np.array(500, dtype=np.int64),
        "encoder_hidden_states": _randn(rng, 1, CLIP_TOKENS, config.cross_attention_dim),
    }
    if config.addition_embed_type == "text_time":  # SDXL: pooled embedding + size conditioning
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        item["pooled_embeds"] = _randn(rng, 1, pooled)
    if op == "controlnet":
        item |= {
            "control_image": rng.random((1, 3, height, width), dtype=np.float32),
            "conditioning_scale": 1.0,
        }
    return item


def _vae_inputs(model: Any, mode: str, height: int, width: int) -> Item:
    rng = np.random.default_rng(0)
    channels = model.config.latent_channels
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    if mode == "decode":
        return {"latents": _randn(rng, 1, channels, height // factor, width // factor)}
    if mode == "decode_packed":
        sequence = (height // (2 * factor)) * (width // (2 * factor))
        return {"latents": _randn(rng, 1, sequence, 4 * channels), "height": height, "width": width}
    return {"pixels": rng.uniform(-1, 1, (1, 3, height, width)).astype(np.float32)}


def _scheduler_init(model: Any, t: Target, mode: str, height: int, width: int, key: str) -> Item:
    iterations = STEPS
    if mode == "init":
        probe = copy.deepcopy(model)
        probe.set_timesteps(STEPS)
        iterations = len(probe.timesteps)  # PNDM repeats a timestep
    return {
        "seed": 0,
        "height": height,
        "width": width,
        "steps": STEPS,
        "iterations": iterations,
        "latent_channels": latent_channels(t.source, t.kind),
        "vae_scale_factor": VAE_SCALE,
        "state_key": key,
    }


Call = Callable[[], object]


def prepared_call(
    backend: TorchBackend, t: Target, op: str, mode: str, batch: int, height: int, width: int
) -> tuple[Callable[[], None], Call]:
    """(setup, call): `setup` (untimed) puts state in place, `call` is the timed batch."""
    model = backend.host_model(t.model_id)
    run = backend.run

    def batched(item: Item) -> tuple[Callable[[], None], Call]:
        items = [dict(item) for _ in range(batch)]
        return (lambda: None), (lambda: run(op, t.model_id, mode, items, ()))

    if op == "text_encoder":
        return batched({"text": PROMPT})
    if op in ("unet", "transformer", "controlnet"):
        return batched(_denoiser_inputs(model, t, op, mode, height, width))
    if op == "vae":
        return batched(_vae_inputs(model, mode, height, width))
    init_mode = t.ops[0][1]
    inits = [_scheduler_init(model, t, init_mode, height, width, f"profile/{i}") for i in range(batch)]
    if mode.startswith("init"):
        return (lambda: None), (lambda: run(op, t.model_id, mode, inits, ()))
    steps: list[Item] = []

    def setup() -> None:  # a step advances the scheduler: start every timed step from a fresh init
        started = run(op, t.model_id, init_mode, inits, ())
        rng = np.random.default_rng(0)
        steps.clear()
        for init, out in zip(inits, started, strict=True):
            shape = out["latents"].shape
            item: Item = {"state_key": init["state_key"], "step_index": 0, "latents": out["latents"]}
            if mode == "cfg_step":
                item |= {
                    "noise_pred_uncond": _randn(rng, *shape),
                    "noise_pred_cond": _randn(rng, *shape),
                    "guidance_scale": GUIDANCE,
                }
            else:
                item["noise_pred"] = _randn(rng, *shape)
            steps.append(item)

    return setup, (lambda: run(op, t.model_id, mode, steps, ()))


class _LargestTensor(TorchDispatchMode):
    """Records the bytes of the largest tensor any torch op returns while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                self.largest = max(self.largest, value.numel() * value.element_size())
        return out


class Clock:
    """Times calls on one device: CUDA work is synchronised before the clock is read."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def median_and_peak(
        self, setup: Callable[[], None], call: Call, runs: int, model_bytes: int
    ) -> tuple[float, int]:
        setup()
        call()  # warm-up
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for _ in range(runs):
            setup()
            self.sync()
            started = time.perf_counter()
            call()
            self.sync()
            times.append(time.perf_counter() - started)
        if self.device.type == "cuda":
            peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            setup()
            tracker = _LargestTensor()
            with tracker:
                call()
            peak = model_bytes + tracker.largest
        return statistics.median(times), peak


def device_description(device: torch.device) -> tuple[str, int]:
    """(gpu_type, gpu_memory_total) for the profile: the CUDA device, or this host's CPU and RAM."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return str(properties.name), int(properties.total_memory)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {name} ({torch.get_num_threads()} threads)", int(psutil.virtual_memory().total)


@dataclass(frozen=True)
class Measured:
    profile: dict[str, Any]
    member_bytes: list[int]  # a text-encoder stack's members (empty for one model)


@contextmanager
def _fresh_backend(device: torch.device) -> Iterator[TorchBackend]:
    backend = TorchBackend(str(device))
    try:
        yield backend
    finally:
        del backend
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def profile_model(
    t: Target,
    device: torch.device,
    sizes: list[int],
    batches: list[int],
    runs: int,
    on_point: Callable[[str], None] = lambda _: None,
) -> Measured:
    """One model's profile (a JSON-ready dict in the H800 files' format) and its members' bytes."""
    gpu_type, total = device_description(device)
    clock = Clock(device)
    with _fresh_backend(device) as backend:
        disk_to_host = backend.prefetch(t.model_id)
        host_to_device = backend.load(t.model_id)
        clock.sync()
        model_bytes = backend.footprint(t.model_id)
        executions = []
        for op, mode in t.ops:
            results = []
            resolutions = sizes if has_resolution(op) else [0]
            for size in resolutions:
                for batch in batches:
                    setup, call = prepared_call(backend, t, op, mode, batch, size, size)
                    seconds, peak = clock.median_and_peak(setup, call, runs, model_bytes)
                    on_point(f"{t.model_id} {op}.{mode} {size or '-'}px x{batch}")
                    result: dict[str, Any] = {"batch_size": batch}
                    if size:
                        result |= {"height": size, "width": size}
                    results.append(result | {"execution_time": seconds, "gpu_memory_used": float(peak)})
            executions.append({"mode": PROFILE_MODES[(op, mode)], "results": results})
        members = _member_bytes(backend.host_model(t.model_id))
    profile = {
        "gpu_type": gpu_type,
        "gpu_memory_total": total,
        "model_name": t.profile,
        "loading": {
            "disk_to_host_mem_time": disk_to_host,
            "host_mem_to_gpu_time": host_to_device,
            "gpu_memory_required": float(model_bytes),
        },
        "execution": executions,
    }
    return Measured(profile, members)


def _bytes_of(module: torch.nn.Module) -> int:
    return sum(x.numel() * x.element_size() for x in [*module.parameters(), *module.buffers()])


def _member_bytes(model: Any) -> list[int]:
    """A text-encoder stack's members' bytes, in the order of its `A+B(+C)` profile name."""
    if isinstance(model, TextEncoderStack):
        return [_bytes_of(encoder) for encoder in model.encoders]
    if isinstance(model, SD3TextEncoders):
        return [*(_bytes_of(clip) for clip in model.clips), _bytes_of(model.t5)]
    if isinstance(model, FluxTextEncoders):
        return [_bytes_of(model.clip), _bytes_of(model.t5)]
    return []


def split_stack(measured: Measured) -> dict[str, dict[str, Any]]:
    """Profile name → profile. A stack of text encoders that runs as one node (`CLIP_L+CLIP_G+T5`) is
    measured as one call; each member's file gets its byte share of every figure, so that
    `lego.profiles.stacked` sums them back to the measurement."""
    profile, members = measured.profile, measured.member_bytes
    names = str(profile["model_name"]).split("+")
    if len(names) == 1:
        return {names[0]: profile}
    if len(members) != len(names):
        raise ValueError(f"{profile['model_name']}: the model has {len(members)} encoders, not {len(names)}")
    total = sum(members)
    shares = [m / total if total else 1 / len(names) for m in members]
    parts = {}
    for name, share in zip(names, shares, strict=True):
        part = copy.deepcopy(profile)
        part["model_name"] = name
        part["loading"] = {key: value * share for key, value in profile["loading"].items()}
        for execution in part["execution"]:
            for result in execution["results"]:
                result["execution_time"] *= share
                result["gpu_memory_used"] *= share
        parts[name] = part
    return parts


def batch_modes(profile: dict[str, Any]) -> tuple[int, int] | None:
    """(latency_mode, throughput_mode) batch sizes for model_batch.json from a profile's `default`
    mode at its largest resolution (`ModelProfile.batch_limits`); None when it has no `default`
    mode (VAEs, schedulers)."""
    parsed = parse_profile(profile)
    points = parsed.modes.get("default")
    if not points:
        return None
    return parsed.batch_limits("default", max(p.pixels for p in points))


def parse_device(text: str) -> torch.device:
    """`cpu`, `cuda` or `cuda:N`; ValueError when unknown or not present on this machine."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"unknown device {text!r} (use cpu or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {text!r} (use cpu or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{text!r}: no CUDA device on this machine")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", index)
    return device


def known_models() -> list[str]:
    """Every profilable `<source>:<component>` of the built-in presets (tiny-*, realsize-*)."""
    from lego_worker import realsize

    tiny = [
        f"{source}:{component}"
        for source, family in SOURCE_FAMILIES.items()
        if source.startswith("tiny-")
        for component in FAMILY_PROFILES[family]
    ]
    return tiny + [
        f"{source}:{component}" for source, parts in realsize.SOURCES.items() for component in parts
    ]
