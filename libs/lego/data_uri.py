"""Images carried in requests: a `data:` URI with base64 PNG/JPEG bytes, or a local path. Apart from
the worker's image operators (lego_worker.images) so that clients building requests import no torch."""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

import numpy as np
import PIL.Image


def decode_image(value: str) -> PIL.Image.Image:
    """A request's image: `data:image/png;base64,...` or a path to a file on the worker."""
    if value.startswith("data:"):
        _, _, payload = value.partition(",")
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error as error:
            raise ValueError(f"image: malformed base64 data URI ({error})") from None
        source: io.BytesIO | Path = io.BytesIO(data)
    else:
        source = Path(value)
        if not source.is_file():
            raise ValueError(f"image: {value[:80]!r} is neither a data: URI nor an existing file")
    with PIL.Image.open(source) as image:
        return image.convert("RGB")


def encode_data_uri(pixels: np.ndarray) -> str:
    """uint8 (H, W, 3) pixels as a PNG data URI (for requests and tests)."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
