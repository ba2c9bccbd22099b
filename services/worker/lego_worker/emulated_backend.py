"""The emulated backend: takes the time a real GPU would (from measured profiles), accounts its
memory, and returns correctly shaped placeholder tensors. It sleeps instead of computing, so dozens
of emulated GPUs run on two cores; `time_scale` K makes everything Kx faster than real time."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from lego.profiles import PROFILE_MODES, ProfileSet

from lego_worker.backend import Item, Outputs, PatchSet

VAE_SCALE_FACTOR = 8  # every profiled family's VAE
TEXT_TOKENS, TEXT_HIDDEN = 77, 768


def pixels_of(item: Item) -> int:
    """The image resolution a call works at, from its inputs (0 when it has none)."""
    if "height" in item and "width" in item:
        return int(item["height"]) * int(item["width"])
    for name in ("sample", "latents"):
        if name in item:
            shape = np.shape(item[name])
            return int(shape[-2] * VAE_SCALE_FACTOR * shape[-1] * VAE_SCALE_FACTOR)
    return 0


def placeholder_outputs(op: str, mode: str, item: Item) -> Outputs:
    if op == "text_encoder":
        return {"embeddings": np.zeros((1, TEXT_TOKENS, TEXT_HIDDEN), dtype=np.float16)}
    if op == "unet":
        return {"noise_pred": np.zeros_like(item["sample"])}
    if op == "vae" and mode == "decode":
        _, _, height, width = np.shape(item["latents"])
        return {
            "image": np.zeros((1, height * VAE_SCALE_FACTOR, width * VAE_SCALE_FACTOR, 3), dtype=np.uint8)
        }
    if op == "noise_scheduler":
        if mode == "init":
            factor = int(item["vae_scale_factor"])
            shape = (
                1,
                int(item["latent_channels"]),
                int(item["height"]) // factor,
                int(item["width"]) // factor,
            )
            latents = np.zeros(shape, dtype=np.float32)
        else:
            latents = np.asarray(item["latents"])
        return {"latents": latents, "model_input": latents, "timestep": np.array(0, dtype=np.int64)}
    raise ValueError(f"the emulated backend cannot run {op}.{mode}")


class EmulatedBackend:
    name = "emulated"

    def __init__(
        self, profiles: ProfileSet, time_scale: float = 1.0, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self.profiles = profiles
        self.time_scale = time_scale
        self._sleep = sleep
        self._host: set[str] = set()

    def _wait(self, seconds: float) -> float:
        scaled = seconds / self.time_scale
        if scaled > 0:
            self._sleep(scaled)
        return scaled

    def prefetch(self, model_id: str) -> float:
        if model_id in self._host:
            return 0.0
        spent = self._wait(self.profiles.for_model(model_id).disk_to_host_s)
        self._host.add(model_id)
        return spent

    def footprint(self, model_id: str) -> int:
        return self.profiles.for_model(model_id).peak_bytes()

    def load(self, model_id: str) -> float:
        self.prefetch(model_id)
        return self._wait(self.profiles.for_model(model_id).host_to_device_s)

    def unload(self, model_id: str) -> None:
        return None

    def host_models(self) -> list[str]:
        return sorted(self._host)

    def execution_s(self, op: str, model_id: str, mode: str, items: list[Item]) -> float:
        """Profiled seconds for this batch at real time (before the time scale)."""
        profile_mode = PROFILE_MODES.get((op, mode))
        if profile_mode is None:
            raise ValueError(f"the emulated backend cannot run {op}.{mode}")
        return self.profiles.for_model(model_id).execution_s(profile_mode, len(items), pixels_of(items[0]))

    def plan(self, op: str, model_id: str, mode: str, items: list[Item]) -> tuple[float, list[Outputs]]:
        """The seconds this batch takes at this time scale, and its outputs, without waiting."""
        seconds = self.execution_s(op, model_id, mode, items) / self.time_scale
        return seconds, [placeholder_outputs(op, mode, item) for item in items]

    def run(self, op: str, model_id: str, mode: str, items: list[Item], patches: PatchSet) -> list[Outputs]:
        seconds, outputs = self.plan(op, model_id, mode, items)
        if seconds > 0:
            self._sleep(seconds)
        return outputs

    def release(self, request_id: str) -> None:
        return None
