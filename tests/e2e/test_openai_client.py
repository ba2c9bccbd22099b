"""The official `openai` package, unchanged, generates images through the gateway."""

from __future__ import annotations

import base64

import httpx
import openai
import pytest
from lego.builtin_workflows import TINY_SD15_TXT2IMG
from lego_cli.cluster import EmbeddedCluster

from tests.pipeline_reference import decode_png


async def test_the_openai_client_lists_models_and_generates_images() -> None:
    async with EmbeddedCluster(workers=1, http_port=0) as cluster:
        client = openai.AsyncOpenAI(
            base_url=f"http://{cluster.http_address}/v1", api_key="unused", max_retries=0
        )
        models = await client.models.list()
        inline = await client.images.generate(
            model=TINY_SD15_TXT2IMG,
            prompt="a red circle on a blue background",
            n=2,
            size="64x64",  # OpenAI's own sizes are larger; any WxH goes to the workflow
            response_format="b64_json",
            extra_body={"steps": 3, "seed": 11},
        )
        linked = await client.images.generate(
            model=TINY_SD15_TXT2IMG,
            prompt="a red circle on a blue background",
            size="64x64",
            extra_body={"steps": 3, "seed": 11},
        )
        assert linked.data is not None and linked.data[0].url is not None
        async with httpx.AsyncClient() as http:
            fetched = await http.get(linked.data[0].url)
        with pytest.raises(openai.BadRequestError) as refused:
            await client.images.generate(model=TINY_SD15_TXT2IMG, prompt="x", size="64xbig")
        with pytest.raises(openai.NotFoundError):
            await client.images.generate(model="dall-e-3", prompt="x")
        await client.close()
    assert TINY_SD15_TXT2IMG in [model.id for model in models.data]
    assert inline.data is not None and len(inline.data) == 2
    images = [decode_png(base64.b64decode(item.b64_json or "")) for item in inline.data]
    assert all(image.shape == (64, 64, 3) for image in images)
    assert not (images[0] == images[1]).all()  # seeds 11 and 12
    assert (decode_png(fetched.content) == images[0]).all()  # same seed, same image
    assert refused.value.body is not None and "size" in str(refused.value.body)
