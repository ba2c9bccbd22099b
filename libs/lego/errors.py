"""Errors users see: each names the field and the limit."""

from __future__ import annotations

from urllib.parse import quote, unquote


class InvalidRequest(ValueError):
    """A request (or workflow) that cannot be served as given; maps to INVALID_ARGUMENT / HTTP 400."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class StoreUnavailable(RuntimeError):
    """The cluster store cannot be reached."""


# gRPC trailing metadata naming the field an INVALID_ARGUMENT (or NOT_FOUND) is about.
FIELD_METADATA = "lego-field"


def field_metadata(field: str) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that names `field` (percent-encoded: metadata values are ASCII)."""
    return ((FIELD_METADATA, quote(field, safe="")),) if field else ()


def field_from_metadata(metadata: object) -> str:
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == FIELD_METADATA:
            return unquote(value if isinstance(value, str) else value.decode())
    return ""
