"""ComfyUI API-format import: supported nodes, the model map, and errors that name node and input."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from lego import operators
from lego.builtin_workflows import sd15_txt2img
from lego.graph import validate_spec
from lego.passes import optimise
from lego_compiler.comfyui import ComfyUIError, import_comfyui, supported_classes
from lego_compiler.model_map import ModelMap, ModelMapError, load_model_map

TXT2IMG = json.loads((Path(__file__).parents[1] / "data" / "comfyui_txt2img.json").read_text())
ISSUE_CLASSES = {
    "CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "KSamplerAdvanced",
    "VAEDecode", "VAEEncode", "SaveImage", "PreviewImage", "LoadImage", "LoraLoader",
    "LoraLoaderModelOnly", "ControlNetLoader", "ControlNetApply", "ControlNetApplyAdvanced",
}  # fmt: skip


def prompt(**changes: dict[str, Any]) -> dict[str, Any]:
    result = copy.deepcopy(TXT2IMG)
    for node_id, node in changes.items():
        if node is None:
            del result[node_id]
        else:
            result[node_id] = node
    return result


def loop_of(spec):  # type: ignore[no-untyped-def]
    return next(n for n in spec.nodes if n.op == operators.DENOISE_LOOP)


def test_every_node_class_the_issue_lists_is_supported() -> None:
    assert set(supported_classes()) >= ISSUE_CLASSES


def test_txt2img_compiles_to_the_same_ir_as_the_python_builder() -> None:
    spec = import_comfyui(TXT2IMG, "c")
    assert validate_spec(spec) == []
    python = sd15_txt2img("c", "tiny-sd15", default_size=64)
    assert [(n.op, n.model, n.mode) for n in spec.nodes] == [(n.op, n.model, n.mode) for n in python.nodes]
    assert dict(loop_of(spec).attributes) == dict(loop_of(python).attributes)
    defaults = {i.name: i.default_value for i in spec.inputs}
    assert defaults["prompt"].string_value == "a red circle on a blue background"
    assert defaults["negative_prompt"].string_value == "blurry"
    assert (defaults["seed"].int_value, defaults["steps"].int_value) == (42, 4)
    assert defaults["guidance_scale"].float_value == 7.5
    assert (defaults["height"].int_value, defaults["width"].int_value) == (64, 64)


def test_unsupported_node_classes_are_named_with_their_ids() -> None:
    bad = prompt(**{"10": {"class_type": "UpscaleModelLoader", "inputs": {}}})
    with pytest.raises(ComfyUIError) as caught:
        import_comfyui(bad, "c")
    assert "node 10: unsupported ComfyUI node class 'UpscaleModelLoader'" in caught.value.errors
    assert "KSampler" in caught.value.errors[-1]  # lists what is supported


def test_a_dangling_link_and_a_wrong_kind_name_node_and_input() -> None:
    dangling = prompt(**{"8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["44", 2]}}})
    with pytest.raises(ComfyUIError, match=r"node 8 \(VAEDecode\): input 'vae' links to node 44"):
        import_comfyui(dangling, "c")
    wrong = prompt(**{"8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 1]}}})
    with pytest.raises(ComfyUIError, match=r"node 8 \(VAEDecode\): input 'vae' expects VAE, got CLIP"):
        import_comfyui(wrong, "c")


def test_unknown_checkpoint_is_an_error_naming_the_node() -> None:
    unknown = prompt(**{"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.ckpt"}}})
    with pytest.raises(
        ComfyUIError, match=r"node 4 \(CheckpointLoaderSimple\): checkpoint 'x.ckpt' is not in"
    ):
        import_comfyui(unknown, "c")


def _checkpoint(name: str) -> dict[str, Any]:
    return {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}


@pytest.mark.parametrize(
    ("checkpoint", "denoiser", "mode"),
    [
        ("sd_xl_base_1.0.safetensors", "stabilityai/stable-diffusion-xl-base-1.0:unet", "encode_pooled"),
        ("sd3.5_large.safetensors", "stabilityai/stable-diffusion-3.5-large:transformer", "encode_pooled"),
        ("tiny-sdxl.safetensors", "tiny-sdxl:unet", "encode_pooled"),
    ],
)
def test_sdxl_and_sd3_checkpoints_use_their_families_operators(
    checkpoint: str, denoiser: str, mode: str
) -> None:
    spec = import_comfyui(prompt(**{"4": _checkpoint(checkpoint)}), "c")
    assert validate_spec(spec) == []
    loop = loop_of(spec)
    assert loop.model == denoiser
    assert {b.name for b in loop.inputs} >= {"pooled_prompt_embeds", "negative_pooled_prompt_embeds"}
    assert loop.attributes["extra_iterations"] == "0"  # Euler / flow matching: one iteration per step
    assert {n.mode for n in spec.nodes if n.op == "text_encoder"} == {mode}


def test_flux_takes_its_guidance_from_flux_guidance_and_needs_cfg_1() -> None:
    nodes = prompt(
        **{
            "4": _checkpoint("tiny-flux-dev.safetensors"),
            "10": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["6", 0], "guidance": 2.5}},
        }
    )
    nodes["3"]["inputs"]["positive"] = ["10", 0]
    nodes["3"]["inputs"]["cfg"] = 1.0
    spec = import_comfyui(nodes, "c")
    assert validate_spec(spec) == []
    loop = loop_of(spec)
    assert loop.attributes["guidance"] == "embedded"
    assert {i.name: i.default_value.float_value for i in spec.inputs}["guidance_scale"] == 2.5
    assert [n.mode for n in spec.nodes if n.op == "vae"] == ["decode_packed"]
    nodes["3"]["inputs"]["cfg"] = 7.0
    with pytest.raises(ComfyUIError, match=r"FLUX\.1 has no CFG"):
        import_comfyui(nodes, "c")


def test_well_known_sd15_file_names_resolve_without_weights() -> None:
    real = {
        "class_type": "CheckpointLoaderSimple",
        "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"},
    }
    spec = import_comfyui(prompt(**{"4": real}), "c")
    assert loop_of(spec).model == "stable-diffusion-v1-5/stable-diffusion-v1-5:unet"


def test_lora_loaders_patch_the_denoiser_through_the_model_map(tmp_path: Path) -> None:
    nodes = prompt(
        **{
            "10": {
                "class_type": "LoraLoader",
                "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": "style.safetensors",
                           "strength_model": 0.7, "strength_clip": 1.0},
            },
            "11": {
                "class_type": "LoraLoaderModelOnly",
                "inputs": {"model": ["10", 0], "lora_name": "detail.safetensors", "strength_model": 0.3},
            },
        }
    )  # fmt: skip
    nodes["3"]["inputs"]["model"] = ["11", 0]
    nodes["6"]["inputs"]["clip"] = ["10", 1]
    with pytest.raises(ComfyUIError, match=r"LoRA 'style\.safetensors' is not in the model map"):
        import_comfyui(nodes, "c")
    model_map = ModelMap().extended(
        {"loras": {"style.safetensors": "/l/style.safetensors"}, "lora_dir": "/d"}
    )
    spec = import_comfyui(nodes, "c", model_map)
    patches = [(p.source, round(p.scale, 3)) for p in loop_of(spec).patches]
    assert patches == [("/l/style.safetensors", 0.7), ("/d/detail.safetensors", 0.3)]
    assert validate_spec(spec) == []


def test_controlnet_apply_advanced_becomes_an_adapter_with_an_image_input() -> None:
    nodes = prompt(
        **{
            "12": {"class_type": "LoadImage", "inputs": {"image": "edges.png"}},
            "13": {
                "class_type": "ControlNetLoader",
                "inputs": {"control_net_name": "control_v11p_sd15_canny.pth"},
            },
            "14": {
                "class_type": "ControlNetApplyAdvanced",
                "inputs": {"positive": ["6", 0], "negative": ["7", 0], "control_net": ["13", 0],
                           "image": ["12", 0], "strength": 0.9, "start_percent": 0.0, "end_percent": 1.0},
            },
        }
    )  # fmt: skip
    nodes["3"]["inputs"]["positive"] = ["14", 0]
    nodes["3"]["inputs"]["negative"] = ["14", 1]
    spec = import_comfyui(nodes, "c")
    assert validate_spec(spec) == []
    adapter = loop_of(spec).adapters[0]
    assert adapter.model == "lllyasviel/control_v11p_sd15_canny:controlnet"
    assert {i.name: i.default_value.string_value for i in spec.inputs}["image"] == "edges.png"
    assert {i.name for i in spec.inputs} >= {"prompt", "negative_prompt"}  # traced through the apply node


def test_vae_encode_with_denoise_is_img2img_and_preview_is_an_output() -> None:
    nodes = prompt(
        **{
            "12": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
            "15": {"class_type": "VAEEncode", "inputs": {"pixels": ["12", 0], "vae": ["4", 2]}},
            "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
        }
    )
    nodes["3"]["inputs"]["latent_image"] = ["15", 0]
    nodes["3"]["inputs"]["denoise"] = 0.6
    spec = optimise(import_comfyui(nodes, "c"))
    assert validate_spec(spec) == []
    assert {i.name: i.default_value.float_value for i in spec.inputs}["strength"] == pytest.approx(0.6)
    assert "init_latents" in {b.name for b in loop_of(spec).inputs}
    assert [o.name for o in spec.outputs] == ["image"]
    nodes["4"] = _checkpoint("tiny-sd3.safetensors")  # SD3 img2img too
    assert validate_spec(import_comfyui(nodes, "c")) == []
    nodes["4"] = _checkpoint("tiny-flux-dev.safetensors")
    nodes["3"]["inputs"]["cfg"] = 1.0
    with pytest.raises(ComfyUIError, match=r"img2img .* is not supported for flux"):
        import_comfyui(nodes, "c")
    nodes["3"]["inputs"]["latent_image"] = ["5", 0]
    nodes["4"] = _checkpoint("tiny-sd15.safetensors")
    with pytest.raises(ComfyUIError, match=r"node 3 \(KSampler\): denoise must be 1.0 with an empty latent"):
        import_comfyui(nodes, "c")


def test_ksampler_advanced_and_partial_sampling() -> None:
    advanced = {
        "class_type": "KSamplerAdvanced",
        "inputs": {"add_noise": "enable", "noise_seed": 5, "steps": 3, "cfg": 1.0, "sampler_name": "euler",
                   "scheduler": "normal", "start_at_step": 0, "end_at_step": 10000,
                   "return_with_leftover_noise": "disable", "model": ["4", 0], "positive": ["6", 0],
                   "negative": ["7", 0], "latent_image": ["5", 0]},
    }  # fmt: skip
    spec = import_comfyui(prompt(**{"3": advanced}), "c")
    assert {i.name: i.default_value.int_value for i in spec.inputs}["seed"] == 5
    advanced["inputs"]["start_at_step"] = 2
    with pytest.raises(ComfyUIError, match="partial sampling is not supported"):
        import_comfyui(prompt(**{"3": advanced}), "c")


def test_ui_format_and_workflows_without_outputs_are_explained() -> None:
    with pytest.raises(ComfyUIError, match="Save \\(API Format\\)"):
        import_comfyui({"nodes": [], "links": []}, "c")
    with pytest.raises(ComfyUIError, match="no SaveImage or PreviewImage"):
        import_comfyui(prompt(**{"9": None}), "c")


def test_model_map_files_extend_the_default(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text(
        json.dumps({"checkpoints": {"mine.safetensors": {"source": "/m/sd15", "family": "sd15"}}})
    )
    model_map = load_model_map(path)
    assert model_map.checkpoint("mine.safetensors").source == "/m/sd15"
    assert model_map.checkpoint("tiny-sd15.safetensors").source == "tiny-sd15"
    path.write_text(json.dumps({"checkpoints": {"bad": {"source": "x", "family": "sd2"}}}))
    with pytest.raises(ModelMapError, match="needs a source and a family"):
        load_model_map(path)


def test_a_flux_controlnet_is_conditioned_on_the_control_images_latents() -> None:
    nodes = prompt(
        **{
            "4": _checkpoint("tiny-flux-dev.safetensors"),
            "12": {"class_type": "LoadImage", "inputs": {"image": "edges.png"}},
            "13": {
                "class_type": "ControlNetLoader",
                "inputs": {"control_net_name": "tiny-flux-controlnet-canny.safetensors"},
            },
            "14": {
                "class_type": "ControlNetApply",
                "inputs": {
                    "conditioning": ["6", 0],
                    "control_net": ["13", 0],
                    "image": ["12", 0],
                    "strength": 0.7,
                },
            },
        }
    )
    nodes["3"]["inputs"] |= {"positive": ["14", 0], "cfg": 1.0}
    spec = import_comfyui(nodes, "c")
    assert validate_spec(spec) == []
    adapter = loop_of(spec).adapters[0]
    assert (adapter.kind, adapter.model) == ("flux_controlnet", "tiny-flux-dev:controlnet_canny")
    assert [n.mode for n in spec.nodes if n.op == "vae"] == ["encode_control", "decode_packed"]
