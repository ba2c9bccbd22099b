import pytest
from lego.device_cache import CacheFull, DeviceCache


def test_evicts_least_recently_used_idle_models_until_the_new_one_fits() -> None:
    cache = DeviceCache(budget_bytes=100)
    cache.admit("a", 40)
    cache.admit("b", 30)
    cache.admit("c", 20)
    cache.touch("a")  # order now b, c, a
    assert cache.plan_load("d", 45) == ["b", "c"]
    assert cache.plan_load("e", 10) == []
    assert cache.plan_load("a", 99) == []  # already resident


def test_models_with_work_in_flight_are_never_evicted() -> None:
    cache = DeviceCache(budget_bytes=100)
    cache.admit("busy", 60)
    cache.admit("idle", 30)
    cache.pin("busy")
    assert cache.plan_load("new", 40) == ["idle"]  # the older model is busy: it stays
    with pytest.raises(CacheFull, match="in use: \\['busy'\\]"):
        cache.plan_load("huge", 80)
    with pytest.raises(RuntimeError, match="work in flight"):
        cache.evict("busy")
    cache.unpin("busy")
    assert cache.plan_load("huge", 80) == ["busy", "idle"]


def test_a_model_larger_than_the_device_is_refused_with_numbers() -> None:
    cache = DeviceCache(budget_bytes=10)
    with pytest.raises(CacheFull, match="needs 11 bytes; the device budget is 10"):
        cache.plan_load("x", 11)


def test_used_bytes_and_order() -> None:
    cache = DeviceCache(budget_bytes=100)
    cache.admit("a", 10)
    cache.admit("b", 20)
    cache.evict("a")
    assert cache.used_bytes == 20
    assert cache.resident() == ["b"]


def test_activation_room_is_reserved_once_for_the_largest_workspace() -> None:
    # weights add up; one call runs at a time, so only the largest workspace is kept free
    cache = DeviceCache(budget_bytes=100)
    cache.admit("transformer", 40, workspace=10)
    cache.admit("vae", 5, workspace=30)
    assert cache.used_bytes == 40 + 5 + 30
    assert cache.plan_load("encoder", 20, workspace=5) == []  # 65 of weights + 30 of room
    assert cache.plan_load("controlnet", 30, workspace=5) == ["transformer"]  # 75 + 30 would not fit
    assert cache.plan_load("big", 30, workspace=40) == ["transformer"]  # 35 + 40: its room replaces the vae's
