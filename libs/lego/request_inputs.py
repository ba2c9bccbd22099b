"""Validating a request's inputs against a workflow's declared inputs (pure)."""

from __future__ import annotations

import math

from lego.errors import InvalidRequest
from lego.v1 import compiler_pb2
from lego.values import Scalar, from_value

_PYTHON_TYPES: dict[int, tuple[type, ...]] = {
    compiler_pb2.VALUE_TYPE_STRING: (str,),
    compiler_pb2.VALUE_TYPE_INT: (int,),
    compiler_pb2.VALUE_TYPE_FLOAT: (float, int),
    compiler_pb2.VALUE_TYPE_BOOL: (bool,),
}
_TYPE_NAMES = {
    compiler_pb2.VALUE_TYPE_STRING: "a string",
    compiler_pb2.VALUE_TYPE_INT: "an integer",
    compiler_pb2.VALUE_TYPE_FLOAT: "a number",
    compiler_pb2.VALUE_TYPE_BOOL: "a boolean",
}


INT64 = (-(2**63), 2**63 - 1)  # what a request input can carry (lego.v1.Value.int_value)


def _show(value: Scalar) -> str:
    """A value as an error message shows it: short (a message must not echo a megabyte back)."""
    if isinstance(value, int) and not isinstance(value, bool) and not INT64[0] <= value <= INT64[1]:
        return "an integer outside the 64-bit range"  # repr() of a huge int may even raise
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _describe_limits(spec: compiler_pb2.InputSpec) -> str:
    parts = [_TYPE_NAMES.get(spec.type, "a value")]
    if spec.multiple_of:
        parts.append(f"a multiple of {spec.multiple_of}")
    if spec.HasField("minimum"):
        parts.append(f"{'>' if spec.exclusive_minimum else '≥'} {_format_number(spec.minimum)}")
    if spec.HasField("maximum"):
        parts.append(f"≤ {_format_number(spec.maximum)}")
    return " and ".join(parts)


def _check_number(spec: compiler_pb2.InputSpec, value: float) -> None:
    valid = math.isfinite(value)
    if valid:  # NaN and infinities compare false, and int() of them raises: checked first
        too_low = spec.HasField("minimum") and (
            value <= spec.minimum if spec.exclusive_minimum else value < spec.minimum
        )
        too_high = spec.HasField("maximum") and value > spec.maximum
        not_multiple = bool(spec.multiple_of) and value % spec.multiple_of != 0
        valid = not (too_low or too_high or not_multiple)
    if not valid:
        raise InvalidRequest(spec.name, f"{spec.name} must be {_describe_limits(spec)}, got {_show(value)}")


def _check_string(spec: compiler_pb2.InputSpec, value: str) -> None:
    if len(value.strip()) < spec.min_length:
        what = "must not be empty" if spec.min_length == 1 else f"needs ≥ {spec.min_length} characters"
        raise InvalidRequest(spec.name, f"{spec.name} {what}")
    if spec.max_length and len(value) > spec.max_length:
        raise InvalidRequest(
            spec.name, f"{spec.name} must be ≤ {spec.max_length} characters, got {len(value)}"
        )


def resolve_inputs(workflow: compiler_pb2.WorkflowSpec, given: dict[str, Scalar]) -> dict[str, Scalar]:
    """The request's inputs with defaults filled in; raises InvalidRequest naming the field."""
    declared = {spec.name: spec for spec in workflow.inputs}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        shown = unknown[0][:100]  # the name is the caller's: never echo a megabyte back
        raise InvalidRequest(
            shown, f"unknown input {shown!r} for workflow {workflow.name} (inputs: {sorted(declared)})"
        )
    resolved: dict[str, Scalar] = {}
    for name, spec in declared.items():
        if name in given:
            value = given[name]
        elif spec.HasField("default_value"):
            default = from_value(spec.default_value)
            if not isinstance(default, str | int | float | bool):  # validation refuses such templates
                raise InvalidRequest(name, f"{name}: the workflow's default is not a scalar value")
            value = default
        else:
            raise InvalidRequest(name, f"{name} is required")
        allowed = _PYTHON_TYPES.get(spec.type, ())
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise InvalidRequest(
                name, f"{name} must be {_TYPE_NAMES.get(spec.type, 'a valid value')}, got {_show(value)}"
            )
        if isinstance(value, int) and not isinstance(value, bool) and not INT64[0] <= value <= INT64[1]:
            # float() and math.isfinite() of a huge int raise; a request's ints are 64-bit
            raise InvalidRequest(name, f"{name} must be {_describe_limits(spec)}, got {_show(value)}")
        if spec.type == compiler_pb2.VALUE_TYPE_FLOAT:
            value = float(value)
        if isinstance(value, str):
            _check_string(spec, value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            _check_number(spec, value)
        resolved[name] = value
    return resolved
