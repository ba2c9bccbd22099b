"""What the gateway accepts before a request reaches the coordinator (which then checks each input
against the workflow's own limits). Every refusal names the field, the limit and the value."""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

import PIL.Image
from lego.errors import InvalidRequest
from lego.values import Scalar

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
MIN_IMAGE_SIDE = 8  # one latent cell of the VAE


@dataclass(frozen=True)
class GatewayLimits:
    max_prompt_chars: int = 4000
    max_side: int = 4096  # height, width (the workflow may allow less)
    max_steps: int = 500
    max_images: int = 8  # `n` of one OpenAI images call
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096


def is_image_input(name: str) -> bool:
    return name == "image" or name.startswith("image_") or name.endswith("_image")


INT64 = 2**63


def check_inputs(inputs: dict[str, Scalar], limits: GatewayLimits) -> None:
    for name, value in inputs.items():
        if isinstance(value, int) and not -INT64 <= value < INT64:
            raise InvalidRequest(name, f"{name} must fit in 64 bits, got {str(value)[:40]}")
        if isinstance(value, str) and "prompt" in name and len(value) > limits.max_prompt_chars:
            raise InvalidRequest(
                name, f"{name} must be at most {limits.max_prompt_chars} characters, got {len(value)}"
            )
        if name in ("height", "width") and isinstance(value, int) and value > limits.max_side:
            raise InvalidRequest(name, f"{name} must be ≤ {limits.max_side}, got {value}")
        if name == "steps" and isinstance(value, int) and value > limits.max_steps:
            raise InvalidRequest(name, f"steps must be ≤ {limits.max_steps}, got {value}")
        if is_image_input(name):
            check_image(name, value, limits)


def check_image(name: str, value: Scalar, limits: GatewayLimits) -> None:
    """Images come inline as `data:image/...;base64,...`: never as paths, which would name files on
    the workers' machines."""
    if not isinstance(value, str) or not value.startswith("data:") or "," not in value:
        raise InvalidRequest(
            name, f"{name} must be a data URI (data:image/png;base64,...), got {_show(value)}"
        )
    header, _, payload = value.partition(",")
    if not header.endswith(";base64"):
        raise InvalidRequest(name, f"{name} must be base64-encoded (data:image/png;base64,...)")
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error as error:
        raise InvalidRequest(name, f"{name} is not valid base64 ({error})") from None
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            image_format, (width, height) = image.format, image.size
            image.verify()
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise InvalidRequest(name, f"{name} is not a readable image ({error})") from None
    if image_format not in IMAGE_FORMATS:
        raise InvalidRequest(name, f"{name} must be one of {', '.join(IMAGE_FORMATS)}, got {image_format}")
    if name != "control_image" and min(width, height) < MIN_IMAGE_SIDE:  # control images are resized
        raise InvalidRequest(
            name, f"{name} must be at least {MIN_IMAGE_SIDE} pixels on each side, got {width}x{height}"
        )
    if width * height > limits.max_image_pixels:
        raise InvalidRequest(
            name, f"{name} must have at most {limits.max_image_pixels} pixels, got {width}x{height}"
        )


def _show(value: Scalar) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
