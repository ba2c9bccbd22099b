"""docs/openapi.json is what the gateway serves at /openapi.json (regenerate: scripts/gen-openapi)."""

from __future__ import annotations

import json
from pathlib import Path

from lego_gateway.rest import openapi_document

COMMITTED = Path(__file__).parents[2] / "docs" / "openapi.json"


def test_the_committed_openapi_description_is_current() -> None:
    assert json.loads(COMMITTED.read_text()) == openapi_document(), "run scripts/gen-openapi"


def test_every_operation_is_described() -> None:
    paths = openapi_document()["paths"]
    for path in ("/v1/requests", "/v1/requests/{request_id}/events", "/v1/images/generations", "/v1/models"):
        assert path in paths
