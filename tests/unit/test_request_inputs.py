import pytest
from lego.builtin_workflows import sd15_txt2img
from lego.errors import InvalidRequest
from lego.request_inputs import resolve_inputs

SPEC = sd15_txt2img("wf", "tiny-sd15", default_size=128)


def test_defaults_are_filled_in() -> None:
    resolved = resolve_inputs(SPEC, {"prompt": "a cat"})
    assert resolved == {
        "prompt": "a cat",
        "negative_prompt": "",
        "steps": 20,
        "guidance_scale": 7.5,
        "seed": 0,
        "height": 128,
        "width": 128,
    }


def test_integer_guidance_becomes_float() -> None:
    assert resolve_inputs(SPEC, {"prompt": "x", "guidance_scale": 3})["guidance_scale"] == 3.0


@pytest.mark.parametrize(
    ("inputs", "field", "message"),
    [
        ({"prompt": ""}, "prompt", "prompt must not be empty"),
        ({"prompt": "   "}, "prompt", "prompt must not be empty"),
        ({}, "prompt", "prompt is required"),
        (
            {"prompt": "x", "height": 3000},
            "height",
            "height must be an integer and a multiple of 8 and ≥ 8 and ≤ 2048, got 3000",
        ),
        ({"prompt": "x", "width": 100}, "width", "multiple of 8"),
        ({"prompt": "x", "steps": 0}, "steps", "steps must be an integer and ≥ 1 and ≤ 200, got 0"),
        ({"prompt": "x", "steps": 201}, "steps", "≤ 200, got 201"),
        ({"prompt": "x", "guidance_scale": -1.0}, "guidance_scale", "≥ 0"),
        ({"prompt": "x", "guidance_scale": float("nan")}, "guidance_scale", "got nan"),
        ({"prompt": "x", "steps": "ten"}, "steps", "steps must be an integer, got 'ten'"),
        ({"prompt": "x", "steps": True}, "steps", "must be an integer"),
        ({"prompt": "x", "colour": "red"}, "colour", "unknown input 'colour'"),
        ({"prompt": "x" * 2001}, "prompt", "≤ 2000 characters, got 2001"),
    ],
)
def test_bad_inputs_name_the_field_and_the_limit(inputs: dict, field: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        resolve_inputs(SPEC, inputs)
    assert caught.value.field == field
    assert message in caught.value.message
