import pytest
from lego.profiles import ProfileSet, default_profile_dir, profile_name

PROFILES = ProfileSet(default_profile_dir())


def test_model_ids_map_to_profiles() -> None:
    assert profile_name("tiny-sd15:unet") == "StableDiffusion15"
    assert profile_name("tiny-sd15#private:vae") == "StableDiffusion15VAE"
    assert profile_name("profile:Flux1Schnell") == "Flux1Schnell"
    with pytest.raises(KeyError, match="no profile known for model 'mystery:unet'"):
        profile_name("mystery:unet")


def test_batch_size_rounds_up_to_the_next_profiled_one() -> None:
    unet = PROFILES.get("StableDiffusion15")
    one = unet.execution_s("default", 1, 512 * 512)
    four = unet.execution_s("default", 4, 512 * 512)
    assert unet.execution_s("default", 3, 512 * 512) == four
    assert one < four
    assert unet.execution_s("default", 16, 512 * 512) == 2 * unet.execution_s("default", 8, 512 * 512)


def test_the_closest_profiled_resolution_is_used_and_unknown_modes_are_named() -> None:
    vae = PROFILES.get("StableDiffusion15VAE")
    assert vae.execution_s("decode_latents", 1, 128 * 128) == vae.execution_s("decode_latents", 1, 512 * 512)
    with pytest.raises(KeyError, match="has no mode 'encode'"):
        vae.execution_s("encode", 1)


def test_loading_and_memory_figures() -> None:
    unet = PROFILES.get("StableDiffusion15")
    assert unet.memory_bytes == 1732438528
    assert unet.peak_bytes() >= unet.memory_bytes
    assert 0 < unet.host_to_device_s < unet.disk_to_host_s


def test_a_stack_of_text_encoders_costs_the_sum_of_its_members() -> None:
    assert profile_name("black-forest-labs/FLUX.1-dev:text_encoders") == "CLIP_Flux+T5_Flux"
    stack = PROFILES.for_model("stabilityai/stable-diffusion-3.5-large:text_encoders")
    members = [PROFILES.get(name) for name in ("CLIP_L", "CLIP_G", "T5")]
    assert stack.memory_bytes == sum(m.memory_bytes for m in members) > 14 * 10**9
    assert stack.host_to_device_s == pytest.approx(sum(m.host_to_device_s for m in members))
    for batch in (1, 3, 8):
        assert stack.execution_s("default", batch) == pytest.approx(
            sum(m.execution_s("default", batch) for m in members)
        )


def test_batch_sizes_are_read_off_the_curve_where_the_table_has_none() -> None:
    # FLUX.1 transformers gain ~6 % per item from batching, not worth a batch's latency.
    assert PROFILES.get("Flux1Schnell").batch_limits("default", 1024 * 1024) == (1, 1)
    assert PROFILES.get("Flux1Dev").batch_limits("default", 1024 * 1024) == (1, 1)  # as model_batch.json
    # A pair of FLUX.1 decodes costs what one does: batch two, and no more (four take twice as long).
    assert PROFILES.get("Flux1VAE").batch_limits("decode_latents", 1024 * 1024) == (2, 2)
    # SD3.5-Large decodes gain 26 % per item in fours, but two take 1.7 times one.
    assert PROFILES.get("StableDiffusion35LargeVAE").batch_limits("decode_latents", 1024 * 1024) == (1, 4)
    assert PROFILES.get("T5_Flux").batch_limits("default") == (1, 2)  # as model_batch.json
    with pytest.raises(KeyError, match="has no mode 'encode'"):
        PROFILES.get("Flux1VAE").batch_limits("encode")
