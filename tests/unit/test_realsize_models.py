"""Real-size architectures from the bundled configs: parameter counts on the meta device (nothing
allocated) against the published model sizes."""

from __future__ import annotations

import pytest
import torch
from lego.profiles import profile_name
from lego_worker import realsize
from lego_worker.sources import SourceLoader

# architecture → published parameter count
PUBLISHED = {
    "sd15_unet": 859_520_964,
    "sd15_vae": 83_653_863,
    "clip_l": 123_060_480,  # CLIP ViT-L/14 text model
    "clip_g": 694_659_840,  # OpenCLIP ViT-bigG/14 text model with projection (SDXL, SD3)
    "sdxl_unet": 2_567_463_684,
    "sd3_medium_transformer": 2_028_328_000,
    "flux1_dev_transformer": 11_901_408_320,
    "t5_xxl_encoder": 4_762_310_656,
}


@pytest.mark.parametrize("architecture", sorted(PUBLISHED))
def test_parameter_count_matches_the_published_size(architecture: str) -> None:
    model = realsize.build(architecture, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    count = realsize.parameter_count(model)
    assert count == pytest.approx(PUBLISHED[architecture], rel=0.02)


def test_every_source_component_builds_on_meta_and_has_a_profile() -> None:
    for source, components in realsize.SOURCES.items():
        for component in components:
            model = realsize.load(source, component, device="meta")
            modules = [m for m in vars(model).values() if isinstance(m, torch.nn.Module)]
            if isinstance(model, torch.nn.Module):
                modules = [model]
            assert all(p.device.type == "meta" for m in modules for p in m.parameters())
            assert profile_name(f"{source}:{component}")


def test_stacks_hold_the_published_encoders() -> None:
    sd3 = realsize.load(realsize.REALSIZE_SD3, "text_encoders", device="meta")
    assert realsize.parameter_count(sd3.t5) == pytest.approx(PUBLISHED["t5_xxl_encoder"], rel=0.02)
    assert sd3.max_length == realsize.SD3_T5_LENGTH
    sdxl = realsize.load(realsize.REALSIZE_SDXL, "text_encoders", device="meta")
    expected = PUBLISHED["clip_l"] + PUBLISHED["clip_g"]
    assert realsize.parameter_count(sdxl) == pytest.approx(expected, rel=0.02)


def test_model_sources_resolve_realsize_ids_and_name_unknown_ones() -> None:
    scheduler = SourceLoader().load("realsize-sd15:scheduler")  # no weights: nothing big built
    assert type(scheduler).__name__ == "PNDMScheduler"
    with pytest.raises(ValueError, match="no component 'controlnet_canny'"):
        SourceLoader().load("realsize-sd15:controlnet_canny")
    with pytest.raises(ValueError, match="unknown real-size source 'realsize-nothing'"):
        SourceLoader().load("realsize-nothing:unet")
    with pytest.raises(ValueError, match="unknown real-size architecture"):
        realsize.build("sd2_unet", device="meta")
