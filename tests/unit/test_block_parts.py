"""ControlNet block samples part by part: a ControlNet hands each block's sample over while it runs
(the very values it returns), and a transformer given samples still arriving runs its first blocks
before the later samples exist, with the same result as from the whole tensors."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import SD3ControlNetModel, SD3Transformer2DModel
from lego_worker.flux import controlnet_residuals_flux, pack, transformer_denoise_flux
from lego_worker.parts import ArrivingParts
from lego_worker.presets_flux import FLUX_LATENT_CHANNELS, build_tiny_flux_controlnet, build_tiny_flux_dev
from lego_worker.presets_sd3 import _TRANSFORMER_CONFIG, CLIP_PROJECTION, T5_HIDDEN
from lego_worker.sd3 import controlnet_residuals_sd3, transformer_denoise_sd3

CPU = torch.device("cpu")


class Recorder:
    """A part sink that keeps what it was handed, in order."""

    def __init__(self) -> None:
        self.totals: dict[tuple[int, str], int] = {}
        self.parts: list[tuple[int, str, int, np.ndarray]] = []

    def announce(self, item: int, output: str, total: int) -> None:
        assert not any(p[:2] == (item, output) for p in self.parts), "announced after its first part"
        self.totals[item, output] = total

    def part(self, item: int, output: str, index: int, part: np.ndarray) -> None:
        self.parts.append((item, output, index, part))


def sd3_models() -> tuple[SD3Transformer2DModel, SD3ControlNetModel]:
    """A transformer of 4 blocks and a ControlNet of 2: transformer blocks 0-1 add sample 0, 2 adds 1."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(num_layers=4, **_TRANSFORMER_CONFIG).eval()
        torch.manual_seed(1)
        controlnet = SD3ControlNetModel(
            num_layers=2, force_zeros_for_pooled_projection=False, **_TRANSFORMER_CONFIG
        ).eval()
        for linear in [*controlnet.controlnet_blocks, controlnet.pos_embed_input.proj]:
            torch.nn.init.normal_(linear.weight, std=0.1)
            torch.nn.init.normal_(linear.bias, std=0.1)
    return transformer, controlnet


def sd3_items(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "sample": normal(1, 4, 8, 8),
        "timestep": np.array(700.0, np.float32),
        "encoder_hidden_states": normal(1, 12, T5_HIDDEN),
        "pooled_embeds": normal(1, 2 * CLIP_PROJECTION),
        "control_samples": normal(2, 4, 8, 8),
        "control_row": seed % 2,
        "control_scaling": np.array([[1.5, 0.06, 1.0]]),
        "conditioning_scale": 0.7,
    }


def flux_items(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "sample": pack(torch.from_numpy(normal(1, FLUX_LATENT_CHANNELS, 8, 8))).numpy(),
        "timestep": np.array(800.0, np.float32),
        "guidance_scale": 3.5,
        "encoder_hidden_states": normal(1, 10, 32),
        "pooled_embeds": normal(1, 32),
        "height": 64,
        "width": 64,
        "control_latents": pack(torch.from_numpy(normal(1, FLUX_LATENT_CHANNELS, 8, 8))).numpy(),
        "conditioning_scale": 0.8,
    }


def assert_parts_are_the_outputs(recorded: Recorder, outputs: list[dict[str, np.ndarray]]) -> None:
    assert recorded.totals == {(i, name): out[name].shape[1] for i, out in enumerate(outputs) for name in out}
    for item, output, index, part in recorded.parts:
        assert np.array_equal(part, outputs[item][output][:, index])
    expected = {
        (i, name, k) for i, out in enumerate(outputs) for name in out for k in range(out[name].shape[1])
    }
    assert {(i, name, k) for i, name, k, _ in recorded.parts} == expected


def test_an_sd3_controlnet_hands_over_each_block_sample_it_returns() -> None:
    _, controlnet = sd3_models()
    items = [sd3_items(1), sd3_items(2)]
    recorded = Recorder()
    outputs = controlnet_residuals_sd3(controlnet, items, CPU, recorded)
    assert [(item, index) for item, _, index, _ in recorded.parts] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert_parts_are_the_outputs(recorded, outputs)
    mixed = [sd3_items(3), {**sd3_items(4), "conditioning_scale": 0.3}]  # run item by item
    recorded = Recorder()
    assert_parts_are_the_outputs(recorded, controlnet_residuals_sd3(controlnet, mixed, CPU, recorded))
    assert {item for item, *_ in recorded.parts} == {0, 1}


@pytest.mark.parametrize("single_layers", [1, 0])
def test_a_flux_controlnet_hands_over_double_and_single_block_samples(single_layers: int) -> None:
    controlnet = build_tiny_flux_controlnet("controlnet_canny", 0)
    if not single_layers:
        controlnet.single_transformer_blocks = torch.nn.ModuleList()
        controlnet.controlnet_single_blocks = torch.nn.ModuleList()
    items = [flux_items(1), flux_items(2)]
    recorded = Recorder()
    outputs = controlnet_residuals_flux(controlnet, items, CPU, recorded)
    assert outputs[0]["single_block_samples"].shape[1] == single_layers
    assert_parts_are_the_outputs(recorded, outputs)


class Producer(threading.Thread):
    """Hands over part k of stream s in `order`; an entry with a gate only once that gate is set
    (a transformer block ran). A consumer that needed that part before running the block would
    leave the producer waiting (`stalled`)."""

    def __init__(
        self,
        streams: list[tuple[ArrivingParts, np.ndarray]],
        order: list[tuple[int, int, threading.Event | None]],
    ) -> None:
        super().__init__(daemon=True)
        self.streams, self.order, self.stalled = streams, order, False

    def run(self) -> None:
        for parts, whole in self.streams:  # what a producer says before it computes
            parts.announce(whole.shape[1])
        for stream, index, gate in self.order:
            if gate is not None and not gate.wait(10):
                self.stalled = True
            parts, whole = self.streams[stream]
            parts.add(index, np.ascontiguousarray(whole[:, index]))


def ran(block: torch.nn.Module) -> threading.Event:
    """Set once `block` has run forward."""
    done = threading.Event()
    block.register_forward_hook(lambda *_: done.set())
    return done


def arriving(tensor_id: str, timeout_s: float = 30.0) -> ArrivingParts:
    return ArrivingParts(tensor_id, timeout_s)


def test_an_sd3_transformer_runs_its_first_blocks_before_the_later_samples_exist() -> None:
    transformer, controlnet = sd3_models()
    items = [sd3_items(1), sd3_items(2)]
    samples = controlnet_residuals_sd3(controlnet, items, CPU)
    denoise = [
        {k: v for k, v in item.items() if not k.startswith("control")} | {"block_samples": s["block_samples"]}
        for item, s in zip(items, samples, strict=True)
    ]
    whole = transformer_denoise_sd3(transformer, denoise, CPU)
    streams = [(arriving(f"r{i}/cn/block_samples"), s["block_samples"]) for i, s in enumerate(samples)]
    block_1 = ran(transformer.transformer_blocks[1])  # blocks 0 and 1 add sample 0, block 2 sample 1
    producer = Producer(streams, [(0, 0, None), (1, 0, None), (0, 1, block_1), (1, 1, None)])
    producer.start()
    lazy = [{**item, "block_samples": stream} for item, (stream, _) in zip(denoise, streams, strict=True)]
    streamed = transformer_denoise_sd3(transformer, lazy, CPU)
    producer.join(5)
    assert not producer.stalled, "the transformer waited for sample 1 before running blocks 0 and 1"
    assert [a.parts_used for a, _ in streams] == [2, 2]
    assert all(np.array_equal(a["noise_pred"], b["noise_pred"]) for a, b in zip(whole, streamed, strict=True))


def test_a_flux_transformer_runs_its_double_blocks_before_the_single_samples_exist() -> None:
    transformer = build_tiny_flux_dev(0).transformer
    controlnet = build_tiny_flux_controlnet("controlnet_canny", 0)
    items = [flux_items(1)]
    samples = controlnet_residuals_flux(controlnet, items, CPU)[0]
    denoise = {k: v for k, v in items[0].items() if k != "control_latents"} | samples
    whole = transformer_denoise_flux(transformer, [denoise], CPU)
    streams = [
        (arriving("r/cn/block_samples"), samples["block_samples"]),
        (arriving("r/cn/single_block_samples"), samples["single_block_samples"]),
    ]
    producer = Producer(streams, [(0, 0, None), (1, 0, ran(transformer.transformer_blocks[0]))])
    producer.start()
    lazy = {**denoise, "block_samples": streams[0][0], "single_block_samples": streams[1][0]}
    streamed = transformer_denoise_flux(transformer, [lazy], CPU)
    producer.join(5)
    assert not producer.stalled, "the transformer waited for the single samples before its double blocks"
    assert np.array_equal(whole[0]["noise_pred"], streamed[0]["noise_pred"])


def test_arriving_parts_answer_from_the_whole_tensor_and_fail_clearly() -> None:
    whole = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    parts = arriving("r/cn/block_samples")
    parts.announce(3)
    parts.add(0, whole[:, 0])
    parts.complete(whole)  # a producer that streamed only part 0, then published the whole
    assert len(parts) == 3 and np.array_equal(parts[2], whole[:, 2]) and parts.parts_used == 0
    assert np.array_equal(parts[0], whole[:, 0]) and parts.parts_used == 1
    with pytest.raises(IndexError):
        parts[3]
    broken = arriving("r/cn/block_samples")
    broken.announce(3)
    broken.add(0, whole[:, 0])
    broken.fail(ConnectionError("data engine gone"))
    with pytest.raises(RuntimeError, match="part 1 will not arrive: data engine gone"):
        broken[1]
    with pytest.raises(TimeoutError, match="r/late/x: the number of parts did not arrive within 0 s"):
        len(arriving("r/late/x", timeout_s=0.05))
