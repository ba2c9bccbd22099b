import numpy as np
import pytest
from lego import tensors


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "uint8", "bool"])
def test_round_trip_keeps_dtype_shape_and_bytes(dtype: str) -> None:
    array = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    handle = tensors.make_handle("r/n/out", array, "127.0.0.1:1")
    restored = tensors.from_bytes(handle, tensors.to_bytes(array))
    assert restored.dtype == array.dtype
    assert restored.shape == array.shape
    assert np.array_equal(restored, array)
    assert handle.nbytes == array.nbytes
    assert list(handle.locations) == ["127.0.0.1:1"]


def test_zero_dimensional_tensor() -> None:
    array = np.array(981, dtype=np.int64)
    handle = tensors.make_handle("t", array)
    assert list(handle.shape) == []
    assert tensors.from_bytes(handle, tensors.to_bytes(array)) == 981


def test_wrong_byte_count_is_rejected() -> None:
    array = np.zeros((2, 2), dtype=np.float32)
    handle = tensors.make_handle("t", array)
    with pytest.raises(ValueError, match="expected 16 bytes, got 12"):
        tensors.from_bytes(handle, b"\0" * 12)


def test_unsupported_dtype_is_named() -> None:
    with pytest.raises(TypeError, match="complex64"):
        tensors.make_handle("t", np.zeros(2, dtype=np.complex64))
