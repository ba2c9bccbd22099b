"""Errors users see: each names the field and the limit."""

from __future__ import annotations


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
