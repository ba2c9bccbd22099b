"""Model sources limited to configured roots: registration refuses others, and so do the workers."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from lego.builtin_workflows import sd15_txt2img
from lego.grpc_server import channel
from lego.model_sources import SourcePolicy
from lego.store import MemoryStore
from lego.v1 import compiler_pb2_grpc
from lego.workflow import LoRA
from lego_compiler import service as compiler
from lego_compiler.service import source_refusals
from lego_worker.lora import PatchState
from lego_worker.sources import SourceLoader


def test_without_roots_every_source_is_allowed() -> None:
    assert SourcePolicy.parse("").refusal("/anywhere/at/all") is None
    assert SourcePolicy.from_env(None, {"LEGO_MODEL_ROOTS": " /models , acme/ "}).roots == (
        "/models",
        "acme/",
    )


def test_roots_allow_presets_their_directories_and_listed_hub_ids(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "sd15").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    policy = SourcePolicy((str(models), "acme/", "org/exact"))
    bundled = ("tiny-sd15", "tiny-sd15#copy", "builtin", "lego-shapes", "realsize-sdxl")
    for allowed in (*bundled, str(models / "sd15"), "acme/sd", "org/exact"):
        assert policy.refusal(allowed) is None, allowed
    escapes = [
        str(models / ".." / "elsewhere"),
        str(tmp_path / "models-evil"),
        "/etc",
        "org/exactly",
        "other/x",
    ]
    for refused in escapes:
        assert "outside the configured model roots" in (policy.refusal(refused) or ""), refused
    link = models / "link"
    link.symlink_to(tmp_path / "elsewhere")
    assert policy.refusal(str(link)) is not None  # a symlink out of the root does not get out


def test_workers_refuse_to_load_models_and_loras_outside_the_roots(tmp_path: Path) -> None:
    policy = SourcePolicy((str(tmp_path),))
    with pytest.raises(PermissionError, match="outside the configured model roots"):
        SourceLoader(policy).load("/etc/sd15:unet")
    with pytest.raises(PermissionError, match="outside the configured model roots"):
        PatchState(policy).apply(object(), (("/etc/lora.safetensors", 1.0),))
    assert SourceLoader(policy).load("builtin:image") is not None


async def test_registration_refuses_workflows_naming_sources_outside_the_roots(tmp_path: Path) -> None:
    policy = SourcePolicy((str(tmp_path),))
    outside = sd15_txt2img("outside", "/etc/sd15", loras=[LoRA("/etc/lora.safetensors")])
    assert len(source_refusals(outside, policy)) == 2
    assert source_refusals(sd15_txt2img("inside", str(tmp_path / "sd15")), policy) == []
    service = await compiler.serve(MemoryStore(), policy=policy)
    try:
        async with channel(service.address) as chan:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await compiler_pb2_grpc.CompilerStub(chan).RegisterWorkflow(outside)
    finally:
        await service.stop()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'/etc/sd15' is outside the configured model roots" in (caught.value.details() or "")
