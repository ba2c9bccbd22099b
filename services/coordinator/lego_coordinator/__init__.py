"""The coordinator: per-request DAG state, batching, placement; its scheduler is a pure core."""

from pathlib import Path

from lego import native

if native.requested():  # the core compiled with mypyc (scripts/build-native)
    native.prefer_native(__path__, __name__, Path(__file__).parent)
