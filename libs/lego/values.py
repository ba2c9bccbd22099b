"""Python scalars ↔ `lego.v1.Value`."""

from __future__ import annotations

from lego.v1 import common_pb2

Scalar = str | int | float | bool


def to_value(value: Scalar) -> common_pb2.Value:
    if isinstance(value, bool):
        return common_pb2.Value(bool_value=value)
    if isinstance(value, int):
        return common_pb2.Value(int_value=value)
    if isinstance(value, float):
        return common_pb2.Value(float_value=value)
    if isinstance(value, str):
        return common_pb2.Value(string_value=value)
    raise TypeError(f"cannot send a value of type {type(value).__name__}")


def from_value(value: common_pb2.Value) -> Scalar | common_pb2.TensorHandle | None:
    kind = value.WhichOneof("kind")
    if kind is None:
        return None
    result: Scalar | common_pb2.TensorHandle = getattr(value, kind)
    return result


def to_values(values: dict[str, Scalar]) -> dict[str, common_pb2.Value]:
    return {name: to_value(v) for name, v in values.items()}
